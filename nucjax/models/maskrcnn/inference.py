"""Mask R-CNN inference: fixed-size detections (jittable), and in NumPy the fusion of several views' detections
(test-time augmentation) and pasting them into one label image."""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nucjax.models.maskrcnn.boxes import clip_boxes, decode, nms
from nucjax.models.maskrcnn.model import SIZE_MULTIPLE, MaskRCNN, anchors_for, pool_rois
from nucjax.models.maskrcnn.proposals import rpn_proposals


def propose(module: MaskRCNN, variables, images: jax.Array,
            config: ml_collections.ConfigDict) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """The FPN levels and RPN proposals of images f32[B, H, W, 3] (padded internally to multiples of 32).

    Returns (features, boxes f32[B, P, 4], valid bool[B, P]), P = config.model.rpn_post_nms_topk_test, best first.
    """
    m = config.model
    b, h, w = images.shape[:3]
    padded = jnp.pad(images, ((0, 0), (0, -h % SIZE_MULTIPLE), (0, -w % SIZE_MULTIPLE), (0, 0)))
    features = module.apply(variables, padded, method=MaskRCNN.features)
    rpn_logits, rpn_deltas = module.apply(variables, features, method=MaskRCNN.rpn_outputs)
    anchors = anchors_for(features, m)
    level_sizes = [f.shape[1] * f.shape[2] * len(m.aspect_ratios) for f in features]
    proposals, _, valid = jax.vmap(
        lambda lg, dl: rpn_proposals(lg, dl, anchors, level_sizes, (h, w), m.rpn_pre_nms_topk_test,
                                     m.rpn_post_nms_topk_test, m.rpn_nms_iou, m.rpn_min_size, m.nms_tile)
    )(rpn_logits, rpn_deltas)
    return features, proposals, valid


