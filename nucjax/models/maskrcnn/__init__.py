"""Mask R-CNN in JAX/flax (ResNet-FPN with GroupNorm, trained from scratch): the `maskrcnn` variant's model."""

from nucjax.models.maskrcnn.config import default_model_config
from nucjax.models.maskrcnn.inference import detect, paste_masks
from nucjax.models.maskrcnn.loss import loss
from nucjax.models.maskrcnn.model import MaskRCNN

__all__ = ["MaskRCNN", "default_model_config", "detect", "loss", "paste_masks"]
