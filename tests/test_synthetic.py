"""Tests for nucjax.data.synthetic.generate: determinism, exact labels, touching nuclei, styles."""

import numpy as np
import pytest
from scipy import ndimage

from nucjax.data import folder, synthetic

SMALL = dict(height=96, width=112)


def touching_ids(label: np.ndarray) -> set[int]:
    """Ids of nuclei that share a 4-neighbour edge with a different nucleus."""
    ids = set()
    for a, b in ((label[:, :-1], label[:, 1:]), (label[:-1, :], label[1:, :])):
        between = (a > 0) & (b > 0) & (a != b)
        ids |= set(a[between].tolist()) | set(b[between].tolist())
    return ids


def test_same_seed_gives_same_arrays_and_other_seeds_differ():
    image, label = synthetic.generate(7, **SMALL)
    again_image, again_label = synthetic.generate(np.random.default_rng(7), **SMALL)
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(label, again_label)
    other_image, other_label = synthetic.generate(8, **SMALL)
    assert not np.array_equal(label, other_label) and not np.array_equal(image, other_image)


@pytest.mark.parametrize("style", synthetic.STYLES)
def test_shapes_dtypes_and_modality_of_each_style(style):
    image, label = synthetic.generate(3, height=64, width=80, style=style)
    assert image.shape == (64, 80, 3) and image.dtype == np.uint8
    assert label.shape == (64, 80) and label.dtype == np.int32
    assert folder.modality(image) == synthetic.STYLE_MODALITY[style]


@pytest.mark.parametrize("seed", range(6))
def test_labels_are_exact_contiguous_connected_and_large_enough(seed):
    _, label = synthetic.generate(seed, num_nuclei=(10, 30), **SMALL)
    n = int(label.max())
    assert 1 <= n <= 30
    areas = np.bincount(label.ravel(), minlength=n + 1)[1:]
    assert areas.min() >= synthetic.MIN_AREA  # ids 1..N all present, none empty or a sliver
    for k in range(1, n + 1):
        assert ndimage.label(label == k)[1] == 1, f"nucleus {k} is in pieces"


def test_every_bright_region_is_a_labelled_nucleus():
    # Fluorescence: each nucleus is brighter than any smoothed background pixel 3+ pixels away from all nuclei.
    for seed in range(4):
        image, label = synthetic.generate(seed, **SMALL)
        grey = ndimage.gaussian_filter(image[..., 0].astype(float), 2)
        far = ndimage.distance_transform_edt(label == 0) >= 4
        means = ndimage.mean(image[..., 0].astype(float), label, np.arange(1, label.max() + 1))
        assert grey[far].max() < np.min(means)


def test_a_good_fraction_of_nuclei_touch_and_touching_controls_it():
    def fraction(touching):
        labels = [synthetic.generate(seed, touching=touching)[1] for seed in range(5)]
        return sum(len(touching_ids(label)) for label in labels) / sum(label.max() for label in labels)

    clustered, isolated = fraction(0.5), fraction(0.0)
    assert clustered >= 0.3
    assert isolated < clustered / 2


def test_counts_and_sizes_follow_the_settings():
    _, label = synthetic.generate(0, num_nuclei=(3, 3), radius=(4.0, 5.0), touching=0.0, height=128, width=128)
    assert label.max() <= 3
    areas = np.bincount(label.ravel())[1:]
    assert areas.max() <= np.pi * (5 * 1.3 * 1.2) ** 2  # semi-axis a <= 1.3 * radius, shape perturbation < 20 %


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(style="sepia"), "style"),
        (dict(radius=(8.0, 4.0)), "radius"),
        (dict(num_nuclei=(5, 2)), "num_nuclei"),
        (dict(height=0), "height"),
    ],
)
def test_bad_settings_raise(kwargs, words):
    with pytest.raises(ValueError, match=words):
        synthetic.generate(0, **kwargs)
