"""The variant registry: a name -> the model, the targets it learns, its loss, and how its outputs become instances."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nucjax import losses, postprocess

Batch = Mapping[str, jax.Array]
ToInstances = Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], np.ndarray]  # (one image's outputs, params)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of learning nuclei: everything the trainer, the predictor and the study need to know about it.

    model(config) -> flax module; target_names(config) -> the `nucjax.data.targets` names the loss reads;
    loss(module, variables, batch, rngs, train, config) -> (scalar, parts, new model state);
    apply(module, variables, images, config) -> dict of outputs with a leading batch axis;
    dense: outputs are per-pixel maps under the key "maps" (they can be tiled and blended);
    to_instances(outputs of one image as NumPy, params) -> int32[H, W] label image.
    postprocess_name: the `nucjax.postprocess` entry behind to_instances, whose parameters tuning searches.
    """

    name: str
    model: Callable[[ml_collections.ConfigDict], Any]
    target_names: Callable[[ml_collections.ConfigDict], tuple[str, ...]]
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array], Any]]
    apply: Callable[..., dict[str, jax.Array]]
    to_instances: ToInstances
    dense: bool = True
    postprocess_name: str | None = None  # the nucjax.postprocess entry to_instances uses (what tuning searches)


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Adds a variant to the registry under its name."""
    VARIANTS[variant.name] = variant
    return variant


def get(name: str) -> Variant:
    """The registered variant called `name`; a ValueError lists the known names otherwise."""
    if name not in VARIANTS:
        raise ValueError(f"config key 'variant': unknown variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name]


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """The compute dtype named by `config.precision` (parameters stay float32)."""
    if config.precision not in ("float32", "bfloat16"):
        raise ValueError(f"config key 'precision' must be 'float32' or 'bfloat16', got {config.precision!r}")
    return jnp.dtype(config.precision)


# ---- The U-Net family: one network, differing in output heads, loss and post-processing. ----


def _unet(out_channels: int) -> Callable[[ml_collections.ConfigDict], Any]:
    def make(config: ml_collections.ConfigDict):
        from nucjax.models.unet import UNet

        m = config.model
        return UNet(
            base_width=m.base_width, depth=m.depth, norm=m.norm, groups=m.groups, activation=m.activation,
            upsample=m.upsample, dropout=m.dropout, out_channels=out_channels, dtype=compute_dtype(config),
        )

    return make


def _unet_loss(objective: Callable[[jax.Array, Batch, ml_collections.ConfigDict], tuple[jax.Array, dict]]):
    """Wraps a loss on U-Net logits into the variant loss signature (handles batch statistics and dropout)."""

    def loss(module, variables, batch, rngs, train, config):
        mutable = ["batch_stats"] if "batch_stats" in variables else False
        out = module.apply(variables, batch["image"], train=train, rngs=rngs, mutable=mutable)
        logits, new_state = out if mutable else (out, {})
        total, parts = objective(logits, batch, config)
        return total, parts, new_state

    return loss


def _unet_apply(activate: Callable[[jax.Array], jax.Array]):
    def apply(module, variables, images, config):
        return {"maps": activate(module.apply(variables, images, train=False))}

    return apply


def _bce_dice(logits: jax.Array, target: jax.Array, valid: jax.Array, weights=None) -> tuple[jax.Array, jax.Array]:
    bce = losses.sigmoid_bce(logits, target, valid, weights=weights)
    dice = losses.soft_dice(logits, target, valid)
    return bce, dice


def _mask_objective(logits, batch, config):
    weights = batch["weight_map"] if config.loss.use_weight_map else None
    bce, dice = _bce_dice(logits[..., 0], batch["foreground"], batch["valid"], weights)
    return bce + config.loss.dice_weight * dice, {"bce": bce, "dice": dice}


def _boundary_objective(logits, batch, config):
    weights = batch["weight_map"] if config.loss.use_weight_map else None
    fg_bce, fg_dice = _bce_dice(logits[..., 0], batch["foreground"], batch["valid"], weights)
    b_bce, b_dice = _bce_dice(logits[..., 1], batch["boundary"], batch["valid"])
    fg = fg_bce + config.loss.dice_weight * fg_dice
    boundary = b_bce + config.loss.dice_weight * b_dice
    return fg + config.loss.boundary_weight * boundary, {"foreground": fg, "boundary": boundary}


def _three_class_objective(logits, batch, config):
    weights = batch["weight_map"] if config.loss.use_weight_map else None
    ce = losses.weighted_cross_entropy(
        logits, batch["three_class"], batch["valid"], class_weights=jnp.asarray(config.loss.class_weights), weights=weights
    )
    return ce, {"cross_entropy": ce}


def _with_weight_map(names: tuple[str, ...]) -> Callable[[ml_collections.ConfigDict], tuple[str, ...]]:
    return lambda config: names + (("weight_map",) if config.loss.use_weight_map else ())


def _postprocessor(name: str, dense: bool = True) -> ToInstances:
    """to_instances by `nucjax.postprocess` entry `name`, on the maps (dense) or on all of a detector's outputs."""
    if not dense:
        return lambda outputs, params: postprocess.POSTPROCESSORS[name](outputs, params)
    return lambda outputs, params: postprocess.POSTPROCESSORS[name](np.asarray(outputs["maps"], np.float32), params)


def _register_unet(name: str, out_channels: int, targets: tuple[str, ...], objective, activate, postprocessor: str):
    """A U-Net variant: the shared backbone with its own heads, loss and post-processing."""
    register(Variant(
        name=name,
        model=_unet(out_channels),
        target_names=_with_weight_map(targets),
        loss=_unet_loss(objective),
        apply=_unet_apply(activate),
        to_instances=_postprocessor(postprocessor),
        postprocess_name=postprocessor,
    ))


_register_unet("unet_mask", 1, ("foreground",), _mask_objective, jax.nn.sigmoid, "components")
_register_unet("unet_boundary", 2, ("foreground", "boundary"), _boundary_objective, jax.nn.sigmoid,
               "boundary_watershed")
_register_unet("unet_3class", 3, ("three_class",), _three_class_objective,
               lambda logits: jax.nn.softmax(logits, axis=-1), "three_class")


# ---- Mask R-CNN: masks learned in parallel with box detection, per region. ----


def _maskrcnn_model(config: ml_collections.ConfigDict):
    from nucjax.models.maskrcnn import MaskRCNN

    return MaskRCNN(config.model, dtype=compute_dtype(config))


def _maskrcnn_loss(module, variables, batch, rngs, train, config):
    from nucjax.models import maskrcnn

    total, parts = maskrcnn.loss(module, variables, batch, rngs["dropout"], config, train)
    return total, parts, {}


def _maskrcnn_apply(module, variables, images, config):
    from nucjax.models import maskrcnn

    return maskrcnn.detect(module, variables, images, config)


register(Variant(
    name="maskrcnn",
    model=_maskrcnn_model,
    target_names=lambda config: ("instances",),
    loss=_maskrcnn_loss,
    apply=_maskrcnn_apply,
    to_instances=_postprocessor("detections", dense=False),  # masks pasted into one label image
    dense=False,
    postprocess_name="detections",
))
