"""Separation of touching nuclei: which ground-truth nuclei touch another, the metrics restricted to them, merges.

Definitions (for one image; counts are pooled over images by `summarize`):
- Two ground-truth nuclei *touch* when a pixel of one is 8-adjacent (sides or corners) to a pixel of the other.
  A *touching nucleus* touches at least one other; a *touching pair* is an unordered pair that touches.
- A prediction is *assigned* to the ground-truth nucleus it shares the most pixels with (ties: the lower id);
  a prediction sharing no pixel with any nucleus is assigned to none. The *touching predictions* are those
  assigned to a touching nucleus.
- The restricted metrics are `nucjax.metrics` on the touching nuclei alone (the others erased from the ground
  truth) against the touching predictions alone (the others erased). Erasing objects changes no IoU between the
  objects that remain, so a touching nucleus is matched exactly as in the full image, and at IoU threshold t:
  TP = touching nuclei matched (IoU >= t, StarDist's one-to-one matching), FN = touching nuclei not matched,
  FP = touching predictions not matched; recall = TP / (TP + FN), accuracy = TP / (TP + FP + FN).
- A touching pair (a, b) is *merged* when one prediction holds more than half of the pixels of a and more than
  half of the pixels of b (at most one prediction can hold more than half of a nucleus, so this is unambiguous).
  `merges_per_100_pairs` = 100 × merged pairs / touching pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from nucjax import metrics


def _labels(labels: np.ndarray, role: str) -> np.ndarray:
    """A 2-D non-negative integer label image as int64, or a ValueError naming `role`."""
    arr = np.asarray(labels)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        raise ValueError(f"{role} must be a 2-D integer label image, got {arr.dtype} of shape {arr.shape}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{role} has negative labels (minimum {arr.min()}); 0 is background, objects are > 0")
    return arr.astype(np.int64, copy=False)


def touching_pairs(labels: np.ndarray) -> np.ndarray:
    """int64[P, 2]: the pairs (a, b), a < b, of different nuclei of `labels` (int[H, W]) with 8-adjacent pixels,
    sorted."""
    labels = _labels(labels, "label image")
    h, w = labels.shape
    pairs = []
    # Right, down, down-right and down-left neighbours cover every 8-adjacency once.
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = labels[: h - dy, max(0, -dx) : w - max(0, dx)]
        b = labels[dy:, max(0, dx) : w - max(0, -dx)]
        differ = (a > 0) & (b > 0) & (a != b)
        pairs.append(np.stack([np.minimum(a[differ], b[differ]), np.maximum(a[differ], b[differ])], axis=1))
    found = np.concatenate(pairs)
    return np.unique(found, axis=0) if len(found) else np.zeros((0, 2), np.int64)


def touching_ids(labels: np.ndarray) -> np.ndarray:
    """int64[K]: the sorted ids of the nuclei of `labels` (int[H, W]) that touch another nucleus."""
    return np.unique(touching_pairs(labels))


@dataclasses.dataclass(frozen=True)
class SeparationStats:
    """One image's counts: touching nuclei and pairs, merged pairs, and per threshold the restricted TP/FP/FN;
    `score` is the restricted DSB2018 score (None when the image has no touching nucleus)."""

    n_touching: int
    n_pairs: int
    merged_pairs: int
    thresholds: tuple[float, ...]
    tp: tuple[int, ...]
    fp: tuple[int, ...]
    fn: tuple[int, ...]
    score: float | None

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of the fields."""
        return dataclasses.asdict(self)


