"""U-Net with a softmax over background / interior / boundary; instances grown from interior seeds."""

import pathlib

from nucjax.config import load_config


def get_config():
    config = load_config(pathlib.Path(__file__).with_name("default.py"))
    config.variant = "unet_3class"
    return config
