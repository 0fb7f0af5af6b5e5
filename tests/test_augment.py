"""Augmentation keeps image and labels aligned (checked on an image that encodes its pixel coordinates)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nucjax import intensity
from nucjax.config import load_config
from nucjax.data import augment, pipeline
from tests.conftest import REPO


def _config(**changes):
    config = load_config(REPO / "configs" / "default.py").data.augment
    config.update(changes)
    return config


GEOMETRY_ONLY = dict(brightness=0.0, contrast=0.0, gamma=0.0, noise_std=0.0, grey_prob=0.0, invert_prob=0.0)


def _coordinate_image(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Channel 0 = row / 100, channel 1 = column / 100; label = 1 + row * width + column (one id per pixel)."""
    rows, cols = np.mgrid[:height, :width].astype(np.float32)
    image = np.stack([rows / 100, cols / 100, np.zeros_like(rows)], axis=2)
    return image, (1 + rows * width + cols).astype(np.int32)


@pytest.mark.parametrize("shape", [(150, 130), (50, 70)])
def test_labels_stay_on_the_pixels_the_image_shows(shape):
    image, label = _coordinate_image(*shape)
    config = _config(scale_range=(0.8, 1.25), nuclei_crop_prob=0.5, **GEOMETRY_ONLY)
    for seed in range(40):
        out_image, out_label, valid, _ = augment.augment(image, label, np.random.default_rng(seed), config, 64)
        assert out_image.shape == (64, 64, 3) and out_image.dtype == np.float32
        assert out_label.shape == valid.shape == (64, 64) and out_label.dtype == np.int32 and valid.dtype == np.float32
        rows, cols = out_image[..., 0] * 100, out_image[..., 1] * 100
        tie = (np.abs(rows % 1 - 0.5) < 1e-2) | (np.abs(cols % 1 - 0.5) < 1e-2)  # bilinear halfway: either side
        expected = 1 + np.round(rows).astype(np.int64) * shape[1] + np.round(cols).astype(np.int64)
        inside = (valid == 1) & ~tie
        np.testing.assert_array_equal(out_label[inside], expected[inside])
        assert (out_label[valid == 0] == 0).all()
        if shape[0] < 64 / 1.25:
            assert (valid == 0).any()  # the image is smaller than every window: mirrored padding, marked invalid


def test_zoom_magnifies_each_pixel_into_a_block():
    """zoom=2 (the run's data.input_scale) at scale_range (1, 1): the crop is a window of the image with every
    pixel repeated into a 2x2 block (nearest labels; the image bilinear, a quarter-pixel off each centre)."""
    image, label = _coordinate_image(80, 90)
    config = _config(scale_range=(1.0, 1.0), nuclei_crop_prob=0.0, flip=False, rot90=False, **GEOMETRY_ONLY)
    for seed in range(5):
        out_image, out_label, valid, _ = augment.augment(image, label, np.random.default_rng(seed), config, 64,
                                                         zoom=2.0)
        assert valid.all()
        top, left = divmod(int(out_label[0, 0]) - 1, 90)
        window = label[top:top + 32, left:left + 32]
        np.testing.assert_array_equal(out_label, np.repeat(np.repeat(window, 2, axis=0), 2, axis=1))
        # Output row i samples source row top + (i + 0.5) / 2 - 0.5, clamped at the image's first row.
        rows = np.maximum(top + (np.arange(64) + 0.5) / 2 - 0.5, 0)
        np.testing.assert_allclose(out_image[:, 0, 0] * 100, rows, atol=1e-4)


def test_flips_and_rotations_without_scale_are_exact_permutations():
    image, label = _coordinate_image(64, 64)
    config = _config(scale_range=(1.0, 1.0), **GEOMETRY_ONLY)
    seen = set()
    for seed in range(30):
        out_image, out_label, valid, _ = augment.augment(image, label, np.random.default_rng(seed), config, 64)
        assert valid.all()
        rows, cols = np.rint(out_image[..., 0] * 100).astype(int), np.rint(out_image[..., 1] * 100).astype(int)
        np.testing.assert_allclose(out_image[..., 0] * 100, rows, atol=1e-4)  # no interpolation at scale 1
        np.testing.assert_array_equal(out_label, 1 + rows * 64 + cols)
        seen.add((rows[0, 0], cols[0, 0], rows[0, 1] - rows[0, 0], cols[0, 1] - cols[0, 0]))
    assert len(seen) == 8  # all 8 symmetries of the square appear


