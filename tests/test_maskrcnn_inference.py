"""Tests of nucjax.models.maskrcnn.inference's NumPy half: paste_masks (hand-made overlaps and a per-pixel
reference loop), and test-time augmentation's unview_detections and fuse_views (hand-made cases)."""

import numpy as np
import pytest

from nucjax.inference import VIEWS
from nucjax.models.maskrcnn import paste_masks
from nucjax.models.maskrcnn.inference import fuse_views, unview_detections


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


@pytest.mark.parametrize("turns, flip", VIEWS)
def test_unview_detections_takes_a_views_box_and_mask_back_to_the_image(turns, flip):
    """An image 10 x 14 holding a 4 x 4 asymmetric pattern at rows 2..5, columns 7..10: in each view (np.rot90,
    then a mirror) the pattern's bounding box, with its pixels as a 4 x 4 mask, goes back to the original box and
    pattern."""
    pattern = np.arange(1, 17, dtype=np.float32).reshape(4, 4)  # all values distinct: any wrong turn shows
    image = np.zeros((10, 14), np.float32)
    image[2:6, 7:11] = pattern
    seen = np.rot90(image, turns)
    seen = seen[:, ::-1] if flip else seen
    rows, cols = np.nonzero(seen)
    y0, x0, y1, x1 = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
    detections = {"boxes": np.array([[y0, x0, y1, x1]], np.float32), "masks": seen[None, y0:y1, x0:x1],
                  "scores": np.array([0.7], np.float32), "valid": np.array([True])}
    back = unview_detections(detections, turns, flip, seen.shape)
    np.testing.assert_array_equal(back["boxes"], [[2, 7, 6, 11]])
    np.testing.assert_array_equal(back["masks"][0], pattern)
    assert back["scores"][0] == np.float32(0.7) and back["valid"][0]


def test_fuse_views_groups_one_detection_per_view_and_averages_boxes_scores_and_masks():
    """Two views. A's best box and B's [0, 0, 10, 5] (IoU 0.5) form one group; B's [1, 1, 11, 11] overlaps A's
    box as well but B already has a member there, so it stands alone; A's padding (valid False) is ignored."""
    m_a1, m_a2 = np.array([[1.0, 0.5], [0.25, 0.0]]), np.full((2, 2), 0.75)
    m_b1, m_b2 = np.full((2, 2), 0.2), np.array([[0.8, 0.4], [0.6, 1.0]])
    view_a = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 30, 30]], np.float32),
              "scores": np.array([0.9, 0.8, 0.99], np.float32), "masks": np.stack([m_a1, m_a2, m_a2]),
              "valid": np.array([True, True, False])}
    view_b = {"boxes": np.array([[1, 1, 11, 11], [0, 0, 10, 5]], np.float32),
              "scores": np.array([0.6, 0.7], np.float32), "masks": np.stack([m_b1, m_b2]),
              "valid": np.array([True, True])}
    fused = fuse_views([view_a, view_b], iou=0.5)

    # Group 1: box (0.9 A1 + 0.7 B2) / 1.6: x1 = (9 + 3.5) / 1.6 = 7.8125; score (0.9 + 0.7) / 2 views.
    # Its mask cells: rows at y 2.5, 7.5 (cells 0, 1 of both sources); columns at x 1.953125, 5.859375: in A1
    # (x 0..10) mask coordinates 0 (clamped from -0.109) and 0.671875; in B2 (x 0..5) 0.28125, and outside.
    col_a = np.stack([m_a1[:, 0], 0.328125 * m_a1[:, 0] + 0.671875 * m_a1[:, 1]], axis=1)
    col_b = np.stack([0.71875 * m_b2[:, 0] + 0.28125 * m_b2[:, 1], np.zeros(2)], axis=1)
    np.testing.assert_allclose(fused["boxes"], [[0, 0, 10, 7.8125], [20, 20, 30, 30], [1, 1, 11, 11]], rtol=1e-6)
    np.testing.assert_allclose(fused["scores"], [0.8, 0.4, 0.3], rtol=1e-6)
    np.testing.assert_allclose(fused["masks"], [(col_a + col_b) / 2, m_a2, m_b1], rtol=1e-6)
    assert fused["valid"].tolist() == [True, True, True]
    # One view alone comes back as it was (its valid detections, best first).
    alone = fuse_views([view_b], iou=0.5)
    np.testing.assert_allclose(alone["boxes"], view_b["boxes"][::-1])
    np.testing.assert_allclose(alone["masks"], view_b["masks"][::-1], rtol=1e-6)
    # Views without detections fuse into none.
    empty = {k: v[:0] for k, v in view_b.items()}
    assert fuse_views([empty, empty], iou=0.5)["boxes"].shape == (0, 4)
