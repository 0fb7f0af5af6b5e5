"""The Predictor: a trained network plus its post-processing, applied to images of any size in overlapping tiles."""

from __future__ import annotations

import pathlib
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import skimage.transform

from nucjax import variants
from nucjax.data.pipeline import normalize_image


def _tile_starts(length: int, tile: int, step: int) -> list[int]:
    """Start offsets of tiles of size `tile` every `step` pixels covering [0, length); the last one ends at `length`."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def _edge_weights(tile: int, overlap: int, first: bool, last: bool) -> np.ndarray:
    """float32[tile] blending weights along one axis: 0 on the outer overlap//4 pixels of a side shared with the
    neighbouring tile, a linear ramp over the next overlap//2, 1 inside; a side on the image border keeps 1."""
    zero, ramp = overlap // 4, overlap // 2
    edge = np.concatenate([np.zeros(zero), (np.arange(ramp) + 0.5) / max(ramp, 1)]).astype(np.float32)
    weights = np.ones(tile, np.float32)
    if edge.size and not first:
        weights[:edge.size] = edge
    if edge.size and not last:
        weights[-edge.size:] = np.minimum(weights[-edge.size:], edge[::-1])
    return weights


def _axis_tiles(length: int, tile: int, overlap: int) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
    """(start, weights) of the tiles along one axis, and float32[length] the sum of their weights (> 0 everywhere)."""
    starts = _tile_starts(length, tile, tile - overlap)
    tiles = [(s, _edge_weights(tile, overlap, i == 0, i == len(starts) - 1)) for i, s in enumerate(starts)]
    total = np.zeros(length, np.float32)
    for s, weights in tiles:
        total[s:s + tile] += weights
    return tiles, total


VIEWS = tuple((turns, flip) for turns in range(4) for flip in (False, True))  # the 8 symmetries of the square


