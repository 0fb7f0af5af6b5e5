"""Joint random augmentation of a normalised image and its label image: crop, scale, flips, rot90 here; the
per-image intensity changes are drawn here and applied on the device (`nucjax.intensity`), inside the train step."""

from collections.abc import Callable
from typing import Any

import numpy as np


def augment(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    config: Any,
    crop_size: int,
    *,
    levels: Callable[[np.ndarray], np.ndarray] | None = None,
    zoom: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A random S x S view (S = crop_size) of image [H, W, 3] and label int[H, W]: (image f32[S, S, 3],
    label int32[S, S], valid f32[S, S], intensity f32[6]); `config` is the run config's `data.augment`. Float
    images are taken as already normalised (`pipeline.normalize_image`), integer ones are normalised here. The
    image is the geometric view only; `intensity` holds the image's drawn intensity changes (`draw_intensity`),
    which `nucjax.intensity.apply` makes on the device. `zoom` (the run's `data.input_scale`) multiplies the
    random zoom, so that training sees the magnification that prediction gives the network.

    `levels` (with `pipeline.image_levels`' pixels [H, W, 1 or 3] as `image`) normalises only the pixels the crop
    reads, before they are interpolated: the result is that of augmenting the whole normalised image. Grey pixels
    (one channel, or three equal ones) are resampled and transformed once and repeated to three channels, with
    the same arithmetic as three equal channels would get, so the output does not depend on these shortcuts.
    """
    image, label, levels = _check(image, label, levels)
    scale = _scale(rng, config.scale_range) * zoom
    ys, xs = _window(label, rng, config.nuclei_crop_prob, crop_size, scale)
    image, label, valid = _resample(image, label, ys, xs, exact=scale == 1.0, levels=levels)
    if config.flip:
        if rng.random() < 0.5:
            image, label, valid = image[::-1], label[::-1], valid[::-1]
        if rng.random() < 0.5:
            image, label, valid = image[:, ::-1], label[:, ::-1], valid[:, ::-1]
    if config.rot90:
        turns = int(rng.integers(4))
        image, label, valid = (np.rot90(a, turns) for a in (image, label, valid))
    intensity = draw_intensity(rng, config)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return (np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label), np.ascontiguousarray(valid),
            intensity)


def _check(image: np.ndarray, label: np.ndarray, levels: Callable | None) -> tuple[np.ndarray, np.ndarray, Callable]:
    image, label = np.asarray(image), np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must be an integer [H, W] array, got {label.dtype} of shape {label.shape}")
    if levels is None and np.issubdtype(image.dtype, np.integer):
        from nucjax.data.pipeline import image_levels  # pipeline imports this module

        image, levels = image_levels(image)
    channels = (1, 3) if levels is not None else (3,)
    if image.ndim != 3 or image.shape[2] not in channels or image.shape[:2] != label.shape:
        shape = "[H, W, 1 or 3]" if levels is not None else "[H, W, 3]"
        raise ValueError(f"image must be {shape} with the label's H, W {label.shape}, got shape {image.shape}")
    if levels is None:
        image = image.astype(np.float32, copy=False)
        levels = _as_float32
    return image, label, levels  # any integer dtype: the crop comes out as int32


def _as_float32(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32, copy=False)


def _scale(rng: np.random.Generator, scale_range: Any) -> float:
    """A zoom factor drawn log-uniformly from scale_range (> 1 magnifies); 1.0 when the range is empty or (1, 1)."""
    if not scale_range:
        return 1.0
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"data.augment.scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    return 1.0 if low == high == 1.0 else float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _window(
    label: np.ndarray, rng: np.random.Generator, nuclei_prob: float, size: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates f64[S] (rows, columns) sampled by each output pixel's centre.

    The window spans S / scale source pixels, at an integer offset drawn uniformly over the positions that keep it
    inside the image (or keep the image inside it, when the image is smaller); with probability `nuclei_prob`
    it is instead centred on a random nucleus pixel (uniform over all of them), then moved to the nearest such
    position."""
    span = size / scale
    limits = [(int(np.ceil(min(0, n - span))), int(np.floor(max(0, n - span)))) for n in label.shape]
    centre = None
    if nuclei_prob > 0 and rng.random() < nuclei_prob:
        centre = _nucleus_pixel(label, rng)
    if centre is not None:
        starts = [int(np.clip(np.round(c + 0.5 - span / 2), lo, hi)) for c, (lo, hi) in zip(centre, limits)]
    else:
        starts = [int(rng.integers(lo, hi + 1)) for lo, hi in limits]
    centres = (np.arange(size) + 0.5) / scale - 0.5
    return starts[0] + centres, starts[1] + centres


def _nucleus_pixel(label: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """(row, column) of the k-th nonzero pixel in raster order, k drawn uniformly; None (drawing nothing) when
    there is none. Found from per-row counts rather than a list of all of them."""
    per_row = np.cumsum(np.count_nonzero(label, axis=1))
    if per_row.size == 0 or per_row[-1] == 0:
        return None
    k = int(rng.integers(per_row[-1]))
    row = int(np.searchsorted(per_row, k, side="right"))
    before = int(per_row[row - 1]) if row else 0
    return row, int(np.flatnonzero(label[row])[k - before])


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Integer indices folded into [0, n) by mirroring about the image edges (numpy's "symmetric" padding)."""
    index = np.mod(index, 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def _span(array: np.ndarray, start: int, stop: int, axis: int) -> np.ndarray:
    """Indices start..stop-1 of `array` along axis 0 or 1, mirrored outside it (a view when inside)."""
    n = array.shape[axis]
    if 0 <= start and stop <= n:
        return array[start:stop] if axis == 0 else array[:, start:stop]
    return array.take(_mirror(np.arange(start, stop), n), axis=axis)


def _resample(
    image: np.ndarray, label: np.ndarray, ys: np.ndarray, xs: np.ndarray, exact: bool, levels: Callable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image bilinear (mirrored outside), label nearest (0 outside) and valid (1 inside) at the grid ys x xs
    (increasing, evenly spaced; `exact`: integer steps of 1, so every sample is a pixel). Only the source window
    the grid reads is passed through `levels`; one channel of it when its channels are equal: f32[S, S, 1 or 3]."""
    height, width = label.shape
    near_y, near_x = np.floor(ys + 0.5).astype(np.int64), np.floor(xs + 0.5).astype(np.int64)
    inside_y = (near_y >= 0) & (near_y < height)
    inside_x = (near_x >= 0) & (near_x < width)
    valid = (inside_y[:, None] & inside_x[None, :]).astype(np.float32)
    if exact:
        out_label = _span(_span(label, near_y[0], near_y[-1] + 1, 0), near_x[0], near_x[-1] + 1, 1)
        out_image = levels(_grey(_span(_span(image, near_y[0], near_y[-1] + 1, 0), near_x[0], near_x[-1] + 1, 1)))
    else:  # separable: a source window's rows, then its columns
        out_label = label.take(_mirror(near_y, height), axis=0).take(_mirror(near_x, width), axis=1)
        y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
        window = levels(_grey(_span(_span(image, y0[0], y0[-1] + 2, 0), x0[0], x0[-1] + 2, 1)))
        wy, wx = (ys - y0).astype(np.float32)[:, None], (xs - x0).astype(np.float32)[None, :]
        if window.shape[2] == 1:  # 2-D arrays: the same arithmetic, faster
            window = window[:, :, 0]
        else:
            wy, wx = wy[:, :, None], wx[:, :, None]
        rows = window.take(y0 - y0[0], axis=0) * (1 - wy) + window.take(y0 - y0[0] + 1, axis=0) * wy
        out_image = rows.take(x0 - x0[0], axis=1) * (1 - wx) + rows.take(x0 - x0[0] + 1, axis=1) * wx
        out_image = out_image.reshape(*out_image.shape[:2], -1)
    if not (inside_y.all() and inside_x.all()):
        out_label = np.where(valid > 0, out_label, 0)
    elif exact:
        out_label = out_label.copy()  # not a view of the caller's label
    return out_image, out_label.astype(np.int32, copy=False), valid


def _grey(window: np.ndarray) -> np.ndarray:
    """The first channel of window [h, w, 3] when its three channels are equal (a view), else the window."""
    if window.shape[2] == 3 and all(np.array_equal(window[:, :, 0], window[:, :, c]) for c in (1, 2)):
        return window[:, :, :1]
    return window


# The order of the values `draw_intensity` returns and `nucjax.intensity.apply` reads; NEUTRAL changes nothing.
INTENSITY = ("grey", "invert", "gamma", "contrast", "brightness", "noise_std")
NEUTRAL = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0)


def draw_intensity(rng: np.random.Generator, config: Any) -> np.ndarray:
    """One image's intensity changes f32[6] in `INTENSITY` order, each drawn when its setting is > 0: colour to
    grey (with grey_prob), inversion (invert_prob), gamma exp(U(-gamma, gamma)), contrast factor
    U(1 - contrast, 1 + contrast), brightness shift U(-brightness, brightness), Gaussian noise std U(0, noise_std)."""
    out = list(NEUTRAL)
    if config.grey_prob > 0 and rng.random() < config.grey_prob:
        out[0] = 1.0
    if config.invert_prob > 0 and rng.random() < config.invert_prob:
        out[1] = 1.0
    if config.gamma > 0:
        out[2] = float(np.exp(rng.uniform(-config.gamma, config.gamma)))
    if config.contrast > 0:
        out[3] = float(rng.uniform(1 - config.contrast, 1 + config.contrast))
    if config.brightness > 0:
        out[4] = float(rng.uniform(-config.brightness, config.brightness))
    if config.noise_std > 0:
        out[5] = float(rng.uniform(0, config.noise_std))
    return np.asarray(out, np.float32)
