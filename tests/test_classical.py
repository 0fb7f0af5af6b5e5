"""Tests of nucjax.classical on small drawn images whose right answers are known by construction."""

import numpy as np
import pytest

from nucjax import classical, metrics


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _image(labels, fg=200, bg=20):
    """uint8[H, W, 3]: bright nuclei on a dark background."""
    grey = np.where(labels > 0, fg, bg).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _same_objects(a, b):
    """Whether two label images hold the same objects up to renumbering."""
    pairs = {(int(x), int(y)) for x, y in zip(a.ravel(), b.ravel())}
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


def _separate():
    labels = np.zeros((64, 64), np.int32)
    labels[_disk(labels.shape, 16, 16, 7)] = 1
    labels[_disk(labels.shape, 44, 40, 9)] = 2
    return labels


def _touching():
    """Two disks of radius 9 whose centres are 16 apart: they overlap in a narrow waist."""
    labels = np.zeros((48, 64), np.int32)
    labels[_disk(labels.shape, 24, 20, 9)] = 1
    labels[_disk(labels.shape, 24, 36, 9) & (labels == 0)] = 2
    return labels


@pytest.mark.parametrize("name", classical.METHODS)
def test_separate_bright_disks_are_found_exactly(name):
    labels = _separate()
    pred = classical.segment(name, _image(labels), classical.default_params(name))
    assert pred.dtype == np.int32 and pred.max() == 2
    assert _same_objects(pred, labels)


@pytest.mark.parametrize("name", classical.METHODS)
def test_dark_nuclei_on_a_bright_background_are_inverted_first(name):
    labels = _separate()
    pred = classical.segment(name, _image(labels, fg=40, bg=230), classical.default_params(name))
    assert _same_objects(pred, labels)


def test_otsu_merges_touching_disks_and_the_distance_watershed_splits_them():
    labels = _touching()
    image = _image(labels)
    otsu = classical.segment("otsu", image, classical.default_params("otsu"))
    assert otsu.max() == 1 and np.array_equal(otsu > 0, labels > 0)
    params = {**classical.default_params("local_watershed"), "min_distance": 5}
    split = classical.segment("local_watershed", image, params)
    assert split.max() == 2
    assert metrics.match(labels, split, thresholds=(0.8,))[0]["tp"] == 2  # each disk recovered with IoU >= 0.8


def test_tuning_picks_a_min_size_that_removes_specks_the_ground_truth_lacks():
    labels = _separate()
    image = _image(labels)
    image[60:62, 2:4] = 200  # a 4-pixel speck that is no nucleus
    assert classical.default_params("otsu")["min_size"] == 0
    untuned = classical.segment("otsu", image, classical.default_params("otsu"))
    assert untuned.max() == 3
    params = classical.tune_classical("otsu", [image], [labels])
    assert 4 < params["min_size"] and _same_objects(classical.segment("otsu", image, params), labels)


def test_bad_names_and_parameters_raise_value_errors():
    image = _image(_separate())
    with pytest.raises(ValueError, match="unknown classical method 'kmeans'"):
        classical.segment("kmeans", image, {})
    with pytest.raises(ValueError, match="missing parameter 'min_size'"):
        classical.segment("otsu", image, {"threshold_scale": 1.0})
    with pytest.raises(ValueError, match="block_size must be an odd"):
        classical.segment("local_watershed", image, {**classical.default_params("local_watershed"), "block_size": 30})
    with pytest.raises(ValueError, match="grid key 'radius'"):
        classical.tune_classical("otsu", [image], [_separate()], grid={"radius": [1]})
    with pytest.raises(ValueError, match="image 0: labels shape"):
        classical.tune_classical("otsu", [image], [np.zeros((3, 3), np.int32)])
