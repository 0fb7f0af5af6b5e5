"""Training targets derived from an instance label image: foreground, boundary, 3-class, weight map, distance, boxes."""

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

NAMES = ("foreground", "boundary", "three_class", "weight_map", "distance", "instances")
INSTANCE_KEYS = ("boxes", "masks", "instance_valid")

# The weight map's distances are computed in a window of the instance's box grown by this many sigmas
# (see `weight_map`); the border term it leaves out is at most w0 * exp(-4.3**2 / 2) < 1e-4 * w0.
_WINDOW_SIGMAS = 4.3


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    """The target names as a tuple; raises ValueError for a name not in `NAMES`."""
    if isinstance(names, str):
        names = (names,)
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        raise ValueError(f"unknown target name(s) {unknown}: valid names are {list(NAMES)}")
    return tuple(names)


def compute(label: np.ndarray, names: Sequence[str], config: Any) -> dict[str, np.ndarray]:
    """Targets of an int[H, W] label image (0 = background) for each name; "instances" gives the keys
    "boxes" f32[K, 4], "masks" uint8[K, M, M] and "instance_valid" bool[K]. `config`: the run config's `targets`."""
    names = check_names(names)
    label = _check_label(label)
    out: dict[str, np.ndarray] = {}
    foreground = label > 0
    if "foreground" in names:
        out["foreground"] = foreground.astype(np.float32)
    if "boundary" in names or "three_class" in names:
        edge = boundary(label, config.boundary_width)
        if "boundary" in names:
            out["boundary"] = edge.astype(np.float32)
        if "three_class" in names:  # 0 background, 1 interior, 2 boundary (a boundary pixel is foreground too)
            out["three_class"] = np.add(foreground, edge, dtype=np.int32)
    if "weight_map" in names:
        out["weight_map"] = weight_map(label, config.w0, config.sigma)
    if "distance" in names:
        out["distance"] = distance(label)
    if "instances" in names:
        out.update(instances(label, config.max_instances, config.mask_size))
    return out


