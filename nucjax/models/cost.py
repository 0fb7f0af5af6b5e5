"""What a model costs: parameter count and forward FLOPs per image from XLA's cost analysis (any flax model).

FLOPs are always counted by the CPU backend's cost analysis: the GPU backend's leaves out the convolutions it hands to
cuDNN (it reported 1.21 instead of 23.68 GFLOPs for the base-32 depth-4 U-Net at 256² on an H100), so its figure would vary by device.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))


def forward_flops(apply_fn: Callable[..., jax.Array], variables: Any, input_shape: tuple[int, ...]) -> float:
    """FLOPs per image of `apply_fn(variables, x, train=False)` for x float32[input_shape], from XLA's cost
    analysis of the compiled forward pass (divided by the batch size input_shape[0])."""
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    with jax.default_device(jax.devices("cpu")[0]):
        compiled = jax.jit(lambda v, x: apply_fn(v, x, train=False)).lower(abstract, x).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
        cost = cost[0]
    return float(cost["flops"]) / input_shape[0]
