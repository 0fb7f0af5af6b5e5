"""python -m nucjax.evaluate: instance metrics of predicted label images against ground truth, or of a checkpoint.

Two modes: `--gt PATH --pred PATH`, each side a folder of label images, a Kaggle-layout folder (<id>/masks/*.png)
or a Kaggle RLE CSV; and `--checkpoint DIR --split NAME`, which runs the checkpoint's Predictor on a split (also as
one of several processes: each predicts its share of the images, process 0 prints and writes the results).
"""

import argparse
import csv
import json
import multiprocessing
import pathlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from nucjax import cli, metrics
from nucjax.data import io

Source = pathlib.Path | np.ndarray | None
"""One image of one side: a label file, a Kaggle <id> folder, labels decoded from a CSV, or None (missing)."""

_LISTED_NAMES = 20


def _load(source: Source) -> np.ndarray | None:
    """int32[H, W] labels of a source (None stays None)."""
    if source is None or isinstance(source, np.ndarray):
        return source
    if source.is_dir():
        image = source / "images" / f"{source.name}.png"
        return io.read_mask_folder(source / "masks", image_path=image if image.is_file() else None)[0]
    return io.read_labels(source)


def _shape(source: pathlib.Path | np.ndarray) -> tuple[int, int]:
    """(H, W) of a source, from file headers where possible."""
    if isinstance(source, np.ndarray):
        return source.shape
    if source.is_dir():
        image = source / "images" / f"{source.name}.png"
        return io.read_shape(image if image.is_file() else source / "masks")
    return io.read_shape(source)


