"""Instance metrics on label images: StarDist-compatible matching, Kaggle's DSB2018 score, AJI, AJI+, Dice, error types.

NumPy and SciPy only, so evaluation runs (and parallelises over worker processes) without JAX.

Conventions, for every function here:
- A label image is a 2-D array, 0 = background, any positive ids (they need not be contiguous). Integer
  dtypes, and float dtypes holding whole numbers, are accepted; booleans are not (label them first).
- IoU values come from one label-overlap table per image, computed in one pass over the pixels.
- Edge cases: an image where both sides are empty has tp = fp = fn = 0, and StarDist's ratios (precision,
  recall, accuracy, f1, the three scores) are 0 there, as in `stardist.matching`; the DSB2018 score, AJI,
  AJI+ and Dice of such an image are 1 (nothing to find, nothing found). When only one side is empty every
  measure is 0. A single object predicted exactly scores 1 everywhere.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
"""IoU thresholds 0.5, 0.55, ..., 0.95 (exact rounded floats); also the thresholds of the DSB2018 score."""

SPLIT_MERGE_IOU = 0.1
"""IoU above which an overlap counts towards a split or a merge (Caicedo et al. 2019)."""

FIELDS = (
    "tp", "fp", "fn", "precision", "recall", "accuracy", "f1",
    "mean_true_score", "mean_matched_score", "panoptic_quality",
)  # fmt: skip
"""Per-threshold fields of `match`, `Report.pooled` and `Report.per_image_mean` (besides "threshold")."""

def _describe(index: int | None, name: str | None) -> str:
    """How error messages name an image."""
    if index is None:
        return "image" if name is None else f"image {name!r}"
    return f"image {index}" if name is None else f"image {index} ({name!r})"


def _label_image(labels: np.ndarray, role: str, where: str) -> np.ndarray:
    """A validated 2-D integer label image (int64 when the input was float or uint64)."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        raise ValueError(f"{where}: {role} is a boolean array; label its objects first (e.g. scipy.ndimage.label)")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{where}: {role} has dtype {arr.dtype}; expected an integer label image")
    if arr.ndim != 2:
        raise ValueError(f"{where}: {role} has shape {arr.shape}; expected a 2-D label image")
    if arr.size == 0:
        raise ValueError(f"{where}: {role} has no pixels (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.trunc(arr))
        if bad.any():
            example = arr[bad][0]
            raise ValueError(f"{where}: {role} has non-integral values (e.g. {example}); labels must be whole numbers")
    lowest = arr.min()
    if lowest < 0:
        raise ValueError(f"{where}: {role} has negative labels (minimum {lowest}); 0 is background, objects are > 0")
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.uint64:
        if arr.max() >= 2**63:
            raise ValueError(f"{where}: {role} has labels of 2**63 or more")
        arr = arr.astype(np.int64)
    return arr


def _label_pair(gt: np.ndarray, pred: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    gt = _label_image(gt, "ground truth", where)
    pred = _label_image(pred, "prediction", where)
    if gt.shape != pred.shape:
        raise ValueError(f"{where}: ground truth has shape {gt.shape} but prediction has shape {pred.shape}")
    return gt, pred


def _check_thresholds(thresholds: Iterable[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if not values or not all(0.0 < t <= 1.0 for t in values):
        raise ValueError(f"thresholds must be a non-empty sequence of IoUs in (0, 1], got {values}")
    return values


def _check_error_iou(error_iou: float) -> float:
    if not 0.0 <= float(error_iou) < 1.0:
        raise ValueError(f"error_iou must be in [0, 1), got {error_iou}")
    return float(error_iou)


@dataclasses.dataclass(frozen=True)
class Overlap:
    """Objects (in increasing id order) and every (true, pred) pair sharing a pixel, sorted by (true, pred)."""

    area_true: np.ndarray  # int64[n_true]
    area_pred: np.ndarray  # int64[n_pred]
    true_idx: np.ndarray  # int64[k]
    pred_idx: np.ndarray  # int64[k]
    inter: np.ndarray  # int64[k]
    union: np.ndarray  # int64[k]
    iou: np.ndarray  # float64[k]


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels mapped to 0 (background), 1..n-1 in id order, and n."""
    ids, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(labels.shape).astype(np.int64)
    if ids[0] != 0:
        return codes + 1, len(ids) + 1
    return codes, len(ids)


def overlap_table(gt: np.ndarray, pred: np.ndarray) -> Overlap:
    """The label-overlap table of two label images (non-negative integers of one shape, unchecked: `match` and
    `evaluate` check theirs), from one bincount over a combined index. Its true_idx and pred_idx index the objects
    present in each image, in increasing id."""
    limit = 4 * gt.size + 2**16
    n_gt, n_pred = int(gt.max()) + 1, int(pred.max()) + 1
    if n_gt * n_pred > limit:
        (gt, n_gt), (pred, n_pred) = _compact(gt), _compact(pred)
    flat = gt.reshape(-1).astype(np.int64)
    flat *= n_pred
    flat += pred.reshape(-1)
    if n_gt * n_pred <= limit:
        table = np.bincount(flat, minlength=n_gt * n_pred).reshape(n_gt, n_pred)
        area_true, area_pred = table.sum(axis=1)[1:], table.sum(axis=0)[1:]
        rows, cols = np.nonzero(table[1:, 1:])
        inter = table[1:, 1:][rows, cols]
        present_true, present_pred = area_true > 0, area_pred > 0
        true_idx = (np.cumsum(present_true) - 1)[rows]
        pred_idx = (np.cumsum(present_pred) - 1)[cols]
        area_true, area_pred = area_true[present_true], area_pred[present_pred]
    else:  # many objects after compaction: a sparse table (every code is present)
        codes, counts = np.unique(flat, return_counts=True)
        rows, cols = np.divmod(codes, n_pred)
        area_true = np.bincount(rows, counts, minlength=n_gt)[1:].astype(np.int64)
        area_pred = np.bincount(cols, counts, minlength=n_pred)[1:].astype(np.int64)
        both = (rows > 0) & (cols > 0)
        true_idx, pred_idx, inter = rows[both] - 1, cols[both] - 1, counts[both]
    inter = inter.astype(np.int64)
    union = area_true[true_idx] + area_pred[pred_idx] - inter
    return Overlap(area_true, area_pred, true_idx, pred_idx, inter, union, inter / union)


def _is_one_to_one(true_idx: np.ndarray, pred_idx: np.ndarray) -> bool:
    """Whether no object appears twice among these pairs (`true_idx` is sorted)."""
    return bool(np.all(true_idx[1:] != true_idx[:-1])) and len(np.unique(pred_idx)) == len(pred_idx)


def _stardist_matching(ov: Overlap, thresholds: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: int64[T] matches and float32[T] sum of their IoUs, exactly as `stardist.matching.matching`.

    A pair may match when its IoU (float64 division rounded to float32, as StarDist) is >= the threshold; the
    matching is one-to-one with the most matches, ties going to the larger sum of assigned IoUs. Where the
    candidate pairs already form a one-to-one matching (always for thresholds >= 0.5) it is the answer; otherwise
    the same linear assignment as StarDist runs on the full score matrix.
    """
    n_true, n_pred = len(ov.area_true), len(ov.area_pred)
    tp = np.zeros(len(thresholds), np.int64)
    score_sum = np.zeros(len(thresholds), np.float32)
    if min(n_true, n_pred) == 0:
        return tp, score_sum
    scores = ov.iou.astype(np.float32)
    candidates = scores >= min(thresholds)  # float32 comparisons, as in StarDist
    true_idx, pred_idx, scores = ov.true_idx[candidates], ov.pred_idx[candidates], scores[candidates]
    unique_at_min = _is_one_to_one(true_idx, pred_idx)  # then unique at every threshold
    for k, threshold in enumerate(thresholds):
        chosen = scores >= threshold
        if unique_at_min or _is_one_to_one(true_idx[chosen], pred_idx[chosen]):
            tp[k], score_sum[k] = np.count_nonzero(chosen), np.sum(scores[chosen])
            continue
        matrix = np.zeros((n_true, n_pred), np.float32)
        matrix[ov.true_idx, ov.pred_idx] = ov.iou
        costs = -(matrix >= threshold).astype(float) - matrix / (2 * min(n_true, n_pred))
        rows, cols = linear_sum_assignment(costs)
        assigned = matrix[rows, cols]
        matched = assigned >= threshold
        tp[k], score_sum[k] = np.count_nonzero(matched), np.sum(assigned[matched])
    return tp, score_sum


def _aji_parts(ov: Overlap) -> tuple[int, int]:
    """(intersection, union) sums of AJI (Kumar et al. 2017), as HoVer-Net's `get_fast_aji` but with exact IoUs.

    Each true object is paired with the prediction of highest IoU (ties: the lower prediction id; a prediction
    may serve several true objects); true objects overlapping nothing, and predictions paired with none, add
    their areas to the union. (HoVer-Net adds 1e-6 to unions, which can turn exact ties the other way.)
    """
    order = np.lexsort((ov.pred_idx, -ov.iou, ov.true_idx))
    first = np.ones(len(order), bool)
    first[1:] = ov.true_idx[order][1:] != ov.true_idx[order][:-1]
    best = order[first]
    return _pairs_parts(ov, best)


def _pairs_parts(ov: Overlap, pairs: np.ndarray) -> tuple[int, int]:
    """(sum of intersections, sum of unions plus the areas of objects in no pair) for these pair indices."""
    unpaired_true = np.ones(len(ov.area_true), bool)
    unpaired_true[ov.true_idx[pairs]] = False
    unpaired_pred = np.ones(len(ov.area_pred), bool)
    unpaired_pred[ov.pred_idx[pairs]] = False
    union = ov.union[pairs].sum() + ov.area_true[unpaired_true].sum() + ov.area_pred[unpaired_pred].sum()
    return int(ov.inter[pairs].sum()), int(union)


def _components(true_idx: np.ndarray, pred_idx: np.ndarray, n_true: int) -> np.ndarray:
    """int64[k]: for each edge of a bipartite graph, the smallest true index in its connected component."""
    label = np.arange(n_true)
    while True:
        pred_label = np.full(pred_idx.max() + 1, n_true)
        np.minimum.at(pred_label, pred_idx, label[true_idx])
        new = label.copy()
        np.minimum.at(new, true_idx, pred_label[pred_idx])
        if np.array_equal(new, label):
            return label[true_idx]
        label = new


def _aji_plus_parts(ov: Overlap) -> tuple[int, int]:
    """(intersection, union) sums of AJI+ (Graham et al. 2019), as HoVer-Net's `get_fast_aji_plus` (exact IoUs).

    True objects and predictions are paired one-to-one maximising the total IoU (linear assignment, solved
    separately on each connected group of overlapping objects); unpaired objects add their areas to the union.
    """
    n_true, n_pred = len(ov.area_true), len(ov.area_pred)
    simple = (np.bincount(ov.true_idx, minlength=n_true)[ov.true_idx] == 1) & (
        np.bincount(ov.pred_idx, minlength=n_pred)[ov.pred_idx] == 1
    )
    chosen = [np.flatnonzero(simple)]
    shared = np.flatnonzero(~simple)
    if len(shared):
        component = _components(ov.true_idx[shared], ov.pred_idx[shared], n_true)
        order = np.argsort(component, kind="stable")
        starts = np.flatnonzero(np.diff(component[order], prepend=-1))
        for edges in np.split(shared[order], starts[1:]):
            rows, row_of = np.unique(ov.true_idx[edges], return_inverse=True)
            cols, col_of = np.unique(ov.pred_idx[edges], return_inverse=True)
            weights = np.zeros((len(rows), len(cols)))
            weights[row_of, col_of] = ov.iou[edges]
            edge_at = np.full((len(rows), len(cols)), -1)
            edge_at[row_of, col_of] = edges
            picked = edge_at[linear_sum_assignment(weights, maximize=True)]
            chosen.append(picked[picked >= 0])
    return _pairs_parts(ov, np.concatenate(chosen))


@dataclasses.dataclass(frozen=True, eq=False)
class ImageStats:
    """Everything a `Report` needs from one image: small and picklable, so worker processes can compute it.

    `tp[k]` and `score_sum[k]` (float32, StarDist's arithmetic) are the matches and the sum of their IoUs at
    `thresholds[k]`; `kaggle_tp[k]` the matches with IoU > DEFAULT_THRESHOLDS[k]; the `*_inter`/`*_union`
    and `fg_*` fields are pixel counts behind AJI, AJI+ and Dice; the error counts are Caicedo et al.'s.
    """

    name: str | None
    thresholds: tuple[float, ...]
    error_iou: float
    n_true: int
    n_pred: int
    tp: np.ndarray
    score_sum: np.ndarray
    kaggle_tp: np.ndarray
    aji_inter: int
    aji_union: int
    aji_plus_inter: int
    aji_plus_union: int
    fg_inter: int
    fg_true: int
    fg_pred: int
    missed: int
    extra: int
    merges: int
    splits: int

    @property
    def dsb2018_score(self) -> float:
        """Kaggle DSB2018: mean over tau in 0.5..0.95 of TP/(TP+FP+FN), TP = pairs with IoU > tau (1 if both empty)."""
        if self.n_true == 0 and self.n_pred == 0:
            return 1.0
        return float(np.mean(self.kaggle_tp / (self.n_true + self.n_pred - self.kaggle_tp)))

    @property
    def aji(self) -> float:
        """Aggregated Jaccard Index (1 if both empty)."""
        return self.aji_inter / self.aji_union if self.aji_union else 1.0

    @property
    def aji_plus(self) -> float:
        """AJI+ (1 if both empty)."""
        return self.aji_plus_inter / self.aji_plus_union if self.aji_plus_union else 1.0

    @property
    def dice(self) -> float:
        """Foreground Dice 2|G∩P| / (|G| + |P|) (1 if both empty)."""
        total = self.fg_true + self.fg_pred
        return 2 * self.fg_inter / total if total else 1.0


def _image_stats(
    gt: np.ndarray, pred: np.ndarray, thresholds: tuple[float, ...], error_iou: float, name: str | None, where: str
) -> ImageStats:
    gt, pred = _label_pair(gt, pred, where)
    ov = overlap_table(gt, pred)
    n_true, n_pred = len(ov.area_true), len(ov.area_pred)
    tp, score_sum = _stardist_matching(ov, thresholds)
    hit = ov.iou > error_iou
    near = ov.iou > SPLIT_MERGE_IOU
    aji, aji_plus = _aji_parts(ov), _aji_plus_parts(ov)
    return ImageStats(
        name=name,
        thresholds=thresholds,
        error_iou=error_iou,
        n_true=n_true,
        n_pred=n_pred,
        tp=tp,
        score_sum=score_sum,
        kaggle_tp=np.array([np.count_nonzero(ov.iou > t) for t in DEFAULT_THRESHOLDS], np.int64),
        aji_inter=aji[0],
        aji_union=aji[1],
        aji_plus_inter=aji_plus[0],
        aji_plus_union=aji_plus[1],
        fg_inter=int(ov.inter.sum()),
        fg_true=int(ov.area_true.sum()),
        fg_pred=int(ov.area_pred.sum()),
        missed=n_true - int(np.count_nonzero(np.bincount(ov.true_idx[hit], minlength=n_true))),
        extra=n_pred - int(np.count_nonzero(np.bincount(ov.pred_idx[hit], minlength=n_pred))),
        merges=int(np.count_nonzero(np.bincount(ov.pred_idx[near], minlength=n_pred) > 1)),
        splits=int(np.count_nonzero(np.bincount(ov.true_idx[near], minlength=n_true) > 1)),
    )


def image_stats(
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    error_iou: float = 0.7,
    name: str | None = None,
) -> ImageStats:
    """The `ImageStats` of one pair of label images gt, pred: int[H, W] (0 = background); errors name `name`."""
    thresholds, error_iou = _check_thresholds(thresholds), _check_error_iou(error_iou)
    return _image_stats(gt, pred, thresholds, error_iou, name, _describe(None, name))


def _stardist_ratios(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, n_true: np.ndarray, score_sum: np.ndarray
) -> dict[str, np.ndarray]:
    """StarDist's ratios, broadcast elementwise, in its arithmetic: counts in float64, `mean_true_score` in
    float32 (float32 sum / int), `mean_matched_score` and `panoptic_quality` in float64 (float32 sum / int64)."""

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        num, den = np.broadcast_arrays(num, den)
        out = np.zeros(num.shape, num.dtype)
        return np.divide(num, den, out=out, where=den > 0)

    tp, fp, fn, n_true = (np.asarray(x, np.float64) for x in (tp, fp, fn, n_true))
    score_sum = np.asarray(score_sum, np.float32)
    return {
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "accuracy": ratio(tp, tp + fp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "mean_true_score": ratio(score_sum, n_true.astype(np.float32)),
        "mean_matched_score": ratio(score_sum.astype(np.float64), tp),
        "panoptic_quality": ratio(score_sum.astype(np.float64), tp + fp / 2 + fn / 2),
    }


def _rows(thresholds: tuple[float, ...], columns: dict[str, np.ndarray], count_type: type) -> list[dict]:
    """One dict per threshold from per-threshold columns."""
    rows = []
    for k, threshold in enumerate(thresholds):
        row = {"threshold": threshold}
        row.update({f: count_type(columns[f][k]) if f in ("tp", "fp", "fn") else float(columns[f][k]) for f in FIELDS})
        rows.append(row)
    return rows


def match(gt: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[dict]:
    """Per threshold, StarDist's `matching` of gt, pred: int[H, W]: a dict of "threshold", FIELDS, n_true, n_pred.

    A pair matches when IoU >= threshold; the matching is one-to-one and has the most matches (ties: the larger
    sum of assigned IoUs), with IoUs rounded to float32 as StarDist does, so the numbers equal StarDist's.
    """
    thresholds = _check_thresholds(thresholds)
    gt, pred = _label_pair(gt, pred, "image")
    ov = overlap_table(gt, pred)
    n_true, n_pred = len(ov.area_true), len(ov.area_pred)
    tp, score_sum = _stardist_matching(ov, thresholds)
    columns = {"tp": tp, "fp": n_pred - tp, "fn": n_true - tp}
    columns.update(_stardist_ratios(tp, n_pred - tp, n_true - tp, n_true, score_sum))
    return [dict(row, n_true=n_true, n_pred=n_pred) for row in _rows(thresholds, columns, int)]


def _key(threshold: float) -> str:
    return f"{threshold:g}"


@dataclasses.dataclass(frozen=True)
class Report:
    """Metrics over a set of images; `to_dict()` is the JSON form later tools rely on.

    - `pooled`: per threshold, counts summed over images, then StarDist's ratios: exactly
      `stardist.matching.matching_dataset(..., by_image=False)` (including its float32 score arithmetic).
    - `per_image_mean`: per threshold, each image's values averaged (tp, fp, fn too); the ratios equal
      `matching_dataset(..., by_image=True)`, which sums rather than averages tp, fp, fn.
    - `dsb2018_score`, `aji`, `aji_plus`, `dice`: the mean over images of each image's value.
    - `errors`: counts summed over images (see `evaluate`).
    - `per_image`: one row per image.
    """

    n_images: int
    thresholds: tuple[float, ...]
    pooled: list[dict]
    per_image_mean: list[dict]
    dsb2018_score: float
    aji: float
    aji_plus: float
    dice: float
    errors: dict
    per_image: list[dict]

    def to_dict(self) -> dict:
        """A JSON-serialisable dict: n_images, thresholds, pooled, per_image_mean, dsb2018_score, aji, aji_plus,
        dice, errors {iou, missed, extra, merges, splits}, per_image [{name, n_true, n_pred, dsb2018_score, aji,
        aji_plus, dice, f1_at_<t>, accuracy_at_<t> for each threshold, missed, extra, merges, splits}]."""
        return {
            "n_images": self.n_images,
            "thresholds": list(self.thresholds),
            "pooled": [dict(row) for row in self.pooled],
            "per_image_mean": [dict(row) for row in self.per_image_mean],
            "dsb2018_score": self.dsb2018_score,
            "aji": self.aji,
            "aji_plus": self.aji_plus,
            "dice": self.dice,
            "errors": dict(self.errors),
            "per_image": [dict(row) for row in self.per_image],
        }

    def summary(self) -> str:
        """A readable table: the image-level scores, the error counts and the pooled numbers per threshold."""
        e = self.errors
        lines = [
            f"{self.n_images} images   DSB2018 score {self.dsb2018_score:.4f}   AJI {self.aji:.4f}   "
            f"AJI+ {self.aji_plus:.4f}   Dice {self.dice:.4f}",
            f"errors: missed {e['missed']}, extra {e['extra']} (IoU > {e['iou']:g}); "
            f"merges {e['merges']}, splits {e['splits']} (IoU > {SPLIT_MERGE_IOU:g})",
            "",
            f"{'IoU>=':>6} {'TP':>7} {'FP':>7} {'FN':>7} {'prec':>7} {'recall':>7} {'acc':>7} {'F1':>7} "
            f"{'mIoU':>7} {'PQ':>7} {'acc/img':>8}",
        ]
        for row, mean in zip(self.pooled, self.per_image_mean):
            lines.append(
                f"{row['threshold']:>6.2f} {row['tp']:>7d} {row['fp']:>7d} {row['fn']:>7d} {row['precision']:>7.4f} "
                f"{row['recall']:>7.4f} {row['accuracy']:>7.4f} {row['f1']:>7.4f} {row['mean_matched_score']:>7.4f} "
                f"{row['panoptic_quality']:>7.4f} {mean['accuracy']:>8.4f}"
            )
        lines.append("(pooled over images; mIoU = mean IoU of matches; acc/img = accuracy averaged over images)")
        return "\n".join(lines)


class Accumulator:
    """Collects images one at a time (or their `ImageStats` from worker processes) and gives a `Report`.

    It keeps only each image's `ImageStats`, so memory does not grow with pixel count.
    """

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, error_iou: float = 0.7):
        self.thresholds = _check_thresholds(thresholds)
        self.error_iou = _check_error_iou(error_iou)
        self._stats: list[ImageStats] = []

    def __len__(self) -> int:
        return len(self._stats)

    def add(self, gt: np.ndarray, pred: np.ndarray, name: str | None = None) -> ImageStats:
        """Adds one image pair gt, pred: int[H, W]; errors name the image by its index (and `name`)."""
        where = _describe(len(self._stats), name)
        stats = _image_stats(gt, pred, self.thresholds, self.error_iou, name, where)
        self._stats.append(stats)
        return stats

    def add_stats(self, stats: ImageStats) -> None:
        """Adds an image's `ImageStats` (computed with this accumulator's thresholds and error_iou)."""
        if stats.thresholds != self.thresholds or stats.error_iou != self.error_iou:
            raise ValueError(
                f"{_describe(len(self._stats), stats.name)}: stats computed with thresholds {stats.thresholds} and "
                f"error_iou {stats.error_iou}, but this Accumulator uses {self.thresholds} and {self.error_iou}"
            )
        self._stats.append(stats)

    def report(self) -> Report:
        """The `Report` of the images added so far (in the order they were added)."""
        if not self._stats:
            raise ValueError("no images were added: a report needs at least one image")
        stats = self._stats
        n = len(stats)
        n_true = np.array([s.n_true for s in stats], np.int64)
        n_pred = np.array([s.n_pred for s in stats], np.int64)
        tp = np.stack([s.tp for s in stats])
        fp, fn = n_pred[:, None] - tp, n_true[:, None] - tp
        score_sum = np.stack([s.score_sum for s in stats])

        # StarDist's pooled sum: each image adds float32(float32(sum / n_true) * n_true), in float32, in order.
        n_true32 = np.maximum(n_true, 1).astype(np.float32)[:, None]
        terms = np.where(n_true[:, None] > 0, score_sum / n_true32 * n_true32, np.float32(0))
        pooled_sum = np.cumsum(terms, axis=0, dtype=np.float32)[-1]
        pooled = {"tp": tp.sum(0), "fp": fp.sum(0), "fn": fn.sum(0)}
        pooled.update(_stardist_ratios(pooled["tp"], pooled["fp"], pooled["fn"], n_true.sum(), pooled_sum))

        per_image = _stardist_ratios(tp, fp, fn, n_true[:, None], score_sum)
        means = {f: np.asarray(x, np.float64).mean(0) for f, x in (("tp", tp), ("fp", fp), ("fn", fn))}
        for field, values in per_image.items():  # sequential sums, as StarDist's by_image=True
            means[field] = np.cumsum(values, axis=0, dtype=values.dtype)[-1] / values.dtype.type(n)

        rows = []
        for i, s in enumerate(stats):
            row = {
                "name": s.name if s.name is not None else str(i),
                "n_true": s.n_true,
                "n_pred": s.n_pred,
                "dsb2018_score": s.dsb2018_score,
                "aji": s.aji,
                "aji_plus": s.aji_plus,
                "dice": s.dice,
            }
            for k, t in enumerate(self.thresholds):
                row[f"f1_at_{_key(t)}"] = float(per_image["f1"][i, k])
                row[f"accuracy_at_{_key(t)}"] = float(per_image["accuracy"][i, k])
            row.update(missed=s.missed, extra=s.extra, merges=s.merges, splits=s.splits)
            rows.append(row)

        return Report(
            n_images=n,
            thresholds=self.thresholds,
            pooled=_rows(self.thresholds, pooled, int),
            per_image_mean=_rows(self.thresholds, means, float),
            dsb2018_score=float(np.mean([s.dsb2018_score for s in stats])),
            aji=float(np.mean([s.aji for s in stats])),
            aji_plus=float(np.mean([s.aji_plus for s in stats])),
            dice=float(np.mean([s.dice for s in stats])),
            errors={
                "iou": self.error_iou,
                **{k: int(sum(getattr(s, k) for s in stats)) for k in ("missed", "extra", "merges", "splits")},
            },
            per_image=rows,
        )


def evaluate(
    gts: Iterable[np.ndarray],
    preds: Iterable[np.ndarray],
    names: Iterable[str] | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    error_iou: float = 0.7,
) -> Report:
    """The `Report` of paired label images gts[i], preds[i]: int[H_i, W_i] (iterables are consumed lazily).

    Error types (Caicedo et al. 2019, Cytometry A, as in their unet4nuclei code), per image, then summed:
    `missed` = true objects with no prediction of IoU > error_iou; `extra` = predictions with no true object
    of IoU > error_iou; `splits` = true objects with IoU > 0.1 (SPLIT_MERGE_IOU) to two or more predictions;
    `merges` = predictions with IoU > 0.1 to two or more true objects.
    """
    for what, column in (("gts", gts), ("preds", preds)):
        if isinstance(column, np.ndarray) and column.ndim == 2:
            raise ValueError(
                f"{what} is one 2-D array; pass a list of label images (e.g. [gt]) or an N×H×W stack"
            )
    accumulator = Accumulator(thresholds, error_iou)
    end = object()
    columns = (gts, preds) if names is None else (gts, preds, names)
    for item in itertools.zip_longest(*columns, fillvalue=end):
        if any(x is end for x in item):
            raise ValueError(f"gts, preds and names differ in length: one of them ends after {len(accumulator)} images")
        accumulator.add(*item)
    return accumulator.report()
