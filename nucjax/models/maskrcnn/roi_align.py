"""RoIAlign over an FPN pyramid in JAX: bilinear sampling with `aligned=True` semantics, one vectorised gather."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def assign_levels(
    boxes: jax.Array, canonical_size: float, canonical_level: int, min_level: int, max_level: int
) -> jax.Array:
    """FPN level of each box f32[..., 4] -> int32[...]: floor(k0 + log2(sqrt(area) / s0)) clipped to the levels."""
    size = jnp.sqrt(jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0))
    level = jnp.floor(canonical_level + jnp.log2(size / canonical_size + 1e-8))
    return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def _axis_weights(coords: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Bilinear taps along one axis (torchvision's rules): coords f32[R, S], size f32[R, 1] -> low, high, weights."""
    inside = (coords >= -1.0) & (coords <= size)
    c = jnp.maximum(coords, 0.0)
    low = jnp.floor(c)
    at_edge = low >= size - 1
    low = jnp.where(at_edge, size - 1, low)
    high = jnp.where(at_edge, size - 1, low + 1)
    c = jnp.where(at_edge, low, c)
    w_high = jnp.where(inside, c - low, 0.0)
    w_low = jnp.where(inside, 1.0 - (c - low), 0.0)
    return low.astype(jnp.int32), high.astype(jnp.int32), w_low, w_high


def roi_align(
    features: Sequence[jax.Array],
    strides: Sequence[int],
    boxes: jax.Array,
    levels: jax.Array,
    output_size: int,
    sampling_ratio: int,
) -> jax.Array:
    """RoI features of one image: features [h_l, w_l, C] per level, boxes f32[R, 4], levels int32[R] (indices into
    `features`) -> [R, output_size, output_size, C].

    As torchvision's `roi_align(aligned=True)`: a box is scaled by 1 / stride and shifted by -0.5 (pixel centres),
    each of the output_size**2 bins averages sampling_ratio**2 bilinear samples on a regular grid, and samples more
    than one cell outside the map are zero. Use `jax.vmap` for a batch.
    """
    if len(features) != len(strides):
        raise ValueError(f"roi_align: {len(features)} feature maps but {len(strides)} strides")
    channels = features[0].shape[-1]
    flat = jnp.concatenate([f.reshape(-1, channels) for f in features])
    sizes = [f.shape[:2] for f in features]
    offsets = jnp.cumsum(jnp.asarray([0] + [h * w for h, w in sizes[:-1]], jnp.int32))
    heights = jnp.asarray([h for h, _ in sizes], jnp.float32)[levels][:, None]
    widths = jnp.asarray([w for _, w in sizes], jnp.float32)[levels][:, None]
    scale = (1.0 / jnp.asarray(strides, jnp.float32))[levels][:, None]

    b = boxes.astype(jnp.float32)
    grid = (jnp.arange(output_size * sampling_ratio, dtype=jnp.float32) + 0.5) / (output_size * sampling_ratio)
    ys = (b[:, 0:1] * scale - 0.5) + grid[None, :] * ((b[:, 2:3] - b[:, 0:1]) * scale)  # [R, S]
    xs = (b[:, 1:2] * scale - 0.5) + grid[None, :] * ((b[:, 3:4] - b[:, 1:2]) * scale)
    y_lo, y_hi, wy_lo, wy_hi = _axis_weights(ys, heights)
    x_lo, x_hi, wx_lo, wx_hi = _axis_weights(xs, widths)

    row_stride = widths.astype(jnp.int32)[:, :, None]  # [R, 1, 1]
    base = offsets[levels][:, None, None]
    index = jnp.stack(
        [
            base + y_lo[:, :, None] * row_stride + x_lo[:, None, :],
            base + y_lo[:, :, None] * row_stride + x_hi[:, None, :],
            base + y_hi[:, :, None] * row_stride + x_lo[:, None, :],
            base + y_hi[:, :, None] * row_stride + x_hi[:, None, :],
        ],
        axis=-1,
    )  # [R, S, S, 4]
    weight = jnp.stack(
        [
            wy_lo[:, :, None] * wx_lo[:, None, :],
            wy_lo[:, :, None] * wx_hi[:, None, :],
            wy_hi[:, :, None] * wx_lo[:, None, :],
            wy_hi[:, :, None] * wx_hi[:, None, :],
        ],
        axis=-1,
    )
    # One multiply-and-reduce over (corner, sample row, sample column) that XLA can fuse with the gather.
    r, s = boxes.shape[0], sampling_ratio
    weight = weight.reshape(r, output_size, s, output_size, s, 4, 1) / (s * s)
    gathered = flat[index.reshape(r, output_size, s, output_size, s, 4)]
    return jnp.sum(weight * gathered, axis=(2, 4, 5), dtype=jnp.float32).astype(flat.dtype)
