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
        conv = nn.Conv(features[0].shape[-1], (3, 3), padding=1, kernel_init=init, dtype=self.dtype)
        score = nn.Conv(self.anchors_per_cell, (1, 1), kernel_init=init, dtype=self.dtype)
        delta = nn.Conv(4 * self.anchors_per_cell, (1, 1), kernel_init=init, dtype=self.dtype)
        logits, deltas = [], []
        for f in features:
            h = nn.relu(conv(f))
            logits.append(score(h).reshape(f.shape[0], -1))
            deltas.append(delta(h).reshape(f.shape[0], -1, 4))
        return (
            jnp.concatenate(logits, axis=1).astype(jnp.float32),
            jnp.concatenate(deltas, axis=1).astype(jnp.float32),
        )


class BoxHead(nn.Module):
    """Two FC layers, then nucleus-vs-background logits and the nucleus class's box deltas.

    RoI features [R, p, p, C] -> (f32[R, 2], f32[R, 4]). There is one object class, so "class-specific" deltas are 4.
    """

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        logits = nn.Dense(2, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype)(x)
        deltas = nn.Dense(4, kernel_init=nn.initializers.normal(0.001), dtype=self.dtype)(x)
        return logits.astype(jnp.float32), deltas.astype(jnp.float32)


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
        x = nn.Dense(4 * self.width, dtype=self.dtype)(x).reshape(r, p, p, 2, 2, self.width)
        x = nn.relu(x.transpose(0, 1, 3, 2, 4, 5).reshape(r, 2 * p, 2 * p, self.width))
        return nn.Conv(1, (1, 1), dtype=self.dtype)(x)[..., 0].astype(jnp.float32)
