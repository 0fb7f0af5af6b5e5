"""Tests of nucjax.models.maskrcnn.roi_align against a direct loop over bins and samples (torchvision's algorithm)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from nucjax.models.maskrcnn.roi_align import assign_levels, roi_align


def _bilinear(f, y, x):
    h, w = f.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(f.shape[2])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (1 - ly) * (1 - lx) * f[y0, x0] + (1 - ly) * lx * f[y0, x1] + ly * (1 - lx) * f[y1, x0] + ly * lx * f[y1, x1]


def _roi_align_reference(f, box, stride, out, ratio):
    y0, x0, y1, x1 = (v / stride - 0.5 for v in box)
    bin_h, bin_w = (y1 - y0) / out, (x1 - x0) / out
    result = np.zeros((out, out, f.shape[2]))
    for py in range(out):
        for px in range(out):
            for iy in range(ratio):
                for ix in range(ratio):
                    y = y0 + py * bin_h + (iy + 0.5) * bin_h / ratio
                    x = x0 + px * bin_w + (ix + 0.5) * bin_w / ratio
                    result[py, px] += _bilinear(f, y, x) / ratio**2
    return result


def test_roi_align_matches_reference_loop_on_two_levels():
    rng = np.random.default_rng(0)
    features = [rng.normal(size=(12, 10, 3)).astype(np.float32), rng.normal(size=(6, 5, 3)).astype(np.float32)]
    strides = [4, 8]
    # Boxes inside, across the border and partly outside the 48x40 image; tiny and large.
    box_list = np.array(
        [[3.0, 5.0, 20.0, 30.0], [-6.0, -3.0, 10.0, 8.0], [40.0, 30.0, 55.0, 47.0], [10.2, 11.7, 11.1, 13.0],
         [0.0, 0.0, 48.0, 40.0], [25.0, 2.0, 47.5, 39.0]],
        np.float32,
    )
    levels = np.array([0, 1, 0, 0, 1, 1], np.int32)
    for out, ratio in [(3, 2), (4, 1)]:
        got = roi_align([jnp.asarray(f) for f in features], strides, jnp.asarray(box_list), jnp.asarray(levels), out, ratio)
        expected = np.stack(
            [_roi_align_reference(features[l], b, strides[l], out, ratio) for b, l in zip(box_list, levels)]
        )
        np.testing.assert_allclose(got, expected, atol=1e-5)


def _two_level_case():
    rng = np.random.default_rng(1)
    features = [rng.normal(size=(12, 10, 3)).astype(np.float32), rng.normal(size=(6, 5, 3)).astype(np.float32)]
    boxes = np.array(
        [[3.0, 5.0, 20.0, 30.0], [-6.0, -3.0, 10.0, 8.0], [40.0, 30.0, 55.0, 47.0], [10.2, 11.7, 11.1, 13.0],
         [0.0, 0.0, 48.0, 40.0], [25.0, 2.0, 47.5, 39.0]],
        np.float32,
    )
    return features, [4, 8], boxes, np.array([0, 1, 0, 0, 1, 1], np.int32)


def test_roi_align_gradient_is_the_transpose_of_the_reference_loop():
    # RoIAlign is linear in the features and acts on each channel alike, so d<out, g>/dF[a, b, c] is
    # sum over boxes and bins of reference(e_ab)[box, bin] * g[box, bin, c], e_ab the map that is 1 at (a, b).
    features, strides, boxes, levels = _two_level_case()
    out, ratio = 3, 2
    g = np.random.default_rng(2).normal(size=(len(boxes), out, out, 3)).astype(np.float32)
    got = jax.grad(lambda fs: jnp.sum(roi_align(fs, strides, jnp.asarray(boxes), jnp.asarray(levels), out, ratio) * g))(
        [jnp.asarray(f) for f in features]
    )
    for level, f in enumerate(features):
        expected = np.zeros(f.shape)
        for a in range(f.shape[0]):
            for b in range(f.shape[1]):
                unit = np.zeros(f.shape[:2] + (1,))
                unit[a, b] = 1.0
                for k in np.flatnonzero(levels == level):
                    response = _roi_align_reference(unit, boxes[k], strides[level], out, ratio)[..., 0]
                    expected[a, b] += np.einsum("ij,ijc->c", response, g[k])
        np.testing.assert_allclose(got[level], expected, atol=1e-5)


def test_roi_align_gradient_in_bfloat16_over_a_batch_matches_each_image_in_float32():
    # vmap and jit over a batch of two images in bfloat16 (as in training) against one float32 image at a time.
    features, strides, boxes, levels = _two_level_case()
    g = np.random.default_rng(3).normal(size=(2, len(boxes), 4, 4, 3)).astype(np.float32)
    pool = jax.vmap(lambda fs, b, l: roi_align(fs, strides, b, l, 4, 2))
    batch_loss = lambda fs: jnp.sum(pool(fs, jnp.asarray([boxes, boxes]), jnp.asarray([levels, levels])) * g)
    got = jax.jit(jax.grad(batch_loss))([jnp.asarray(np.stack([f, -f]), jnp.bfloat16) for f in features])
    for i in range(2):
        one = jax.grad(lambda fs: jnp.sum(roi_align(fs, strides, jnp.asarray(boxes), jnp.asarray(levels), 4, 2) * g[i]))(
            [jnp.asarray(f) for f in features]
        )
        for level in range(2):
            assert got[level].dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(got[level][i], np.float32), one[level], rtol=1e-2, atol=1e-2)


def test_roi_align_of_a_linear_map_is_its_value_at_bin_centres():
    yy, xx = np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="ij")
    f = (2.0 * yy - 3.0 * xx + 1.0)[:, :, None].astype(np.float32)  # value at feature cell (i, j)
    box = np.array([[8.0, 12.0, 40.0, 28.0]], np.float32)  # stride 4 -> feature coords [1.5, 9.5) x [2.5, 6.5)
    got = roi_align([jnp.asarray(f)], [4], jnp.asarray(box), jnp.zeros(1, jnp.int32), 4, 2)[0, :, :, 0]
    cy = 1.5 + (np.arange(4) + 0.5) * 2.0
    cx = 2.5 + (np.arange(4) + 0.5) * 1.0
    np.testing.assert_allclose(got, 2.0 * cy[:, None] - 3.0 * cx[None, :] + 1.0, atol=1e-4)


def test_assign_levels_follows_the_fpn_rule():
    sizes = np.array([10.0, 111.0, 112.0, 224.0, 447.0, 448.0, 2000.0])
    b = np.stack([np.zeros_like(sizes), np.zeros_like(sizes), sizes, sizes], axis=1)
    expected = [min(max(math.floor(4 + math.log2(s / 224.0 + 1e-8)), 2), 5) for s in sizes]
    assert expected == [2, 2, 3, 4, 4, 5, 5]
    np.testing.assert_array_equal(assign_levels(jnp.asarray(b), 224.0, 4, 2, 5), expected)
