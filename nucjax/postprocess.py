"""Network outputs -> instance label images, and their tuning: probability maps (components, marker watershed,
3-class) and Mask R-CNN's detections (masks pasted into the image).

NumPy in, NumPy out (scikit-image and SciPy); objects are 4-connected everywhere (labelling and watershed).
"""

import dataclasses
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential, watershed
from tqdm.auto import tqdm

from nucjax import metrics

Params = Mapping[str, Any]  # a dict or an ml_collections ConfigDict (the `postprocess` section of the config)

POSTPROCESSORS: dict[str, Callable[[np.ndarray, Params], np.ndarray]] = {}

# The values of configs/default.py's `postprocess` section: what `tune` uses for parameters outside its grid
# when no `base_params` are given.
DEFAULT_PARAMS: dict[str, Any] = {
    "threshold": 0.5,
    "boundary_threshold": 0.5,
    "interior_threshold": 0.5,
    "min_size": 15,
    "seed_min_size": 5,
    "fill_holes": True,
    "min_score": 0.0,
    "min_visible": 0.5,
}

_THRESHOLDS = ("threshold", "boundary_threshold", "interior_threshold", "min_score", "min_visible")
DETECTION_KEYS = ("boxes", "scores", "masks", "valid", "size")  # the per-image outputs of a detector
_SIZES = ("min_size", "seed_min_size")


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How a post-processor is run: `segment` gives the objects before small-object removal; its input is maps
    float[H, W, channels], or a detector's outputs (DETECTION_KEYS) when channels is None."""

    channels: int | None
    keys: tuple[str, ...]
    segment: Callable[[Any, dict[str, Any]], np.ndarray]
    grid: dict[str, list]


_SPECS: dict[str, _Spec] = {}


def register(name: str, channels: int | None, keys: tuple[str, ...], grid: dict[str, list]) -> Callable:
    """Registers `segment(maps, params) -> int32[H, W]`, checked and followed by min_size removal and contiguous
    ids, as POSTPROCESSORS[name] (the decorated name becomes that function). channels=None: its input is a
    detector's outputs for one image (a mapping with DETECTION_KEYS) instead of maps."""

    def decorate(segment: Callable[[Any, dict[str, Any]], np.ndarray]) -> Callable:
        spec = _Spec(channels, keys, segment, grid)

        def postprocess(maps: Any, params: Params) -> np.ndarray:
            p = _read_params(name, spec, params)
            return _finish(segment(_check_input(name, spec, maps)[0], p), p["min_size"])

        postprocess.__name__ = name
        postprocess.__doc__ = segment.__doc__
        POSTPROCESSORS[name] = postprocess
        _SPECS[name] = spec
        return postprocess

    return decorate


def search_space(name: str) -> dict[str, list]:
    """The default tuning grid of post-processor `name`: parameter -> candidate values."""
    return {key: list(values) for key, values in _spec(name).grid.items()}


_THRESHOLD_GRID = [0.3, 0.4, 0.5, 0.6, 0.7]
_MIN_SIZE_GRID = [0, 10, 20, 40]


