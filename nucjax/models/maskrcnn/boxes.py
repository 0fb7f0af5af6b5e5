"""Box arithmetic for Mask R-CNN: IoU, delta encoding, anchors and a fixed-size jittable NMS.

Boxes are float32 (y0, x0, y1, x1) in pixel units where pixel i covers [i, i + 1).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Largest log-scale change a decoded delta may apply (as torchvision/Detectron2: boxes grow at most 1000/16 x).
_MAX_LOG_SCALE = float(np.log(1000.0 / 16))


def box_area(boxes: jax.Array) -> jax.Array:
    """Areas of f32[..., 4] boxes -> f32[...] (zero for empty or inverted boxes)."""
    return jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise IoU of f32[N, 4] and f32[M, 4] -> f32[N, M] (0 where the union is empty)."""
    lo = jnp.maximum(a[:, None, :2], b[None, :, :2])
    hi = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = jnp.prod(jnp.maximum(hi - lo, 0.0), axis=-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def _centre_size(boxes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * h, boxes[..., 1] + 0.5 * w, h, w


def encode(boxes: jax.Array, reference: jax.Array, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jax.Array:
    """Deltas (dy, dx, dh, dw) f32[..., 4] that turn `reference` boxes into `boxes` (both f32[..., 4], non-empty)."""
    cy, cx, h, w = _centre_size(boxes)
    ry, rx, rh, rw = _centre_size(reference)
    wy, wx, wh, ww = weights
    return jnp.stack(
        [wy * (cy - ry) / rh, wx * (cx - rx) / rw, wh * jnp.log(h / rh), ww * jnp.log(w / rw)], axis=-1
    )


def decode(deltas: jax.Array, reference: jax.Array, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jax.Array:
    """Boxes f32[..., 4] from deltas f32[..., 4] applied to `reference` boxes (the inverse of `encode`)."""
    ry, rx, rh, rw = _centre_size(reference)
    wy, wx, wh, ww = weights
    cy = ry + deltas[..., 0] / wy * rh
    cx = rx + deltas[..., 1] / wx * rw
    h = rh * jnp.exp(jnp.minimum(deltas[..., 2] / wh, _MAX_LOG_SCALE))
    w = rw * jnp.exp(jnp.minimum(deltas[..., 3] / ww, _MAX_LOG_SCALE))
    return jnp.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def clip_boxes(boxes: jax.Array, height: float, width: float) -> jax.Array:
    """Boxes f32[..., 4] clipped to the image [0, height) x [0, width)."""
    lo = jnp.zeros(4, boxes.dtype)
    hi = jnp.asarray([height, width, height, width], boxes.dtype)
    return jnp.clip(boxes, lo, hi)


def anchors(
    feature_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    sizes: Sequence[float],
    ratios: Sequence[float],
) -> np.ndarray:
    """Anchors of all levels, f32[sum(h * w) * len(ratios), 4], ordered level, row, column, ratio.

    Level l has one anchor per ratio r = height / width (side lengths size * sqrt(r) and size / sqrt(r)), centred on
    each feature cell's centre ((i + 0.5) * stride, (j + 0.5) * stride), matching an RPN output reshaped from
    [h, w, len(ratios)].
    """
    if not len(feature_shapes) == len(strides) == len(sizes):
        raise ValueError(f"anchors: {len(feature_shapes)} levels but {len(strides)} strides and {len(sizes)} sizes")
    out = []
    for (h, w), stride, size in zip(feature_shapes, strides, sizes):
        r = np.asarray(ratios, np.float64)
        half = 0.5 * np.stack([size * np.sqrt(r), size / np.sqrt(r)], axis=-1)  # [A, 2]
        cy, cx = np.meshgrid((np.arange(h) + 0.5) * stride, (np.arange(w) + 0.5) * stride, indexing="ij")
        centre = np.stack([cy, cx], axis=-1)[:, :, None, :]  # [h, w, 1, 2]
        out.append(np.concatenate([centre - half, centre + half], axis=-1).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def nms(
    boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: float, max_output: int, tile: int = 256
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS, static shapes: boxes f32[N, 4], scores f32[N], valid bool[N] -> (int32[D], bool[D]), D = max_output.

    Returns the indices of the kept boxes in decreasing score order (a box is dropped when its IoU with a kept,
    higher-scoring box exceeds `iou_threshold`) and which of the `max_output` slots hold one. The exact greedy result,
    computed tile by tile: each tile is first suppressed by the boxes kept in earlier tiles, then resolved within
    itself by a fixed-point iteration (whose only fixed point is the greedy answer). Jittable and vmappable.
    """
    n = boxes.shape[0]
    n_pad = max(-(-n // tile) * tile, tile)
    boxes = jnp.pad(boxes.astype(jnp.float32), ((0, n_pad - n), (0, 0)))
    scores = jnp.pad(scores.astype(jnp.float32), (0, n_pad - n))
    valid = jnp.pad(valid, (0, n_pad - n))
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
    sorted_boxes, keep = boxes[order], valid[order]
    position = jnp.arange(n_pad)
    earlier_in_tile = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]

    def resolve_tile(t, keep):
        start = t * tile
        current = jax.lax.dynamic_slice_in_dim(sorted_boxes, start, tile)
        kept_before = keep & (position < start)
        suppressed = jnp.any(kept_before[:, None] & (box_iou(sorted_boxes, current) > iou_threshold), axis=0)
        candidates = jax.lax.dynamic_slice_in_dim(keep, start, tile) & ~suppressed
        overlaps = earlier_in_tile & (box_iou(current, current) > iou_threshold)

        def step(state):
            kept, _ = state
            new = candidates & ~jnp.any(kept[:, None] & overlaps, axis=0)
            return new, jnp.any(new != kept)

        kept, _ = jax.lax.while_loop(lambda s: s[1], step, (candidates, jnp.asarray(True)))
        return jax.lax.dynamic_update_slice_in_dim(keep, kept, start, axis=0)

    keep = jax.lax.fori_loop(0, n_pad // tile, resolve_tile, keep)
    slots = jnp.argsort(~keep, stable=True)[:max_output]
    indices, kept = jnp.minimum(order[slots], n - 1), keep[slots]
    if max_output > n_pad:
        indices = jnp.pad(indices, (0, max_output - n_pad))
        kept = jnp.pad(kept, (0, max_output - n_pad))
    return indices.astype(jnp.int32), kept
