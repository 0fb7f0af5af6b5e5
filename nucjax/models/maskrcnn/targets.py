"""Training targets with static shapes: IoU matching, random fg/bg sampling, box deltas and mini-mask mask targets.

Mask targets use the "mini-mask" approximation: the input pipeline stores each ground-truth mask cropped to its box
and resized to M x M, and the target of a proposal is that M x M mask resampled (bilinear, threshold 0.5) at the
proposal's output grid, zero outside the ground-truth box. It differs from cropping the full-resolution mask only
near the object's outline, by at most about one box-pixel / M.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from nucjax.models.maskrcnn.boxes import box_iou, encode


def match(
    iou: jax.Array, gt_valid: jax.Array, fg_iou: float, bg_iou: float, low_quality: bool
) -> tuple[jax.Array, jax.Array]:
    """Labels candidates by IoU with the ground truth: iou f32[N, K], gt_valid bool[K] -> (int32[N], int32[N]).

    Label 1 (foreground) when the best IoU is >= fg_iou, 0 (background) when < bg_iou, -1 (ignored) between. With
    `low_quality`, each ground truth also claims the candidates of its highest (positive) IoU, ties included. The
    second output is the index of the best-matching ground truth.
    """
    iou = jnp.where(gt_valid[None, :], iou, -1.0)
    best = iou.max(axis=1)
    matched = iou.argmax(axis=1).astype(jnp.int32)
    labels = jnp.where(best >= fg_iou, 1, jnp.where(best < bg_iou, 0, -1))
    if low_quality:
        best_per_gt = iou.max(axis=0)
        claimed = (iou == best_per_gt[None, :]) & (best_per_gt[None, :] > 0)
        labels = jnp.where(claimed.any(axis=1), 1, labels)
    return labels.astype(jnp.int32), matched


def _random_rank(mask: jax.Array, key: jax.Array) -> jax.Array:
    """A uniformly random order of the True entries of bool[N]: their ranks 0..count-1 (others rank after them)."""
    order = jnp.argsort(jnp.where(mask, jax.random.uniform(key, mask.shape), 2.0))
    return jnp.zeros(mask.shape, jnp.int32).at[order].set(jnp.arange(mask.shape[0], dtype=jnp.int32))


def sample(labels: jax.Array, key: jax.Array, num: int, positive_fraction: float) -> tuple[jax.Array, jax.Array]:
    """Random fixed-size sample of labels int32[N] -> (positive bool[N], negative bool[N]).

    At most int(num * positive_fraction) positives, then negatives up to `num` in all (fewer when too few exist).
    """
    pos_key, neg_key = jax.random.split(key)
    is_pos, is_neg = labels == 1, labels == 0
    num_pos = jnp.minimum(is_pos.sum(), int(num * positive_fraction))
    num_neg = jnp.minimum(is_neg.sum(), num - num_pos)
    positive = is_pos & (_random_rank(is_pos, pos_key) < num_pos)
    negative = is_neg & (_random_rank(is_neg, neg_key) < num_neg)
    return positive, negative


def rpn_targets(
    anchors: jax.Array,
    anchor_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    key: jax.Array,
    fg_iou: float,
    bg_iou: float,
    num: int,
    positive_fraction: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RPN targets of one image: anchors f32[A, 4], anchor_valid bool[A], gt f32[K, 4] + bool[K].

    Returns (positive bool[A], negative bool[A], deltas f32[A, 4] (zero where not positive)). Anchors whose
    `anchor_valid` is False (centred on padding) are never sampled.
    """
    labels, matched = match(box_iou(anchors, gt_boxes), gt_valid, fg_iou, bg_iou, low_quality=True)
    positive, negative = sample(jnp.where(anchor_valid, labels, -1), key, num, positive_fraction)
    target = jnp.where(positive[:, None], gt_boxes[matched], anchors)
    return positive, negative, encode(target, anchors)


