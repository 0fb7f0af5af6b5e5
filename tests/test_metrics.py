"""Tests for nucjax.metrics: hand-worked cases, a brute-force reference, StarDist, and Kaggle's rule on DSB2018."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.segmentation import expand_labels

from nucjax import metrics
from tests.conftest import REPO

LOW_AND_DEFAULT = (0.1, 0.3, 0.45) + metrics.DEFAULT_THRESHOLDS


def random_labels(rng: np.random.Generator, shape=(32, 32), n=10) -> np.ndarray:
    """Rectangles with non-contiguous ids painted in random order (later ones cover earlier ones)."""
    labels = np.zeros(shape, np.int32)
    for k in rng.permutation(np.arange(1, n + 1) * 3):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        h, w = rng.integers(2, 12, size=2)
        labels[y : y + h, x : x + w] = k
    return labels


def random_prediction(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """Unrelated objects, a shifted copy, merged objects or split objects, chosen at random."""
    kind = rng.integers(4)
    if kind == 0:
        return random_labels(rng, gt.shape, n=int(rng.integers(0, 14)))
    if kind == 1:
        return np.roll(gt, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
    ids = np.unique(gt)[1:]
    if kind == 2:
        lut = np.arange(gt.max() + 1)
        lut[ids] = np.where(rng.random(len(ids)) < 0.4, rng.choice(ids, len(ids)), ids)
        return lut[gt]
    rows = np.indices(gt.shape)[0]
    return np.where(np.isin(gt, ids[::2]) & (rows > rng.integers(gt.shape[0])), gt + 1000, gt)


def reference(gt: np.ndarray, pred: np.ndarray, thresholds, error_iou=0.7) -> dict:
    """Brute force from per-object masks and the full IoU matrix, with scipy's linear_sum_assignment."""
    true_masks = [gt == i for i in np.unique(gt) if i]
    pred_masks = [pred == j for j in np.unique(pred) if j]
    inter = np.zeros((len(true_masks), len(pred_masks)), int)
    union = np.zeros_like(inter)
    for i, t in enumerate(true_masks):
        for j, p in enumerate(pred_masks):
            inter[i, j], union[i, j] = np.sum(t & p), np.sum(t | p)
    iou = inter / np.maximum(union, 1)
    area_t = np.array([m.sum() for m in true_masks], int)
    area_p = np.array([m.sum() for m in pred_masks], int)
    out = {"tp": [], "sum": []}
    for t in thresholds:
        rows, cols = linear_sum_assignment(iou >= t, maximize=True)  # the largest number of matches
        ok = iou[rows, cols] >= t
        out["tp"].append(int(ok.sum()))
        out["sum"].append(iou[rows, cols][ok].sum())
    n_t, n_p = iou.shape
    hits = [np.sum(iou > t) for t in metrics.DEFAULT_THRESHOLDS]
    out["dsb2018_score"] = np.mean([h / (n_t + n_p - h) for h in hits]) if n_t + n_p else 1.0
    c = u = 0
    used = set()
    for i in range(n_t):
        j = int(np.argmax(iou[i])) if n_p else 0
        if n_p and iou[i, j] > 0:
            c, u = c + inter[i, j], u + union[i, j]
            used.add(j)
        else:
            u += area_t[i]
    u += sum(area_p[j] for j in range(n_p) if j not in used)
    out["aji"] = c / u if u else 1.0
    rows, cols = linear_sum_assignment(iou, maximize=True)
    keep = iou[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    c = inter[rows, cols].sum()
    u = union[rows, cols].sum() + np.delete(area_t, rows).sum() + np.delete(area_p, cols).sum()
    out["aji_plus"] = c / u if u else 1.0
    fg = (gt > 0).sum() + (pred > 0).sum()
    out["dice"] = 2 * np.sum((gt > 0) & (pred > 0)) / fg if fg else 1.0
    out["missed"] = int(np.sum(~(iou > error_iou).any(1)))
    out["extra"] = int(np.sum(~(iou > error_iou).any(0)))
    out["splits"] = int(np.sum((iou > 0.1).sum(1) > 1))
    out["merges"] = int(np.sum((iou > 0.1).sum(0) > 1))
    return out


def kaggle_dsb2018(gt: np.ndarray, pred: np.ndarray) -> float:
    """Kaggle's DSB2018 rule as in the public kernels: a hit when IoU > t; TP/(TP+FP+FN) averaged over t."""
    _, g = np.unique(gt, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    inter = np.histogram2d(g.ravel(), p.ravel(), bins=(g.max() + 1, p.max() + 1))[0]
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    iou = (inter / union)[1:, 1:]
    scores = []
    for t in np.arange(0.5, 1.0, 0.05):
        hits = iou > round(t, 2)
        tp = np.sum(hits.sum(1) == 1)
        fp = np.sum(hits.sum(0) == 0)
        fn = np.sum(hits.sum(1) == 0)
        scores.append(tp / (tp + fp + fn))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def stardist_matching():
    """StarDist's matching module, the reference implementation (the `test` extra installs it)."""
    return pytest.importorskip("stardist.matching")


def by_threshold(rows: list[dict]) -> dict:
    return {row["threshold"]: row for row in rows}


def test_default_thresholds_are_exact_rounded_floats():
    assert metrics.DEFAULT_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_partial_overlap_by_hand():
    gt = np.zeros((10, 10), np.int32)
    gt[2:6, 2:6] = 1
    pred = np.roll(gt, 1, axis=1) * 4  # 12 shared pixels, union 20: IoU 0.6
    rows = by_threshold(metrics.match(gt, pred, (0.5, 0.6, 0.65)))
    assert rows[0.6]["tp"] == 1 and rows[0.6]["fp"] == 0 and rows[0.6]["fn"] == 0  # IoU >= threshold
    assert rows[0.65]["tp"] == 0 and rows[0.65]["fp"] == 1 and rows[0.65]["fn"] == 1
    assert rows[0.65]["accuracy"] == 0 and rows[0.65]["precision"] == 0
    assert rows[0.5]["mean_matched_score"] == pytest.approx(0.6, rel=1e-7)
    assert rows[0.5]["panoptic_quality"] == pytest.approx(0.6, rel=1e-7)
    s = metrics.image_stats(gt, pred)
    assert s.dsb2018_score == pytest.approx(0.2)  # IoU > 0.5 and > 0.55 only: Kaggle's match is strict
    assert (s.aji, s.aji_plus, s.dice) == (0.6, 0.6, 0.75)
    assert (s.missed, s.extra, s.merges, s.splits) == (1, 1, 0, 0)


def test_merge_by_hand():
    gt = np.zeros((6, 8), np.int32)
    gt[0:3, 0:3], gt[0:3, 3:6] = 1, 2
    pred = np.where(gt > 0, 5, 0)  # one object over both: IoU 9/18 = 0.5 with each
    (row,) = metrics.match(gt, pred, (0.5,))
    assert (row["tp"], row["fp"], row["fn"]) == (1, 0, 1)
    assert (row["precision"], row["recall"], row["accuracy"]) == (1.0, 0.5, 0.5)
    assert row["f1"] == pytest.approx(2 / 3)
    assert (row["mean_matched_score"], row["mean_true_score"]) == (0.5, 0.25)
    assert row["panoptic_quality"] == pytest.approx(1 / 3)
    s = metrics.image_stats(gt, pred)
    assert s.dsb2018_score == 0.0
    assert (s.aji, s.aji_plus, s.dice) == (18 / 36, 9 / 27, 1.0)
    assert (s.missed, s.extra, s.merges, s.splits) == (2, 1, 1, 0)


def test_split_into_tied_halves_by_hand():
    gt = np.zeros((6, 8), np.int32)
    gt[0:3, 0:6] = 3
    pred = np.zeros_like(gt)
    pred[0:3, 0:3], pred[0:3, 3:6] = 9, 7  # both halves tie at IoU 0.5
    (row,) = metrics.match(gt, pred, (0.5,))
    assert (row["tp"], row["fp"], row["fn"]) == (1, 1, 0)
    assert (row["mean_matched_score"], row["mean_true_score"]) == (0.5, 0.5)
    assert row["panoptic_quality"] == pytest.approx(1 / 3)
    s = metrics.image_stats(gt, pred)
    assert (s.aji, s.aji_plus) == (9 / 27, 9 / 27)  # AJI: the tie goes to the lower id; the other half is unpaired
    assert (s.missed, s.extra, s.merges, s.splits) == (1, 2, 0, 1)
    assert s.dsb2018_score == 0.0


def test_matching_maximises_the_number_of_matches():
    gt = np.zeros((1, 20), np.int32)
    gt[0, 0:10], gt[0, 10:14] = 1, 2
    pred = np.zeros_like(gt)
    pred[0, 4:14], pred[0, 0:4] = 1, 2
    # IoU(gt1, p1) = 6/14, IoU(gt2, p1) = 4/10, IoU(gt1, p2) = 4/10: greedy by IoU would find one match
    rows = by_threshold(metrics.match(gt, pred, (0.35, 0.41, 0.5)))
    assert rows[0.35]["tp"] == 2 and rows[0.35]["mean_matched_score"] == pytest.approx(0.4, rel=1e-7)
    assert rows[0.41]["tp"] == 1 and rows[0.41]["mean_matched_score"] == pytest.approx(6 / 14, rel=1e-7)
    assert rows[0.5]["tp"] == 0
    s = metrics.image_stats(gt, pred)
    assert s.aji == pytest.approx((6 + 4) / (14 + 10 + 4))  # both gt objects pick p1; p2 is unused
    assert s.aji_plus == pytest.approx((4 + 4) / (10 + 10))  # one-to-one: gt1-p2 and gt2-p1
    assert (s.merges, s.splits) == (1, 1)


def test_empty_images():
    empty = np.zeros((5, 5), np.int32)
    one = empty.copy()
    one[1:3, 1:4] = 7
    both = metrics.image_stats(empty, empty)
    assert (both.n_true, both.n_pred, both.tp.sum()) == (0, 0, 0)
    assert (both.dsb2018_score, both.aji, both.aji_plus, both.dice) == (1.0, 1.0, 1.0, 1.0)
    row = metrics.match(empty, empty)[0]
    assert (row["tp"], row["fp"], row["fn"], row["accuracy"], row["panoptic_quality"]) == (0, 0, 0, 0.0, 0.0)
    for gt, pred, fp, fn in ((empty, one, 1, 0), (one, empty, 0, 1)):
        s = metrics.image_stats(gt, pred)
        row = metrics.match(gt, pred)[0]
        assert (row["tp"], row["fp"], row["fn"], row["f1"], row["mean_true_score"]) == (0, fp, fn, 0.0, 0.0)
        assert (s.dsb2018_score, s.aji, s.aji_plus, s.dice) == (0.0, 0.0, 0.0, 0.0)
        assert (s.extra, s.missed) == (fp, fn)


def test_perfect_prediction_scores_one_everywhere():
    rng = np.random.default_rng(1)
    gts = [random_labels(rng) for _ in range(5)]
    single = np.zeros((8, 8), np.int32)
    single[2:5, 3:7] = 2
    gts.append(single)
    report = metrics.evaluate(gts, [np.where(g > 0, g + 5, 0) for g in gts], thresholds=LOW_AND_DEFAULT)
    for row in report.pooled + report.per_image_mean:
        assert row["fp"] == row["fn"] == 0
        assert all(row[f] == 1.0 for f in metrics.FIELDS[3:]), row
    assert (report.dsb2018_score, report.aji, report.aji_plus, report.dice) == (1.0, 1.0, 1.0, 1.0)
    assert {k: v for k, v in report.errors.items() if k != "iou"} == {"missed": 0, "extra": 0, "merges": 0, "splits": 0}


def test_agrees_with_brute_force_reference_on_random_images():
    rng = np.random.default_rng(0)
    for i in range(120):
        gt = random_labels(rng, n=int(rng.integers(0, 14)))
        pred = random_prediction(rng, gt)
        ref = reference(gt, pred, LOW_AND_DEFAULT)
        s = metrics.image_stats(gt, pred, thresholds=LOW_AND_DEFAULT)
        assert list(s.tp) == ref["tp"], i
        unique = np.array(LOW_AND_DEFAULT) >= 0.5  # where the matching (hence the IoU sum) is unique
        np.testing.assert_allclose(s.score_sum[unique], np.array(ref["sum"])[unique], rtol=1e-6, err_msg=str(i))
        for key in ("dsb2018_score", "aji", "aji_plus", "dice"):
            assert getattr(s, key) == pytest.approx(ref[key], rel=1e-12), (i, key)
        for key in ("missed", "extra", "merges", "splits"):
            assert getattr(s, key) == ref[key], (i, key)


def test_equals_stardist_per_image_and_pooled_on_random_images(stardist_matching):
    rng = np.random.default_rng(2)
    gts = [random_labels(rng, n=int(rng.integers(0, 14))) for _ in range(80)]
    preds = [random_prediction(rng, gt) for gt in gts]
    for gt, pred in zip(gts, preds):
        theirs_all = stardist_matching.matching(gt, pred, LOW_AND_DEFAULT)
        for ours, theirs in zip(metrics.match(gt, pred, LOW_AND_DEFAULT), theirs_all):
            assert {f: ours[f] for f in metrics.FIELDS} == {f: getattr(theirs, f) for f in metrics.FIELDS}
    report = metrics.evaluate(gts, preds, thresholds=LOW_AND_DEFAULT)
    pooled = stardist_matching.matching_dataset(gts, preds, LOW_AND_DEFAULT, by_image=False, show_progress=False)
    for ours, theirs in zip(report.pooled, pooled):
        assert {f: ours[f] for f in metrics.FIELDS} == {f: getattr(theirs, f) for f in metrics.FIELDS}
    means = stardist_matching.matching_dataset(gts, preds, LOW_AND_DEFAULT, by_image=True, show_progress=False)
    for ours, theirs in zip(report.per_image_mean, means):  # StarDist's by_image sums tp, fp, fn
        assert {f: ours[f] for f in metrics.FIELDS[3:]} == {f: getattr(theirs, f) for f in metrics.FIELDS[3:]}
        assert ours["tp"] == theirs.tp / len(gts)


def test_invariant_to_relabelling():
    rng = np.random.default_rng(3)
    for _ in range(30):
        gt = random_labels(rng)
        pred = random_prediction(rng, gt)
        new_ids = rng.permutation(10**6)[: max(gt.max(), pred.max()) + 1] + 1
        new_ids[0] = 0
        before = metrics.evaluate([gt], [pred]).to_dict()
        after = metrics.evaluate([new_ids[gt]], [new_ids[pred]]).to_dict()
        for key in ("pooled", "per_image_mean"):  # StarDist's float32 IoU sums run in id order: last-bit changes
            for row_before, row_after in zip(before.pop(key), after.pop(key)):
                assert row_after == pytest.approx(row_before, rel=1e-6, abs=0)
                assert all(row_after[f] == row_before[f] for f in metrics.FIELDS[:7])
        assert before == after


def test_large_ids_and_crowded_images_give_the_same_numbers():
    # 2x2 tiles on 36x36 pixels: 324 objects on each side, more pairs than the dense table allows for that size
    tiles = (np.arange(18)[:, None] * 18 + np.arange(18) + 1).repeat(2, 0).repeat(2, 1)
    gt, pred = tiles, np.roll(tiles, 1, axis=0)
    assert gt.max() * pred.max() > 4 * gt.size + 2**16
    padded = [np.pad(x, ((0, 124), (0, 124))) for x in (gt, pred)]  # the same objects, room for a dense table
    huge = [np.where(x > 0, x.astype(np.int64) * 10**12 + 5, 0) for x in (gt, pred)]  # ids mapped to contiguous
    expected = metrics.evaluate([gt], [pred], names=["x"], thresholds=LOW_AND_DEFAULT).to_dict()
    assert metrics.evaluate([padded[0]], [padded[1]], names=["x"], thresholds=LOW_AND_DEFAULT).to_dict() == expected
    assert metrics.evaluate([huge[0]], [huge[1]], names=["x"], thresholds=LOW_AND_DEFAULT).to_dict() == expected
    assert expected["pooled"][0]["tp"] == 324 and expected["pooled"][3]["tp"] == 0  # IoU 2/6 with each neighbour


def test_accepts_float_labels_with_integral_values_and_any_ids():
    rng = np.random.default_rng(4)
    gt = random_labels(rng)
    pred = random_prediction(rng, gt)
    expected = metrics.image_stats(gt, pred)
    as_float = metrics.image_stats(gt.astype(np.float32), (pred * 7).astype(np.uint64))
    assert as_float.aji == expected.aji and list(as_float.tp) == list(expected.tp)


@pytest.mark.parametrize(
    "gt, pred, problem",
    [
        (np.zeros((4, 4), int), np.zeros((4, 5), int), "shape"),
        (np.zeros((4, 4, 1), int), np.zeros((4, 4, 1), int), "2-D"),
        (np.full((4, 4), 0.5), np.zeros((4, 4)), "non-integral"),
        (np.full((4, 4), np.nan), np.zeros((4, 4)), "non-integral"),
        (np.zeros((4, 4), int), np.full((4, 4), -1), "negative"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), int), "boolean"),
        (np.zeros((4, 4), complex), np.zeros((4, 4), int), "dtype"),
    ],
)
def test_bad_input_names_the_image_and_the_problem(gt, pred, problem):
    ok = np.zeros((4, 4), np.int32)
    with pytest.raises(ValueError, match=rf"image 1 \('b'\).*{problem}"):
        metrics.evaluate([ok, gt], [ok, pred], names=["a", "b"])
    with pytest.raises(ValueError, match=rf"image 'b'.*{problem}"):
        metrics.image_stats(gt, pred, name="b")


