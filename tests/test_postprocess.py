"""Tests for nucjax.postprocess on hand-drawn probability maps."""

import importlib.util
import pathlib
import re

import numpy as np
import pytest

from nucjax import postprocess
from nucjax.postprocess import POSTPROCESSORS

REPO = pathlib.Path(__file__).resolve().parents[1]

H, W = 40, 60
YY, XX = np.mgrid[:H, :W]
PARAMS = {
    "threshold": 0.5,
    "boundary_threshold": 0.5,
    "interior_threshold": 0.5,
    "min_size": 0,
    "seed_min_size": 1,
    "fill_holes": True,
}


def disc(cy: float, cx: float, r: float) -> np.ndarray:
    return (YY - cy) ** 2 + (XX - cx) ** 2 <= r**2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def objects(labels: np.ndarray) -> list[np.ndarray]:
    return [labels == i for i in range(1, labels.max() + 1)]


# Two discs of radius 10 whose centres are 18 apart: they overlap, so their union is one foreground blob. The
# drawn nuclei split the overlap at column 29, which the boundary channels mark.
DISC_A, DISC_B = disc(20, 20, 10), disc(20, 38, 10)
UNION = DISC_A | DISC_B
LINE = UNION & (XX == 29)
NUCLEUS_A, NUCLEUS_B = DISC_A & (XX < 29), DISC_B & (XX > 29)
RIM = UNION & ~disc(20, 20, 9) & ~disc(20, 38, 9)  # the outer edge of the blob, 1-2 pixels wide


def prob(mask: np.ndarray, inside: float = 0.9, outside: float = 0.1) -> np.ndarray:
    return np.where(mask, inside, outside).astype(np.float32)


def boundary_maps() -> np.ndarray:
    return np.stack([prob(UNION), prob(LINE | RIM)], axis=-1)


def three_class_maps() -> np.ndarray:
    boundary = LINE | RIM
    interior = UNION & ~boundary
    return np.stack([prob(~UNION, 0.9, 0.05), prob(interior, 0.9, 0.05), prob(boundary, 0.9, 0.05)], axis=-1)


def assert_matches_nuclei(labels: np.ndarray) -> None:
    found = objects(labels)
    assert len(found) == 2
    for nucleus in (NUCLEUS_A, NUCLEUS_B):
        assert max(iou(obj, nucleus) for obj in found) > 0.9


def test_components_merges_touching_discs():
    labels = POSTPROCESSORS["components"](prob(UNION)[..., None], PARAMS)
    assert labels.dtype == np.int32 and labels.shape == (H, W)
    assert labels.max() == 1
    np.testing.assert_array_equal(labels == 1, UNION)


def test_boundary_watershed_splits_touching_discs_at_the_boundary_line():
    labels = POSTPROCESSORS["boundary_watershed"](boundary_maps(), PARAMS)
    assert labels.dtype == np.int32
    assert_matches_nuclei(labels)
    np.testing.assert_array_equal(labels > 0, UNION)  # the watershed covers the whole foreground


def test_three_class_grows_interior_seeds_into_two_nuclei():
    labels = POSTPROCESSORS["three_class"](three_class_maps(), PARAMS)
    assert labels.dtype == np.int32
    assert_matches_nuclei(labels)
    np.testing.assert_array_equal(labels > 0, UNION)


def test_watershed_split_follows_the_boundary_ridge_not_the_midpoint():
    # Seeds at both ends of a bar; the boundary probability peaks at column 15, far from the midpoint (column 27).
    bar = (YY >= 10) & (YY < 20) & (XX >= 5) & (XX < 50)
    boundary = np.where((XX >= 9) & (XX < 46), 0.9 - 0.3 * np.abs(XX - 15) / 40, 0.1).astype(np.float32)
    labels = POSTPROCESSORS["boundary_watershed"](np.stack([prob(bar), boundary], axis=-1), PARAMS)
    assert labels.max() == 2
    left = labels == labels[15, 5]
    assert left[15, 5:15].all() and not left[15, 17:].any()


