"""The embedded default (`make demo`): unet_boundary on synthetic nuclei, small enough to train in minutes on 2 CPU cores."""

import pathlib

from nucjax.config import load_config


def get_config():
    config = load_config(pathlib.Path(__file__).with_name("default.py"))
    config.variant = "unet_boundary"
    config.data.name = "synthetic_nuclei"
    config.data.crop_size = 128
    config.model.base_width = 16
    config.model.depth = 3
    config.train.batch_size = 8
    config.train.steps = 400
    config.train.log_every = 50
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 50
    config.predict.tile_size = 512
    return config