@register(
    "components",
    channels=1,
    keys=("threshold", "fill_holes", "min_size"),
    grid={"threshold": _THRESHOLD_GRID, "min_size": _MIN_SIZE_GRID},
)
def components(maps: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """maps: float32[H, W, 1] foreground -> int32[H, W]: threshold, fill holes, connected components."""
    mask = maps[..., 0] > params["threshold"]
    if params["fill_holes"]:
        mask = ndimage.binary_fill_holes(mask)
    return _label(mask)


@register(
    "boundary_watershed",
    channels=2,
    keys=("threshold", "boundary_threshold", "seed_min_size", "fill_holes", "min_size"),
    grid={
        "threshold": _THRESHOLD_GRID,
        "boundary_threshold": [0.3, 0.5, 0.7],
        "seed_min_size": [2, 5, 10],
        "min_size": _MIN_SIZE_GRID,
    },
)
def boundary_watershed(maps: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """maps: float32[H, W, 2] (foreground, boundary) -> int32[H, W]: seeds = foreground minus boundary, grown
    by watershed on the boundary probability within the foreground."""
    foreground, boundary = maps[..., 0], maps[..., 1]
    mask = foreground > params["threshold"]
    seeds = _drop_small(_label(mask & (boundary < params["boundary_threshold"])), params["seed_min_size"])
    return _grow(seeds, boundary, mask, params["fill_holes"])


@register(
    "three_class",
    channels=3,
    keys=("threshold", "interior_threshold", "seed_min_size", "fill_holes", "min_size"),
    grid={
        "threshold": _THRESHOLD_GRID,
        "interior_threshold": [0.3, 0.5, 0.7],
        "seed_min_size": [2, 5, 10],
        "min_size": _MIN_SIZE_GRID,
    },
)
def three_class(maps: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """maps: float32[H, W, 3] (background, interior, boundary) -> int32[H, W]: seeds = interior components,
    grown by watershed on the boundary probability into interior + boundary (1 - background > threshold)."""
    background, interior, boundary = maps[..., 0], maps[..., 1], maps[..., 2]
    mask = (1.0 - background) > params["threshold"]
    seeds = _drop_small(_label(mask & (interior > params["interior_threshold"])), params["seed_min_size"])
    return _grow(seeds, boundary, mask, params["fill_holes"])


@register(
    "detections",
    channels=None,
    keys=("threshold", "min_score", "min_visible", "min_size"),
    grid={
        "threshold": _THRESHOLD_GRID,
        # 0: what the detector kept (its own model.score_threshold, 0.5); below it, for scores fused over TTA's views
        "min_score": [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        "min_visible": [0.0, 0.25, 0.5, 0.7, 0.8, 0.9],
        "min_size": _MIN_SIZE_GRID,
    },
)
def detections(outputs: Mapping[str, np.ndarray], params: dict[str, Any]) -> np.ndarray:
    """A detector's outputs for one image (boxes, scores, masks, valid, size) -> int32[H, W]: masks thresholded
    and pasted best first; detections below min_score, or left with less than min_visible of their mask, dropped."""
    from nucjax.models.maskrcnn.inference import paste_masks  # NumPy code; the import brings JAX with it

    height, width = (int(v) for v in np.asarray(outputs["size"]))
    return paste_masks(outputs["boxes"], outputs["scores"], outputs["masks"], outputs["valid"], height, width,
                       mask_threshold=params["threshold"], min_score=params["min_score"],
                       min_visible=params["min_visible"])


def tune(
    name: str,
    maps_list: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    grid: Mapping[str, Sequence] | None = None,
    base_params: Params | None = None,
    *,
    max_exhaustive: int = 256,
    progress: bool = True,
) -> tuple[dict[str, Any], float]:
    """Best parameters of post-processor `name` for the mean dsb2018_score of its labels on (maps_list, gts).

    maps_list[i]: float[H, W, C] probabilities (for `detections`: a detector's outputs), gts[i]: int32[H, W].
    `grid` (default `search_space(name)`) maps parameters to candidates; the others come from `base_params`
    (default DEFAULT_PARAMS). Every combination is tried when there are at most `max_exhaustive` (ties keep the
    earlier one), otherwise coordinate ascent: from the base values (the middle candidate where the base value is
    not one), each parameter is swept in turn, the others fixed, until a full sweep improves nothing (ties keep the
    current value).
    Returns (base_params updated with the best values, best score).
    """
    spec = _spec(name)
    if len(maps_list) != len(gts) or not len(gts):
        raise ValueError(
            f"tune {name!r}: need as many maps as ground truths (at least one), got {len(maps_list)} and {len(gts)}"
        )
    grid = {key: list(values) for key, values in (spec.grid if grid is None else grid).items()}
    for key, values in grid.items():
        if key not in spec.keys:
            raise ValueError(f"tune {name!r}: grid key {key!r} is not a parameter of it (parameters: {spec.keys})")
        if not values:
            raise ValueError(f"tune {name!r}: grid key {key!r} has no candidate values")
    base = dict(DEFAULT_PARAMS if base_params is None else base_params.items())
    missing = [key for key in spec.keys if key not in grid and key not in base]
    if missing:
        raise ValueError(f"tune {name!r}: parameter {missing[0]!r} is neither in the grid nor in base_params")
    checked = [_check_input(name, spec, maps, index=i) for i, maps in enumerate(maps_list)]
    maps_list = [maps for maps, _ in checked]
    for i, ((_, shape), gt) in enumerate(zip(checked, gts)):
        if np.shape(gt) != shape:
            raise ValueError(f"tune {name!r}: image {i}: ground truth shape {np.shape(gt)} != output shape {shape}")
    start = {key: base[key] for key in spec.keys if key not in grid}
    for key, values in grid.items():
        start[key] = base[key] if base.get(key) in values else values[len(values) // 2]
    for key, values in grid.items():  # bad candidates fail now, not half-way through the search
        for value in values:
            _read_params(name, spec, {**start, key: value})
    n_combinations = math.prod(len(values) for values in grid.values())
    exhaustive = n_combinations <= max_exhaustive
    with tqdm(total=n_combinations if exhaustive else None, desc=f"tune {name}", disable=not progress) as bar:
        scorer = _Scorer(name, spec, maps_list, gts, bar)
        best, best_score = (_exhaustive if exhaustive else _coordinate_ascent)(scorer, start, grid)
    return {**base, **best}, best_score


class _Scorer:
    """Mean dsb2018_score of a parameter set; reuses the latest segmentation across min_size values."""

    def __init__(self, name: str, spec: _Spec, maps_list: list[np.ndarray], gts: Sequence[np.ndarray], bar: tqdm):
        self.name, self.spec, self.maps_list, self.gts, self.bar = name, spec, maps_list, list(gts), bar
        self.scores: dict[tuple, float] = {}
        self.segmented: tuple[tuple, list[np.ndarray]] | None = None

    def __call__(self, params: dict[str, Any]) -> float:
        p = _read_params(self.name, self.spec, params)
        key = tuple(p[k] for k in self.spec.keys)
        if key not in self.scores:
            seg_key = tuple(p[k] for k in self.spec.keys if k != "min_size")
            if self.segmented is None or self.segmented[0] != seg_key:
                self.segmented = (seg_key, [self.spec.segment(maps, p) for maps in self.maps_list])
            preds = [_finish(labels, p["min_size"]) for labels in self.segmented[1]]
            self.scores[key] = float(metrics.evaluate(self.gts, preds).dsb2018_score)
            self.bar.update()
        return self.scores[key]


def _exhaustive(scorer: _Scorer, start: dict[str, Any], grid: dict[str, list]) -> tuple[dict[str, Any], float]:
    """Every combination of the grid (min_size varying fastest, so segmentations are reused)."""
    keys = sorted(grid, key=lambda k: k == "min_size")
    best, best_score = start, -math.inf
    for values in itertools.product(*(grid[k] for k in keys)):
        params = {**start, **dict(zip(keys, values))}
        score = scorer(params)
        if score > best_score:
            best, best_score = params, score
    return best, best_score


def _coordinate_ascent(scorer: _Scorer, start: dict[str, Any], grid: dict[str, list]) -> tuple[dict[str, Any], float]:
    """Sweeps one parameter at a time over its candidates, the others fixed, until a sweep improves nothing."""
    best, best_score = start, scorer(start)
    improved = True
    while improved:
        improved = False
        for key, values in grid.items():
            for value in values:
                params = {**best, key: value}
                score = scorer(params)
                if score > best_score:
                    best, best_score, improved = params, score, True
    return best, best_score


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"unknown post-processor {name!r}; known: {sorted(_SPECS)}")
    return _SPECS[name]


def _read_params(name: str, spec: _Spec, params: Params) -> dict[str, Any]:
    """The parameters `spec` needs, checked and as plain Python values."""
    out = {}
    for key in spec.keys:
        if key not in params:
            raise ValueError(f"post-processor {name!r}: missing parameter {key!r} (needs {', '.join(spec.keys)})")
        value = params[key]
        if key in _THRESHOLDS:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
                raise ValueError(f"post-processor {name!r}: {key} must be a number in [0, 1], got {value!r}")
            value = float(value)
        elif key in _SIZES:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"post-processor {name!r}: {key} must be an integer >= 0, got {value!r}")
            value = int(value)
        elif not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"post-processor {name!r}: {key} must be True or False, got {value!r}")
        else:
            value = bool(value)
        out[key] = value
    return out


def _check_input(name: str, spec: _Spec, maps: Any, index: int | None = None) -> tuple[Any, tuple[int, int]]:
    """(input, its image's (H, W)): maps as a float NumPy array of shape [H, W, spec.channels], or a detector's
    outputs; else a ValueError naming `name`."""
    where = f"post-processor {name!r}" + ("" if index is None else f", image {index}")
    if spec.channels is None:
        missing = [k for k in DETECTION_KEYS if not isinstance(maps, Mapping) or k not in maps]
        if missing:
            raise ValueError(f"{where}: expects a detector's outputs with keys {DETECTION_KEYS}, missing {missing}")
        size = np.asarray(maps["size"])
        if size.shape != (2,) or not np.issubdtype(size.dtype, np.integer) or size.min() < 1:
            raise ValueError(f"{where}: 'size' must be the image's (height, width), got {size.tolist()}")
        return maps, (int(size[0]), int(size[1]))
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[-1] != spec.channels:
        raise ValueError(f"{where}: expects maps of shape [H, W, {spec.channels}], got {maps.shape}")
    if not np.issubdtype(maps.dtype, np.floating):
        raise ValueError(f"{where}: expects float probabilities, got dtype {maps.dtype}")
    return maps, maps.shape[:2]


def _label(mask: np.ndarray) -> np.ndarray:
    """bool[H, W] -> int32[H, W] 4-connected components, ids 1..N."""
    return ndimage.label(mask)[0].astype(np.int32)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """labels with the objects of fewer than min_size pixels set to 0 (ids not renumbered)."""
    small = np.bincount(labels.ravel()) < min_size
    small[0] = False
    return np.where(small[labels], 0, labels).astype(np.int32)


def _finish(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Small objects removed, ids made contiguous 1..N: int32[H, W]."""
    return relabel_sequential(_drop_small(labels, min_size))[0].astype(np.int32)


def _grow(seeds: np.ndarray, relief: np.ndarray, mask: np.ndarray, fill_holes: bool) -> np.ndarray:
    """Marker watershed of seeds on relief within mask; mask components without a seed become objects too."""
    labels = watershed(relief, markers=seeds, mask=mask).astype(np.int32)
    unseeded = _label(mask & (labels == 0))
    labels = np.where(unseeded > 0, unseeded + labels.max(), labels)
    return _fill_holes_per_object(labels) if fill_holes else labels


def _fill_holes_per_object(labels: np.ndarray) -> np.ndarray:
    """Background enclosed by one object joins it; objects in a bounding box order, smallest first, so a
    hole of an object that lies inside another object's hole goes to the inner one."""
    out = labels.copy()
    boxes = [(i, box) for i, box in enumerate(ndimage.find_objects(labels), start=1) if box is not None]
    for i, box in sorted(boxes, key=lambda item: math.prod(s.stop - s.start for s in item[1])):
        obj = labels[box] == i
        holes = ndimage.binary_fill_holes(obj) & (out[box] == 0)
        out[box][holes] = i
    return out
