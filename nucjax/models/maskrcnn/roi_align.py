"""RoIAlign over an FPN pyramid in JAX: bilinear sampling with `aligned=True` semantics, one vectorised gather
forward, and a backward pass of matrix products instead of the gather's scatter-add (see `roi_align`)."""

import functools
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


def _taps(
    sizes: Sequence[tuple[int, int]], strides: Sequence[int], boxes: jax.Array, levels: jax.Array, samples: int
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Bilinear taps of the `samples` (= output_size * sampling_ratio) sample rows and columns of each box on its
    level: (low, high, w_low, w_high) for rows, each [R, samples], and the same for columns."""
    heights = jnp.asarray([h for h, _ in sizes], jnp.float32)[levels][:, None]
    widths = jnp.asarray([w for _, w in sizes], jnp.float32)[levels][:, None]
    scale = (1.0 / jnp.asarray(strides, jnp.float32))[levels][:, None]
    b = boxes.astype(jnp.float32)
    grid = (jnp.arange(samples, dtype=jnp.float32) + 0.5) / samples
    ys = (b[:, 0:1] * scale - 0.5) + grid[None, :] * ((b[:, 2:3] - b[:, 0:1]) * scale)  # [R, S]
    xs = (b[:, 1:2] * scale - 0.5) + grid[None, :] * ((b[:, 3:4] - b[:, 1:2]) * scale)
    return _axis_weights(ys, heights), _axis_weights(xs, widths)


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

    The gradient goes to the features only: boxes are treated as constants (Mask R-CNN's proposals are), so
    differentiating with respect to them gives zeros. It is computed as matrix products (`_roi_align_bwd`), not as
    the scatter-add that differentiating the gather would give: on a GPU that scatter took 84% of a Mask R-CNN
    train step (benchmarks/results/2026-11-26-h200-b).
    """
    if len(features) != len(strides):
        raise ValueError(f"roi_align: {len(features)} feature maps but {len(strides)} strides")
    return _roi_align(tuple(features), tuple(strides), boxes, levels, output_size, sampling_ratio)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 4, 5))
def _roi_align(features, strides, boxes, levels, output_size, sampling_ratio):
    channels = features[0].shape[-1]
    flat = jnp.concatenate([f.reshape(-1, channels) for f in features])
    sizes = [f.shape[:2] for f in features]
    offsets = jnp.cumsum(jnp.asarray([0] + [h * w for h, w in sizes[:-1]], jnp.int32))
    (y_lo, y_hi, wy_lo, wy_hi), (x_lo, x_hi, wx_lo, wx_hi) = _taps(
        sizes, strides, boxes, levels, output_size * sampling_ratio
    )
    row_stride = jnp.asarray([w for _, w in sizes], jnp.int32)[levels][:, None, None]  # [R, 1, 1]
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


def _roi_align_fwd(features, strides, boxes, levels, output_size, sampling_ratio):
    out = _roi_align(features, strides, boxes, levels, output_size, sampling_ratio)
    shapes = tuple(jax.ShapeDtypeStruct(f.shape, f.dtype) for f in features)
    return out, (shapes, boxes, levels)


def _interpolation_matrix(low, high, w_low, w_high, size: int, output_size: int) -> jax.Array:
    """[R, output_size, size]: each output bin's weight on each map row (or column), averaged over its samples."""
    cells = jnp.arange(size, dtype=jnp.int32)
    m = w_low[..., None] * (low[..., None] == cells) + w_high[..., None] * (high[..., None] == cells)  # [R, S, size]
    r, samples = low.shape
    return m.reshape(r, output_size, samples // output_size, size).mean(axis=2)


def _roi_align_bwd(strides, output_size, sampling_ratio, residuals, grad):
    """Bilinear RoIAlign is separable: out[r] = A_y[r] F_l A_x[r]^T per channel, with A_y [output_size, h_l] and
    A_x [output_size, w_l] on the box's level l. So dF_l = sum_r A_y[r]^T grad[r] A_x[r] over the boxes on l: two
    dense contractions per level (f32 accumulation), with no scatter and the same result on every run."""
    shapes, boxes, levels = residuals
    sizes = [s.shape[:2] for s in shapes]
    y_taps, x_taps = _taps(sizes, strides, boxes, levels, output_size * sampling_ratio)
    g = grad.astype(jnp.float32)
    grads = []
    for level, (h, w) in enumerate(sizes):
        on_level = (levels == level).astype(jnp.float32)[:, None, None]
        a_y = _interpolation_matrix(*y_taps, h, output_size) * on_level  # [R, P, h]
        a_x = _interpolation_matrix(*x_taps, w, output_size)  # [R, P, w]
        rows = jnp.einsum("rqw,rpqc->rpwc", a_x, g)  # [R, P, w, C]
        grads.append(jnp.einsum("rph,rpwc->hwc", a_y, rows).astype(shapes[level].dtype))
    return tuple(grads), jnp.zeros_like(boxes), None


_roi_align.defvjp(_roi_align_fwd, _roi_align_bwd)
