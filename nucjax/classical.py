"""Two classical baselines with nothing learnt, so the study shows what learning adds: Otsu threshold + connected
components, and a local (adaptive) threshold + distance-transform watershed (scikit-image).

Both work on one grey channel in which nuclei are bright: the image normalised as in training, colour replaced by
the channel mean and bright-background images inverted (`nucjax.data.pipeline.normalize_image(grey=True,
invert_bright=True)`). Objects are 4-connected, holes are filled, objects below `min_size` pixels are removed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.filters import threshold_local, threshold_otsu
from skimage.segmentation import relabel_sequential, watershed

from nucjax import metrics

LOCAL_FLOOR = 0.5
"""local_watershed: pixels below this fraction of the image's Otsu threshold are never foreground (flat background
would otherwise pass a local threshold about half the time)."""

GRIDS: dict[str, dict[str, list]] = {
    "otsu": {"threshold_scale": [0.7, 0.85, 1.0, 1.15, 1.3], "min_size": [0, 10, 20, 40]},
    "local_watershed": {
        "block_size": [31, 63, 127],
        "offset": [0.0, -0.05, -0.1],
        "min_distance": [3, 5, 8],
        "min_size": [0, 10, 20, 40],
    },
}
"""The tuning grid of each method: parameter -> candidates (the first candidates are the defaults)."""

METHODS = tuple(GRIDS)


def grey(image: np.ndarray) -> np.ndarray:
    """float32[H, W] with bright nuclei from an image [H, W] or [H, W, C] (uint8, uint16 or float)."""
    from nucjax.data.pipeline import normalize_image

    return normalize_image(image, grey=True, invert_bright=True)[..., 0]


def _otsu(g: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
    """Foreground = above threshold_scale × Otsu's threshold; components."""
    if g.max() <= g.min():
        return np.zeros(g.shape, np.int32)
    mask = ndimage.binary_fill_holes(g > p["threshold_scale"] * threshold_otsu(g))
    return ndimage.label(mask)[0].astype(np.int32)


def _local_watershed(g: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
    """Foreground = above the Gaussian local mean over block_size minus offset (and above LOCAL_FLOOR × Otsu);
    seeds = maxima of its distance transform at least min_distance apart; watershed of -distance."""
    if g.max() <= g.min():
        return np.zeros(g.shape, np.int32)
    local = threshold_local(g, p["block_size"], method="gaussian", offset=p["offset"])
    mask = ndimage.binary_fill_holes((g > local) & (g > LOCAL_FLOOR * threshold_otsu(g)))
    components = ndimage.label(mask)[0]
    distance = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(distance, min_distance=p["min_distance"], labels=components, exclude_border=False)
    seeds = np.zeros(g.shape, bool)
    seeds[tuple(peaks.T)] = True
    markers = ndimage.label(seeds, structure=np.ones((3, 3)))[0]
    labels = watershed(-distance, markers, mask=mask).astype(np.int32)
    unseeded = ndimage.label(mask & (labels == 0))[0]  # components no seed reached stay objects
    return np.where(unseeded > 0, unseeded + labels.max(), labels).astype(np.int32)


_SEGMENT: dict[str, Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]] = {
    "otsu": _otsu,
    "local_watershed": _local_watershed,
}


def default_params(name: str) -> dict[str, Any]:
    """The first candidate of each parameter of `name`'s grid."""
    return {key: values[0] for key, values in _grid(name).items()}


def _grid(name: str) -> dict[str, list]:
    if name not in GRIDS:
        raise ValueError(f"unknown classical method {name!r}; known: {', '.join(METHODS)}")
    return GRIDS[name]


def _check_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    missing = sorted(set(_grid(name)) - set(params))
    if missing:
        raise ValueError(f"classical method {name!r}: missing parameter {missing[0]!r} (needs {sorted(_grid(name))})")
    p = {key: params[key] for key in _grid(name)}
    if name == "local_watershed" and (int(p["block_size"]) % 2 == 0 or p["block_size"] < 3):
        raise ValueError(f"classical method {name!r}: block_size must be an odd integer >= 3, got {p['block_size']}")
    if int(p["min_size"]) < 0:
        raise ValueError(f"classical method {name!r}: min_size must be >= 0, got {p['min_size']}")
    return p


def _finish(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects of fewer than min_size pixels removed, ids made contiguous: int32[H, W]."""
    small = np.bincount(labels.ravel()) < min_size
    small[0] = False
    return relabel_sequential(np.where(small[labels], 0, labels))[0].astype(np.int32)


def segment(name: str, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """int32[H, W] label image of `image` ([H, W] or [H, W, C]) by classical method `name` with `params`."""
    p = _check_params(name, params)
    return _finish(_SEGMENT[name](grey(image), p), int(p["min_size"]))


def tune_classical(name: str, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                   grid: Mapping[str, Sequence] | None = None) -> dict[str, Any]:
    """The parameters of `name` with the best mean dsb2018_score on (images[i], labels[i]: int[H, W]), every
    combination of `grid` (default GRIDS[name]) tried; ties keep the earlier combination."""
    grid = {key: list(values) for key, values in (_grid(name) if grid is None else grid).items()}
    unknown = sorted(set(grid) - set(_grid(name)))
    if unknown:
        raise ValueError(f"tune_classical {name!r}: grid key {unknown[0]!r} is not a parameter (parameters: "
                         f"{sorted(_grid(name))})")
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"tune_classical {name!r}: need as many label images as images (at least one), "
                         f"got {len(images)} and {len(labels)}")
    for key, values in grid.items():
        if not values:
            raise ValueError(f"tune_classical {name!r}: grid key {key!r} has no candidate values")
    greys = [grey(image) for image in images]
    for i, (g, gt) in enumerate(zip(greys, labels)):
        if np.shape(gt) != g.shape:
            raise ValueError(f"tune_classical {name!r}: image {i}: labels shape {np.shape(gt)} != image shape "
                             f"{g.shape}")
    base = default_params(name)
    keys = sorted(grid, key=lambda k: k == "min_size")  # min_size varies fastest: segmentations are reused
    best, best_score, cached = dict(base), -np.inf, (None, None)
    for values in itertools.product(*(grid[k] for k in keys)):
        params = _check_params(name, {**base, **dict(zip(keys, values))})
        seg_key = tuple(params[k] for k in keys if k != "min_size")
        if cached[0] != seg_key:
            cached = (seg_key, [_SEGMENT[name](g, params) for g in greys])
        preds = [_finish(raw, int(params["min_size"])) for raw in cached[1]]
        score = metrics.evaluate(labels, preds).dsb2018_score
        if score > best_score:
            best, best_score = params, score
    return best
