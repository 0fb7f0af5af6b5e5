"""The shared base config: every variant config starts from this one and changes only what the variant needs."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Base hyper-parameters for a U-Net trained on DSB2018 (256² crops, base width 32)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.variant = "unet_boundary"  # a name in nucjax.variants.VARIANTS
    config.precision = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)

    config.data = ml_collections.ConfigDict()
    config.data.name = "dsb2018"  # dsb2018 | nuclei_folder | synthetic_nuclei
    config.data.data_dir = ""  # where prepared datasets live ("" = $NUCJAX_DATA_DIR or ~/.cache/nucjax/datasets)
    config.data.manual_dir = ""  # raw data ("" = $NUCJAX_DSB2018_DIR for dsb2018)
    config.data.builder_kwargs = ml_collections.ConfigDict()  # passed to the builder config
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.crop_size = 256
    config.data.num_workers = 0  # grain worker processes (0 = in the main process)
    config.data.prefetch = 2
    config.data.cache_mb = 1024.0  # decoded training examples kept per process or grain worker (0 = none)
    config.data.grey = False  # stain robustness: feed the grey level to all three channels
    config.data.invert_bright = False  # stain robustness: invert images whose background is bright
    config.data.input_scale = 1.0  # images are magnified by this before the network, in training and prediction

    config.data.augment = ml_collections.ConfigDict()
    config.data.augment.nuclei_crop_prob = 0.5  # chance a crop is centred on a nucleus
    config.data.augment.flip = True
    config.data.augment.rot90 = True
    config.data.augment.scale_range = (0.8, 1.25)
    config.data.augment.brightness = 0.1
    config.data.augment.contrast = 0.2
    config.data.augment.gamma = 0.2
    config.data.augment.noise_std = 0.02
    config.data.augment.grey_prob = 0.1
    config.data.augment.invert_prob = 0.0

    config.targets = ml_collections.ConfigDict()
    config.targets.boundary_width = 2
    config.targets.w0 = 10.0
    config.targets.sigma = 5.0
    config.targets.max_instances = 256
    config.targets.mask_size = 28

    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"
    config.model.base_width = 32
    config.model.depth = 4
    config.model.norm = "group"  # group | batch | none
    config.model.groups = 8
    config.model.activation = "relu"
    config.model.upsample = "dense"  # dense (per-pixel Dense + depth-to-space) | transpose | resize
    config.model.dropout = 0.0

    config.loss = ml_collections.ConfigDict()
    config.loss.dice_weight = 1.0
    config.loss.use_weight_map = False
    config.loss.class_weights = (1.0, 1.0, 3.0)  # 3-class: background, interior, boundary
    config.loss.boundary_weight = 1.0  # unet_boundary: weight of the boundary channel's loss

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.optim.weight_decay = 1e-4
    config.optim.clip_norm = 1.0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 8  # global, over all devices and processes
    config.train.steps = 10_000
    config.train.log_every = 50
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 3
    config.train.best_metric = "dsb2018_score"
    config.train.eval_max_images = 0  # 0 = the whole validation split

    # Every post-processor's parameters (nucjax.postprocess); each reads its own. `evaluate --tune` searches them.
    config.postprocess = ml_collections.ConfigDict()
    config.postprocess.threshold = 0.5  # foreground (a detector: mask) probability
    config.postprocess.boundary_threshold = 0.5
    config.postprocess.interior_threshold = 0.5
    config.postprocess.min_size = 15  # objects smaller than this (pixels) are removed
    config.postprocess.seed_min_size = 5
    config.postprocess.fill_holes = True
    config.postprocess.min_score = 0.0  # detectors: detections scoring below are dropped (beyond model.score_threshold)
    config.postprocess.min_visible = 0.5  # detectors: one left with less than this part of its mask is dropped

    config.predict = ml_collections.ConfigDict()
    config.predict.tile_size = 512
    config.predict.tile_overlap = 64
    config.predict.tile_batch = 4
    config.predict.tta = False  # 8 flips and quarter turns (8x slower): maps averaged, or detections fused
    config.lock()  # a misspelt key in a config file fails at once instead of being silently added
    return config
