"""Segmentation losses (BCE, soft Dice, weighted cross-entropy, focal): pure functions of arrays, masked by `valid`.

Every loss is a mean over valid pixels only (valid f32[B, H, W], 1 = counts, 0 = padding), so padded pixels never
count whatever their logits; a batch without any valid pixel gives 0, not NaN. Per-pixel `weights` f32[B, H, W]
(e.g. the Ronneberger weight map) multiply each pixel's loss before that mean.
"""

import jax
import jax.numpy as jnp

DICE_SMOOTH = 1.0  # added to the numerator and denominator of each image's Dice: an empty target with an empty
# prediction scores 1 (loss 0) and the gradient stays finite.


def _per_channel(valid: jax.Array, like: jax.Array) -> jax.Array:
    """valid f32[B, H, W] broadcast to `like` ([B, H, W] or [B, H, W, C])."""
    return valid if like.ndim == valid.ndim else valid[..., None] * jnp.ones((like.shape[-1],), valid.dtype)


def _masked_mean(pixel_loss: jax.Array, valid: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Mean of pixel_loss ([B, H, W] or [B, H, W, C]) over valid pixels, each scaled by its weight."""
    if weights is not None:
        pixel_loss = pixel_loss * (weights if pixel_loss.ndim == weights.ndim else weights[..., None])
    mask = _per_channel(valid.astype(jnp.float32), pixel_loss)
    total = jnp.sum(jnp.where(mask > 0, pixel_loss * mask, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1.0)


def _bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Element-wise −[t·log σ(x) + (1 − t)·log σ(−x)], in the stable log-sigmoid form."""
    return -(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))


def sigmoid_bce(
    logits: jax.Array, targets: jax.Array, valid: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Binary cross-entropy on logits f32[B, H, W(, C)] against targets in [0, 1] of the same shape; scalar."""
    logits = logits.astype(jnp.float32)
    return _masked_mean(_bce(logits, targets.astype(jnp.float32)), valid, weights)


def soft_dice(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
    """1 − soft Dice of σ(logits) f32[B, H, W(, C)] and targets, per image (and channel), then the mean; scalar.

    Dice = (2·Σ v·p·t + s) / (Σ v·p + Σ v·t + s) with s = DICE_SMOOTH and the sums over the image's pixels.
    """
    probs = jax.nn.sigmoid(logits.astype(jnp.float32))
    targets = targets.astype(jnp.float32)
    mask = _per_channel(valid.astype(jnp.float32), probs)
    probs = jnp.where(mask > 0, probs, 0.0) * mask
    targets = jnp.where(mask > 0, targets, 0.0) * mask
    axes = (1, 2)
    intersection = jnp.sum(probs * targets, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
    dice = (2.0 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
    return 1.0 - jnp.mean(dice)


def weighted_cross_entropy(
    logits: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    class_weights: jax.Array | tuple[float, ...] | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Softmax cross-entropy of logits f32[B, H, W, K] against classes int[B, H, W]; scalar.

    Each pixel's loss is scaled by class_weights[K][class] and weights[B, H, W], then averaged over valid pixels.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    classes = classes.astype(jnp.int32)
    pixel_loss = -jnp.take_along_axis(log_probs, classes[..., None], axis=-1)[..., 0]
    if class_weights is not None:
        pixel_loss = pixel_loss * jnp.asarray(class_weights, jnp.float32)[classes]
    return _masked_mean(pixel_loss, valid, weights)


def focal(
    logits: jax.Array, targets: jax.Array, valid: jax.Array, gamma: float = 2.0, alpha: float | None = None
) -> jax.Array:
    """Sigmoid focal loss (Lin et al. 2017) on logits f32[B, H, W(, C)] against targets in [0, 1]; scalar.

    Per pixel: α_t·(1 − p_t)**γ·BCE with p_t = p·t + (1 − p)·(1 − t) and α_t = α·t + (1 − α)·(1 − t) (1 when
    alpha is None).
    """
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    probs = jax.nn.sigmoid(logits)
    p_t = probs * targets + (1.0 - probs) * (1.0 - targets)
    pixel_loss = _bce(logits, targets) * (1.0 - p_t) ** gamma
    if alpha is not None:
        pixel_loss = pixel_loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    return _masked_mean(pixel_loss, valid, None)