def test_bad_arguments_raise():
    ok = np.zeros((4, 4), np.int32)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.evaluate([ok, ok], [ok])
    with pytest.raises(ValueError, match="preds is one 2-D array; pass a list"):
        metrics.evaluate([ok], ok)
    with pytest.raises(ValueError, match="gts is one 2-D array"):
        metrics.evaluate(ok, ok)
    with pytest.raises(ValueError, match="thresholds"):
        metrics.match(ok, ok, (0.0, 0.5))
    with pytest.raises(ValueError, match="no images"):
        metrics.Accumulator().report()
    with pytest.raises(ValueError, match=r"image 0 \('x'\).*thresholds"):
        metrics.Accumulator().add_stats(metrics.image_stats(ok, ok, thresholds=(0.5,), name="x"))


def test_a_stack_is_a_sequence_of_images():
    gt = np.zeros((2, 6, 6), np.int32)
    gt[0, 1:3, 1:3] = 1
    gt[1, 3:5, 3:5] = 4
    pred = gt.copy()
    pred[1] = 0  # image 1: its one nucleus missed (score 0); image 0 exact (score 1); the mean is 1/2
    assert metrics.evaluate(gt, pred).dsb2018_score == pytest.approx(0.5)


def test_accumulator_of_pickled_stats_equals_evaluate():
    rng = np.random.default_rng(5)
    gts = [random_labels(rng) for _ in range(6)]
    preds = [random_prediction(rng, gt) for gt in gts]
    names = [f"img{i}" for i in range(6)]
    accumulator = metrics.Accumulator(thresholds=LOW_AND_DEFAULT, error_iou=0.5)
    for gt, pred, name in zip(gts, preds, names):
        stats = metrics.image_stats(gt, pred, thresholds=LOW_AND_DEFAULT, error_iou=0.5, name=name)
        accumulator.add_stats(pickle.loads(pickle.dumps(stats)))
    expected = metrics.evaluate(gts, preds, names=names, thresholds=LOW_AND_DEFAULT, error_iou=0.5)
    assert accumulator.report().to_dict() == expected.to_dict()


