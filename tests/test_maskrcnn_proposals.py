"""Tests of nucjax.models.maskrcnn.proposals on a hand-made two-level case."""

import jax.numpy as jnp
import numpy as np

from nucjax.models.maskrcnn.proposals import rpn_proposals


def test_per_level_topk_clipping_min_size_and_nms_within_levels():
    anchors = np.array(
        [
            # level 0 (5 anchors, top-3 kept)
            [10, 10, 30, 30],  # logit 5: kept
            [10, 11, 30, 31],  # logit 4: IoU 0.9 with the first -> suppressed
            [50, 50, 50.5, 60],  # logit 3: 0.5 px tall -> below min_size
            [-10, -10, 8, 8],  # logit 1: outside the level's top-3
            [40, 40, 70, 70],  # logit 0.5: outside the top-3
            # level 1 (3 anchors, all kept by top-3)
            [10, 10, 30, 30],  # logit 2: same box as level 0's best, but NMS is per level -> kept
            [-5, 20, 20, 90],  # logit 1.5: clipped to [0, 20, 20, 64]
            [15, 15, 30, 30],  # logit -1: IoU 0.56 with the level's best, below 0.7 -> kept
        ],
        np.float32,
    )
    logits = np.array([5, 4, 3, 1, 0.5, 2, 1.5, -1], np.float32)
    boxes, scores, valid = rpn_proposals(
        jnp.asarray(logits), jnp.zeros((8, 4)), jnp.asarray(anchors), [5, 3], (64, 64), pre_nms_topk=3,
        post_nms_topk=6, nms_iou=0.7, min_size=1.0, tile=4,
    )
    np.testing.assert_array_equal(valid, [True, True, True, True, False, False])
    np.testing.assert_allclose(scores[:4], [5, 2, 1.5, -1])
    np.testing.assert_allclose(
        boxes[:4], [[10, 10, 30, 30], [10, 10, 30, 30], [0, 20, 20, 64], [15, 15, 30, 30]], atol=1e-5
    )