def test_seeds_smaller_than_seed_min_size_are_dropped():
    # Disc B is all boundary except a 3-pixel seed: with seed_min_size 4 it has no seed and A's seed floods it.
    boundary = LINE | RIM | (DISC_B & ~NUCLEUS_A)
    boundary[20, 37:40] = False
    maps = np.stack([prob(UNION), prob(boundary)], axis=-1)
    assert POSTPROCESSORS["boundary_watershed"](maps, {**PARAMS, "seed_min_size": 3}).max() == 2
    merged = POSTPROCESSORS["boundary_watershed"](maps, {**PARAMS, "seed_min_size": 4})
    assert merged.max() == 1
    np.testing.assert_array_equal(merged == 1, UNION)


def test_foreground_without_seed_is_kept_as_its_own_object():
    blob = disc(5, 53, 3)  # all boundary: no seed in it
    maps = np.stack([prob(UNION | blob), prob(LINE | RIM | blob)], axis=-1)
    labels = POSTPROCESSORS["boundary_watershed"](maps, PARAMS)
    assert labels.max() == 3
    assert any(np.array_equal(obj, blob) for obj in objects(labels))


@pytest.mark.parametrize("name", ["components", "boundary_watershed", "three_class"])
def test_objects_smaller_than_min_size_are_removed(name):
    square = (YY >= 2) & (YY < 5) & (XX >= 50) & (XX < 53)  # 9 pixels, away from the discs
    fg = UNION | square
    maps = {
        "components": prob(fg)[..., None],
        "boundary_watershed": np.stack([prob(fg), prob(LINE | RIM)], axis=-1),
        "three_class": np.stack([prob(~fg, 0.9, 0.05), prob(fg & ~(LINE | RIM), 0.9, 0.05), prob(LINE | RIM)], -1),
    }[name]
    kept = POSTPROCESSORS[name](maps, {**PARAMS, "min_size": 9})
    removed = POSTPROCESSORS[name](maps, {**PARAMS, "min_size": 10})
    assert any(np.array_equal(obj, square) for obj in objects(kept))
    assert kept.max() == removed.max() + 1
    assert not removed[square].any()


def test_components_fills_holes_only_when_asked():
    ring = disc(20, 20, 8) & ~disc(20, 20, 3)
    maps = prob(ring)[..., None]
    np.testing.assert_array_equal(POSTPROCESSORS["components"](maps, PARAMS) == 1, disc(20, 20, 8))
    np.testing.assert_array_equal(POSTPROCESSORS["components"](maps, {**PARAMS, "fill_holes": False}) == 1, ring)


def test_watershed_fills_holes_per_object_not_between_objects():
    # Two touching squares; a hole inside A only, and a hole straddling their shared edge (enclosed by neither).
    a, b = (YY >= 5) & (YY < 25) & (XX >= 5) & (XX < 25), (YY >= 5) & (YY < 25) & (XX >= 25) & (XX < 45)
    own_hole = (YY >= 8) & (YY < 11) & (XX >= 8) & (XX < 11)
    shared_hole = (YY >= 14) & (YY < 17) & (XX >= 23) & (XX < 27)
    fg = (a | b) & ~own_hole & ~shared_hole
    edge = fg & (XX == 24)
    maps = np.stack([prob(fg), prob(edge)], axis=-1)
    labels = POSTPROCESSORS["boundary_watershed"](maps, PARAMS)
    assert labels.max() == 2
    obj_a = labels == labels[6, 6]
    assert obj_a[own_hole].all() and not obj_a[b].any()
    assert not labels[shared_hole].any()
    unfilled = POSTPROCESSORS["boundary_watershed"](maps, {**PARAMS, "fill_holes": False})
    assert not unfilled[own_hole].any()


def test_background_enclosed_by_two_objects_is_not_filled():
    # A square frame (B) whose left side has a plug (A) cut off by two boundary lines: the frame's inside is
    # enclosed by A and B together, not by either alone.
    outer = (YY >= 5) & (YY < 25) & (XX >= 25) & (XX < 45)
    inside = (YY >= 8) & (YY < 22) & (XX >= 28) & (XX < 42)
    cuts = ((YY == 11) | (YY == 18)) & (XX >= 25) & (XX < 28)
    maps = np.stack([prob(outer & ~inside), prob(cuts)], axis=-1)
    labels = POSTPROCESSORS["boundary_watershed"](maps, PARAMS)
    assert labels.max() == 2
    assert not labels[inside].any()
    np.testing.assert_array_equal(labels > 0, outer & ~inside)


