"""Tests for nucjax.losses against NumPy closed forms, with weights and masked padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nucjax import losses

RNG = np.random.default_rng(0)
SHAPE = (2, 5, 6)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_bce(x, t):
    p = np_sigmoid(x.astype(np.float64))
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


@pytest.fixture
def case():
    logits = RNG.normal(scale=2.0, size=SHAPE).astype(np.float32)
    targets = (RNG.random(SHAPE) > 0.5).astype(np.float32)
    valid = np.ones(SHAPE, np.float32)
    valid[:, :, 4:] = 0.0  # two columns of padding
    weights = RNG.uniform(0.5, 3.0, size=SHAPE).astype(np.float32)
    return logits, targets, valid, weights


def test_sigmoid_bce_matches_closed_form_with_weights_and_padding(case):
    logits, targets, valid, weights = case
    expected = np.sum(np_bce(logits, targets) * weights * valid) / valid.sum()
    got = losses.sigmoid_bce(logits, targets, valid, weights)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(
        losses.sigmoid_bce(logits, targets, valid), np.sum(np_bce(logits, targets) * valid) / valid.sum(), rtol=1e-5
    )


def test_sigmoid_bce_hand_value():
    # logit 0 -> log 2 whatever the target; logit ln 3 (p = 3/4) with target 1 -> ln(4/3); the third pixel is padding.
    logits = np.array([[[0.0, np.log(3.0), 50.0]]], np.float32)
    targets = np.array([[[1.0, 1.0, 0.0]]], np.float32)
    valid = np.array([[[1.0, 1.0, 0.0]]], np.float32)
    np.testing.assert_allclose(losses.sigmoid_bce(logits, targets, valid), (np.log(2) + np.log(4 / 3)) / 2, rtol=1e-6)


def test_sigmoid_bce_channels_share_the_mask(case):
    logits, targets, valid, _ = case
    logits2 = np.stack([logits, -logits], axis=-1)
    targets2 = np.stack([targets, targets], axis=-1)
    expected = np.sum((np_bce(logits, targets) + np_bce(-logits, targets)) * valid) / (2 * valid.sum())
    np.testing.assert_allclose(losses.sigmoid_bce(logits2, targets2, valid), expected, rtol=1e-5)


def test_sigmoid_bce_is_stable_for_huge_logits():
    logits = np.array([[[1000.0, -1000.0]]], np.float32)
    targets = np.array([[[0.0, 0.0]]], np.float32)
    valid = np.ones((1, 1, 2), np.float32)
    np.testing.assert_allclose(losses.sigmoid_bce(logits, targets, valid), 500.0, rtol=1e-6)
    grad = jax.grad(lambda x: losses.sigmoid_bce(x, targets, valid))(jnp.asarray(logits))
    np.testing.assert_allclose(grad, [[[0.5, 0.0]]], atol=1e-6)


def test_soft_dice_matches_closed_form(case):
    logits, targets, valid, _ = case
    p = np_sigmoid(logits.astype(np.float64)) * valid
    t = targets * valid
    dice = (2 * (p * t).sum(axis=(1, 2)) + 1.0) / (p.sum(axis=(1, 2)) + t.sum(axis=(1, 2)) + 1.0)
    np.testing.assert_allclose(losses.soft_dice(logits, targets, valid), 1 - dice.mean(), rtol=1e-5)


def test_soft_dice_hand_value():
    # Image 0: p = (1/2, 1/2), t = (1, 0): Dice = (2·0.5 + 1) / (1 + 1 + 1) = 2/3.
    # Image 1: empty target, p ≈ 0 everywhere: Dice = 1 (the smoothing term). Loss = 1 − (2/3 + 1) / 2 = 1/6.
    logits = np.array([[[0.0, 0.0]], [[-100.0, -100.0]]], np.float32)
    targets = np.array([[[1.0, 0.0]], [[0.0, 0.0]]], np.float32)
    valid = np.ones((2, 1, 2), np.float32)
    np.testing.assert_allclose(losses.soft_dice(logits, targets, valid), 1 / 6, rtol=1e-5)


def test_weighted_cross_entropy_matches_closed_form(case):
    _, _, valid, weights = case
    logits = RNG.normal(scale=2.0, size=SHAPE + (3,)).astype(np.float32)
    classes = RNG.integers(0, 3, size=SHAPE).astype(np.int32)
    class_weights = np.array([1.0, 2.0, 5.0], np.float32)
    x = logits.astype(np.float64)
    log_softmax = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_softmax, classes[..., None], -1)[..., 0]
    expected = np.sum(nll * class_weights[classes] * weights * valid) / valid.sum()
    got = losses.weighted_cross_entropy(logits, classes, valid, class_weights=tuple(class_weights), weights=weights)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(
        losses.weighted_cross_entropy(logits, classes, valid), np.sum(nll * valid) / valid.sum(), rtol=1e-5
    )


def test_weighted_cross_entropy_hand_value():
    # Uniform logits over 3 classes: −log(1/3) per pixel; class weights 1 and 3 on two valid pixels -> 2·ln 3.
    logits = np.zeros((1, 1, 3, 3), np.float32)
    classes = np.array([[[0, 2, 1]]], np.int32)
    valid = np.array([[[1.0, 1.0, 0.0]]], np.float32)
    got = losses.weighted_cross_entropy(logits, classes, valid, class_weights=(1.0, 1.0, 3.0))
    np.testing.assert_allclose(got, 2 * np.log(3), rtol=1e-6)


def test_focal_matches_closed_form(case):
    logits, targets, valid, _ = case
    p = np_sigmoid(logits.astype(np.float64))
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = 0.25 * targets + 0.75 * (1 - targets)
    expected = np.sum(alpha_t * (1 - p_t) ** 2 * np_bce(logits, targets) * valid) / valid.sum()
    np.testing.assert_allclose(losses.focal(logits, targets, valid, gamma=2.0, alpha=0.25), expected, rtol=1e-5)


def test_focal_with_gamma_zero_is_bce(case):
    logits, targets, valid, _ = case
    np.testing.assert_allclose(
        losses.focal(logits, targets, valid, gamma=0.0), losses.sigmoid_bce(logits, targets, valid), rtol=1e-6
    )


def all_losses(logits, targets, valid):
    classes = targets.astype(jnp.int32)
    three = jnp.stack([logits, -logits, 0.5 * logits], axis=-1)
    return jnp.stack(
        [
            losses.sigmoid_bce(logits, targets, valid),
            losses.soft_dice(logits, targets, valid),
            losses.weighted_cross_entropy(three, classes, valid, class_weights=(1.0, 2.0, 3.0)),
            losses.focal(logits, targets, valid, alpha=0.25),
        ]
    )


def test_padding_never_counts(case):
    logits, targets, valid, _ = case
    changed_logits = np.where(valid > 0, logits, 1e4 * RNG.normal(size=SHAPE)).astype(np.float32)
    changed_targets = np.where(valid > 0, targets, 1.0 - targets)
    np.testing.assert_allclose(
        all_losses(logits, targets, valid), all_losses(changed_logits, changed_targets, valid), rtol=1e-6
    )
    grads = jax.jacobian(all_losses)(jnp.asarray(logits), targets, valid)
    assert np.all(np.asarray(grads)[:, valid == 0] == 0.0)
    assert np.any(np.asarray(grads)[:, valid > 0] != 0.0)


def test_all_invalid_batch_gives_zero_and_finite_gradient(case):
    logits, targets, _, _ = case
    valid = np.zeros(SHAPE, np.float32)
    np.testing.assert_array_equal(all_losses(logits, targets, valid), 0.0)
    grads = jax.jacobian(all_losses)(jnp.asarray(logits), targets, valid)
    assert np.all(np.isfinite(grads))
