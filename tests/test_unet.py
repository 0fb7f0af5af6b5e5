"""Tests for nucjax.models.unet: shapes, the dense == transposed-conv identity, config errors, counts, overfitting."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nucjax import losses
from nucjax.models.cost import count_params, forward_flops
from nucjax.models.unet import (
    CPU_COMPILER_OPTIONS,
    GroupNorm,
    UNet,
    Upsample,
    max_pool_2x2,
)

X = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)


@pytest.mark.parametrize(
    "norm, upsample, out_channels",
    [
        ("group", "dense", 1),
        ("group", "transpose", 2),
        ("group", "resize", 3),
        ("group", "resize_nearest", 1),
        ("batch", "dense", 2),
        ("batch", "resize", 1),
        ("none", "transpose", 3),
        ("none", "resize_nearest", 2),
    ],
)
def test_output_shape_and_dtype(norm, upsample, out_channels):
    model = UNet(base_width=4, depth=2, norm=norm, groups=2, upsample=upsample, out_channels=out_channels)
    variables = model.init(jax.random.key(0), X, train=False)
    assert ("batch_stats" in variables) == (norm == "batch")
    out, updates = model.apply(variables, X, train=True, mutable=["batch_stats"])
    assert out.shape == (2, 16, 16, out_channels) and out.dtype == jnp.float32
    assert ("batch_stats" in updates) == (norm == "batch")


def test_bfloat16_computes_in_bf16_with_float32_params_and_logits():
    model = UNet(base_width=4, depth=2, groups=2, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), X, train=False)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    out = model.apply(variables, X, train=False)
    assert out.dtype == jnp.float32
    ref = UNet(base_width=4, depth=2, groups=2).apply(variables, X, train=False)
    assert 0 < np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_bfloat16_gradients_stay_close_to_float32():
    # Mixed precision may round each value to bf16 (2**-8 relative), but the gradients of the biases and norm
    # parameters are sums over every pixel of the batch; summed in bf16, 2·96·96 terms lose most of their digits.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 96, 96, 3)).astype(np.float32)
    target = (rng.random((2, 96, 96, 1)) < 0.3).astype(np.float32)
    variables = UNet(base_width=8, depth=2, groups=2).init(jax.random.key(0), x, train=False)

    def grads(dtype):
        model = UNet(base_width=8, depth=2, groups=2, dtype=dtype)
        loss = lambda p: optax.sigmoid_binary_cross_entropy(model.apply({"params": p}, x, train=False), target).mean()
        return jax.jit(jax.grad(loss))(variables["params"])

    g32, g16 = grads(jnp.float32), grads(jnp.bfloat16)
    # Measured: 1.0% over all parameters and at most 6.5% for one layer (a first-layer kernel, whose gradient at
    # initialisation is a sum with much cancellation); with the bias and norm sums in bf16 it was 14% and 50%.
    difference = jax.tree.map(lambda a, b: b - a, g32, g16)
    assert float(optax.tree.norm(difference) / optax.tree.norm(g32)) < 0.03
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g32)[0], jax.tree.leaves(g16)):
        error = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
        assert error < 0.1, f"{jax.tree_util.keystr(path)}: bf16 gradient off by {error:.1%}"


def test_dense_upsampling_equals_transposed_conv():
    x = jax.random.normal(jax.random.key(1), (2, 5, 7, 6))
    transpose = Upsample(4, "transpose", jnp.float32)
    params = transpose.init(jax.random.key(2), x)["params"]["ConvTranspose_0"]
    kernel = params["kernel"] + 0.0  # [a, b, cin, c], flax puts kernel[1 - a, 1 - b] at pixel (2i + a, 2j + b)
    bias = jax.random.normal(jax.random.key(3), (4,))
    dense_kernel = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(6, 16)
    y_transpose = transpose.apply({"params": {"ConvTranspose_0": {"kernel": kernel, "bias": bias}}}, x)
    dense_params = {"Dense_0": {"kernel": dense_kernel}, "bias": bias}
    y_dense = Upsample(4, "dense", jnp.float32).apply({"params": dense_params}, x)
    assert y_dense.shape == (2, 10, 14, 4)
    np.testing.assert_allclose(y_dense, y_transpose, atol=1e-5)
    # and by hand: output pixel (2i + a, 2j + b) = x[i, j] @ kernel[1 - a, 1 - b] + bias
    np.testing.assert_allclose(y_dense[:, 3::2, 4::2], x[:, 1:, 2:] @ kernel[0, 1] + bias, atol=1e-5)


def test_dense_and_transpose_unets_agree_with_copied_weights():
    dense = UNet(base_width=4, depth=2, groups=2)
    transpose = UNet(base_width=4, depth=2, groups=2, upsample="transpose")
    variables = transpose.init(jax.random.key(0), X, train=False)
    params = dict(variables["params"])
    for name in [k for k in params if k.startswith("Upsample")]:
        kernel, bias = params[name]["ConvTranspose_0"]["kernel"], params[name]["ConvTranspose_0"]["bias"] + 0.1
        params[name] = {"Dense_0": {"kernel": kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(kernel.shape[2], -1)},
                        "bias": bias}
        variables["params"][name]["ConvTranspose_0"]["bias"] = bias
    assert count_params(params) == count_params(variables["params"])
    np.testing.assert_allclose(
        dense.apply({"params": params}, X, train=False), transpose.apply(variables, X, train=False), atol=1e-5
    )


def test_max_pool_values_and_gradient_match_flax():
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
    g = jax.random.normal(jax.random.key(1), (2, 4, 3, 3))
    ref = lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) * g)  # noqa: E731
    ours = lambda x: jnp.sum(max_pool_2x2(x) * g)  # noqa: E731
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
    np.testing.assert_array_equal(jax.grad(ours)(x), jax.grad(ref)(x))


def test_max_pool_gradient_goes_to_the_first_of_tied_maxima():
    x = jnp.array([[1.0, 3.0], [3.0, 3.0]])[None, :, :, None]
    np.testing.assert_array_equal(jax.grad(lambda x: max_pool_2x2(x).sum())(x)[0, :, :, 0], [[0, 1], [0, 0]])


def test_group_norm_matches_flax_in_values_and_gradients():
    x = 2.0 * jax.random.normal(jax.random.key(0), (2, 4, 6, 8)) + 0.5
    params = {"scale": 1.0 + jax.random.normal(jax.random.key(1), (8,)),
              "bias": jax.random.normal(jax.random.key(2), (8,))}
    r = jax.random.normal(jax.random.key(3), x.shape)
    ours = lambda p, x: jnp.sum(GroupNorm(4).apply({"params": p}, x) * r)  # noqa: E731
    ref = lambda p, x: jnp.sum(nn.GroupNorm(num_groups=4, epsilon=1e-5).apply({"params": p}, x) * r)  # noqa: E731
    np.testing.assert_allclose(GroupNorm(4).apply({"params": params}, x),
                               nn.GroupNorm(num_groups=4, epsilon=1e-5).apply({"params": params}, x), atol=1e-5)
    for a, b in zip(jax.grad(ours, argnums=(0, 1))(params, x), jax.grad(ref, argnums=(0, 1))(params, x)):
        for leaf_a, leaf_b in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(leaf_a, leaf_b, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, shape, key",
    [
        (dict(norm="layer"), (1, 16, 16, 3), "model.norm"),
        (dict(upsample="pixelshuffle"), (1, 16, 16, 3), "model.upsample"),
        (dict(activation="tanhh"), (1, 16, 16, 3), "model.activation"),
        (dict(groups=3), (1, 16, 16, 3), "model.groups"),
        (dict(dropout=1.5), (1, 16, 16, 3), "model.dropout"),
        (dict(depth=0), (1, 16, 16, 3), "model.depth"),
        (dict(), (1, 18, 16, 3), "2**model.depth"),
        (dict(), (1, 16, 16, 1), "float32[B, H, W, 3]"),
    ],
)
def test_bad_config_raises_naming_the_key(kwargs, shape, key):
    model = UNet(**{"base_width": 8, "depth": 2, **kwargs})
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("*", r"\*")):
        model.init(jax.random.key(0), jnp.zeros(shape), train=False)


def test_dropout_uses_the_dropout_rng_in_training_only():
    model = UNet(base_width=4, depth=2, groups=2, dropout=0.5)
    variables = model.init(jax.random.key(0), X, train=False)
    np.testing.assert_array_equal(model.apply(variables, X, train=False), model.apply(variables, X, train=False))
    a = model.apply(variables, X, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, X, train=True, rngs={"dropout": jax.random.key(2)})
    assert np.abs(a - b).max() > 0


def test_count_params_closed_form():
    w = 4  # depth 1, no norm: every conv has a bias
    expected = (
        (27 * w + w) + (9 * w * w + w)  # block 3 -> w
        + (9 * w * 2 * w + 2 * w) + (9 * 4 * w * w + 2 * w)  # bottleneck w -> 2w
        + (4 * 2 * w * w + w)  # up-sampling 2w -> w (2×2 kernel)
        + (9 * 2 * w * w + w) + (9 * w * w + w)  # block 2w -> w
        + (w + 1)  # 1×1 head
    )
    for upsample in ("dense", "transpose"):
        params = UNet(base_width=w, depth=1, norm="none", upsample=upsample).init(
            jax.random.key(0), X, train=False
        )["params"]
        assert count_params(params) == expected


def test_forward_flops_of_one_conv_is_the_closed_form():
    conv = nn.Conv(8, (3, 3), use_bias=False)
    variables = conv.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    # XLA counts 2 FLOPs per multiply-add that touches the image, not the zero padding: per axis, 16 positions
    # × 3 taps less the 2 taps that fall outside.
    expected = 2 * 3 * 8 * (3 * 16 - 2) ** 2
    for batch in (1, 4):
        flops = forward_flops(lambda v, x, train: conv.apply(v, x), variables, (batch, 16, 16, 3))
        assert flops == pytest.approx(expected, rel=1e-6)


def test_cpu_compiler_options_compile_the_same_gradients():
    model = UNet(base_width=4, depth=2, groups=2)
    variables = model.init(jax.random.key(0), X, train=False)
    grad = lambda v: jax.grad(lambda v: jnp.sum(model.apply(v, X, train=True) ** 2))(v)  # noqa: E731
    default = jax.jit(grad)(variables)
    with_options = jax.jit(grad, compiler_options=CPU_COMPILER_OPTIONS)(variables)
    for a, b in zip(jax.tree_util.tree_leaves(with_options), jax.tree_util.tree_leaves(default)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def two_squares(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One tiny image float32[1, S, S, 3] with two bright squares on a dark background, and its mask."""
    mask = np.zeros((1, size, size), np.float32)
    mask[0, 4:12, 5:13] = 1.0
    mask[0, 18:28, 16:26] = 1.0
    noise = np.random.default_rng(0).normal(scale=0.1, size=(1, size, size, 3))
    return (mask[..., None] * np.array([0.9, 0.6, 0.8]) + noise).astype(np.float32), mask


def test_a_few_adam_steps_overfit_one_batch():
    image, mask = two_squares()
    valid = np.ones_like(mask)
    model = UNet(base_width=8, depth=2, groups=4)
    params = model.init(jax.random.key(0), image, train=False)["params"]
    tx = optax.adam(1e-2)

    def loss_fn(params):
        logits = model.apply({"params": params}, image, train=True)[..., 0]
        return losses.sigmoid_bce(logits, mask, valid) + losses.soft_dice(logits, mask, valid)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    first = None
    for _ in range(60):
        params, opt_state, loss = step(params, opt_state)
        first = float(loss) if first is None else first
    final = float(loss_fn(params))
    assert final <= 0.1 * first, (first, final)