def test_report_dict_has_the_documented_shape():
    rng = np.random.default_rng(6)
    gts = [random_labels(rng) for _ in range(3)]
    report = metrics.evaluate(gts, [random_prediction(rng, gt) for gt in gts])
    d = json.loads(json.dumps(report.to_dict()))
    assert list(d) == ["n_images", "thresholds", "pooled", "per_image_mean", "dsb2018_score", "aji", "aji_plus",
                       "dice", "errors", "per_image"]  # fmt: skip
    assert d["n_images"] == 3 and d["thresholds"] == list(metrics.DEFAULT_THRESHOLDS)
    for rows in (d["pooled"], d["per_image_mean"]):
        assert [row["threshold"] for row in rows] == d["thresholds"]
        assert all(list(row) == ["threshold", *metrics.FIELDS] for row in rows)
    assert list(d["errors"]) == ["iou", "missed", "extra", "merges", "splits"] and d["errors"]["iou"] == 0.7
    row = d["per_image"][1]
    assert list(row)[:7] == ["name", "n_true", "n_pred", "dsb2018_score", "aji", "aji_plus", "dice"]
    assert row["name"] == "1" and "f1_at_0.5" in row and "accuracy_at_0.95" in row and "splits" in row
    assert d["dsb2018_score"] == pytest.approx(np.mean([r["dsb2018_score"] for r in d["per_image"]]))
    summary = report.summary()
    assert f"{d['dsb2018_score']:.4f}" in summary and summary.count("\n  0.") == len(metrics.DEFAULT_THRESHOLDS)


