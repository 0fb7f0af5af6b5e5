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


def test_funnel_follows_each_true_nucleus_through_the_stages():
    label = np.zeros((24, 28), np.int32)
    label[2:14, 2:14] = 1
    label[2:14, 14:26] = 2  # touches 1
    label[18:22, 2:6] = 3  # isolated, 4x4
    proposals = np.array([[2, 2, 14, 14],  # nucleus 1 exactly
                          [2, 16, 14, 28],  # nucleus 2 shifted 2 right: box IoU 120/168
                          [18, 0, 22, 4]], np.float32)  # beside nucleus 3: box IoU 8/24
    refined = np.array([[2, 2, 14, 14], [2, 14, 14, 26], [18, 2, 22, 6]], np.float32)  # all three exact
    kept = np.array([True, True, False])  # nucleus 3's box scores too low
    detections = np.array([[2, 2, 14, 14], [2, 20, 14, 32]], np.float32)  # nucleus 2's only at box IoU 72/216
    predicted = np.zeros_like(label)
    predicted[2:14, 2:14] = 7  # nucleus 1 exactly
    predicted[2:14, 14:20] = 9  # half of nucleus 2: mask IoU 0.5, not a match (> 0.5 is)
    out = maskrcnn_limits.funnel(label, proposals, refined, kept, detections, predicted)
    np.testing.assert_array_equal(out["proposed"], [True, True, False])
    np.testing.assert_array_equal(out["refined"], [True, True, True])
    np.testing.assert_array_equal(out["scored"], [True, True, False])
    np.testing.assert_array_equal(out["detected"], [True, False, False])
    np.testing.assert_array_equal(out["segmented"], [True, False, False])
    np.testing.assert_array_equal(out["touching"], [True, True, False])
    np.testing.assert_allclose(out["diameter"], 2 * np.sqrt(np.array([144, 144, 16]) / np.pi))

    empty = maskrcnn_limits.funnel(np.zeros((8, 8), np.int32), np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0, bool),
                                   np.zeros((0, 4)), np.zeros((8, 8), np.int32))
    assert all(v.shape == (0,) for v in empty.values())
    lost = maskrcnn_limits.funnel(label, np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0, bool), np.zeros((0, 4)),
                                  np.zeros_like(label))
    assert not any(lost[k].any() for k in maskrcnn_limits.FUNNEL)

    table = maskrcnn_limits.funnel_table([out, lost], ["fluorescence", "brightfield"], "run")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table.splitlines()[2:]}
    assert rows["all"][:3] == ["6", "0.333", "0.500"]  # 2 of 6 proposed, 3 of 6 refined
    assert rows["touching another"][:2] == ["4", "0.500"]
    assert rows["diameter 0–10 px"][:3] == ["2", "0.000", "0.500"]  # nucleus 3 of each image (4.5 px)
    assert rows["diameter 10–20 px"][:2] == ["4", "0.500"] and rows["diameter ≥ 40 px"][:2] == ["0", "–"]
    assert rows["fluorescence"][:2] == ["3", "0.667"] and rows["brightfield"][:2] == ["3", "0.000"]
