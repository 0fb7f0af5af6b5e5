"""Mask R-CNN heads: the RPN (shared over FPN levels), the box head (two FC layers) and the mask head."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nucjax.models.maskrcnn.backbone import group_norm


class RPNHead(nn.Module):
    """Objectness and deltas per anchor: levels [B, h_l, w_l, C] -> (f32[B, A], f32[B, A, 4]), A = sum h*w*anchors."""

    anchors_per_cell: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
        init = nn.initializers.normal(0.01)
        # Every bias is added in float32 (the 1x1 output layers run in float32: few FLOPs), here and in the other
        # heads: a bias gradient is a sum over every anchor, RoI or pixel, which loses most of its digits in bf16.
        conv = Conv3x3F32Bias(features[0].shape[-1], init, self.dtype, name="Conv_0")
        score = nn.Conv(self.anchors_per_cell, (1, 1), kernel_init=init, dtype=jnp.float32, name="Conv_1")
        delta = nn.Conv(4 * self.anchors_per_cell, (1, 1), kernel_init=init, dtype=jnp.float32, name="Conv_2")
        logits, deltas = [], []
        for f in features:
            h = nn.relu(conv(f)).astype(jnp.float32)
            logits.append(score(h).reshape(f.shape[0], -1))
            deltas.append(delta(h).reshape(f.shape[0], -1, 4))
        return jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1)


class BoxHead(nn.Module):
    """Two FC layers, then nucleus-vs-background logits and the nucleus class's box deltas.

    RoI features [R, p, p, C] -> (f32[R, 2], f32[R, 4]). There is one object class, so "class-specific" deltas are 4.
    """

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(DenseF32Bias(self.hidden, self.dtype, name="Dense_0")(x))
        x = nn.relu(DenseF32Bias(self.hidden, self.dtype, name="Dense_1")(x)).astype(jnp.float32)
        logits = nn.Dense(2, kernel_init=nn.initializers.normal(0.01), dtype=jnp.float32, name="Dense_2")(x)
        deltas = nn.Dense(4, kernel_init=nn.initializers.normal(0.001), dtype=jnp.float32, name="Dense_3")(x)
        return logits, deltas


class DenseF32Bias(nn.Module):
    """nn.Dense (the same parameters and initialisation), its product in `dtype` and its bias added in float32, so
    that in bf16 the bias gradient, a sum over every RoI or pixel, is summed in float32."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        return (y.astype(jnp.float32) + bias).astype(self.dtype)


class Conv3x3F32Bias(nn.Module):
    """nn.Conv(features, (3, 3), padding=1) (the same parameters), its convolution in `dtype` and its bias added in
    float32, as DenseF32Bias."""

    features: int
    kernel_init: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (y.astype(jnp.float32) + bias).astype(self.dtype)


class MaskHead(nn.Module):
    """Four 3x3 conv + GroupNorm layers, a 2x2 stride-2 deconvolution, a 1x1 conv: [R, p, p, C] -> f32[R, 2p, 2p]."""

    width: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(4):
            x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
            x = nn.relu(group_norm(self.width, self.groups, self.dtype)(x))
        # The 2x2 stride-2 deconvolution as a per-pixel Dense + depth-to-space (the same map; XLA's CPU
        # transposed convolution is ~100x slower than this matmul).
        r, p = x.shape[0], x.shape[1]
        x = DenseF32Bias(4 * self.width, self.dtype, name="Dense_0")(x).reshape(r, p, p, 2, 2, self.width)
        x = nn.relu(x.transpose(0, 1, 3, 2, 4, 5).reshape(r, 2 * p, 2 * p, self.width))
        return nn.Conv(1, (1, 1), dtype=jnp.float32)(x.astype(jnp.float32))[..., 0]
