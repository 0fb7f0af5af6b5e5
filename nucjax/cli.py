"""Command-line options shared by `nucjax.predict` and `nucjax.evaluate --checkpoint`: which checkpoint step, and how
its Predictor runs (tiles, test-time augmentation, input scale). Light: no JAX import, so `--help` stays quick."""

from __future__ import annotations

import argparse
from typing import Any


def step(text: str) -> int | str:
    """argparse type of --step: best, latest or a step number."""
    if text in ("best", "latest"):
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: expected best, latest or a step number")


def positive(text: str) -> float:
    """argparse type of a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0")
    return value


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """--tile-size, --tile-overlap, --tta and --input-scale: each overrides the checkpoint's own setting."""
    group = parser.add_argument_group("prediction", "how the checkpoint's network runs (default: as in its config)")
    group.add_argument("--tile-size", type=int, metavar="N", help="tile size (default: the checkpoint's)")
    group.add_argument("--tile-overlap", type=int, metavar="N", help="tile overlap (default: the checkpoint's)")
    group.add_argument("--tta", action="store_true",
                       help="test-time augmentation: the 8 flips/rotations, maps averaged or detections fused "
                            "(8x slower)")
    group.add_argument("--input-scale", type=positive, metavar="S",
                       help="magnify images S times before the network (default: the checkpoint's data.input_scale); "
                            "2 for images whose nuclei are half as wide as in the training images")


def prediction_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `checkpoint.load` given by `add_prediction_arguments`' options (None: the config's)."""
    return {"tile_size": args.tile_size, "tile_overlap": args.tile_overlap, "tta": True if args.tta else None,
            "input_scale": args.input_scale}
