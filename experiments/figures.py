"""The study's figures (matplotlib, PNG) from its result rows: accuracy vs IoU, validation vs time, accuracy vs cost,
error types, and a panel of crowded crops with each method's outlines."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

from experiments import stats  # noqa: E402

ERROR_TYPES = ("missed", "extra", "merges", "splits")


def _by_method(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    """{method name: its rows}, in first-seen order."""
    out: dict[str, list[Mapping]] = {}
    for row in rows:
        out.setdefault(row["method"], []).append(row)
    return out


def _colours(names: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def accuracy_vs_iou(rows: Sequence[Mapping], path: pathlib.Path) -> pathlib.Path:
    """Pooled accuracy against the IoU threshold: per method, the mean over seeds with a ± sd band."""
    groups = _by_method(rows)
    colours = _colours(list(groups))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, group in groups.items():
        thresholds = np.asarray(group[0]["accuracy_curve"]["thresholds"])
        curves = np.asarray([r["accuracy_curve"]["accuracy"] for r in group], np.float64)
        mean = curves.mean(axis=0)
        style = "--" if group[0].get("kind") == "classical" else "-"
        ax.plot(thresholds, mean, style, color=colours[name], label=f"{name} (n={len(group)})")
        if len(group) > 1:
            sd = curves.std(axis=0, ddof=1)
            ax.fill_between(thresholds, mean - sd, mean + sd, color=colours[name], alpha=0.2)
    ax.set(xlabel="IoU threshold", ylabel="accuracy TP/(TP+FP+FN), pooled", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def validation_vs_time(rows: Sequence[Mapping], path: pathlib.Path) -> pathlib.Path:
    """Validation dsb2018_score against training wall time, one line per run."""
    learned = [r for r in rows if r.get("validation_curve")]
    groups = _by_method(learned)
    colours = _colours(list(groups))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, group in groups.items():
        for i, row in enumerate(group):
            curve = np.asarray(row["validation_curve"], np.float64)
            ax.plot(curve[:, 0] / 60, curve[:, 2], "o-", ms=3, color=colours[name], alpha=0.8,
                    label=name if i == 0 else None)
    ax.set(xlabel="training wall time (min)", ylabel="validation dsb2018_score")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    return _save(fig, path)


def accuracy_vs_cost(rows: Sequence[Mapping], path: pathlib.Path) -> pathlib.Path:
    """Held-apart dsb2018_score (mean ± sd over seeds) against parameters and against GFLOPs per 256² image."""
    groups = {k: v for k, v in _by_method(rows).items() if v[0].get("kind") != "classical"}
    colours = _colours(list(groups))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "params", "parameters (millions)"),
                           (axes[1], "gflops_per_256", "forward GFLOPs per 256² image")):
        for name, group in groups.items():
            score, sd = stats.mean_sd(r["dsb2018_score"] for r in group)
            cost = float(group[0][key]) / (1e6 if key == "params" else 1.0)
            ax.errorbar([cost], [score], yerr=_err([sd]), fmt="o", capsize=4, color=colours[name], label=name)
            ax.annotate(name, (cost, score), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set(xlabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="held-apart dsb2018_score")
    return _save(fig, path)


def error_types(rows: Sequence[Mapping], path: pathlib.Path) -> pathlib.Path:
    """Missed / extra / merged / split nuclei per method (mean ± sd over seeds), and merges per 100 touching pairs."""
    groups = _by_method(rows)
    colours = _colours(list(groups))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(ERROR_TYPES))
    for i, (name, group) in enumerate(groups.items()):
        means, sds = zip(*(stats.mean_sd(r[k] for r in group) for k in ERROR_TYPES))
        ax.bar(x + i * width, means, width, yerr=_err(sds), capsize=3, color=colours[name], label=name)
        merge, merge_sd = stats.mean_sd(r["merges_per_100_pairs"] for r in group)
        ax2.bar([i], [merge], yerr=_err([merge_sd]), capsize=3, color=colours[name])
    ax.set_xticks(x + width * (len(groups) - 1) / 2, ERROR_TYPES)
    ax.set(ylabel="count on the held-apart images")
    ax.legend(fontsize=8)
    ax2.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right", fontsize=8)
    ax2.set(ylabel="merges per 100 touching pairs")
    return _save(fig, path)


def crowded_panel(crops: Sequence[Mapping], path: pathlib.Path) -> pathlib.Path:
    """One row per crop: the ground truth, then each method's outlines over the image.

    crops[i]: {"id": str, "image": uint8[h, w, 3], "gt": int[h, w], "preds": {method: int[h, w]}}."""
    if not crops:
        raise ValueError("crowded_panel needs at least one crop")
    methods = list(crops[0]["preds"])
    ncols = 1 + len(methods)
    fig, axes = plt.subplots(len(crops), ncols, figsize=(2.6 * ncols, 2.6 * len(crops)), squeeze=False)
    for r, crop in enumerate(crops):
        for c, (title, labels) in enumerate([("ground truth", crop["gt"])] + [(m, crop["preds"][m]) for m in methods]):
            ax = axes[r, c]
            ax.imshow(_outlined(crop["image"], labels))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(str(crop["id"])[:12], fontsize=7)
    return _save(fig, path)


def _err(sds: Sequence[float]) -> np.ndarray | None:
    """Error-bar lengths, or None (no bars) when no standard deviation is known (a single run)."""
    sds = np.asarray(sds, np.float64)
    return None if np.isnan(sds).all() else np.nan_to_num(sds)


def _outlined(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8[h, w, 3]: the image with each object's inner boundary drawn in yellow."""
    out = np.array(image, np.uint8, copy=True)
    out[find_boundaries(np.asarray(labels), mode="inner")] = (255, 220, 0)
    return out


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(rows: Sequence[Mapping], crops: Sequence[Mapping], directory: pathlib.Path,
              prefix: str) -> list[pathlib.Path]:
    """Every figure of the study into `directory` as `<prefix>-<figure>.png`; the panel only when there are crops."""
    if not rows:
        raise ValueError("no result rows to plot")
    directory = pathlib.Path(directory)
    paths = [
        accuracy_vs_iou(rows, directory / f"{prefix}-accuracy_vs_iou.png"),
        validation_vs_time(rows, directory / f"{prefix}-validation_vs_time.png"),
        accuracy_vs_cost(rows, directory / f"{prefix}-accuracy_vs_cost.png"),
        error_types(rows, directory / f"{prefix}-error_types.png"),
    ]
    if crops:
        paths.append(crowded_panel(crops, directory / f"{prefix}-crowded_crops.png"))
    return paths
