"""U-Net learning the mask and the nucleus boundaries in parallel; instances by marker watershed."""

import pathlib

from nucjax.config import load_config


def get_config():
    config = load_config(pathlib.Path(__file__).with_name("default.py"))
    config.variant = "unet_boundary"
    return config
