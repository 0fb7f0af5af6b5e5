"""ResNet-18/34/50 with GroupNorm and an FPN (levels P2..P6), trained from scratch (no pretrained weights)."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
STRIDES = (4, 8, 16, 32, 64)  # P2..P6


def group_norm(channels: int, groups: int, dtype: Any, zero_init: bool = False) -> nn.GroupNorm:
    """GroupNorm with gcd(groups, channels) groups; `zero_init` starts its scale at 0 (last norm of a residual)."""
    scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    return nn.GroupNorm(num_groups=math.gcd(groups, channels), dtype=dtype, scale_init=scale_init)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    features: int
    stride: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s: nn.Conv(f, (k, k), (s, s), padding=k // 2, use_bias=False, dtype=self.dtype)
        y = nn.relu(group_norm(self.features, self.groups, self.dtype)(conv(self.features, 3, self.stride)(x)))
        y = group_norm(self.features, self.groups, self.dtype, zero_init=True)(conv(self.features, 3, 1)(y))
        if x.shape[-1] != self.features or self.stride != 1:
            x = group_norm(self.features, self.groups, self.dtype)(conv(self.features, 1, self.stride)(x))
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 x4 convolutions with a residual connection (ResNet-50)."""

    features: int
    stride: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s: nn.Conv(f, (k, k), (s, s), padding=k // 2, use_bias=False, dtype=self.dtype)
        out = 4 * self.features
        y = nn.relu(group_norm(self.features, self.groups, self.dtype)(conv(self.features, 1, 1)(x)))
        y = nn.relu(group_norm(self.features, self.groups, self.dtype)(conv(self.features, 3, self.stride)(y)))
        y = group_norm(out, self.groups, self.dtype, zero_init=True)(conv(out, 1, 1)(y))
        if x.shape[-1] != out or self.stride != 1:
            x = group_norm(out, self.groups, self.dtype)(conv(out, 1, self.stride)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet body: images f32[B, H, W, 3] -> [C2, C3, C4, C5] at strides 4, 8, 16, 32."""

    depth: int
    width: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        x = nn.Conv(self.width, (7, 7), (2, 2), padding=3, use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(group_norm(self.width, self.groups, self.dtype)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        block = Bottleneck if self.depth == 50 else BasicBlock
        outputs = []
        for stage, count in enumerate(STAGES[self.depth]):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                x = block(self.width * 2**stage, stride, self.groups, self.dtype)(x)
            outputs.append(x)
        return outputs


class FPN(nn.Module):
    """Feature pyramid: [C2..C5] -> [P2..P6] with `width` channels (GroupNorm; P6 subsamples P5)."""

    width: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, stages: list[jax.Array]) -> list[jax.Array]:
        norm = lambda: group_norm(self.width, self.groups, self.dtype)
        laterals = [norm()(nn.Conv(self.width, (1, 1), use_bias=False, dtype=self.dtype)(c)) for c in stages]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            merged.insert(0, lateral + jnp.repeat(jnp.repeat(merged[0], 2, axis=1), 2, axis=2))
        outputs = [
            group_norm(self.width, self.groups, self.dtype)(
                nn.Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(p)
            )
            for p in merged
        ]
        return outputs + [outputs[-1][:, ::2, ::2]]
