"""Per-image intensity augmentation of a training batch, made on the device inside the jitted train step.

The input pipeline draws each image's changes (`data.augment.draw_intensity`: grey, invert, gamma, contrast,
brightness, noise std) and ships them as batch["intensity"]; applying them here takes that per-pixel work, and the
Gaussian noise, off the CPU workers, which were the bottleneck of a GPU run.
"""

import jax
import jax.numpy as jnp


def apply(images: jax.Array, params: jax.Array, key: jax.Array) -> jax.Array:
    """images f32[B, H, W, 3] with params f32[B, 6] (`data.augment.INTENSITY` order) -> f32[B, H, W, 3].

    In order, per image: channel mean to every channel when grey; 1 - x when invert; sign(x) |x|^gamma; contrast
    about the image mean (all pixels and channels); + brightness; + noise_std × N(0, 1), one value per pixel for
    all channels (from `key`, so the same for any sharding of the batch).
    """
    if images.ndim != 4 or params.shape != (images.shape[0], 6):
        raise ValueError(f"intensity.apply: images [B, H, W, C] and params [B, 6], got {images.shape}, {params.shape}")
    x = images.astype(jnp.float32)
    grey, invert, gamma, contrast, brightness, noise = (params[:, i, None, None, None].astype(jnp.float32)
                                                         for i in range(6))
    x = jnp.where(grey > 0, jnp.mean(x, axis=-1, keepdims=True), x)
    x = jnp.where(invert > 0, 1.0 - x, x)
    x = jnp.sign(x) * jnp.abs(x) ** gamma
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * contrast + mean + brightness
    return x + noise * jax.random.normal(key, x.shape[:3] + (1,), jnp.float32)
