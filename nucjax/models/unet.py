"""The U-Net of the study (flax linen): width, depth, normalisation, up-sampling and output heads from the config."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# XLA:CPU options for compiling this model's train step on CPU (jax.jit(..., compiler_options=...)): YNNPACK keeps
# dots and reductions but leaves convolutions to XLA's Eigen kernels, whose filter gradients ran twice as fast and
# with far less scratch memory (jax 0.10.2, 2-core AVX-512 CPU: train step at base width 32 12-18 % faster, at base
# width 16 unchanged to 4 % slower; benchmarks/bench_train.py, "+cpu-options"). CPU only: not a GPU option.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}
NORMS = ("group", "batch", "none")
UPSAMPLES = ("dense", "transpose", "resize", "resize_nearest")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "elu": nn.elu,
    "leaky_relu": nn.leaky_relu,
}


def _window_position() -> jax.Array:
    """Position 2·r + s of each element (r, s) of a 2×2 window, shaped to broadcast against [B, h, 2, w, 2, C]."""
    iota = lambda axis: jax.lax.broadcasted_iota(jnp.int8, (1, 1, 2, 1, 2, 1), axis)  # noqa: E731
    return 2 * iota(2) + iota(4)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 max-pool with stride 2: x [B, H, W, C] -> [B, H/2, W/2, C] (H, W even); the values of
    `nn.max_pool(x, (2, 2), (2, 2))`.

    The gradient goes to the first maximum of each window (row-major), as with XLA's select-and-scatter, but
    through the window index saved by the forward pass: an element-wise select that XLA fuses (select-and-scatter
    is slow on CPU), and, unlike the gradient of a plain max reduction, never split between ties nor lost when a
    recomputed input rounds differently.
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, h, w, c = x.shape
    windows = x.reshape(b, h // 2, 2, w // 2, 2, c)
    y = windows.max(axis=(2, 4))
    first = jnp.where(windows == y[:, :, None, :, None], _window_position(), jnp.int8(4)).min(axis=(2, 4))
    return y, first


def _max_pool_bwd(first: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    b, h, w, c = g.shape
    chosen = first[:, :, None, :, None] == _window_position()
    dx = jnp.where(chosen, g[:, :, None, :, None], jnp.zeros((), g.dtype))
    return (dx.reshape(b, 2 * h, 2 * w, c),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) over [B, H, W, C]; the parameters and values of flax's nn.GroupNorm.

    Statistics come from per-channel sums (then summed per group) in float32, and the normalisation is applied as
    one per-channel multiply-add: fewer passes over the activations than nn.GroupNorm, measured faster on CPU.
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        size = c // self.num_groups
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        count = h * w * size
        mean = jnp.sum(x32, axis=(1, 2)).reshape(b, self.num_groups, size).sum(-1) / count
        mean_sq = jnp.sum(x32 * x32, axis=(1, 2)).reshape(b, self.num_groups, size).sum(-1) / count
        inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + self.epsilon)
        a = jnp.repeat(inv, size, axis=1) * scale  # [B, C]
        offset = bias - jnp.repeat(mean, size, axis=1) * a
        # In float32, so that the gradients of `scale` and `bias` are summed over H×W in float32 (a bf16 sum of
        # 10^4-10^5 terms loses most of its digits) and the mean is not cancelled in bf16.
        return (x32 * a[:, None, None] + offset[:, None, None]).astype(self.dtype)


def depth_to_space_2x2(x: jax.Array, channels: int) -> jax.Array:
    """Rearrange x [B, h, w, 4·c] (channel (2·r + s)·c + k at pixel (i, j)) into [B, 2h, 2w, c] (channel k at pixel
    (2i + r, 2j + s))."""
    b, h, w, _ = x.shape
    x = x.reshape(b, h, w, 2, 2, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, 2 * h, 2 * w, channels)


class ConvBlock(nn.Module):
    """Two 3×3 convolutions, each followed by the normalisation and the activation."""

    features: int
    norm: str
    groups: int
    activation: str
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), use_bias=self.norm == "none", dtype=self.dtype)(x)
            if self.norm == "group":
                x = GroupNorm(self.groups, dtype=self.dtype)(x)
            elif self.norm == "batch":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)(x)
            x = ACTIVATIONS[self.activation](x)
        return x


class Upsample(nn.Module):
    """2× up-sampling to `features` channels: "dense" (per-pixel Dense to 4·c + depth-to-space, the same operation
    as "transpose", a 2×2 stride-2 transposed conv), or "resize" / "resize_nearest" (bilinear / nearest + 3×3 conv)."""

    features: int
    method: str
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.method == "dense":
            y = depth_to_space_2x2(nn.Dense(4 * self.features, use_bias=False, dtype=self.dtype)(x), self.features)
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            return (y.astype(jnp.float32) + bias).astype(self.dtype)  # bias gradient summed in float32
        if self.method == "transpose":
            return nn.ConvTranspose(self.features, (2, 2), strides=(2, 2), dtype=self.dtype)(x)
        b, h, w, c = x.shape
        resize = "bilinear" if self.method == "resize" else "nearest"
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), resize).astype(x.dtype)
        return nn.Conv(self.features, (3, 3), dtype=self.dtype)(x)


class UNet(nn.Module):
    """U-Net: `depth` max-pool levels, widths base_width·2**level, skip connections by concatenation.

    upsample="dense" (the default) is the fastest form measured on CPU and the same network as "transpose"
    (benchmarks/bench_train.py). Parameters are float32; computation runs in `dtype`; logits are returned in
    float32. BatchNorm keeps its running statistics in the 'batch_stats' collection; dropout (before the
    bottleneck block, as in the original U-Net) draws from the 'dropout' rng.
    """

    base_width: int = 32
    depth: int = 4
    norm: str = "group"
    groups: int = 8
    activation: str = "relu"
    upsample: str = "dense"
    dropout: float = 0.0
    out_channels: int = 1
    dtype: Any = jnp.float32

    def check(self, input_shape: tuple[int, ...]) -> None:
        """Raise ValueError naming the model.* key when the configuration or the input shape is invalid."""
        if self.norm not in NORMS:
            raise ValueError(f"model.norm: unknown normalisation {self.norm!r}; choose one of {NORMS}")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"model.upsample: unknown up-sampling {self.upsample!r}; choose one of {UPSAMPLES}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation: unknown activation {self.activation!r}; choose one of {tuple(ACTIVATIONS)}"
            )
        if self.depth < 1 or self.base_width < 1 or self.out_channels < 1:
            raise ValueError(
                f"model.depth, model.base_width and out_channels must be >= 1, got "
                f"{self.depth}, {self.base_width}, {self.out_channels}"
            )
        if self.norm == "group" and (self.groups < 1 or self.base_width % self.groups):
            raise ValueError(
                f"model.groups: {self.groups} groups do not divide model.base_width = {self.base_width} channels"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout: {self.dropout} is not in [0, 1)")
        if len(input_shape) != 4 or input_shape[-1] != 3:
            raise ValueError(f"UNet input: expected float32[B, H, W, 3], got shape {tuple(input_shape)}")
        step = 2**self.depth
        if input_shape[1] % step or input_shape[2] % step:
            raise ValueError(
                f"UNet input: H, W = {input_shape[1]}, {input_shape[2]} are not multiples of 2**model.depth = {step}"
            )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: float32[B, H, W, 3] -> float32[B, H, W, out_channels] logits."""
        self.check(x.shape)
        block = dict(norm=self.norm, groups=self.groups, activation=self.activation, dtype=self.dtype)
        x = x.astype(self.dtype)
        skips = []
        for level in range(self.depth):
            x = ConvBlock(self.base_width * 2**level, **block)(x, train)
            skips.append(x)
            x = max_pool_2x2(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = ConvBlock(self.base_width * 2**self.depth, **block)(x, train)
        for level in reversed(range(self.depth)):
            features = self.base_width * 2**level
            x = Upsample(features, self.upsample, self.dtype)(x)
            x = ConvBlock(features, **block)(jnp.concatenate([skips[level], x], axis=-1), train)
        # The 1×1 output convolution in float32 (a few FLOPs per pixel): its bias gradient, the sum of the loss
        # gradient over every pixel of the batch, would otherwise be summed in bf16.
        return nn.Conv(self.out_channels, (1, 1), dtype=jnp.float32)(x.astype(jnp.float32))
