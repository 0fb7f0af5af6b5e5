"""Targets against hand-worked small label images and brute-force / full-distance-transform references."""

import numpy as np
import pytest
from scipy import ndimage

from nucjax.config import load_config
from nucjax.data import targets
from tests.conftest import REPO


def _config(**changes):
    config = load_config(REPO / "configs" / "default.py").targets
    config.update(changes)
    return config


def _brute_boundary(label: np.ndarray, width: int) -> np.ndarray:
    """Instance pixels with a pixel of another label within city-block distance `width` (inside the image)."""
    height, wide = label.shape
    out = np.zeros(label.shape, bool)
    for y, x in zip(*np.nonzero(label)):
        for dy in range(-width, width + 1):
            for dx in range(-(width - abs(dy)), width - abs(dy) + 1):
                qy, qx = y + dy, x + dx
                if 0 <= qy < height and 0 <= qx < wide and label[qy, qx] != label[y, x]:
                    out[y, x] = True
    return out


def _two_touching_squares() -> np.ndarray:
    label = np.zeros((14, 22), np.int32)
    label[3:11, 3:11] = 1  # rows 3..10, columns 3..10
    label[3:11, 11:19] = 2  # touches square 1 along columns 10 | 11
    return label


def _ring() -> np.ndarray:
    yy, xx = np.mgrid[:21, :21]
    radius = np.hypot(yy - 10, xx - 10)
    return ((radius >= 4) & (radius <= 8)).astype(np.int32) * 3


@pytest.mark.parametrize("width", [1, 2])
def test_touching_line_of_two_squares_is_boundary_on_both_sides(width):
    label = _two_touching_squares()
    out = targets.compute(label, ["boundary", "three_class", "foreground"], _config(boundary_width=width))
    # Pixel (r, c) of an axis-aligned square is within `width` of its outside iff its distance to an edge < width.
    expected = np.zeros(label.shape, bool)
    for c0, c1 in ((3, 10), (11, 18)):
        for r in range(3, 11):
            for c in range(c0, c1 + 1):
                expected[r, c] = min(r - 3, 10 - r, c - c0, c1 - c) < width
    np.testing.assert_array_equal(out["boundary"], expected.astype(np.float32))
    assert out["boundary"][3:11, 11 - width : 11 + width].all()  # the touching line, `width` deep on each side
    np.testing.assert_array_equal(out["three_class"], np.where(expected, 2, (label > 0).astype(np.int32)))
    assert (out["three_class"] == 1).sum() == 2 * (8 - 2 * width) ** 2
    np.testing.assert_array_equal(out["foreground"], (label > 0).astype(np.float32))
    assert out["boundary"].dtype == np.float32 and out["three_class"].dtype == np.int32


@pytest.mark.parametrize("width", [1, 2, 3])
def test_ring_boundary_covers_inner_and_outer_edges_with_the_given_width(width):
    label = _ring()
    edge = targets.compute(label, ["boundary"], _config(boundary_width=width))["boundary"]
    np.testing.assert_array_equal(edge.astype(bool), _brute_boundary(label, width))
    assert edge[10, 10 - 4] == 1 and edge[10, 10 + 8] == 1  # inner and outer rim on the centre row
    if width == 1:
        assert edge[10, 10 + 6] == 0  # mid-ring


def test_instance_cut_by_the_image_edge_has_no_boundary_there():
    label = np.zeros((8, 8), np.int32)
    label[:, :4] = 1
    edge = targets.compute(label, ["boundary"], _config(boundary_width=1))["boundary"]
    expected = np.zeros((8, 8), np.float32)
    expected[:, 3] = 1  # only the column next to the background
    np.testing.assert_array_equal(edge, expected)


def test_distance_of_a_square_is_its_inset_depth_over_the_maximum():
    label = np.zeros((11, 11), np.int32)
    label[2:9, 2:9] = 5  # 7 x 7: the nearest outside pixel is straight across, depth min(...) + 1, centre 4
    dist = targets.compute(label, ["distance"], _config())["distance"]
    rows, cols = np.mgrid[:11, :11]
    depth = np.minimum.reduce([rows - 2, 8 - rows, cols - 2, 8 - cols]) + 1
    expected = np.where(label > 0, depth / 4.0, 0.0)
    np.testing.assert_allclose(dist, expected, atol=1e-6)
    assert dist.dtype == np.float32 and dist[5, 5] == 1.0 and (dist == 1.0).sum() == 1