def test_objects_touching_at_a_corner_are_separate():
    fg = ((YY >= 5) & (YY < 10) & (XX >= 5) & (XX < 10)) | ((YY >= 10) & (YY < 15) & (XX >= 10) & (XX < 15))
    assert POSTPROCESSORS["components"](prob(fg)[..., None], PARAMS).max() == 2


def test_nested_objects_keep_their_own_holes():
    # Ring A lies in the hole of ring B: A's hole goes to A, the gap between the rings to B.
    ring_a, ring_b = disc(20, 30, 6) & ~disc(20, 30, 3), disc(20, 30, 15) & ~disc(20, 30, 10)
    maps = np.stack([prob(ring_a | ring_b), prob(np.zeros((H, W), bool))], axis=-1)
    labels = POSTPROCESSORS["boundary_watershed"](maps, PARAMS)
    np.testing.assert_array_equal(labels == labels[20, 30], disc(20, 30, 6))
    np.testing.assert_array_equal(labels == labels[20, 45], disc(20, 30, 15) & ~disc(20, 30, 6))


def test_ids_are_contiguous_after_removal():
    sizes = [20, 2, 20, 3, 20]  # the 2- and 3-pixel objects fall between kept ones in label order
    fg = np.zeros((H, W), bool)
    for k, size in enumerate(sizes):
        fg[2 + 4 * k, 2 : 2 + size] = True
    labels = POSTPROCESSORS["components"](prob(fg)[..., None], {**PARAMS, "min_size": 5})
    np.testing.assert_array_equal(np.unique(labels), [0, 1, 2, 3])
    np.testing.assert_array_equal(np.bincount(labels.ravel())[1:], [20, 20, 20])


def test_accepts_the_config_postprocess_section():
    spec = importlib.util.spec_from_file_location("default_config", REPO / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    section = module.get_config().postprocess
    assert dict(section.items()) == postprocess.DEFAULT_PARAMS
    assert_matches_nuclei(POSTPROCESSORS["boundary_watershed"](boundary_maps(), section))


def test_missing_key_names_the_key():
    params = {k: v for k, v in PARAMS.items() if k != "boundary_threshold"}
    with pytest.raises(ValueError, match="boundary_threshold"):
        POSTPROCESSORS["boundary_watershed"](boundary_maps(), params)
    with pytest.raises(ValueError, match="min_size"):
        POSTPROCESSORS["components"](prob(UNION)[..., None], {"threshold": 0.5, "fill_holes": True})


@pytest.mark.parametrize(
    "name, maps", [("boundary_watershed", prob(UNION)[..., None]), ("three_class", np.zeros((H, W, 2), np.float32)),
                   ("components", prob(UNION))],
)
def test_wrong_channel_count_names_postprocessor_and_shape(name, maps):
    with pytest.raises(ValueError, match=re.escape(name) + ".*" + re.escape(str(maps.shape))):
        POSTPROCESSORS[name](maps, PARAMS)


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="dtype"):
        POSTPROCESSORS["components"]((prob(UNION)[..., None] * 255).astype(np.uint8), PARAMS)
    with pytest.raises(ValueError, match="threshold"):
        POSTPROCESSORS["components"](prob(UNION)[..., None], {**PARAMS, "threshold": 2.0})
    with pytest.raises(ValueError, match="min_size"):
        POSTPROCESSORS["components"](prob(UNION)[..., None], {**PARAMS, "min_size": -1})


def test_search_space_covers_each_postprocessors_thresholds():
    for name, extra in [("components", set()), ("boundary_watershed", {"boundary_threshold", "seed_min_size"}),
                        ("three_class", {"interior_threshold", "seed_min_size"}),
                        ("detections", {"min_score", "min_visible"})]:
        grid = postprocess.search_space(name)
        assert set(grid) == {"threshold", "min_size"} | extra
        assert min(grid["threshold"]) <= 0.3 and max(grid["threshold"]) >= 0.7
    with pytest.raises(ValueError, match="nope"):
        postprocess.search_space("nope")