def view(x: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """Images [B, H, W, ...] turned by `turns` quarter turns (np.rot90), then mirrored left-right if `flip`."""
    x = np.rot90(x, turns, axes=(1, 2))
    return np.ascontiguousarray(x[:, :, ::-1] if flip else x)


def unview(y: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """The inverse of `view` on maps [B, h, w, ...]: mirrored back, then turned back."""
    return np.rot90(y[:, :, ::-1] if flip else y, -turns, axes=(1, 2))


def tile_ownership(length: int, tile: int, overlap: int) -> list[tuple[int, float, float]]:
    """(start, low, high) of the tiles along one axis: each tile owns [low, high), the axis cut at the middle of
    each overlap, so every position belongs to one tile and lies at least overlap/2 inside it (or on the image
    border). A tiled detector keeps a detection from the tile owning its box centre: each nucleus once, whole when
    it is at most `overlap` pixels across."""
    starts = _tile_starts(length, tile, tile - overlap)
    cuts = [0.0] + [(prev + tile + start) / 2 for prev, start in zip(starts, starts[1:])] + [float(length)]
    return [(start, cuts[k], cuts[k + 1]) for k, start in enumerate(starts)]


class Predictor:
    """Runs a trained variant on images: `predict_outputs` gives the network's maps, `predict` a label image.

    With `tta` (default: the run's `predict.tta`) the network sees the image's 8 flips and quarter turns (`VIEWS`):
    a dense variant's maps are the mean of the 8 maps, each turned back; a detector's detections of the 8 views,
    turned back, are fused into one set (`maskrcnn.inference.fuse_views`, at the model's `detection_nms_iou`).

    Images larger than `tile_size` are cut into tiles overlapping by `tile_overlap` (multiples of the network's
    stride), run `tile_batch` at a time, and blended (zero weight on each tile's outer overlap/4, then a ramp)
    before post-processing. A detector's tiles (the same cut) each keep the detections whose box centre they own
    (`tile_ownership`), and all of them are pasted together.

    `input_scale` (default: the run's `data.input_scale`) magnifies each image before the network (bilinear);
    maps, boxes and label images come back at the image's own size. Use it for images whose nuclei are smaller or
    larger than those the network was trained on (2 for nuclei half as wide).
    """

    def __init__(self, config: ml_collections.ConfigDict, variables: Mapping[str, Any], *,
                 postprocess: Mapping[str, Any] | None = None, step: int | None = None,
                 workdir: str | pathlib.Path | None = None, tile_size: int | None = None,
                 tile_overlap: int | None = None, tile_batch: int | None = None, tta: bool | None = None,
                 input_scale: float | None = None):
        self.config = config
        self.variant = variants.get(config.variant)
        self.module = self.variant.model(config)
        self.variables = variables
        self.step = step
        self.workdir = workdir
        self.postprocess_params = config.postprocess.to_dict()
        if postprocess:
            self.postprocess_params.update(postprocess)
        self.stride = 2 ** int(config.model.get("depth", 5))
        self.tile_size = int(tile_size or config.predict.tile_size)
        self.tile_overlap = int(tile_overlap if tile_overlap is not None else config.predict.tile_overlap)
        self.tile_batch = int(tile_batch or config.predict.tile_batch)
        self.tta = bool(config.predict.tta if tta is None else tta)
        self.input_scale = float(config.data.input_scale if input_scale is None else input_scale)
        if not self.input_scale > 0:
            raise ValueError(f"input_scale must be a number > 0, got {self.input_scale}")
        for name, value in (("predict.tile_size", self.tile_size), ("predict.tile_overlap", self.tile_overlap)):
            if value % self.stride:
                raise ValueError(f"config key {name!r} = {value} must be a multiple of the network stride {self.stride}")
        if not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(f"config key 'predict.tile_overlap' must be in [0, tile_size), got {self.tile_overlap}")
        self._apply = jax.jit(lambda v, x: self.variant.apply(self.module, v, x, config))

    # ---- network outputs ----

    def _normalize(self, image: np.ndarray) -> np.ndarray:
        return normalize_image(image, grey=self.config.data.grey, invert_bright=self.config.data.invert_bright)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """maps float32[B, h, w, C] of normalised images float32[B, h, w, 3] (h, w multiples of the stride)."""
        if not self.tta:
            return np.asarray(self._apply(self.variables, batch)["maps"], np.float32)
        total = 0.0
        for turns, flip in VIEWS:
            total = total + unview(np.asarray(self._apply(self.variables, view(batch, turns, flip))["maps"],
                                              np.float32), turns, flip)
        return total / len(VIEWS)

    def _padded_run(self, images: np.ndarray) -> np.ndarray:
        """Pads float32[B, H, W, 3] by reflection to a multiple of the stride, runs, crops back."""
        _, h, w, _ = images.shape
        ph, pw = -h % self.stride, -w % self.stride
        x = np.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
        return self._run(x)[:, :h, :w]

    def network_input(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the network sees of one image: normalised float32[h, w, 3], magnified by `input_scale` (bilinear, at
        pixel centres, as training's zoom), and the factors (h / H, w / W) that take image coordinates to it."""
        x = self._normalize(image)
        h, w, _ = x.shape
        if h == 0 or w == 0:
            raise ValueError(f"image is empty: shape {np.shape(image)}")
        if self.input_scale == 1.0:
            return x, np.ones(2)
        size = (max(1, round(h * self.input_scale)), max(1, round(w * self.input_scale)))
        x = skimage.transform.resize(x, (*size, 3), order=1, mode="edge", anti_aliasing=self.input_scale < 1)
        return x.astype(np.float32), np.array(size) / np.array([h, w])

    def predict_outputs(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Network outputs for one image (H×W or H×W×C; uint8, uint16 or float): {"maps": float32[H, W, C]} for
        dense variants; for detectors, their per-image detections in image coordinates plus "size"."""
        x, factors = self.network_input(image)
        h, w = np.shape(image)[:2]
        if not self.variant.dense:
            out = self._detections(x)
            return {**out, "boxes": (out["boxes"] / np.tile(factors, 2)).astype(np.float32), "size": np.array([h, w])}
        maps = self._padded_run(x[None])[0] if max(x.shape[:2]) <= self.tile_size else self._tiled(x)
        if maps.shape[:2] != (h, w):  # bilinear at pixel centres: at input_scale 2, the mean of each 2x2 block
            maps = skimage.transform.resize(maps, (h, w, maps.shape[2]), order=1, mode="edge",
                                            anti_aliasing=False).astype(np.float32)
        return {"maps": maps}

    def _detect(self, crops: np.ndarray) -> list[dict[str, np.ndarray]]:
        """A detector's outputs for each of normalised crops float32[B, h, w, 3], in the crop's coordinates; with
        `tta`, the fusion of the detections of its 8 views."""
        from nucjax.models.maskrcnn.inference import fuse_views, unview_detections

        def run(x: np.ndarray) -> list[dict[str, np.ndarray]]:
            out = jax.device_get(self._apply(self.variables, x))
            return [{key: np.asarray(v[k]) for key, v in out.items()} for k in range(len(x))]

        if not self.tta:
            return run(crops)
        per_view = []
        for turns, flip in VIEWS:
            x = view(crops, turns, flip)
            per_view.append([unview_detections(d, turns, flip, x.shape[1:3]) for d in run(x)])
        return [fuse_views(views, self.config.model.detection_nms_iou) for views in zip(*per_view)]

    def _detections(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """A detector's outputs for one normalised image float32[H, W, 3], in image coordinates: the whole image
        when it fits one tile, otherwise every tile's detections with `valid` kept only where the tile owns the
        box centre."""
        h, w, _ = x.shape
        if max(h, w) <= self.tile_size:
            return self._detect(x[None])[0]
        t, o = self.tile_size, self.tile_overlap
        tiles = [(y, y_range, x0, x_range) for y, *y_range in tile_ownership(h, t, o)
                 for x0, *x_range in tile_ownership(w, t, o)]
        parts = []
        for i in range(0, len(tiles), self.tile_batch):
            chunk = tiles[i:i + self.tile_batch]
            crops = np.stack([x[y:y + t, x0:x0 + t] for y, _, x0, _ in chunk])
            for out, (y, (y_low, y_high), x0, (x_low, x_high)) in zip(self._detect(crops), chunk):
                boxes = out["boxes"] + np.array([y, x0, y, x0], np.float32)
                cy, cx = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
                owned = (y_low <= cy) & (cy < y_high) & (x_low <= cx) & (cx < x_high)
                parts.append({**out, "boxes": boxes, "valid": out["valid"] & owned})
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def _tiled(self, x: np.ndarray) -> np.ndarray:
        """Blended maps float32[H, W, C] of an image larger than one tile; device memory bounded by `tile_batch` tiles,
        host memory by the image and the maps (the weights are separable: one vector per axis).

        A tile's outer overlap//4 pixels get weight 0, so when that is at least the network's receptive-field radius
        and the model has no per-image statistics (norm "none", or "batch" at inference), the result equals the
        untiled one; GroupNorm statistics depend on the tile, so there the blend only smooths the seams.
        """
        h, w, _ = x.shape
        t = self.tile_size
        # Pad to at least one tile and to a multiple of the stride so that every tile keeps the pooling grid.
        ph, pw = max(t - h, -h % self.stride), max(t - w, -w % self.stride)
        if ph or pw:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        (rows, row_total), (cols, col_total) = (_axis_tiles(n, t, self.tile_overlap) for n in x.shape[:2])
        tiles = [(y, wy, x0, wx) for y, wy in rows for x0, wx in cols]
        total = None
        for i in range(0, len(tiles), self.tile_batch):
            chunk = tiles[i:i + self.tile_batch]
            maps = self._run(np.stack([x[y:y + t, x0:x0 + t] for y, _, x0, _ in chunk]))
            if total is None:
                total = np.zeros((h, w, maps.shape[-1]), np.float32)
            for (y, wy, x0, wx), m in zip(chunk, maps):
                dy, dx = min(t, h - y), min(t, w - x0)
                if dy > 0 and dx > 0:
                    total[y:y + dy, x0:x0 + dx] += m[:dy, :dx] * (wy[:dy, None, None] * wx[None, :dx, None])
        total /= row_total[:h, None, None]
        total /= col_total[None, :w, None]
        return total

    # ---- instances ----

    def to_instances(self, outputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None = None) -> np.ndarray:
        """Label image int32[H, W] from the network outputs, with the stored (or given) post-processing parameters."""
        merged = dict(self.postprocess_params)
        if params:
            merged.update(params)
        return self.variant.to_instances(outputs, merged).astype(np.int32)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Label image int32[H, W] (0 = background, 1..N = nuclei) for one image of any size."""
        return self.to_instances(self.predict_outputs(image))

    def predict_many(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Label images for a list of images of equal size, run `tile_batch` at a time."""
        if not images:
            return []
        shapes = {np.shape(im)[:2] for im in images}
        if len(shapes) != 1:
            raise ValueError(f"predict_many needs images of one size, got sizes {sorted(shapes)}")
        h, w = shapes.pop()
        if max(h, w) > self.tile_size or not self.variant.dense or self.input_scale != 1.0:
            return [self.predict(im) for im in images]
        x = np.stack([self._normalize(im) for im in images])
        maps = np.concatenate([self._padded_run(x[i:i + self.tile_batch]) for i in range(0, len(x), self.tile_batch)])
        return [self.to_instances({"maps": m}) for m in maps]


def evaluate_source(predictor: Predictor, source: Any, *, limit: int = 0, thresholds: Sequence[float] | None = None,
                    error_iou: float = 0.7, progress: bool = False, keep_outputs: bool = False) -> tuple[Any, list]:
    """Predicts every image of a data source and scores it with `nucjax.metrics`; returns (Report, outputs or []).
    With several processes each predicts its share of the images and all gather the per-image counts (in source
    order) before the metrics are formed, so the Report is a single process's."""
    from nucjax import distributed, metrics

    n = len(source) if not limit else min(limit, len(source))
    acc = metrics.Accumulator(thresholds or metrics.DEFAULT_THRESHOLDS, error_iou)
    mine = []
    indices: Iterable[int] = distributed.shard(n)
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        indices = tqdm(indices, desc="evaluate", unit="img", leave=False)
    for i in indices:
        example = source[i]
        outputs = predictor.predict_outputs(example["image"])
        pred = predictor.to_instances(outputs)
        stats = metrics.image_stats(np.asarray(example["label"]), pred, thresholds=acc.thresholds,
                                    error_iou=acc.error_iou, name=str(example["id"]))
        mine.append((stats, (example, outputs) if keep_outputs else None))
    everything = distributed.in_index_order(distributed.gather(mine))
    for stats, _ in everything:
        acc.add_stats(stats)
    return acc.report(), [item for _, item in everything if item is not None]


def tune_postprocess(predictor: Predictor, source: Any, *, limit: int = 0, grid: Mapping[str, Sequence] | None = None,
                     max_exhaustive: int = 256, store: bool = True, progress: bool = True) -> tuple[dict, float]:
    """Searches the post-processing parameters for the best mean dsb2018_score on `source` (a validation split);
    applies them to `predictor` and, with `store`, saves them beside its checkpoint for every later `load()`."""
    from nucjax import checkpoint, postprocess

    name = predictor.variant.postprocess_name
    if name is None:
        raise ValueError(f"variant {predictor.variant.name!r} has no tunable post-processing")
    n = len(source) if not limit else min(limit, len(source))
    examples = [source[i] for i in range(n)]
    outputs = (predictor.predict_outputs(ex["image"]) for ex in examples)
    maps = [out["maps"] if predictor.variant.dense else out for out in outputs]  # a detector's: its detections
    gts = [np.asarray(ex["label"]) for ex in examples]
    params, score = postprocess.tune(name, maps, gts, grid=grid, base_params=predictor.postprocess_params,
                                     max_exhaustive=max_exhaustive, progress=progress)
    predictor.postprocess_params = dict(params)
    if store and predictor.workdir is not None and predictor.step is not None:
        checkpoint.write_postprocess(predictor.workdir, predictor.step, params, score)
    return params, score