def test_distance_per_instance_peaks_at_one_and_ignores_the_image_edge():
    label = np.zeros((11, 11), np.int32)
    label[2:9, 0:7] = 1  # touches the left edge: depth counts only the top, bottom and right sides
    label[0:3, 8:11] = 2  # a small instance in the top-right corner, column 7 between them
    dist = targets.compute(label, ["distance"], _config())["distance"]
    rows, cols = np.mgrid[:11, :11]
    depth = np.minimum.reduce([rows - 2, 8 - rows, 6 - cols]) + 1
    np.testing.assert_allclose(dist[label == 1], (depth / 4.0)[label == 1], atol=1e-6)
    ring = targets.compute(_ring(), ["distance"], _config())["distance"]
    for out, lab in ((dist, label), (ring, _ring())):
        for k in np.unique(lab)[1:]:
            assert out[lab == k].max() == pytest.approx(1.0) and out[lab == k].min() > 0
        assert (out[lab == 0] == 0).all()


def _reference_weight_map(label: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """The slow formula: one full-image distance transform per instance."""
    ids = np.unique(label)[1:]
    fraction = (label > 0).mean()
    wc = np.where(label > 0, 0.5 / fraction, 0.5 / (1 - fraction))
    dists = np.sort(np.stack([ndimage.distance_transform_edt(label != k) for k in ids]), axis=0)
    border = w0 * np.exp(-((dists[0] + dists[1]) ** 2) / (2 * sigma**2))
    return wc + np.where(label > 0, 0, border)


def test_weight_map_at_known_points_of_two_bars():
    label = np.zeros((10, 10), np.int32)
    label[:, 0:4] = 1
    label[:, 6:10] = 2  # background is columns 4 and 5: 20% of the image
    weights = targets.compute(label, ["weight_map"], _config(w0=10.0, sigma=5.0))["weight_map"]
    assert weights.dtype == np.float32
    next_to_bar = 0.5 / 0.2 + 10.0 * np.exp(-((1 + 2) ** 2) / (2 * 25.0))  # d1 = 1, d2 = 2
    np.testing.assert_allclose(weights[:, 4], next_to_bar, rtol=1e-6)
    np.testing.assert_allclose(weights[:, 5], next_to_bar, rtol=1e-6)
    np.testing.assert_allclose(weights[label > 0], 0.5 / 0.8, rtol=1e-6)


def test_weight_map_matches_full_distance_transforms_per_instance():
    rng = np.random.default_rng(3)
    label = np.zeros((90, 110), np.int32)
    for k in range(1, 13):  # scattered discs: some close together, some farther apart than the window reach
        cy, cx, r = rng.integers(5, 85), rng.integers(5, 105), rng.integers(2, 6)
        yy, xx = np.mgrid[:90, :110]
        label[(np.hypot(yy - cy, xx - cx) <= r) & (label == 0)] = k
    for sigma in (2.0, 5.0):
        got = targets.compute(label, ["weight_map"], _config(w0=10.0, sigma=sigma))["weight_map"]
        np.testing.assert_allclose(got, _reference_weight_map(label, 10.0, sigma), atol=1e-3)


def test_weight_map_of_one_instance_is_class_balance_only():
    label = np.zeros((6, 6), np.int32)
    label[1:3, 1:4] = 7
    weights = targets.compute(label, ["weight_map"], _config())["weight_map"]
    np.testing.assert_allclose(weights, np.where(label > 0, 0.5 / (6 / 36), 0.5 / (30 / 36)), rtol=1e-6)
    empty = targets.compute(np.zeros((4, 4), np.int32), ["weight_map"], _config())["weight_map"]
    np.testing.assert_array_equal(empty, np.ones((4, 4), np.float32))


def test_instances_boxes_masks_and_padding():
    label = np.zeros((20, 20), np.int32)
    label[2:6, 3:5] = 4  # 4 x 2 rectangle, ids need not be consecutive
    label[2:6, 5:7] = 9  # touching rectangle right of it
    label[10:18, 10:18] = 2  # 8 x 8 square without its 3 x 3 top-left corner
    label[10:13, 10:13] = 0
    out = targets.compute(label, ["instances"], _config(max_instances=5, mask_size=4))
    assert set(out) == {"boxes", "masks", "instance_valid"}
    assert out["boxes"].dtype == np.float32 and out["masks"].dtype == np.uint8 and out["instance_valid"].dtype == bool
    np.testing.assert_array_equal(out["instance_valid"], [True, True, True, False, False])
    np.testing.assert_array_equal(out["boxes"][:3], [[10, 10, 18, 18], [2, 3, 6, 5], [2, 5, 6, 7]])
    np.testing.assert_array_equal(out["boxes"][3:], 0)
    # Cells of 2 x 2 input pixels: the top-left one is empty, its neighbours half (kept: >= 0.5), the rest full.
    expected_corner = np.ones((4, 4), np.uint8)
    expected_corner[0, 0] = 0
    np.testing.assert_array_equal(out["masks"][0], expected_corner)
    np.testing.assert_array_equal(out["masks"][1], 1)
    np.testing.assert_array_equal(out["masks"][3:], 0)


def test_instance_mask_upsampled_keeps_the_split_line():
    label = np.zeros((6, 6), np.int32)
    label[1:5, 1:3] = 1  # left half of box rows 1..4, columns 1..4 (the right half belongs to instance 2)
    label[1:5, 3:5] = 2
    label[1, 3] = 0  # instance 2's box stays 1..4 x 3..4
    masks = targets.compute(label, ["instances"], _config(max_instances=3, mask_size=28))["masks"]
    np.testing.assert_array_equal(masks[0], 1)
    # Instance 2: 4 x 2 box, top-left pixel missing; output cell rows 0..6 map to input row 0 (7 cells/pixel).
    expected = np.ones((28, 28), np.uint8)
    expected[:7, :14] = 0
    np.testing.assert_array_equal(masks[1], expected)


def test_instances_beyond_max_keep_the_largest_in_id_order():
    label = np.zeros((12, 12), np.int32)
    label[0:2, 0:2] = 1  # area 4
    label[4:7, 4:7] = 5  # area 9
    label[9:11, 0:3] = 3  # area 6
    out = targets.compute(label, ["instances"], _config(max_instances=2, mask_size=4))
    np.testing.assert_array_equal(out["boxes"], [[9, 0, 11, 3], [4, 4, 7, 7]])  # ids 3 and 5
    assert out["instance_valid"].all()


def test_unknown_target_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="edges.*foreground.*instances"):
        targets.compute(np.zeros((4, 4), np.int32), ["foreground", "edges"], _config())


def test_bad_label_image_is_rejected():
    with pytest.raises(ValueError, match="integer"):
        targets.compute(np.zeros((4, 4), np.float32), ["foreground"], _config())
    with pytest.raises(ValueError, match="negative"):
        targets.compute(-np.ones((4, 4), np.int32), ["foreground"], _config())


def _random_touching_label(seed: int, shape=(40, 48)) -> np.ndarray:
    """Overlapping random rectangles (later ones on top): touching instances, instances cut by the image edge."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.int32)
    for k in range(1, 15):
        y, x = rng.integers(-4, shape[0]), rng.integers(-4, shape[1])
        label[max(y, 0) : y + rng.integers(3, 14), max(x, 0) : x + rng.integers(3, 14)] = k
    return label


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_boundary_of_touching_random_instances_is_the_brute_force_one(width):
    for seed in range(3):
        label = _random_touching_label(seed)
        out = targets.compute(label, ["boundary", "three_class"], _config(boundary_width=width))
        expected = _brute_boundary(label, width)
        np.testing.assert_array_equal(out["boundary"].astype(bool), expected)
        np.testing.assert_array_equal(out["three_class"], np.where(expected, 2, (label > 0).astype(np.int32)))