def reference_dsb2018_score(gt: np.ndarray, pred: np.ndarray) -> float:
    """Kaggle DSB2018 score of one image: mean over t in 0.5..0.95 of TP / (TP + FP + FN), match = IoU > t."""
    ious = np.array([[iou(g, p) for p in objects(pred)] for g in objects(gt)]).reshape(gt.max(), pred.max())
    scores = []
    for t in np.arange(0.5, 1.0, 0.05):
        tp = int((ious > t).sum())  # IoU > 0.5 makes matches one-to-one
        scores.append(tp / (gt.max() + pred.max() - tp))
    return float(np.mean(scores))


def threshold_case():
    """Maps where only threshold 0.6 separates two discs (a 0.55 bridge joins them; B's probability is 0.65),
    and only min_size 10 removes a 5-pixel speck."""
    a, b = disc(20, 15, 7), disc(20, 45, 8)
    bridge = (np.abs(YY - 20) <= 1) & (XX > 15) & (XX < 45)
    fg = np.full((H, W), 0.1, np.float32)
    fg[bridge], fg[a], fg[b] = 0.55, 0.9, 0.65
    fg[disc(35, 55, 1)] = 0.9
    gt = np.zeros((H, W), np.int32)
    gt[disc(20, 15, 8)] = 1  # A is drawn one pixel larger in the ground truth: IoU about 0.77
    gt[b] = 2
    expected = a.astype(np.int32) + 2 * b
    return fg[..., None], gt, expected


def single_disc_case():
    maps = prob(disc(20, 30, 9))[..., None]
    gt = disc(20, 30, 10).astype(np.int32)
    return maps, gt, disc(20, 30, 9).astype(np.int32)


@pytest.mark.parametrize("max_exhaustive", [256, 1])  # exhaustive, then coordinate ascent
def test_tune_finds_the_separating_threshold(max_exhaustive):
    cases = [threshold_case(), single_disc_case()]
    maps_list, gts, expected = zip(*cases)
    grid = {"threshold": [0.4, 0.5, 0.6, 0.7], "min_size": [0, 10]}
    base = {"fill_holes": True, "threshold": 0.5, "min_size": 15, "interior_threshold": 0.3}
    params, score = postprocess.tune("components", maps_list, gts, grid, base, max_exhaustive=max_exhaustive)
    assert params == {"fill_holes": True, "threshold": 0.6, "min_size": 10, "interior_threshold": 0.3}
    reference = np.mean([reference_dsb2018_score(gt, pred) for gt, pred in zip(gts, expected)])
    assert 0.5 < reference < 0.95
    assert score == pytest.approx(reference)


def test_tune_uses_default_grid_and_params():
    maps, gt, _ = single_disc_case()
    params, score = postprocess.tune("components", [maps], [gt], progress=False)
    assert set(params) == set(postprocess.DEFAULT_PARAMS)
    assert params["threshold"] in postprocess.search_space("components")["threshold"]
    assert score == pytest.approx(reference_dsb2018_score(gt, POSTPROCESSORS["components"](maps, params)))


def test_tune_rejects_bad_grids_and_inputs():
    maps, gt, _ = single_disc_case()
    with pytest.raises(ValueError, match="boundary_threshold"):
        postprocess.tune("components", [maps], [gt], {"boundary_threshold": [0.5]})
    with pytest.raises(ValueError, match="fill_holes"):
        postprocess.tune("components", [maps], [gt], {"threshold": [0.5]}, {"min_size": 0})
    with pytest.raises(ValueError, match="image 0"):
        postprocess.tune("boundary_watershed", [maps], [gt])
    with pytest.raises(ValueError, match="threshold must be"):
        postprocess.tune("components", [maps], [gt], {"threshold": [0.5, 1.5]})
    with pytest.raises(ValueError, match="as many"):
        postprocess.tune("components", [maps, maps], [gt])


