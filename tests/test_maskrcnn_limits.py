"""Tests of experiments.maskrcnn_limits on hand-made label images (its checkpoint rows: test_maskrcnn_variant)."""

import numpy as np

from experiments import maskrcnn_limits


def test_rectangles_survive_any_mask_size_exactly():
    label = np.zeros((40, 50), np.int32)
    label[3:11, 4:30] = 1
    label[11:37, 10:17] = 2  # touches nucleus 1
    label[20:25, 30:48] = 3
    for size in (2, 7, 28):
        np.testing.assert_array_equal(maskrcnn_limits.oracle_labels(label, size), label)


def test_a_disk_through_a_2x2_mask_comes_back_as_its_box():
    # Each quadrant of a radius-10 disk in its 21x21 box is ~pi/4 covered, above 0.5: the 2x2 mask is all ones, and
    # pasting it fills the box.
    yy, xx = np.mgrid[:30, :30]
    label = (((yy - 14) ** 2 + (xx - 15) ** 2) <= 100).astype(np.int32)
    expected = np.zeros_like(label)
    expected[4:25, 5:26] = 1
    np.testing.assert_array_equal(maskrcnn_limits.oracle_labels(label, 2), expected)
    assert maskrcnn_limits.oracle_labels(np.zeros((5, 5), np.int32), 28).sum() == 0


def test_ideal_masks_are_the_matched_nucleus_pixels_in_each_box():
    label = np.zeros((20, 20), np.int32)
    label[2:10, 2:10] = 1
    label[2:10, 10:18] = 2  # touches 1 on the right
    boxes = np.array([
        [2, 2, 10, 10],  # exactly nucleus 1's box: all ones
        [2, 0, 10, 8],  # shifted 2 pixels left: box IoU 6/10 with nucleus 1; its left quarter is background
        [2, 6, 10, 14],  # straddles 1 and 2 (IoU 1/3 with each): unmatched
        [2, 12, 10, 20],  # shifted 2 right over nucleus 2 (IoU 0.6): its right quarter is background
    ], np.float32)
    masks, matched = maskrcnn_limits.ideal_masks(boxes, label, 4)
    np.testing.assert_array_equal(matched, [True, True, False, True])
    np.testing.assert_array_equal(masks[0], np.ones((4, 4)))
    np.testing.assert_array_equal(masks[1], np.tile([0, 1, 1, 1], (4, 1)))
    np.testing.assert_array_equal(masks[2], np.zeros((4, 4)))
    np.testing.assert_array_equal(masks[3], np.tile([1, 1, 1, 0], (4, 1)))
    # Fractional boxes: cells take exact pixel areas. Box x in [1.5, 9.5), cells 2 wide: the first, [1.5, 3.5), is
    # 0.5 of background pixel 1 and 1.5 of nucleus 1 (75%: in); shifted to [0.5, 8.5) it is 1.5 background (out).
    masks, matched = maskrcnn_limits.ideal_masks(np.array([[2, 1.5, 10, 9.5], [2, 0.5, 10, 8.5]]), label, 4)
    assert matched.all()
    np.testing.assert_array_equal(masks[0], np.ones((4, 4)))
    np.testing.assert_array_equal(masks[1], np.tile([0, 1, 1, 1], (4, 1)))


def test_cli_rejects_bad_sizes(capsys):
    assert maskrcnn_limits.main(["--sizes", "28,x"]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert maskrcnn_limits.main(["--setting", "holdout_fraction"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