def _owners(gt: np.ndarray, pred: np.ndarray) -> tuple[dict[int, int], dict[int, int]]:
    """({pred id: the gt id it shares most pixels with (ties: lower gt id)}, {gt id: the pred id holding more than
    half of its pixels}) from one overlap count."""
    both = (gt > 0) & (pred > 0)
    pairs, counts = np.unique(np.stack([pred[both], gt[both]]), axis=1, return_counts=True)
    assigned: dict[int, int] = {}
    best: dict[int, int] = {}
    for (p, g), c in zip(pairs.T.tolist(), counts.tolist()):  # sorted by (pred, gt): the first maximum wins
        if c > best.get(p, 0):
            assigned[p], best[p] = g, c
    gt_ids, gt_area = np.unique(gt[gt > 0], return_counts=True)
    area = dict(zip(gt_ids.tolist(), gt_area.tolist()))
    cover = {g: p for (p, g), c in zip(pairs.T.tolist(), counts.tolist()) if 2 * c > area[g]}
    return assigned, cover


def image_separation(
    gt: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = metrics.DEFAULT_THRESHOLDS
) -> SeparationStats:
    """The separation counts of one image: gt, pred int[H, W] label images (see the module docstring)."""
    gt, pred = _labels(gt, "ground truth"), _labels(pred, "prediction")
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth has shape {gt.shape} but prediction has shape {pred.shape}")
    thresholds = tuple(float(t) for t in thresholds)
    pairs = touching_pairs(gt)
    touching = np.unique(pairs)
    assigned, cover = _owners(gt, pred)
    merged = sum(1 for a, b in pairs.tolist() if cover.get(a, 0) != 0 and cover.get(a) == cover.get(b))
    if not len(touching):
        zeros = (0,) * len(thresholds)
        return SeparationStats(0, 0, 0, thresholds, zeros, zeros, zeros, None)
    gt_t = np.where(np.isin(gt, touching), gt, 0)
    touching_set = set(touching.tolist())
    kept = np.array([p for p, g in assigned.items() if g in touching_set], np.int64)
    pred_t = np.where(np.isin(pred, kept), pred, 0)
    rows = metrics.match(gt_t, pred_t, thresholds)
    score = metrics.image_stats(gt_t, pred_t).dsb2018_score
    return SeparationStats(
        n_touching=len(touching), n_pairs=len(pairs), merged_pairs=merged, thresholds=thresholds,
        tp=tuple(r["tp"] for r in rows), fp=tuple(r["fp"] for r in rows), fn=tuple(r["fn"] for r in rows),
        score=float(score),
    )


def summarize(stats: Iterable[SeparationStats]) -> dict[str, float]:
    """Pooled over images: touching_nuclei, touching_pairs, merged_pairs, merges_per_100_pairs, and per threshold t
    touching_recall@t, touching_accuracy@t, touching_f1@t; touching_dsb2018_score = the mean of the restricted
    DSB2018 score over images with a touching nucleus. Ratios with a zero denominator are NaN."""
    stats = list(stats)
    if not stats:
        raise ValueError("summarize needs the stats of at least one image")
    thresholds = stats[0].thresholds
    if any(s.thresholds != thresholds for s in stats):
        raise ValueError("summarize: the images' stats were computed with different thresholds")
    tp, fp, fn = (np.sum([getattr(s, k) for s in stats], axis=0) for k in ("tp", "fp", "fn"))
    pairs = sum(s.n_pairs for s in stats)
    merged = sum(s.merged_pairs for s in stats)
    scores = [s.score for s in stats if s.score is not None]
    out = {
        "touching_nuclei": int(sum(s.n_touching for s in stats)),
        "touching_pairs": int(pairs),
        "merged_pairs": int(merged),
        "merges_per_100_pairs": 100.0 * merged / pairs if pairs else float("nan"),
        "touching_dsb2018_score": float(np.mean(scores)) if scores else float("nan"),
    }
    for k, t in enumerate(thresholds):
        key = f"{t:g}"
        out[f"touching_recall@{key}"] = _ratio(tp[k], tp[k] + fn[k])
        out[f"touching_accuracy@{key}"] = _ratio(tp[k], tp[k] + fp[k] + fn[k])
        out[f"touching_f1@{key}"] = _ratio(2 * tp[k], 2 * tp[k] + fp[k] + fn[k])
    return out


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")