def refine(module: MaskRCNN, variables, features: list[jax.Array], proposals: jax.Array, image_size: tuple[int, int],
           config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """The box head on proposals f32[B, P, 4]: their refined boxes f32[B, P, 4] (clipped to image_size, (h, w)) and
    nucleus probabilities f32[B, P]."""
    m = config.model
    class_logits, deltas = module.apply(variables, pool_rois(features, proposals, m.box_pool_size, m),
                                        method=MaskRCNN.box_outputs)
    return clip_boxes(decode(deltas, proposals, m.box_weights), *image_size), jax.nn.softmax(class_logits)[..., 1]


def candidates(boxes: jax.Array, scores: jax.Array, proposal_valid: jax.Array, score_threshold: float) -> jax.Array:
    """bool[..., P]: the refined boxes that go on to NMS: from a valid proposal, non-empty, scoring above the
    threshold."""
    nonempty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return proposal_valid & nonempty & (scores > score_threshold)


def detect(module: MaskRCNN, variables, images: jax.Array, config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """Detections of images f32[B, H, W, 3] (padded internally to multiples of 32), best first.

    Returns {"boxes": f32[B, D, 4], "scores": f32[B, D], "masks": f32[B, D, M, M] probabilities in each box,
    "valid": bool[B, D]}, D = config.model.detections_per_image: proposals are scored by the box head, refined,
    kept above `score_threshold`, NMS'd at `detection_nms_iou`, and the mask head runs on the kept boxes.
    """
    m = config.model
    features, proposals, proposal_valid = propose(module, variables, images, config)
    boxes, scores = refine(module, variables, features, proposals, images.shape[1:3], config)
    ok = candidates(boxes, scores, proposal_valid, m.score_threshold)
    keep, valid = jax.vmap(lambda bx, s, v: nms(bx, s, v, m.detection_nms_iou, m.detections_per_image, m.nms_tile))(
        boxes, scores, ok
    )
    take = jax.vmap(lambda a, i: a[i])
    boxes, scores = take(boxes, keep), take(scores, keep) * valid
    masks = module.apply(variables, pool_rois(features, boxes, m.mask_pool_size, m), method=MaskRCNN.mask_outputs)
    return {"boxes": boxes, "scores": scores, "masks": jax.nn.sigmoid(masks), "valid": valid}


def _bilinear_rows(coords: np.ndarray, mask_size: int) -> np.ndarray:
    """f64[n, mask_size]: row i samples a mask axis bilinearly at coordinate coords[i] (in cells, centres at k),
    clamped to [0, mask_size - 1]."""
    coords = np.clip(coords, 0.0, mask_size - 1.0)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, mask_size - 1)
    frac = coords - low
    weights = np.zeros((len(coords), mask_size))
    np.add.at(weights, (np.arange(len(coords)), low), 1.0 - frac)
    np.add.at(weights, (np.arange(len(coords)), high), frac)
    return weights


def _paste_weights(start: float, stop: float, size: int, mask_size: int) -> tuple[int, np.ndarray]:
    """First pixel and weights f64[n, mask_size] sampling a box-mask axis at the pixel centres in [start, stop)."""
    first, last = max(int(np.ceil(start - 0.5)), 0), min(int(np.ceil(stop - 0.5)), size)
    centres = np.arange(first, last) + 0.5
    return first, _bilinear_rows((centres - start) * (mask_size / (stop - start)) - 0.5, mask_size)


def _resample_weights(source: tuple[float, float], target: tuple[float, float], mask_size: int) -> np.ndarray:
    """f64[mask_size, mask_size] taking a mask axis over the box side `source` (start, stop) to one over `target`:
    bilinear at the target cells' centres, 0 at those outside the source side."""
    (s0, s1), (t0, t1) = source, target
    centres = t0 + (np.arange(mask_size) + 0.5) * ((t1 - t0) / mask_size)
    weights = _bilinear_rows((centres - s0) * (mask_size / (s1 - s0)) - 0.5, mask_size)
    weights[(centres < s0) | (centres >= s1)] = 0.0
    return weights


def unview_detections(detections: Mapping[str, np.ndarray], turns: int, flip: bool,
                      view_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Detections (boxes f32[D, 4], masks f32[D, M, M], ...) of a view of an image, the image turned by `turns`
    quarter turns (np.rot90) and then mirrored left-right if `flip`, of size view_size (h, w), taken back to the
    image's coordinates."""
    boxes = np.asarray(detections["boxes"], np.float64)
    masks = np.asarray(detections["masks"])
    h, w = view_size
    y0, x0, y1, x1 = boxes.T
    if flip:
        x0, x1 = w - x1, w - x0
        masks = masks[:, :, ::-1]
    for _ in range(turns % 4):  # undo one quarter turn: view pixel (i, j) came from (j, h - 1 - i) before it
        y0, x0, y1, x1 = x0, h - y1, x1, h - y0
        h, w = w, h
    masks = np.rot90(masks, -turns, axes=(1, 2))
    return {**detections, "boxes": np.stack([y0, x0, y1, x1], axis=-1).astype(np.float32),
            "masks": np.ascontiguousarray(masks)}


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU f64[N] of one box f[4] with boxes f[N, 4]: `boxes.box_iou` in NumPy, for host arrays whose sizes change
    with every image (eager jnp would compile for each; measured 3x slower in `fuse_views`)."""
    lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.maximum(hi - lo, 0.0), axis=-1)
    area = lambda b: np.prod(np.maximum(b[..., 2:] - b[..., :2], 0.0), axis=-1)
    union = area(box) + area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def fuse_views(views: Sequence[Mapping[str, np.ndarray]], iou: float) -> dict[str, np.ndarray]:
    """One image's detections from several views (each in the image's coordinates) -> one set of detections.

    Valid detections are grouped best first: each joins the group whose first box it overlaps most with IoU >=
    `iou` and which has none from its view yet, or starts a group. A group becomes one detection: the
    score-weighted mean box, score = the sum of its scores / len(views) (an object seen in fewer views scores
    less), the mean of its masks resampled into that box. Returns boxes f32[G, 4], scores f32[G], masks f32[G, M,
    M], valid bool[G], best first.
    """
    keep = [np.asarray(v["valid"], bool) for v in views]
    boxes = np.concatenate([np.asarray(v["boxes"], np.float64)[k] for v, k in zip(views, keep)])
    scores = np.concatenate([np.asarray(v["scores"], np.float64)[k] for v, k in zip(views, keep)])
    masks = np.concatenate([np.asarray(v["masks"], np.float64)[k] for v, k in zip(views, keep)])
    view = np.concatenate([np.full(int(k.sum()), i) for i, k in enumerate(keep)])
    mask_size = np.asarray(views[0]["masks"]).shape[-1]
    groups: list[list[int]] = []
    firsts = np.zeros((len(scores), 4))  # each group's first (best) box
    taken = np.zeros((len(scores), len(views)), bool)  # whether a group has a member from a view
    for i in np.argsort(-scores, kind="stable"):
        g = len(groups)
        overlap = np.where(taken[:g, view[i]], -1.0, _box_iou(boxes[i], firsts[:g]))  # one per view in a group
        best = int(np.argmax(overlap)) if g else -1
        if best < 0 or overlap[best] < iou:
            best = g
            groups.append([])
            firsts[g] = boxes[i]
        groups[best].append(i)
        taken[best, view[i]] = True
    fused_boxes, fused_scores, fused_masks = [], [], []
    for g in groups:
        box = np.average(boxes[g], axis=0, weights=scores[g])
        fused_boxes.append(box)
        fused_scores.append(scores[g].sum() / len(views))
        fused_masks.append(np.mean([_resample_weights((boxes[j, 0], boxes[j, 2]), (box[0], box[2]), mask_size)
                                    @ masks[j] @
                                    _resample_weights((boxes[j, 1], boxes[j, 3]), (box[1], box[3]), mask_size).T
                                    for j in g], axis=0))
    order = np.argsort(-np.asarray(fused_scores), kind="stable")
    return {
        "boxes": np.asarray(fused_boxes, np.float32).reshape(-1, 4)[order],
        "scores": np.asarray(fused_scores, np.float32)[order],
        "masks": np.asarray(fused_masks, np.float32).reshape(-1, mask_size, mask_size)[order],
        "valid": np.ones(len(groups), bool),
    }


def paste_masks(
    boxes: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    valid: np.ndarray,
    height: int,
    width: int,
    mask_threshold: float = 0.5,
    min_score: float = 0.0,
    min_visible: float = 0.0,
) -> np.ndarray:
    """One image's detections (f32[D, 4], f32[D], f32[D, M, M] probabilities, bool[D]) -> int32[height, width] labels.

    Each mask is resampled bilinearly at the centres of the pixels inside its box and thresholded (>= mask_threshold).
    Detections are pasted best first, each onto the pixels no better one took, so where masks overlap the higher
    score wins. One scoring below `min_score`, or left with fewer than `min_visible` × its mask's pixels, is dropped
    and leaves its pixels to those after it (the sliver beside a better duplicate is no object). Ids are 1..N in
    decreasing score over the detections pasted.
    """
    boxes, scores, masks, valid = (np.asarray(a) for a in (boxes, scores, masks, valid))
    d = boxes.shape[0]
    if boxes.shape != (d, 4) or scores.shape != (d,) or valid.shape != (d,) or masks.ndim != 3 or masks.shape[0] != d:
        raise ValueError(
            f"paste_masks: expected boxes [D, 4], scores [D], masks [D, M, M], valid [D]; got {boxes.shape}, "
            f"{scores.shape}, {masks.shape}, {valid.shape}"
        )
    label = np.zeros((height, width), np.int32)
    n = 0
    for i in np.argsort(-scores.astype(np.float64), kind="stable"):  # best first; ties: the lower index first
        y0, x0, y1, x1 = (float(v) for v in boxes[i])
        if not valid[i] or scores[i] < min_score or y1 <= y0 or x1 <= x0:
            continue
        top, wy = _paste_weights(y0, y1, height, masks.shape[1])
        left, wx = _paste_weights(x0, x1, width, masks.shape[2])
        inside = wy @ masks[i].astype(np.float64) @ wx.T >= mask_threshold
        region = label[top:top + wy.shape[0], left:left + wx.shape[0]]
        free = inside & (region == 0)
        visible = int(free.sum())
        if visible == 0 or visible < min_visible * int(inside.sum()):
            continue
        n += 1
        region[free] = n
    return label