def erode(labels):
    cross = ndimage.generate_binary_structure(2, 1)
    same = ndimage.grey_erosion(labels, footprint=cross) == ndimage.grey_dilation(labels, footprint=cross)
    return np.where(same, labels, 0)


def merge_neighbours(labels):
    grown = expand_labels(labels, 2)
    a, b = grown[:, :-1].ravel(), grown[:, 1:].ravel()
    lut = np.arange(labels.max() + 1)
    for x, y in set(zip(a[(a != b) & (a > 0) & (b > 0)], b[(a != b) & (a > 0) & (b > 0)])):
        if x % 2:
            lut[y] = lut[x]
    return lut[labels]


def split_nuclei(labels):
    rows = np.indices(labels.shape)[0]
    area = np.bincount(labels.ravel())
    centre = np.bincount(labels.ravel(), rows.ravel()) / np.maximum(area, 1)
    return np.where((labels % 3 == 0) & (rows > centre[labels]), labels + labels.max(), labels)


def spurious(labels):
    out = labels.copy()
    for k, (y, x) in enumerate(np.random.default_rng(0).integers(0, min(labels.shape) - 4, size=(10, 2))):
        patch = out[y : y + 4, x : x + 4]
        patch[patch == 0] = labels.max() + 1 + k
    return out


