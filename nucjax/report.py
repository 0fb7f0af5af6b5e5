"""PNG figures of an evaluation (`python -m nucjax.evaluate --report DIR`): accuracy and F1 against the IoU threshold,
error types, metrics by modality, and the worst images with their ground-truth and predicted outlines."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # drawn without pyplot: the Agg canvas, no global backend change

from nucjax.predict import overlay

FIGURES = ("iou_curves.png", "errors.png", "by_modality.png", "worst_images.png")
"""The files `write_report` writes (the last two only when examples are given)."""
ERROR_TYPES = ("missed", "extra", "merges", "splits")


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_iou_curves(report: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Pooled accuracy TP/(TP+FP+FN) and F1 against the IoU threshold (per-image mean accuracy dashed)."""
    thresholds = [row["threshold"] for row in report["pooled"]]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    ax.plot(thresholds, [row["accuracy"] for row in report["pooled"]], "o-", label="accuracy (pooled)")
    ax.plot(thresholds, [row["f1"] for row in report["pooled"]], "s-", label="F1 (pooled)")
    ax.plot(thresholds, [row["accuracy"] for row in report["per_image_mean"]], "o--", label="accuracy (per-image mean)")
    ax.set(xlabel="IoU threshold", ylabel="score", ylim=(0, 1.02),
           title=f"{report['n_images']} images, DSB2018 score {report['dsb2018_score']:.3f}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_errors(report: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Bar chart of the error counts (missed / extra at IoU > errors.iou, merges / splits)."""
    errors = report["errors"]
    counts = [errors[k] for k in ERROR_TYPES]
    n_true = sum(row["n_true"] for row in report["per_image"])
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    bars = ax.bar(ERROR_TYPES, counts, color=["tab:red", "tab:orange", "tab:purple", "tab:blue"])
    ax.bar_label(bars)
    ax.set(ylabel="objects", title=f"errors ({n_true} true nuclei; missed/extra at IoU > {errors['iou']:g})")
    return _save(fig, path)


def _check_paired(report: Mapping[str, Any], examples: Sequence[tuple[Mapping, Any]]) -> None:
    """Raises ValueError unless examples[i] is the image of report["per_image"][i] (by count and name)."""
    rows = report["per_image"]
    if len(rows) != len(examples):
        raise ValueError(f"the report has {len(rows)} images but {len(examples)} examples were given")
    for i, (row, (example, _)) in enumerate(zip(rows, examples)):
        if row["name"] != str(example["id"]):
            raise ValueError(f"image {i}: the report's row is {row['name']!r} but the example is {example['id']!r}")


def _modality_rows(report: Mapping[str, Any], examples: Sequence[tuple[Mapping, Any]]) -> dict[str, list[dict]]:
    """{modality: per-image rows} (examples without a modality count as "unknown"), sorted by modality."""
    _check_paired(report, examples)
    groups: dict[str, list[dict]] = {}
    for row, (example, _) in zip(report["per_image"], examples):
        groups.setdefault(str(example.get("modality", "unknown")), []).append(row)
    return dict(sorted(groups.items()))


def metrics_by_modality(report: Mapping[str, Any], examples: Sequence[tuple[Mapping, Any]]) -> dict[str, dict]:
    """{modality: {"n_images", "dsb2018_score", "aji_plus", "f1_at_<first threshold>"}}: per-image values averaged."""
    f1_key = f"f1_at_{report['thresholds'][0]:g}"
    return {
        modality: {"n_images": len(rows), **{k: float(np.mean([r[k] for r in rows]))
                                             for k in ("dsb2018_score", "aji_plus", f1_key)}}
        for modality, rows in _modality_rows(report, examples).items()
    }


def plot_by_modality(report: Mapping[str, Any], examples: Sequence[tuple[Mapping, Any]],
                     path: pathlib.Path) -> pathlib.Path:
    """Grouped bars of `metrics_by_modality`: mean per-image DSB2018 score, AJI+ and F1 at the first threshold."""
    groups = metrics_by_modality(report, examples)
    keys = [k for k in next(iter(groups.values())) if k != "n_images"]
    fig = Figure(figsize=(max(5.5, 1.8 * len(groups) + 2), 4))
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        ax.bar(x + (k - (len(keys) - 1) / 2) * width, [g[key] for g in groups.values()], width, label=key)
    ax.set_xticks(x, [f"{name}\n({g['n_images']} images)" for name, g in groups.items()])
    ax.set(ylabel="mean over images", ylim=(0, 1.2), yticks=np.linspace(0, 1, 6), title="metrics by modality")
    ax.legend(ncol=len(keys), loc="upper center")
    return _save(fig, path)


def plot_worst(report: Mapping[str, Any], examples: Sequence[tuple[Mapping, Any]],
               to_instances: Callable[[Any], np.ndarray], path: pathlib.Path, count: int = 6) -> pathlib.Path:
    """The `count` images with the lowest DSB2018 score: ground-truth outlines left, predicted outlines right."""
    _check_paired(report, examples)
    order = np.argsort([row["dsb2018_score"] for row in report["per_image"]], kind="stable")[:count]
    fig = Figure(figsize=(8, 4 * len(order)))
    for r, i in enumerate(order):
        example, outputs = examples[i]
        row = report["per_image"][i]
        panels = (("ground truth", np.asarray(example["label"]), row["n_true"]),
                  ("prediction", np.asarray(to_instances(outputs)), row["n_pred"]))
        for c, (what, labels, n) in enumerate(panels):
            ax = fig.add_subplot(len(order), 2, 2 * r + c + 1)
            ax.imshow(overlay(example["image"], labels), interpolation="nearest")
            ax.set_title(f"{row['name'][:16]} {what}: {n} nuclei\nDSB2018 score {row['dsb2018_score']:.3f}",
                         fontsize=9)
            ax.axis("off")
    return _save(fig, path)


def write_report(report: Mapping[str, Any], examples: Sequence[tuple[Mapping, Any]],
                 report_dir: str | pathlib.Path, *, to_instances: Callable[[Any], np.ndarray] | None = None,
                 worst: int = 6) -> list[pathlib.Path]:
    """Writes FIGURES into `report_dir` (created) and returns their paths.

    report: `Report.to_dict()`; examples: the (example, outputs) pairs of `evaluate_source(..., keep_outputs=True)`,
    in the report's order (example dicts with "id", "image", "label", "modality"); to_instances: outputs -> int32[H, W]
    (`predictor.to_instances`), needed for the worst-images panel. With no examples only the first two are written.
    """
    report_dir = pathlib.Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_iou_curves(report, report_dir / FIGURES[0]), plot_errors(report, report_dir / FIGURES[1])]
    if examples:
        if to_instances is None:
            raise ValueError("write_report: examples were given without to_instances (e.g. predictor.to_instances)")
        written.append(plot_by_modality(report, examples, report_dir / FIGURES[2]))
        written.append(plot_worst(report, examples, to_instances, report_dir / FIGURES[3], count=worst))
    return written
