"""Tests of nucjax.models.maskrcnn.inference.paste_masks: hand-made overlaps and a per-pixel reference loop."""

import numpy as np
import pytest

from nucjax.models.maskrcnn import paste_masks


def test_higher_score_wins_overlaps_and_ids_follow_score():
    boxes = np.array([[2, 2, 10, 10], [6, 6, 14, 14], [7, 7, 9, 9], [0, 0, 3, 3]], np.float32)
    scores = np.array([0.6, 0.9, 0.1, 0.99], np.float32)
    masks = np.ones((4, 4, 4), np.float32)
    valid = np.array([True, True, True, False])  # the last one is padding
    label = paste_masks(boxes, scores, masks, valid, 16, 16)
    expected = np.zeros((16, 16), np.int32)
    expected[2:10, 2:10] = 2
    expected[6:14, 6:14] = 1  # box 2 (score 0.1) lies inside box 1 and vanishes: ids stay 1..N
    np.testing.assert_array_equal(label, expected)


def test_half_mask_pastes_onto_half_its_box():
    masks = np.zeros((1, 4, 4), np.float32)
    masks[0, :, :2] = 1.0
    label = paste_masks(np.array([[0, 0, 4, 8]], np.float32), np.ones(1), masks, np.ones(1, bool), 6, 10)
    expected = np.zeros((6, 10), np.int32)
    expected[0:4, 0:4] = 1  # column j samples the mask at j / 2 - 0.25: columns 0..3 reach >= 0.5
    np.testing.assert_array_equal(label, expected)


def _paste_reference(boxes, scores, masks, valid, height, width, threshold):
    m = masks.shape[1]
    best = np.full((height, width), -np.inf)
    owner = np.full((height, width), -1)
    for i in range(len(boxes)):
        if not valid[i]:
            continue
        y0, x0, y1, x1 = boxes[i]
        for r in range(height):
            for c in range(width):
                y, x = r + 0.5, c + 0.5
                if not (y0 <= y < y1 and x0 <= x < x1):
                    continue
                my = min(max((y - y0) * m / (y1 - y0) - 0.5, 0), m - 1)
                mx = min(max((x - x0) * m / (x1 - x0) - 0.5, 0), m - 1)
                a, b = int(my), int(mx)
                a1, b1 = min(a + 1, m - 1), min(b + 1, m - 1)
                ly, lx = my - a, mx - b
                v = ((1 - ly) * (1 - lx) * masks[i, a, b] + (1 - ly) * lx * masks[i, a, b1]
                     + ly * (1 - lx) * masks[i, a1, b] + ly * lx * masks[i, a1, b1])
                if v >= threshold and scores[i] > best[r, c]:
                    best[r, c], owner[r, c] = scores[i], i
    ids = sorted(set(owner[owner >= 0].tolist()), key=lambda i: -scores[i])
    label = np.zeros((height, width), np.int32)
    for new, i in enumerate(ids, start=1):
        label[owner == i] = new
    return label


def test_paste_masks_matches_per_pixel_reference():
    rng = np.random.default_rng(0)
    start = rng.uniform(-5, 30, (8, 2))
    boxes = np.concatenate([start, start + rng.uniform(3, 15, (8, 2))], axis=1).astype(np.float32)
    scores = rng.permutation(8).astype(np.float32) / 8
    masks = rng.random((8, 6, 6)).astype(np.float32)
    valid = rng.random(8) > 0.2
    got = paste_masks(boxes, scores, masks, valid, 32, 36, mask_threshold=0.4)
    np.testing.assert_array_equal(got, _paste_reference(boxes, scores, masks, valid, 32, 36, 0.4))
    assert got.max() > 3


def test_paste_masks_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="paste_masks"):
        paste_masks(np.zeros((3, 4)), np.zeros(2), np.zeros((3, 5, 5)), np.ones(3, bool), 8, 8)


def test_min_score_drops_detections_and_ids_stay_contiguous():
    boxes = np.array([[0, 0, 4, 4], [0, 6, 4, 10], [6, 0, 10, 4]], np.float32)
    scores = np.array([0.9, 0.55, 0.7], np.float32)
    label = paste_masks(boxes, scores, np.ones((3, 4, 4), np.float32), np.ones(3, bool), 12, 12, min_score=0.6)
    expected = np.zeros((12, 12), np.int32)
    expected[0:4, 0:4] = 1
    expected[6:10, 0:4] = 2  # score 0.7; the 0.55 one is gone
    np.testing.assert_array_equal(label, expected)


def test_min_visible_drops_the_sliver_of_a_duplicate_and_frees_its_pixels():
    # A: 8x8 at the origin (best). B: its duplicate shifted by 2 columns: 16 of its 64 pixels are left (1/4).
    # C: the worst, overlapping only B's free strip and beyond it.
    boxes = np.array([[0, 0, 8, 8], [0, 2, 8, 10], [0, 8, 8, 12]], np.float32)
    scores = np.array([0.9, 0.8, 0.6], np.float32)
    masks, valid = np.ones((3, 4, 4), np.float32), np.ones(3, bool)
    kept = paste_masks(boxes, scores, masks, valid, 8, 14, min_visible=0.25)  # 16 >= 0.25 * 64: B stays
    expected = np.zeros((8, 14), np.int32)
    expected[:, 0:8], expected[:, 8:10], expected[:, 10:12] = 1, 2, 3
    np.testing.assert_array_equal(kept, expected)
    dropped = paste_masks(boxes, scores, masks, valid, 8, 14, min_visible=0.3)  # 16 < 0.3 * 64: B goes, C takes
    expected[:, 8:12] = 2  # its strip, and C is the second id
    np.testing.assert_array_equal(dropped, expected)


def test_paste_masks_without_min_visible_matches_the_reference_for_any_order_of_scores():
    rng = np.random.default_rng(3)
    start = rng.uniform(0, 20, (12, 2))
    boxes = np.concatenate([start, start + rng.uniform(4, 12, (12, 2))], axis=1).astype(np.float32)
    scores = rng.random(12).astype(np.float32)
    masks = rng.random((12, 5, 5)).astype(np.float32)
    valid = np.ones(12, bool)
    np.testing.assert_array_equal(paste_masks(boxes, scores, masks, valid, 30, 30, min_visible=0.0),
                                  _paste_reference(boxes, scores, masks, valid, 30, 30, 0.5))