PERTURBATIONS = {
    "eroded": erode,
    "dilated": lambda labels: expand_labels(labels, 2),
    "merged": merge_neighbours,
    "split": split_nuclei,
    "dropped": lambda labels: np.where(labels % 4 == 1, 0, labels),
    "spurious": spurious,
}


@pytest.fixture(scope="module")
def dsb2018_masks(dsb2018):
    from nucjax.data.io import read_mask_folder

    folders = sorted((dsb2018 / "stage1_train").iterdir())[:6]
    return [read_mask_folder(folder / "masks", overlap="first")[0] for folder in folders]


@pytest.mark.parametrize("kind", list(PERTURBATIONS))
def test_real_masks_match_stardist_and_kaggle(dsb2018_masks, kind, stardist_matching):
    gts = dsb2018_masks
    preds = [PERTURBATIONS[kind](gt) for gt in gts]
    thresholds = (0.1, 0.3) + metrics.DEFAULT_THRESHOLDS
    report = metrics.evaluate(gts, preds, thresholds=thresholds)
    pooled = stardist_matching.matching_dataset(gts, preds, thresholds, by_image=False, show_progress=False)
    for ours, theirs in zip(report.pooled, pooled):
        assert {f: ours[f] for f in metrics.FIELDS} == {f: getattr(theirs, f) for f in metrics.FIELDS}
    kaggle = [kaggle_dsb2018(gt, pred) for gt, pred in zip(gts, preds)]
    assert [row["dsb2018_score"] for row in report.per_image] == pytest.approx(kaggle, rel=1e-12)
    assert report.dsb2018_score == pytest.approx(np.mean(kaggle), rel=1e-12)
    assert report.pooled[2]["fp"] + report.pooled[2]["fn"] > 0  # the perturbation changed something


def test_importing_metrics_does_not_import_jax():
    code = "import sys, nucjax.metrics; print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
