"""Tests of nucjax.models.maskrcnn.boxes against NumPy references written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nucjax.models.maskrcnn import boxes


def _random_boxes(rng, n, size=100.0, max_side=30.0):
    start = rng.uniform(0, size, (n, 2))
    side = rng.uniform(0.5, max_side, (n, 2))
    return np.concatenate([start, start + side], axis=1).astype(np.float32)


def _iou_reference(a, b):
    out = np.zeros((len(a), len(b)))
    for i, (ay0, ax0, ay1, ax1) in enumerate(a):
        for j, (by0, bx0, by1, bx1) in enumerate(b):
            inter = max(0.0, min(ay1, by1) - max(ay0, by0)) * max(0.0, min(ax1, bx1) - max(ax0, bx0))
            union = (ay1 - ay0) * (ax1 - ax0) + (by1 - by0) * (bx1 - bx0) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def test_box_iou_matches_loop_and_hand_cases():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 20), _random_boxes(rng, 15)
    np.testing.assert_allclose(boxes.box_iou(jnp.asarray(a), jnp.asarray(b)), _iou_reference(a, b), atol=1e-6)
    hand_a = np.array([[0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 0, 0]], np.float32)
    hand_b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]], np.float32)
    expected = np.array([[1 / 7, 1, 0], [4 / 16, 4 / 16, 0], [0, 0, 0]])
    np.testing.assert_allclose(boxes.box_iou(hand_a, hand_b), expected, atol=1e-6)


def test_encode_decode_round_trip_and_closed_form():
    rng = np.random.default_rng(1)
    target, reference = _random_boxes(rng, 50), _random_boxes(rng, 50)
    weights = (10.0, 10.0, 5.0, 5.0)
    deltas = boxes.encode(jnp.asarray(target), jnp.asarray(reference), weights)
    np.testing.assert_allclose(boxes.decode(deltas, jnp.asarray(reference), weights), target, atol=1e-3)
    # A 4x8 reference box moved down by 2 (half its height) and doubled in width.
    d = boxes.encode(jnp.asarray([[2.0, -4.0, 6.0, 12.0]]), jnp.asarray([[0.0, 0.0, 4.0, 8.0]]), weights)
    np.testing.assert_allclose(d[0], [10 * 0.5, 0.0, 0.0, 5 * np.log(2.0)], atol=1e-5)


def test_anchors_count_centres_and_sizes():
    shapes, strides, sizes, ratios = [(4, 6), (2, 3)], [4, 8], [8.0, 16.0], [0.5, 1.0, 2.0]
    a = boxes.anchors(shapes, strides, sizes, ratios)
    assert a.shape == ((4 * 6 + 2 * 3) * 3, 4) and a.dtype == np.float32
    h, w = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    expected_size = np.repeat([8.0, 16.0], [4 * 6 * 3, 2 * 3 * 3])
    np.testing.assert_allclose(np.sqrt(h * w), expected_size, rtol=1e-5)
    np.testing.assert_allclose(h / w, np.tile(ratios, 30), rtol=1e-5)
    # Level 1, row 1, column 2, ratio 2.0 (index 2): centre ((1 + 0.5) * 8, (2 + 0.5) * 8), h = 16 sqrt 2, w = 16 / sqrt 2.
    k = 4 * 6 * 3 + (1 * 3 + 2) * 3 + 2
    s2 = np.sqrt(2.0)
    np.testing.assert_allclose(a[k], [12 - 8 * s2, 20 - 8 / s2, 12 + 8 * s2, 20 + 8 / s2], rtol=1e-5)


def _greedy_nms(b, scores, valid, threshold):
    order = [i for i in sorted(range(len(b)), key=lambda i: -scores[i]) if valid[i]]
    kept = []
    for i in order:
        if all(_iou_reference(b[[i]], b[[j]])[0, 0] <= threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_nms_matches_greedy_loop(threshold):
    rng = np.random.default_rng(2)
    # Clusters of overlapping boxes, so suppression chains run within and across tiles.
    centres = np.repeat(_random_boxes(rng, 12, max_side=20.0), 25, axis=0)
    b = (centres + rng.normal(0, 3.0, centres.shape)).astype(np.float32)
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1.0)
    scores = rng.permutation(len(b)).astype(np.float32)
    valid = rng.random(len(b)) > 0.1
    expected = _greedy_nms(b, scores, valid, threshold)

    run = jax.jit(lambda b, s, v: boxes.nms(b, s, v, threshold, 400, tile=64))
    index, kept = run(b, scores, valid)
    assert kept.sum() == len(expected)
    np.testing.assert_array_equal(np.asarray(index)[np.asarray(kept)], expected)
    assert not np.asarray(kept)[len(expected):].any()

    few, few_kept = boxes.nms(jnp.asarray(b), jnp.asarray(scores), jnp.asarray(valid), threshold, 5, tile=64)
    np.testing.assert_array_equal(np.asarray(few)[np.asarray(few_kept)], expected[:5])


def test_nms_vmaps_over_images():
    rng = np.random.default_rng(3)
    b = np.stack([_random_boxes(rng, 40, size=40.0) for _ in range(2)])
    s = rng.random((2, 40)).astype(np.float32)
    v = np.ones((2, 40), bool)
    index, kept = jax.vmap(lambda b, s, v: boxes.nms(b, s, v, 0.5, 40, tile=16))(b, s, v)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(index[i])[np.asarray(kept[i])], _greedy_nms(b[i], s[i], v[i], 0.5))
