"""The Mask R-CNN network (ResNet-FPN, RPN, box and mask heads) as one flax module, plus anchors and RoI pooling."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nucjax.models.maskrcnn import boxes as box_ops
from nucjax.models.maskrcnn.backbone import FPN, STRIDES, ResNet
from nucjax.models.maskrcnn.config import check_model_config
from nucjax.models.maskrcnn.heads import BoxHead, MaskHead, RPNHead
from nucjax.models.maskrcnn.roi_align import assign_levels, roi_align

SIZE_MULTIPLE = 32  # image sides must be multiples of the C5 stride


class MaskRCNN(nn.Module):
    """Mask R-CNN (He et al. 2017) for one object class (nuclei), GroupNorm throughout, trained from scratch.

    `config` is the `config.model` section (see `default_model_config`); no pretrained weights are used or needed.
    The stages are separate methods (`features`, `rpn_outputs`, `box_outputs`, `mask_outputs`) that `loss` and
    `detect` chain with `module.apply(..., method=...)`; `__call__` runs them all (on given boxes) for `init`.
    """

    config: Any  # ml_collections.ConfigDict or FrozenConfigDict: the config.model section
    dtype: Any = jnp.float32

    def setup(self):
        m = self.config
        check_model_config(m)
        self.backbone = ResNet(m.resnet_depth, m.resnet_width, m.groups, self.dtype)
        self.fpn = FPN(m.fpn_width, m.groups, self.dtype)
        self.rpn = RPNHead(len(m.aspect_ratios), self.dtype)
        self.box_head = BoxHead(m.box_head_dim, self.dtype)
        self.mask_head = MaskHead(m.mask_head_width, m.groups, self.dtype)

    def features(self, images: jax.Array) -> list[jax.Array]:
        """FPN levels [P2..P6] of images f32[B, H, W, 3] (H, W multiples of 32): each [B, H/s, W/s, fpn_width]."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"MaskRCNN: images must be [B, H, W, 3], got shape {images.shape}")
        if images.shape[1] % SIZE_MULTIPLE or images.shape[2] % SIZE_MULTIPLE:
            raise ValueError(
                f"MaskRCNN: image height and width must be multiples of {SIZE_MULTIPLE}, got {images.shape[1:3]}"
            )
        return self.fpn(self.backbone(images.astype(self.dtype)))

    def rpn_outputs(self, features: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Objectness logits f32[B, A] and deltas f32[B, A, 4] for the anchors of `anchors_for(features)`."""
        return self.rpn(features)

    def box_outputs(self, roi_features: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Class logits f32[..., 2] (background, nucleus) and deltas f32[..., 4] of RoI features [..., p, p, C]."""
        lead = roi_features.shape[:-3]
        logits, deltas = self.box_head(roi_features.reshape((-1,) + roi_features.shape[-3:]))
        return logits.reshape(lead + (2,)), deltas.reshape(lead + (4,))

    def mask_outputs(self, roi_features: jax.Array) -> jax.Array:
        """Mask logits f32[..., 2p, 2p] of RoI features [..., p, p, C]."""
        lead = roi_features.shape[:-3]
        logits = self.mask_head(roi_features.reshape((-1,) + roi_features.shape[-3:]))
        return logits.reshape(lead + logits.shape[1:])

    def __call__(self, images: jax.Array, boxes: jax.Array | None = None, train: bool = False) -> dict[str, jax.Array]:
        """All outputs for images f32[B, H, W, 3] and boxes f32[B, R, 4] (default: one whole-image box each).

        `train` is accepted for the trainer's common `init(..., train=False)` call; no layer behaves differently.
        """
        if boxes is None:
            b, h, w = images.shape[:3]
            boxes = jnp.broadcast_to(jnp.asarray([0.0, 0.0, h, w], jnp.float32), (b, 1, 4))
        features = self.features(images)
        rpn_logits, rpn_deltas = self.rpn_outputs(features)
        class_logits, box_deltas = self.box_outputs(pool_rois(features, boxes, self.config.box_pool_size, self.config))
        masks = self.mask_outputs(pool_rois(features, boxes, self.config.mask_pool_size, self.config))
        return {"rpn_logits": rpn_logits, "rpn_deltas": rpn_deltas, "class_logits": class_logits,
                "box_deltas": box_deltas, "mask_logits": masks}


def anchors_for(features: list[jax.Array], model_config: ml_collections.ConfigDict) -> jax.Array:
    """The anchors f32[A, 4] of FPN levels [B, h_l, w_l, C] (level, row, column, ratio order, as the RPN outputs)."""
    shapes = [f.shape[1:3] for f in features]
    return jnp.asarray(box_ops.anchors(shapes, STRIDES, model_config.anchor_sizes, model_config.aspect_ratios))


def pool_rois(
    features: list[jax.Array], boxes: jax.Array, output_size: int, model_config: ml_collections.ConfigDict
) -> jax.Array:
    """RoIAlign of boxes f32[B, R, 4] from the level P2..P5 each is assigned to -> [B, R, p, p, C]."""
    levels = assign_levels(boxes, model_config.roi_canonical_size, model_config.roi_canonical_level, 2, 5) - 2
    pool = lambda f, b, l: roi_align(f, STRIDES[:4], b, l, output_size, model_config.sampling_ratio)
    return jax.vmap(pool)(features[:4], boxes, levels)
