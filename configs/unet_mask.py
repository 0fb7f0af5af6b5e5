"""U-Net learning the nucleus mask alone; instances by threshold + connected components."""

import pathlib

from nucjax.config import load_config


def get_config():
    config = load_config(pathlib.Path(__file__).with_name("default.py"))
    config.variant = "unet_mask"
    return config