def test_labels_are_never_interpolated():
    label = np.zeros((90, 90), np.int32)
    label[10:40, 10:40] = 3
    label[40:70, 20:60] = 8
    image = np.random.default_rng(0).random((90, 90, 3), dtype=np.float32)
    for seed in range(10):
        _, out_label, _, _ = augment.augment(image, label, np.random.default_rng(seed), _config(), 48)
        assert set(np.unique(out_label)) <= {0, 3, 8}


def test_nuclei_crop_prob_biases_crops_towards_nuclei():
    label = np.zeros((400, 400), np.int32)
    label[300:305, 300:305] = 1
    image = np.zeros((400, 400, 3), np.float32)
    contains = {}
    for prob in (0.0, 1.0):
        config = _config(nuclei_crop_prob=prob, scale_range=(1.0, 1.0), **GEOMETRY_ONLY)
        hits = [augment.augment(image, label, np.random.default_rng(s), config, 64)[1].any() for s in range(20)]
        contains[prob] = sum(hits)
    assert contains[1.0] == 20 and contains[0.0] < 5


def test_same_rng_seed_gives_the_same_output():
    image, label = _coordinate_image(100, 120)
    first = augment.augment(image, label, np.random.default_rng(7), _config(), 64)
    second = augment.augment(image, label, np.random.default_rng(7), _config(), 64)
    other = augment.augment(image, label, np.random.default_rng(8), _config(), 64)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def _identity_view(**settings):
    """A 32 x 32 random image with geometry off and only the given intensity settings: (image, output with the
    changes made by nucjax.intensity, the drawn changes)."""
    image = np.random.default_rng(1).random((32, 32, 3), dtype=np.float32)
    label = np.zeros((32, 32), np.int32)
    config = _config(scale_range=(1.0, 1.0), flip=False, rot90=False, **{**GEOMETRY_ONLY, **settings})
    view, _, _, drawn = augment.augment(image, label, np.random.default_rng(5), config, 32)
    np.testing.assert_array_equal(view, image)  # geometry off: the view is the image
    out = intensity.apply(jnp.asarray(view[None]), jnp.asarray(drawn[None]), jax.random.key(0))
    return image, np.asarray(out[0]), dict(zip(augment.INTENSITY, drawn.tolist()))


def test_intensity_changes_follow_their_definitions():
    image, out, drawn = _identity_view()
    assert tuple(drawn.values()) == augment.NEUTRAL
    np.testing.assert_allclose(out, image, atol=1e-6)
    _, out, _ = _identity_view(grey_prob=1.0)
    np.testing.assert_allclose(out, np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2), atol=1e-6)
    _, out, _ = _identity_view(invert_prob=1.0)
    np.testing.assert_allclose(out, 1 - image, atol=1e-6)
    _, out, drawn = _identity_view(brightness=0.1)
    shift = out - image
    assert np.ptp(shift) < 1e-5 and 0 < abs(shift.mean()) <= 0.1
    assert shift.mean() == pytest.approx(drawn["brightness"], abs=1e-6)
    _, out, drawn = _identity_view(contrast=0.2)
    factor = (out - image.mean()) / (image - image.mean())
    assert np.ptp(factor) < 1e-3 and 0.8 <= factor.mean() <= 1.2 and factor.mean() != 1
    assert factor.mean() == pytest.approx(drawn["contrast"], abs=1e-4)
    _, out, drawn = _identity_view(gamma=0.2)
    middle = (image > 0.05) & (image < 0.95)
    gamma = np.log(out[middle]) / np.log(image[middle])
    assert np.ptp(gamma) < 1e-3 and np.exp(-0.2) <= gamma.mean() <= np.exp(0.2)
    assert gamma.mean() == pytest.approx(drawn["gamma"], abs=1e-4)
    _, out, drawn = _identity_view(noise_std=0.05)
    noise = out - image
    assert 0 < drawn["noise_std"] <= 0.05 and noise.std() == pytest.approx(drawn["noise_std"], rel=0.1)
    np.testing.assert_allclose(noise[..., 0], noise[..., 2], atol=1e-6)  # one value per pixel for all channels


