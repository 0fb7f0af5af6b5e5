"""RPN proposals with static shapes: per-level top-k, decoding, clipping, per-level NMS, a fixed number kept."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from nucjax.models.maskrcnn.boxes import clip_boxes, decode, nms


def rpn_proposals(
    logits: jax.Array,
    deltas: jax.Array,
    anchors: jax.Array,
    level_sizes: Sequence[int],
    image_size: tuple[int, int],
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_iou: float,
    min_size: float,
    tile: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Proposals of one image: logits f32[A], deltas f32[A, 4], anchors f32[A, 4] (levels of `level_sizes` anchors).

    Returns boxes f32[P, 4], objectness logits f32[P] and valid bool[P], P = post_nms_topk, best first. Each level
    keeps its `pre_nms_topk` best anchors; boxes are clipped to `image_size` (h, w), those with a side below
    `min_size` dropped, and NMS runs within each level (as torchvision and Detectron2).
    """
    height, width = image_size
    boxes, scores, valid, shifted = [], [], [], []
    start = 0
    for level, count in enumerate(level_sizes):
        top, index = jax.lax.top_k(logits[start:start + count], min(pre_nms_topk, count))
        index = index + start
        b = clip_boxes(decode(deltas[index], anchors[index]), height, width)
        boxes.append(b)
        scores.append(top)
        valid.append(jnp.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= min_size)
        shifted.append(b + level * (max(height, width) + 1.0))  # levels never overlap: NMS stays within a level
        start += count
    boxes, scores, valid = jnp.concatenate(boxes), jnp.concatenate(scores), jnp.concatenate(valid)
    keep, kept = nms(jnp.concatenate(shifted), scores, valid, nms_iou, post_nms_topk, tile)
    return boxes[keep], scores[keep], kept
