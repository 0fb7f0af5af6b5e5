"""The `cpu` study budget: every U-Net variant × 3 seeds on DSB2018 in at most 4 hours of a 2-core CPU.

A budget holds the overrides applied to every `configs/<variant>.py`, the seeds, the splits, and the extra settings
of the study; copy this file to add a budget (`python -m experiments.study --budget NAME`). See experiments/README.md.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """128² crops, a width-16 depth-4 U-Net, 1200 steps of 8 crops: see experiments/README.md for the timing."""
    c = ml_collections.ConfigDict()
    c.variants = ()  # () = every registered variant (an unregistered maskrcnn is skipped)
    c.seeds = (0, 1, 2)
    c.baseline = "unet_mask"  # paired differences are taken against this method
    c.eval_split = "holdout"  # held apart from train and validation (by id hash, stratified by modality)
    c.tune_split = "validation"  # post-processing is tuned here (checkpoint selection uses it too)
    c.tune_images = 0  # 0 = every image of tune_split
    # Applied to each variant's config, in order (the same syntax as --config.key=value).
    c.overrides = (
        "data.builder_kwargs.holdout_fraction=0.1",
        "data.crop_size=128",
        "train.batch_size=8",
        "train.steps=1200",
        "optim.warmup_steps=50",
        "train.log_every=25",
        "train.eval_every=300",
        "train.checkpoint_every=300",
        "train.eval_max_images=24",
        "predict.tile_size=512",
        "predict.tile_overlap=64",
    )
    # Extra overrides of some variants, applied after `overrides`: a key is a variant's name or a pattern (`unet_*`);
    # the model section differs between families, so its keys go here.
    c.variant_overrides = ml_collections.ConfigDict({
        "unet_*": ("model.base_width=16", "model.depth=4"),
        "maskrcnn": ("train.batch_size=4",),  # a smaller Mask R-CNN entry: configs/maskrcnn.py's CPU-sized model
    })
    c.classical = ("otsu", "local_watershed")
    c.classical_tune_images = 48  # training images the classical baselines are tuned on
    # Stain robustness: named sets of overrides; `chosen` is applied to every variant of the main runs, and
    # `python -m experiments.study --stain` trains `variant` with each setting to measure the choice.
    c.stain = ml_collections.ConfigDict()
    c.stain.settings = ml_collections.ConfigDict({
        "colour": (),
        "grey": ("data.grey=True",),
        "grey_invert": ("data.grey=True", "data.invert_bright=True"),
        "colour_augment": ("data.augment.grey_prob=0.5", "data.augment.invert_prob=0.5"),
    })
    c.stain.chosen = "colour"
    c.stain.variant = "unet_mask"
    c.stain.seeds = (0,)
    c.panel = ml_collections.ConfigDict()
    c.panel.crops = 4  # held-apart images with the most touching pairs
    c.panel.size = 128  # crop size in pixels
    c.bootstrap_samples = 10_000
    return c
