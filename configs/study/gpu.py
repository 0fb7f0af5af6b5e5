"""The `gpu` study budget: the full recipe (256² crops, base width 32, bfloat16) for every variant × 3 seeds within
25 minutes of one H100. Starts from `cpu.py` and changes the recipe and the schedule."""

import pathlib

from nucjax.config import load_config


def get_config():
    """256² crops, a width-32 depth-4 U-Net in bfloat16, 1500 steps of 16 crops, 5 input workers per run."""
    c = load_config(pathlib.Path(__file__).with_name("cpu.py"))
    c.overrides = (
        "data.builder_kwargs.holdout_fraction=0.1",
        "data.crop_size=256",
        "data.num_workers=5",  # x 3 seeds side by side on a 16-core GPU machine (benchmarks/gpu.sh)
        "precision=bfloat16",
        "train.batch_size=16",
        "train.steps=1500",
        "optim.warmup_steps=100",
        "train.log_every=50",
        "train.eval_every=500",
        "train.checkpoint_every=500",
        "train.eval_max_images=32",
        "predict.tile_size=512",
        "predict.tile_overlap=64",
        "predict.tile_batch=8",
    )
    c.variant_overrides = {
        "unet_*": ("model.base_width=32", "model.depth=4"),
        "maskrcnn": ("train.batch_size=8",),
    }
    c.classical_tune_images = 96
    return c
