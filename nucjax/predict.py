"""python -m nucjax.predict: a checkpoint on new images -> label images, outlined overlays, measurement tables, RLE.

The per-image steps (`find_inputs`, `plan_outputs`, `overlay`, `measure`, `write_outputs`, `predict_files`) are usable
from scripts; `main` is the command line. As one of several processes (`nucjax.distributed`), each segments its
share of the inputs into the same output folder, and process 0 writes the RLE CSV and the summary.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image
from skimage.color import hsv2rgb
from skimage.measure import regionprops_table
from skimage.segmentation import find_boundaries
from tqdm import tqdm

from nucjax import checkpoint, cli, distributed
from nucjax.data import io
from nucjax.data.pipeline import normalize_image
from nucjax.inference import Predictor

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
"""File types found in folders and globs given as inputs."""
FORMATS = ("tif", "png", "npy")
TABLE_PROPERTIES = ("label", "area", "centroid", "bbox", "equivalent_diameter_area", "eccentricity", "solidity",
                    "intensity_mean")
"""`skimage.measure.regionprops_table` properties of the --table CSV (columns named as regionprops_table names them)."""
_GOLDEN = 0.618033988749895
_LISTED = 5


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    """Where the outputs of one input image go (None: not asked for)."""

    image: pathlib.Path
    labels: pathlib.Path
    overlay: pathlib.Path | None
    table: pathlib.Path | None

    def files(self) -> list[pathlib.Path]:
        """The output files asked for."""
        return [p for p in (self.labels, self.overlay, self.table) if p is not None]


def find_inputs(patterns: Sequence[str]) -> list[pathlib.Path]:
    """Input files from paths, globs and folders (a folder's PNG/TIFF/JPEG files, sorted), in order, each once.

    A named file is kept even if missing or unreadable (it is reported when read); a glob or folder with no image
    raises ValueError naming it.
    """
    found: dict[pathlib.Path, None] = {}
    for pattern in patterns:
        path = pathlib.Path(pattern)
        if glob.has_magic(pattern):
            matches = [pathlib.Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
            files = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files = [path]
        if not files:
            raise ValueError(f"{pattern}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images found")
        for file in files:
            found.setdefault(file, None)
    return list(found)


def plan_outputs(inputs: Sequence[pathlib.Path], output_dir: str | pathlib.Path, *, fmt: str = "tif",
                 overlay: bool = False, table: bool = False) -> list[OutputPaths]:
    """Output files per input, named by the input's stem: <stem>.<fmt>, <stem>_overlay.png, <stem>.csv.

    Raises ValueError when `fmt` is unknown or two inputs share a stem (their outputs would collide).
    """
    if fmt not in FORMATS:
        raise ValueError(f"label format {fmt!r} is not one of {FORMATS}")
    output_dir = pathlib.Path(output_dir)
    by_stem: dict[str, pathlib.Path] = {}
    plans = []
    for path in inputs:
        if path.stem in by_stem:
            raise ValueError(f"{by_stem[path.stem]} and {path} have the same name {path.stem!r}, so their outputs "
                             f"in {output_dir} would collide; predict them into different output folders")
        by_stem[path.stem] = path
        plans.append(OutputPaths(
            image=path,
            labels=output_dir / f"{path.stem}.{fmt}",
            overlay=output_dir / f"{path.stem}_overlay.png" if overlay else None,
            table=output_dir / f"{path.stem}.csv" if table else None,
        ))
    return plans


def check_not_written(paths: Sequence[pathlib.Path]) -> None:
    """Raises FileExistsError naming the files of `paths` that already exist (pass --overwrite to replace them)."""
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        more = f" and {len(existing) - _LISTED} more" if len(existing) > _LISTED else ""
        raise FileExistsError(f"{', '.join(existing[:_LISTED])}{more} already exist(s); pass --overwrite to replace")


def label_colours(n: int) -> np.ndarray:
    """uint8[n + 1, 3]: row k is nucleus k's outline colour (hues spaced by the golden ratio; row 0 black)."""
    hues = (np.arange(n + 1) * _GOLDEN) % 1.0
    hsv = np.stack([hues, np.full(n + 1, 0.85), np.ones(n + 1)], axis=-1)
    colours = np.round(hsv2rgb(hsv[None])[0] * 255).astype(np.uint8)
    colours[0] = 0
    return colours


def display_image(image: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] for viewing an image [H, W] or [H, W, C]: the training normalisation, clipped to [0, 1]."""
    return np.round(np.clip(normalize_image(image), 0.0, 1.0) * 255).astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3]: `display_image(image)` with each nucleus of labels int32[H, W] outlined in its own colour.

    The outline is the nucleus's own pixels with a 4-neighbour (inside the image) of another id or background.
    """
    labels = np.asarray(labels)
    if labels.shape != np.shape(image)[:2]:
        raise ValueError(f"labels of shape {labels.shape} do not match the image of shape {np.shape(image)}")
    out = display_image(image)
    edge = find_boundaries(labels, connectivity=1, mode="inner")
    out[edge] = label_colours(int(labels.max(initial=0)))[labels[edge]]
    return out


def measure(labels: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """Per-nucleus measurements of labels int32[H, W] on the raw image [H, W] or [H, W, C]: TABLE_PROPERTIES,
    one array per column (`centroid-0` is the row; colour images give `intensity_mean-0..C-1`)."""
    image = np.asarray(image)
    if np.shape(labels) != image.shape[:2]:
        raise ValueError(f"labels of shape {np.shape(labels)} do not match the image of shape {image.shape}")
    return regionprops_table(np.asarray(labels), intensity_image=image, properties=TABLE_PROPERTIES)


def write_table(path: str | pathlib.Path, table: dict[str, np.ndarray]) -> None:
    """Writes columns {name: array[N]} as a CSV with a header row, one row per nucleus."""
    columns = list(table)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(zip(*(np.asarray(table[c]).tolist() for c in columns)))


def write_outputs(image: np.ndarray, labels: np.ndarray, paths: OutputPaths) -> None:
    """Writes the label image, and the overlay PNG and table CSV where `paths` asks for them."""
    io.write_labels(paths.labels, labels)
    if paths.overlay is not None:
        Image.fromarray(overlay(image, labels)).save(paths.overlay, format="PNG")
    if paths.table is not None:
        write_table(paths.table, measure(labels, image))


def _one_line(error: Exception, path: pathlib.Path) -> str:
    text = " ".join(str(error).split())
    return text if text.startswith(str(path)) else f"{path}: {text}"


def predict_files(predictor: Predictor, plans: Sequence[OutputPaths], *, rle: str | pathlib.Path | None = None,
                  progress: bool = True) -> list[pathlib.Path]:
    """Predicts and writes the outputs of each planned input, then the Kaggle RLE CSV of all of them if `rle`.

    An input that cannot be read or written is reported on stderr (one line naming it) and skipped; returns those.
    With several processes each handles inputs k, k + N, ...; the failures and the RLE rows are gathered, and
    process 0 writes the CSV.
    """
    import jax

    failed = []
    rle_labels: dict[str, np.ndarray] = {}
    mine = [plans[i] for i in distributed.shard(len(plans))]
    for paths in tqdm(mine, desc="predict", unit="img", disable=not progress or jax.process_index() > 0,
                      file=sys.stderr):
        try:
            image = io.read_image(paths.image)
            labels = predictor.predict(image)
            paths.labels.parent.mkdir(parents=True, exist_ok=True)
            write_outputs(image, labels, paths)
        except (ValueError, OSError) as e:  # io.ReadError, an image the predictor refuses, an unwritable file
            tqdm.write(f"error: {_one_line(e, paths.image)} (skipped)", file=sys.stderr)
            failed.append(paths.image)
            continue
        if rle is not None:
            rle_labels[paths.image.stem] = labels
    if distributed.is_multiprocess():
        gathered = distributed.gather((failed, rle_labels))
        failed = [path for part, _ in gathered for path in part]
        rle_labels = {stem: labels for _, part in gathered for stem, labels in part.items()}
        order = {paths.image.stem: i for i, paths in enumerate(plans)}
        rle_labels = dict(sorted(rle_labels.items(), key=lambda item: order[item[0]]))
    if rle is not None and jax.process_index() == 0:
        io.write_rle_csv(rle_labels, rle, with_size=False)
    return failed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nucjax.predict",
        description="Segment nuclei in images with a trained nucjax checkpoint: one label image per input "
        "(0 = background, 1..N = nuclei), optionally an outlined overlay, a measurement table and a Kaggle RLE CSV.",
    )
    parser.add_argument("--checkpoint", required=True, type=pathlib.Path, metavar="DIR",
                        help="a training workdir, or a checkpoint inside one")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="image files, globs or folders of PNG/TIFF/JPEG images")
    parser.add_argument("--output", required=True, type=pathlib.Path, metavar="DIR", help="folder for the outputs")
    parser.add_argument("--step", type=cli.step, default="best", help="best (default), latest or a step number")
    parser.add_argument("--format", choices=FORMATS, default="tif",
                        help="label image format: tif (32-bit, default; Fiji/napari open it as labels), png, npy")
    parser.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png with outlined nuclei")
    parser.add_argument("--table", action="store_true", help="also write <name>.csv of per-nucleus measurements")
    parser.add_argument("--rle", type=pathlib.Path, metavar="FILE", help="also write a Kaggle submission CSV (ImageId,EncodedPixels)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    cli.add_prediction_arguments(parser)
    distributed.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 if an input failed or nothing could be done)."""
    args = _parser().parse_args(argv)
    if not distributed.initialize_from_args(args):
        return 2

    def work() -> int:
        import jax

        plans = plan_outputs(find_inputs(args.input), args.output, fmt=args.format, overlay=args.overlay,
                             table=args.table)
        if not args.overwrite:
            check_not_written([f for p in plans for f in p.files()] + ([args.rle] if args.rle else []))
        distributed.barrier("nucjax: outputs checked")  # no process writes before every process has checked
        predictor = checkpoint.load(args.checkpoint, step=args.step, **cli.prediction_options(args))
        failed = predict_files(predictor, plans, rle=args.rle)
        if jax.process_index() == 0:
            print(f"{len(plans) - len(failed)} of {len(plans)} images segmented into {args.output}", file=sys.stderr)
        return 1 if failed else 0

    # bad inputs or checkpoint (CheckpointError), existing outputs, unwritable
    return distributed.run(work, expected=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