def _check_label(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label image must be an integer [H, W] array, got {label.dtype} of shape {label.shape}")
    if label.size and label.min() < 0:
        raise ValueError(f"label image has negative ids (min {label.min()}); 0 is background, 1..N instances")
    return label.astype(np.int32, copy=False)


def boundary(label: np.ndarray, width: int) -> np.ndarray:
    """bool[H, W]: pixels of an instance within city-block distance `width` of a pixel of another label
    (background or another instance, so both sides of a touching line count); the image edge is no boundary.

    Computed as the foreground within distance width - 1 of a pixel whose 4-neighbour has another label: a shortest
    path from an instance pixel to such a pixel leaves the instance within that distance, or does not leave it."""
    if width < 1:
        raise ValueError(f"targets.boundary_width must be >= 1, got {width}")
    change = np.zeros(label.shape, bool)
    vertical = label[1:] != label[:-1]
    horizontal = label[:, 1:] != label[:, :-1]
    change[1:] |= vertical
    change[:-1] |= vertical
    change[:, 1:] |= horizontal
    change[:, :-1] |= horizontal
    for _ in range(width - 1):
        change = _dilate_cross(change)
    return change & (label > 0)


def _dilate_cross(mask: np.ndarray) -> np.ndarray:
    """bool[H, W]: `mask` dilated by the 3 x 3 cross (nothing enters from outside the image), as
    ndimage.binary_dilation(mask) with its default structure gives it, by shifted ORs."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _boxes(label: np.ndarray) -> list[tuple[int, tuple[slice, slice]]]:
    """(id, box slices) of every instance present, in increasing id order."""
    return [(i + 1, box) for i, box in enumerate(ndimage.find_objects(label)) if box is not None]


def distance(label: np.ndarray) -> np.ndarray:
    """f32[H, W]: each instance's Euclidean distance to the nearest pixel outside it, divided by its maximum
    (so 0..1 per instance, 1 at its centre); the image edge is not a border; 0 on background."""
    out = np.zeros(label.shape, np.float32)
    height, width = label.shape
    for k, (ys, xs) in _boxes(label):
        ys = slice(max(ys.start - 1, 0), min(ys.stop + 1, height))
        xs = slice(max(xs.start - 1, 0), min(xs.stop + 1, width))
        inside = label[ys, xs] == k
        if inside.all():
            out[ys, xs] = 1.0
            continue
        dist = ndimage.distance_transform_edt(inside)
        out[ys, xs][inside] = dist[inside] / dist.max()
    return out


def weight_map(label: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """f32[H, W] weights of Ronneberger et al. 2015: w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on background.

    w_c balances the classes: 0.5 / (fraction of pixels in the class), for background and foreground (1 when the
    image holds one class only). d1, d2: Euclidean distances to the nearest and second-nearest instance (1 for a
    pixel next to it); the border term is added on background pixels only, where at least two instances are
    present. Each instance's distances come from a distance transform in its box grown by R = 4.3 sigma (exact
    there); pixels farther than R from an instance take no term from it, which changes a weight by at most
    w0 * exp(-R^2 / (2 sigma^2)) < 1e-4 * w0.
    """
    foreground = label > 0
    fraction = foreground.mean() if label.size else 0.0
    if 0.0 < fraction < 1.0:
        weights = np.where(foreground, 0.5 / fraction, 0.5 / (1.0 - fraction)).astype(np.float32)
    else:
        weights = np.ones(label.shape, np.float32)
    boxes = _boxes(label)
    if len(boxes) < 2 or w0 == 0:
        return weights
    if sigma <= 0:
        raise ValueError(f"targets.sigma must be > 0, got {sigma}")
    reach = int(np.ceil(_WINDOW_SIGMAS * sigma))
    height, width = label.shape
    d1 = np.full(label.shape, np.inf)
    d2 = np.full(label.shape, np.inf)
    for k, (ys, xs) in boxes:
        ys = slice(max(ys.start - reach, 0), min(ys.stop + reach, height))
        xs = slice(max(xs.start - reach, 0), min(xs.stop + reach, width))
        dist = ndimage.distance_transform_edt(label[ys, xs] != k)
        near1, near2 = d1[ys, xs], d2[ys, xs]  # views: updated in place, near1 <= near2 throughout
        np.minimum(near2, np.maximum(near1, dist), out=near2)
        np.minimum(near1, dist, out=near1)
    near = ~foreground & (d2 < np.inf)  # elsewhere the border term is 0
    border = w0 * np.exp(-((d1[near] + d2[near]) ** 2) / (2.0 * sigma**2))
    weights[near] = (weights[near] + border).astype(np.float32)
    return weights


def instances(label: np.ndarray, max_instances: int, mask_size: int) -> dict[str, np.ndarray]:
    """Boxes f32[K, 4] (y0, x0, y1, x1), masks uint8[K, M, M] and instance_valid bool[K], K = max_instances.

    Instances are listed in increasing id order; when there are more than K, the largest K by pixel count are
    kept (ties: the lower id). Each mask is the instance's pixels in its box, resampled to M x M by exact area
    averaging and thresholded at >= 0.5. Rows past the last instance are zero and invalid.
    """
    boxes = np.zeros((max_instances, 4), np.float32)
    masks = np.zeros((max_instances, mask_size, mask_size), np.uint8)
    valid = np.zeros((max_instances,), bool)
    found = _boxes(label)
    if len(found) > max_instances:
        areas = np.bincount(label.ravel(), minlength=found[-1][0] + 1)
        order = sorted(found, key=lambda item: (-areas[item[0]], item[0]))
        found = sorted(order[:max_instances], key=lambda item: item[0])
    for row, (k, (ys, xs)) in enumerate(found):
        boxes[row] = (ys.start, xs.start, ys.stop, xs.stop)
        masks[row] = _area_resize(label[ys, xs] == k, mask_size) >= 0.5
        valid[row] = True
    return {"boxes": boxes, "masks": masks, "instance_valid": valid}


def _area_resize(mask: np.ndarray, size: int) -> np.ndarray:
    """f64[size, size]: the fraction of each output cell covered by `mask` (bool[h, w]) stretched over it."""
    return _overlap(mask.shape[0], size) @ mask.astype(np.float64) @ _overlap(mask.shape[1], size).T


@functools.lru_cache(maxsize=4096)
def _overlap(n: int, size: int) -> np.ndarray:
    """f64[size, n]: the share of output cell i (of `size` covering [0, n)) that lies in input pixel j (read-only,
    cached: boxes repeat their sizes)."""
    edges = np.arange(size + 1) * (n / size)
    lo = np.maximum(edges[:-1, None], np.arange(n)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(n)[None, :] + 1)
    out = np.clip(hi - lo, 0.0, None) * (size / n)
    out.setflags(write=False)
    return out
