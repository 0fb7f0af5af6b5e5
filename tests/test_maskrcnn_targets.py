"""Tests of nucjax.models.maskrcnn.targets: matching, sampling, RPN/RoI targets and mini-mask targets on hand-made cases."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from skimage.draw import ellipse

from nucjax.data import targets as data_targets
from nucjax.models.maskrcnn import targets
from nucjax.models.maskrcnn.boxes import encode


def test_match_thresholds_low_quality_and_invalid_ground_truth():
    iou = jnp.asarray([[0.8, 0.1], [0.5, 0.2], [0.1, 0.2], [0.0, 0.05]])
    labels, matched = targets.match(iou, jnp.asarray([True, True]), 0.7, 0.3, low_quality=False)
    np.testing.assert_array_equal(labels, [1, -1, 0, 0])
    np.testing.assert_array_equal(matched, [0, 0, 1, 1])
    # GT 1's best IoU (0.2, tied by candidates 1 and 2) claims both.
    labels, _ = targets.match(iou, jnp.asarray([True, True]), 0.7, 0.3, low_quality=True)
    np.testing.assert_array_equal(labels, [1, 1, 1, 0])
    labels, matched = targets.match(iou, jnp.asarray([False, True]), 0.7, 0.3, low_quality=True)
    np.testing.assert_array_equal(labels, [0, 1, 1, 0])
    np.testing.assert_array_equal(matched, [1, 1, 1, 1])
    labels, _ = targets.match(iou, jnp.asarray([False, False]), 0.7, 0.3, low_quality=True)
    np.testing.assert_array_equal(labels, [0, 0, 0, 0])


def test_sample_takes_fixed_counts_from_the_right_sets():
    labels = jnp.asarray(np.r_[np.ones(10), np.zeros(100), -np.ones(20)].astype(np.int32))
    pos, neg = targets.sample(labels, jax.random.key(0), 16, 0.5)
    assert int(pos.sum()) == 8 and int(neg.sum()) == 8
    assert not pos[10:].any() and not neg[:10].any() and not neg[110:].any()
    other, _ = targets.sample(labels, jax.random.key(1), 16, 0.5)
    assert (np.asarray(other) != np.asarray(pos)).any()  # a random subset, not the first ones
    few = jnp.asarray(np.r_[np.ones(3), np.zeros(100)].astype(np.int32))
    pos, neg = targets.sample(few, jax.random.key(0), 16, 0.5)
    assert int(pos.sum()) == 3 and int(neg.sum()) == 13


def test_rpn_targets_on_hand_made_anchors():
    gt = jnp.asarray([[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 0.0, 0.0]])
    gt_valid = jnp.asarray([True, False])
    anchors = jnp.asarray(
        [[10.0, 10.0, 30.0, 30.0], [12.0, 10.0, 32.0, 30.0], [40.0, 40.0, 60.0, 60.0], [12.0, 10.0, 32.0, 30.0],
         [20.0, 20.0, 40.0, 40.0]]
    )
    anchor_valid = jnp.asarray([True, True, True, False, True])
    pos, neg, deltas = targets.rpn_targets(anchors, anchor_valid, gt, gt_valid, jax.random.key(0), 0.7, 0.3, 8, 0.5)
    # IoUs with the GT: 1, 360/440 = 0.82, 0, (0.82 but on padding), 100/700 = 0.14.
    np.testing.assert_array_equal(pos, [True, True, False, False, False])
    np.testing.assert_array_equal(neg, [False, False, True, False, True])
    np.testing.assert_allclose(deltas[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(deltas[1], [-2.0 / 20.0, 0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(deltas[2:], 0.0)


def test_roi_targets_adds_ground_truth_and_orders_foreground_first():
    gt = jnp.asarray([[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 0.0, 0.0]])
    gt_valid = jnp.asarray([True, True, False])
    proposals = jnp.asarray([[70.0, 70.0, 80.0, 80.0], [10.0, 12.0, 30.0, 32.0], [20.0, 20.0, 40.0, 40.0], [0, 0, 5, 5.0]])
    proposal_valid = jnp.asarray([True, True, True, False])
    weights = (10.0, 10.0, 5.0, 5.0)
    out = targets.roi_targets(proposals, proposal_valid, gt, gt_valid, jax.random.key(0), 0.5, 0.5, 8, 0.5, weights)
    # Foreground: proposal 1 (IoU 360/440 with GT 0) and the two valid GT boxes; background: proposals 0 and 2.
    fg = np.asarray(out["foreground"])
    np.testing.assert_array_equal(fg, [True, True, True, False, False, False, False, False])
    np.testing.assert_array_equal(out["sampled"], [True] * 5 + [False] * 3)
    fg_rois = {tuple(np.asarray(r)) for r in out["rois"][:3]}
    assert fg_rois == {(10.0, 12.0, 30.0, 32.0), (10.0, 10.0, 30.0, 30.0), (50.0, 50.0, 60.0, 60.0)}
    assert {tuple(np.asarray(r)) for r in out["rois"][3:5]} == {(70.0, 70.0, 80.0, 80.0), (20.0, 20.0, 40.0, 40.0)}
    for r, m, d in zip(out["rois"][:3], out["matched"][:3], out["deltas"][:3]):
        np.testing.assert_allclose(d, encode(gt[m], r, weights), atol=1e-6)
    np.testing.assert_allclose(out["deltas"][3:], 0.0)


def _mask_target_reference(roi, gt_box, gt_mask, out):
    m = gt_mask.shape[0]
    result = np.zeros((out, out))
    for u in range(out):
        for v in range(out):
            y = roi[0] + (u + 0.5) * (roi[2] - roi[0]) / out
            x = roi[1] + (v + 0.5) * (roi[3] - roi[1]) / out
            if not (gt_box[0] <= y < gt_box[2] and gt_box[1] <= x < gt_box[3]):
                continue
            my = min(max((y - gt_box[0]) * m / (gt_box[2] - gt_box[0]) - 0.5, 0.0), m - 1.0)
            mx = min(max((x - gt_box[1]) * m / (gt_box[3] - gt_box[1]) - 0.5, 0.0), m - 1.0)
            y0, x0 = int(my), int(mx)
            y1, x1 = min(y0 + 1, m - 1), min(x0 + 1, m - 1)
            ly, lx = my - y0, mx - x0
            value = ((1 - ly) * (1 - lx) * gt_mask[y0, x0] + (1 - ly) * lx * gt_mask[y0, x1]
                     + ly * (1 - lx) * gt_mask[y1, x0] + ly * lx * gt_mask[y1, x1])
            result[u, v] = value >= 0.5
    return result


def test_mask_targets_match_reference_loop_and_identity():
    rng = np.random.default_rng(0)
    gt_mask = (rng.random((4, 8, 8)) > 0.5).astype(np.uint8)
    gt_box = np.array([[10.0, 10.0, 30.0, 40.0]] * 4, np.float32)
    rois = np.array([[10.0, 10.0, 30.0, 40.0], [5.0, 20.0, 25.0, 50.0], [12.3, 11.1, 19.7, 22.9], [0, 0, 60, 60]], np.float32)
    got = targets.mask_targets(jnp.asarray(rois), jnp.asarray(gt_box), jnp.asarray(gt_mask), 6)
    expected = np.stack([_mask_target_reference(r, g, m, 6) for r, g, m in zip(rois, gt_box, gt_mask)])
    np.testing.assert_array_equal(got, expected)
    same = targets.mask_targets(jnp.asarray(rois[:1]), jnp.asarray(gt_box[:1]), jnp.asarray(gt_mask[:1]), 8)
    np.testing.assert_array_equal(same[0], gt_mask[0])


def test_mini_mask_target_is_close_to_the_full_resolution_crop():
    label = np.zeros((96, 96), np.int32)
    label[ellipse(48, 45, 30, 18, rotation=0.6, shape=label.shape)] = 1
    config = ml_collections.ConfigDict({"max_instances": 4, "mask_size": 28, "boundary_width": 2, "w0": 10.0,
                                        "sigma": 5.0})
    inst = data_targets.compute(label, ["instances"], config)
    roi = np.array([20.0, 30.0, 70.0, 80.0], np.float32)  # a proposal overlapping the nucleus' box
    got = np.asarray(targets.mask_targets(jnp.asarray(roi[None]), jnp.asarray(inst["boxes"][:1]),
                                          jnp.asarray(inst["masks"][:1]), 50)[0])
    exact = label[20:70, 30:80] == 1  # output pixel (u, v) is image pixel (20 + u, 30 + v) here
    iou = (got.astype(bool) & exact).sum() / (got.astype(bool) | exact).sum()
    assert iou > 0.95, iou