def test_intensity_changes_match_a_numpy_reference_in_order():
    """All changes at once, per image, against the definitions written out in NumPy (noise taken from the output
    of a zero image with the same key: it is added last)."""
    rng = np.random.default_rng(2)
    images = rng.normal(0.4, 0.3, (3, 16, 12, 3)).astype(np.float32)
    params = np.array([[1, 1, 1.2, 0.9, 0.05, 0.02], [0, 1, 0.8, 1.1, -0.1, 0.0], [1, 0, 1.0, 1.0, 0.0, 0.01]],
                      np.float32)
    key = jax.random.key(3)
    got = np.asarray(intensity.apply(jnp.asarray(images), jnp.asarray(params), key))
    zeros = np.zeros_like(images)
    neutral = np.array([[0, 0, 1, 1, 0, p[5]] for p in params], np.float32)
    noise = np.asarray(intensity.apply(jnp.asarray(zeros), jnp.asarray(neutral), key))
    for b, (grey, invert, gamma, contrast, brightness, _) in enumerate(params):
        x = images[b].astype(np.float64)
        if grey:
            x = np.repeat(x.mean(axis=2, keepdims=True), 3, axis=2)
        if invert:
            x = 1 - x
        x = np.copysign(np.abs(x) ** gamma, x)
        x = (x - x.mean()) * contrast + x.mean() + brightness
        np.testing.assert_allclose(got[b], x + noise[b], atol=2e-5, err_msg=f"image {b}")


def test_a_grey_image_gives_what_its_three_equal_channels_give():
    grey = np.random.default_rng(3).normal(0.4, 0.3, (48, 40, 1)).astype(np.float32)
    label = np.zeros((48, 40), np.int32)
    same = pipeline.Levels(0.0, 1.0)  # pixels as they are; one channel is what pipeline.image_levels gives grey
    one = augment.augment(grey, label, np.random.default_rng(4), _config(grey_prob=1.0), 32, levels=same)
    three = augment.augment(np.repeat(grey, 3, axis=2), label, np.random.default_rng(4), _config(grey_prob=1.0), 32,
                            levels=same)
    assert one[0].shape == (32, 32, 3) and one[0].dtype == np.float32
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)  # bit for bit: the one-channel shortcut changes nothing


def test_nucleus_pixel_is_the_drawn_one_of_all_nucleus_pixels_in_raster_order():
    rng = np.random.default_rng(0)
    label = (rng.random((37, 53)) < 0.05).astype(np.int32) * rng.integers(1, 9, (37, 53))
    pixels = np.flatnonzero(label)
    for seed in range(20):
        expected = np.unravel_index(pixels[np.random.default_rng(seed).integers(len(pixels))], label.shape)
        assert augment._nucleus_pixel(label, np.random.default_rng(seed)) == tuple(int(i) for i in expected)
    assert augment._nucleus_pixel(np.zeros((5, 5), np.int32), rng) is None


def test_integer_images_are_normalised_first():
    image = np.random.default_rng(2).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    label = np.zeros((40, 40), np.int32)
    config = _config()
    got = augment.augment(image, label, np.random.default_rng(3), config, 32)[0]
    want = augment.augment(pipeline.normalize_image(image), label, np.random.default_rng(3), config, 32)[0]
    np.testing.assert_array_equal(got, want)


def test_mismatched_image_and_label_are_rejected():
    rng = np.random.default_rng()
    with pytest.raises(ValueError, match="H, W"):
        augment.augment(np.zeros((10, 12, 3), np.float32), np.zeros((10, 10), np.int32), rng, _config(), 8)
    with pytest.raises(ValueError, match="integer"):
        augment.augment(np.zeros((10, 10, 3), np.float32), np.zeros((10, 10)), rng, _config(), 8)