@pytest.mark.parametrize("max_exhaustive, evaluations", [(8, 8), (7, 5)])
def test_tune_tries_every_combination_of_a_small_grid_only(monkeypatch, max_exhaustive, evaluations):
    # Coordinate ascent from (0.5, 10): the threshold sweep (4 sets), then min_size at 0.6 (1 new set), then a
    # sweep of cached sets that improves nothing.
    calls = []
    evaluate = postprocess.metrics.evaluate
    monkeypatch.setattr(postprocess.metrics, "evaluate", lambda gts, preds: calls.append(1) or evaluate(gts, preds))
    maps, gt, _ = threshold_case()
    grid = {"threshold": [0.4, 0.5, 0.6, 0.7], "min_size": [0, 10]}
    params, _ = postprocess.tune("components", [maps], [gt], grid, max_exhaustive=max_exhaustive, progress=False)
    assert (params["threshold"], params["min_size"]) == (0.6, 10)
    assert len(calls) == evaluations


# ---- a detector's outputs ----


def duplicate_detections_case():
    """One nucleus (an 8x8 square) found twice: the best box on it, a worse duplicate shifted by 2 columns whose
    visible part (a 2-column sliver) is an extra object unless min_visible drops it; and a third, low-scoring box
    on background. Masks 4x4 of ones; the ground truth is the square."""
    outputs = {
        "boxes": np.array([[4, 4, 12, 12], [4, 6, 12, 14], [20, 20, 26, 26], [0, 0, 0, 0]], np.float32),
        "scores": np.array([0.95, 0.8, 0.55, 0.0], np.float32),
        "masks": np.ones((4, 4, 4), np.float32),
        "valid": np.array([True, True, True, False]),
        "size": np.array([32, 32]),
    }
    gt = np.zeros((32, 32), np.int32)
    gt[4:12, 4:12] = 1
    return outputs, gt


def test_detections_pastes_with_the_detection_parameters():
    outputs, gt = duplicate_detections_case()
    params = {"threshold": 0.5, "min_score": 0.0, "min_visible": 0.0, "min_size": 0}
    labels = POSTPROCESSORS["detections"](outputs, params)
    expected = gt.copy()
    expected[4:12, 12:14] = 2  # the duplicate's sliver
    expected[20:26, 20:26] = 3
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(POSTPROCESSORS["detections"](outputs, {**params, "min_visible": 0.5, "min_score": 0.6}),
                                  gt)
    # min_size removes the 16-pixel sliver and renumbers: the background box becomes 2.
    np.testing.assert_array_equal(POSTPROCESSORS["detections"](outputs, {**params, "min_size": 20}),
                                  np.where(expected == 3, 2, np.where(expected == 2, 0, expected)))


def test_tune_on_detections_drops_the_duplicate_and_the_background_box():
    outputs, gt = duplicate_detections_case()
    grid = {"min_score": [0.0, 0.6], "min_visible": [0.0, 0.5]}
    base = {**postprocess.DEFAULT_PARAMS, "min_size": 0, "min_visible": 0.0}
    params, score = postprocess.tune("detections", [outputs], [gt], grid, base, progress=False)
    assert (params["min_score"], params["min_visible"]) == (0.6, 0.5) and score == 1.0
    # Without them: 1 match and 2 extra objects at every IoU threshold.
    _, untuned = postprocess.tune("detections", [outputs], [gt], {"min_score": [0.0]}, base, progress=False)
    assert untuned == pytest.approx(1 / 3)


def test_detections_input_errors_name_the_postprocessor_and_key():
    outputs, gt = duplicate_detections_case()
    with pytest.raises(ValueError, match="'detections'.*missing.*'size'"):
        POSTPROCESSORS["detections"]({k: v for k, v in outputs.items() if k != "size"}, postprocess.DEFAULT_PARAMS)
    with pytest.raises(ValueError, match="'detections', image 0.*size"):
        postprocess.tune("detections", [{**outputs, "size": np.array([32.0, 32.0])}], [gt])
    with pytest.raises(ValueError, match="ground truth shape"):
        postprocess.tune("detections", [outputs], [gt[:16]])
    with pytest.raises(ValueError, match="min_visible"):
        POSTPROCESSORS["detections"](outputs, {**postprocess.DEFAULT_PARAMS, "min_visible": 1.5})