def roi_targets(
    proposals: jax.Array,
    proposal_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    key: jax.Array,
    fg_iou: float,
    bg_iou: float,
    num: int,
    positive_fraction: float,
    box_weights: Sequence[float],
) -> dict[str, jax.Array]:
    """Samples `num` RoIs of one image from proposals f32[P, 4] (+ bool[P]) and the ground truth (added as proposals).

    Returns {"rois": f32[num, 4], "foreground": bool[num], "sampled": bool[num], "matched": int32[num],
    "deltas": f32[num, 4]}: foreground RoIs come first (at most int(num * positive_fraction)), then background ones;
    slots past the sample have sampled=False. Deltas (scaled by box_weights) are zero where not foreground.
    """
    short = max(num - proposals.shape[0] - gt_boxes.shape[0], 0)  # pad so that `num` slots always exist
    candidates = jnp.concatenate([proposals, gt_boxes, jnp.zeros((short, 4), proposals.dtype)])
    valid = jnp.concatenate([proposal_valid, gt_valid, jnp.zeros((short,), bool)])
    labels, matched = match(box_iou(candidates, gt_boxes), gt_valid, fg_iou, bg_iou, low_quality=False)
    positive, negative = sample(jnp.where(valid, labels, -1), key, num, positive_fraction)
    order = jnp.argsort(jnp.where(positive, 0, jnp.where(negative, 1, 2)), stable=True)[:num]
    rois, foreground, matched = candidates[order], positive[order], matched[order]
    reference = jnp.where(foreground[:, None], rois, jnp.asarray([0.0, 0.0, 1.0, 1.0]))
    target = jnp.where(foreground[:, None], gt_boxes[matched], reference)
    return {
        "rois": rois,
        "foreground": foreground,
        "sampled": (positive | negative)[order],
        "matched": matched,
        "deltas": encode(target, reference, box_weights),
    }


def _interpolation_matrix(start: jax.Array, length: jax.Array, gt_start: jax.Array, gt_length: jax.Array,
                          out_size: int, mask_size: int) -> jax.Array:
    """Weights f32[R, out_size, mask_size] sampling a GT box-mask axis at a RoI's output-pixel centres (0 outside)."""
    points = start[:, None] + (jnp.arange(out_size) + 0.5)[None, :] * (length[:, None] / out_size)
    inside = (points >= gt_start[:, None]) & (points < (gt_start + gt_length)[:, None])
    coords = jnp.clip((points - gt_start[:, None]) * (mask_size / gt_length[:, None]) - 0.5, 0.0, mask_size - 1.0)
    low = jnp.floor(coords)
    frac = coords - low
    high = jnp.minimum(low + 1, mask_size - 1)
    weights = (jax.nn.one_hot(low.astype(jnp.int32), mask_size) * (1 - frac)[..., None]
               + jax.nn.one_hot(high.astype(jnp.int32), mask_size) * frac[..., None])
    return weights * inside[..., None]


def mask_targets(rois: jax.Array, gt_boxes: jax.Array, gt_masks: jax.Array, out_size: int) -> jax.Array:
    """Mini-mask targets: RoIs f32[R, 4], matched GT boxes f32[R, 4], box-masks [R, M, M] -> f32[R, S, S] in {0, 1}.

    Output pixel (u, v) of a RoI samples the GT box-mask bilinearly (edge-clamped) at the RoI's pixel-centre point;
    points outside the GT box are 0; the result is thresholded at 0.5.
    """
    m = gt_masks.shape[-1]
    gt_h = jnp.maximum(gt_boxes[:, 2] - gt_boxes[:, 0], 1e-6)
    gt_w = jnp.maximum(gt_boxes[:, 3] - gt_boxes[:, 1], 1e-6)
    wy = _interpolation_matrix(rois[:, 0], rois[:, 2] - rois[:, 0], gt_boxes[:, 0], gt_h, out_size, m)
    wx = _interpolation_matrix(rois[:, 1], rois[:, 3] - rois[:, 1], gt_boxes[:, 1], gt_w, out_size, m)
    values = jnp.einsum("rum,rmn,rvn->ruv", wy, jnp.minimum(gt_masks.astype(jnp.float32), 1.0), wx)
    return (values >= 0.5).astype(jnp.float32)
