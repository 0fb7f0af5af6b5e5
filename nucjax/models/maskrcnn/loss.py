"""The Mask R-CNN training loss: RPN BCE + smooth-L1, box cross-entropy + smooth-L1, mask BCE; one jittable function."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nucjax.models.maskrcnn.model import MaskRCNN, anchors_for, pool_rois
from nucjax.models.maskrcnn.proposals import rpn_proposals
from nucjax.models.maskrcnn.targets import mask_targets, roi_targets, rpn_targets

BATCH_KEYS = ("image", "valid", "boxes", "masks", "instance_valid")
_BETA = 1.0 / 9.0  # smooth-L1 transition point for RPN and box deltas (torchvision)


def _smooth_l1(x: jax.Array) -> jax.Array:
    a = jnp.abs(x)
    return jnp.where(a < _BETA, 0.5 * a * a / _BETA, a - 0.5 * _BETA).sum(axis=-1)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def check_batch(batch: Mapping[str, jax.Array]) -> None:
    """Raises ValueError naming the batch key that is missing or has the wrong shape."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"maskrcnn loss: batch lacks keys {missing} (target name 'instances' gives boxes/masks)")
    if batch["image"].ndim != 4 or batch["instance_valid"].ndim != 2:
        raise ValueError(f"maskrcnn loss: batch['image'] must be [B, S, S, 3] and batch['instance_valid'] [B, K]; got "
                         f"{batch['image'].shape} and {batch['instance_valid'].shape}")
    b, h, w = batch["image"].shape[:3]
    k = batch["instance_valid"].shape[1]
    masks = batch["masks"].shape
    expected = {"valid": (b, h, w), "boxes": (b, k, 4), "instance_valid": (b, k),
                "masks": (b, k) + (masks[2:] if len(masks) == 4 and masks[2] == masks[3] else ("M", "M"))}
    for key, shape in expected.items():
        if batch[key].shape != shape:
            raise ValueError(f"maskrcnn loss: batch['{key}'] has shape {batch[key].shape}, expected {shape}")


def loss(
    module: MaskRCNN,
    variables: Mapping,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    train: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and its parts {rpn_objectness, rpn_box, box_class, box_regression, mask} for one batch.

    `batch` holds image f32[B, S, S, 3], valid f32[B, S, S], boxes f32[B, K, 4], masks uint8[B, K, M, M] (box-masks),
    instance_valid bool[B, K]; `rng` drives the anchor and RoI sampling. Sampling sizes and thresholds come from
    `config.model`; `train` picks the RPN's train or test top-k. Static shapes throughout: wrap it in `jax.jit`.
    """
    check_batch(batch)
    m = config.model
    images = batch["image"]
    size = images.shape[1:3]
    gt_boxes, gt_valid = batch["boxes"].astype(jnp.float32), batch["instance_valid"].astype(bool)
    rpn_key, roi_key = jax.random.split(rng)
    features = module.apply(variables, images, method=MaskRCNN.features)
    rpn_logits, rpn_deltas = module.apply(variables, features, method=MaskRCNN.rpn_outputs)

    # RPN: sampled anchors (those centred on padding excluded), objectness BCE and smooth-L1 on the positives.
    anchors = anchors_for(features, m)
    centre = jnp.floor((anchors[:, :2] + anchors[:, 2:]) / 2).astype(jnp.int32)
    cy, cx = jnp.clip(centre[:, 0], 0, size[0] - 1), jnp.clip(centre[:, 1], 0, size[1] - 1)
    anchor_valid = batch["valid"][:, cy, cx] > 0.5
    positive, negative, rpn_target = jax.vmap(
        lambda v, g, gv, key: rpn_targets(anchors, v, g, gv, key, m.rpn_fg_iou, m.rpn_bg_iou,
                                          m.rpn_batch_per_image, m.rpn_positive_fraction)
    )(anchor_valid, gt_boxes, gt_valid, jax.random.split(rpn_key, images.shape[0]))
    sampled = (positive | negative).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(rpn_logits, positive.astype(jnp.float32))
    rpn_objectness = _masked_mean(bce, sampled)
    rpn_box = jnp.sum(_smooth_l1(rpn_deltas - rpn_target) * positive) / jnp.maximum(sampled.sum(), 1.0)

    # Proposals (no gradient through them), RoI sampling, box head.
    level_sizes = [f.shape[1] * f.shape[2] * len(m.aspect_ratios) for f in features]
    pre = m.rpn_pre_nms_topk_train if train else m.rpn_pre_nms_topk_test
    post = m.rpn_post_nms_topk_train if train else m.rpn_post_nms_topk_test
    proposals, _, proposal_valid = jax.vmap(
        lambda lg, dl: rpn_proposals(lg, dl, anchors, level_sizes, size, pre, post, m.rpn_nms_iou, m.rpn_min_size,
                                     m.nms_tile)
    )(jax.lax.stop_gradient(rpn_logits), jax.lax.stop_gradient(rpn_deltas))
    rois = jax.vmap(
        lambda p, pv, g, gv, key: roi_targets(p, pv, g, gv, key, m.roi_fg_iou, m.roi_bg_iou, m.roi_batch_per_image,
                                              m.roi_positive_fraction, m.box_weights)
    )(proposals, proposal_valid, gt_boxes, gt_valid, jax.random.split(roi_key, images.shape[0]))
    class_logits, box_deltas = module.apply(
        variables, pool_rois(features, rois["rois"], m.box_pool_size, m), method=MaskRCNN.box_outputs
    )
    roi_sampled, foreground = rois["sampled"].astype(jnp.float32), rois["foreground"]
    ce = optax.softmax_cross_entropy_with_integer_labels(class_logits, foreground.astype(jnp.int32))
    box_class = _masked_mean(ce, roi_sampled)
    box_regression = jnp.sum(_smooth_l1(box_deltas - rois["deltas"]) * foreground) / jnp.maximum(roi_sampled.sum(), 1.0)

    # Mask head on the foreground slots only (they come first), against mini-mask targets.
    num_fg = int(m.roi_batch_per_image * m.roi_positive_fraction)
    fg_rois, fg, matched = rois["rois"][:, :num_fg], foreground[:, :num_fg], rois["matched"][:, :num_fg]
    mask_features = pool_rois(features, fg_rois, m.mask_pool_size, m)
    mask_logits = module.apply(variables, mask_features, method=MaskRCNN.mask_outputs)
    take = jax.vmap(lambda a, i: a[i])
    targets = jax.vmap(mask_targets, in_axes=(0, 0, 0, None))(
        fg_rois, take(gt_boxes, matched), take(batch["masks"], matched), mask_logits.shape[-1]
    )
    mask_bce = optax.sigmoid_binary_cross_entropy(mask_logits, targets).mean(axis=(-2, -1))
    mask = _masked_mean(mask_bce, fg.astype(jnp.float32))

    parts = {"rpn_objectness": rpn_objectness, "rpn_box": rpn_box, "box_class": box_class,
             "box_regression": box_regression, "mask": mask}
    return sum(parts.values()), parts