class _ShapesOf(Mapping):
    """{name: (H, W)} of the other side's images, read only when a CSV without Height/Width asks."""

    def __init__(self, sources: Mapping[str, Source]):
        self._sources = sources

    def __getitem__(self, name: str) -> tuple[int, int]:
        return _shape(self._sources[name])

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def _folder_sources(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """{name: source} of a folder of label images (paired by stem) or of a Kaggle-layout folder."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file() and p.suffix.lower() in io.LABEL_SUFFIXES]
    kaggle = [p for p in entries if (p / "masks").is_dir()]
    if files and kaggle:
        raise io.ReadError(f"{folder}: holds both label files and <id>/masks/ folders; keep one form per folder")
    if kaggle:
        return {p.name: p for p in kaggle}
    if not files:
        raise io.ReadError(
            f"{folder}: no label images ({', '.join(io.LABEL_SUFFIXES)}) and no Kaggle <id>/masks/ folders"
        )
    sources: dict[str, pathlib.Path] = {}
    for file in files:
        if file.stem in sources:
            other = sources[file.stem].name
            raise io.ReadError(f"{folder}: two label images named {file.stem!r}: {other}, {file.name}")
        sources[file.stem] = file
    return sources


def _sources(path: pathlib.Path, other: Mapping[str, Source]) -> dict[str, Source]:
    """{name: source} of one side; a CSV without Height/Width takes its sizes from the other side."""
    if path.is_file() and path.suffix.lower() == ".csv":
        return dict(io.read_rle_csv(path, _ShapesOf(other)))
    if path.is_dir():
        return dict(_folder_sources(path))
    if not path.exists():
        raise io.ReadError(f"{path}: no such file or folder")
    raise io.ReadError(f"{path}: not a folder of label images, a Kaggle-layout folder or a .csv file")


def _is_csv(path: pathlib.Path) -> bool:
    """Whether a side is given as an RLE CSV file."""
    return path.suffix.lower() == ".csv" and not path.is_dir()


def _name_list(names: Sequence[str]) -> str:
    """The first names of a list, and how many there are in all when it is long."""
    shown = ", ".join(names[:_LISTED_NAMES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _LISTED_NAMES else "")


def _pair(
    gt: pathlib.Path, pred: pathlib.Path, missing_as_empty: bool
) -> tuple[list[str], dict[str, Source], dict[str, Source]]:
    """(sorted names, gt sources, pred sources); a name on one side only is an error unless missing_as_empty."""
    if _is_csv(gt) and not _is_csv(pred):
        pred_sources = _sources(pred, {})
        gt_sources = _sources(gt, pred_sources)
    else:
        gt_sources = _sources(gt, {})
        pred_sources = _sources(pred, gt_sources)
    only_gt = sorted(set(gt_sources) - set(pred_sources))
    only_pred = sorted(set(pred_sources) - set(gt_sources))
    if (only_gt or only_pred) and not missing_as_empty:
        sides = (("gt", only_gt), ("pred", only_pred))
        parts = [f"only in --{side}: {_name_list(only)}" for side, only in sides if only]
        raise ValueError(
            f"{gt} and {pred} name different images ({'; '.join(parts)}); "
            "pass --missing-as-empty to score a missing image as empty"
        )
    names = sorted(set(gt_sources) | set(pred_sources))
    if not names:
        raise ValueError(f"no images to evaluate in {gt} and {pred}")
    return names, gt_sources, pred_sources


def _image_stats(task: tuple[str, Source, Source, tuple[float, ...], float]) -> metrics.ImageStats:
    """The ImageStats of one named image pair (a missing side is empty); runs in worker processes."""
    name, gt_source, pred_source, thresholds, error_iou = task
    gt, pred = _load(gt_source), _load(pred_source)
    gt = np.zeros_like(pred) if gt is None else gt
    pred = np.zeros_like(gt) if pred is None else pred
    return metrics.image_stats(gt, pred, thresholds=thresholds, error_iou=error_iou, name=name)


def evaluate_folders(
    gt: str | pathlib.Path,
    pred: str | pathlib.Path,
    *,
    thresholds: Sequence[float] = metrics.DEFAULT_THRESHOLDS,
    error_iou: float = 0.7,
    missing_as_empty: bool = False,
    workers: int = 0,
    progress: bool = True,
) -> metrics.Report:
    """The metrics Report of the label images at `pred` against those at `gt`, paired by name in sorted order.

    Each path is a folder of label images (.png/.tif/.tiff/.npy, paired by file stem), a Kaggle-layout folder
    (<id>/masks/*.png, optionally <id>/images/<id>.png for the size) or a Kaggle RLE CSV (sizes from its
    Height/Width columns, else from the other side; when both are CSVs, the ground truth's needs Height/Width).
    `workers` > 1 reads and scores images in that many processes. Unreadable files raise io.ReadError.
    """
    accumulator = metrics.Accumulator(thresholds, error_iou)
    names, gt_sources, pred_sources = _pair(pathlib.Path(gt), pathlib.Path(pred), missing_as_empty)
    tasks = [(n, gt_sources.get(n), pred_sources.get(n), accumulator.thresholds, accumulator.error_iou) for n in names]
    with tqdm(total=len(tasks), desc="evaluate", unit="image", file=sys.stderr, disable=not progress) as bar:
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            try:
                for stats in pool.map(_image_stats, tasks):
                    accumulator.add_stats(stats)
                    bar.update()
            finally:
                pool.shutdown(cancel_futures=True)
        else:
            for task in tasks:
                accumulator.add_stats(_image_stats(task))
                bar.update()
    return accumulator.report()


def _thresholds(text: str) -> tuple[float, ...]:
    """IoU thresholds from "start:stop:step" (stop included) or "a,b,c"."""
    try:
        if ":" not in text:
            return tuple(float(x) for x in text.split(","))
        start, stop, step = (float(x) for x in text.split(":"))
        if step <= 0 or stop < start:
            raise ValueError
        return tuple(round(start + i * step, 10) for i in range(int(round((stop - start) / step)) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected start:stop:step (e.g. 0.5:0.95:0.05) or a,b,c") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nucjax.evaluate",
        description="Score predicted instance label images against ground truth. PATH: a folder of label images "
        "(.png 8/16-bit, .tif/.tiff, .npy; paired by file stem), a Kaggle-layout folder (<id>/masks/*.png) or a "
        "Kaggle RLE CSV (ImageId,EncodedPixels[,Height,Width]).",
    )
    parser.add_argument("--gt", type=pathlib.Path, metavar="PATH", help="ground truth")
    parser.add_argument("--pred", type=pathlib.Path, metavar="PATH", help="predictions")
    parser.add_argument("--checkpoint", type=pathlib.Path, metavar="DIR",
                        help="a training workdir (or a checkpoint in it) to evaluate instead of --gt/--pred")
    parser.add_argument("--split", default="validation", help="with --checkpoint: the split (validation, test, holdout)")
    parser.add_argument("--step", type=cli.step, default="best",
                        help="with --checkpoint: best (default), latest or a step number")
    parser.add_argument("--tune", action="store_true",
                        help="with --checkpoint: first tune post-processing on the validation split (predicted with "
                             "the prediction options below) and store it beside the checkpoint")
    parser.add_argument("--limit", type=int, default=0, metavar="N", help="with --checkpoint: only the first N images")
    parser.add_argument("--report", type=pathlib.Path, metavar="DIR", help="with --checkpoint: also write PNG figures")
    parser.add_argument(
        "--thresholds",
        type=_thresholds,
        default=metrics.DEFAULT_THRESHOLDS,
        metavar="T",
        help="IoU thresholds, start:stop:step or a,b,c (default 0.5:0.95:0.05)",
    )
    parser.add_argument(
        "--error-iou", type=float, default=0.7, metavar="IOU", help="IoU for missed/extra objects (default 0.7)"
    )
    parser.add_argument("--json", type=pathlib.Path, metavar="FILE", help="write Report.to_dict() here")
    parser.add_argument("--csv", type=pathlib.Path, metavar="FILE", help="write one row per image here")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes (0 or 1: none)")
    parser.add_argument("--missing-as-empty", action="store_true", help="score an image missing on one side as empty")
    cli.add_prediction_arguments(parser)
    from nucjax import distributed

    distributed.add_arguments(parser)
    return parser


def _write_outputs(report: metrics.Report, json_path: pathlib.Path | None, csv_path: pathlib.Path | None) -> None:
    """--json: Report.to_dict(); --csv: the per-image rows."""
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if csv_path is not None:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(report.per_image[0]))
            writer.writeheader()
            writer.writerows(report.per_image)


def evaluate_checkpoint(path: str | pathlib.Path, split: str = "validation", *, step: int | str = "best",
                        limit: int = 0, tune: bool = False, report_dir: str | pathlib.Path | None = None,
                        thresholds: Sequence[float] = metrics.DEFAULT_THRESHOLDS, error_iou: float = 0.7,
                        progress: bool = True, predictor_options: Mapping[str, Any] | None = None) -> metrics.Report:
    """Runs the checkpoint's Predictor on a split of its own dataset and scores it (optionally tuning first);
    `predictor_options` go to `checkpoint.load` (tile_size, tile_overlap, tta, input_scale).

    With several processes (`nucjax.distributed`) each predicts its share of the split and every process returns
    the whole Report; tuning runs in each (same result), and process 0 alone stores it and writes the figures."""
    import jax

    from nucjax import checkpoint, data, distributed
    from nucjax.inference import evaluate_source, tune_postprocess

    first = jax.process_index() == 0
    predictor = checkpoint.load(path, step=step, **(predictor_options or {}))
    source, validation = distributed.process_0_first(lambda: (
        data.source_for(predictor.config, split),
        data.source_for(predictor.config, predictor.config.data.eval_split) if tune else None,
    ), "nucjax: data prepared")
    if tune:
        params, score = tune_postprocess(predictor, validation, limit=limit, progress=progress and first, store=first)
        if first:
            print(f"tuned post-processing (validation dsb2018_score {score:.4f}): {params}", file=sys.stderr)
    report, kept = evaluate_source(predictor, source, limit=limit, thresholds=thresholds, error_iou=error_iou,
                                   progress=progress, keep_outputs=report_dir is not None)
    if report_dir is not None and first:
        from nucjax.report import write_report

        write_report(report.to_dict(), kept, pathlib.Path(report_dir), to_instances=predictor.to_instances)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 with a one-line message on stderr for unreadable input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.gt is None and args.pred is None) or (
            args.checkpoint is None and (args.gt is None or args.pred is None)):
        parser.error("give either --checkpoint DIR, or both --gt PATH and --pred PATH")
    if args.checkpoint is not None:
        return _main_checkpoint(args)
    given = [name for name, value in cli.prediction_options(args).items() if value is not None]
    if given:
        parser.error(f"--{given[0].replace('_', '-')} needs --checkpoint (it sets how a checkpoint predicts)")
    try:
        report = evaluate_folders(
            args.gt,
            args.pred,
            thresholds=args.thresholds,
            error_iou=args.error_iou,
            missing_as_empty=args.missing_as_empty,
            workers=args.workers,
        )
        print(report.summary())
        _write_outputs(report, args.json, args.csv)
    except (ValueError, OSError) as e:  # io.ReadError, mismatched names or shapes, unwritable outputs
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


def _main_checkpoint(args: argparse.Namespace) -> int:
    """--checkpoint mode, alone or as one of several processes (each predicts its share; process 0 prints)."""
    from nucjax import distributed
    from nucjax.checkpoint import quiet_libraries

    if not distributed.initialize_from_args(args):
        return 2

    def work() -> None:
        import jax

        with quiet_libraries():
            report = evaluate_checkpoint(args.checkpoint, args.split, step=args.step, limit=args.limit,
                                         tune=args.tune, report_dir=args.report,
                                         thresholds=args.thresholds, error_iou=args.error_iou,
                                         predictor_options=cli.prediction_options(args))
        if jax.process_index() == 0:
            print(report.summary())
            _write_outputs(report, args.json, args.csv)

    # io.ReadError, CheckpointError, unwritable outputs
    return distributed.run(work, expected=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
