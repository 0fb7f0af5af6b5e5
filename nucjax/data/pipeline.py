"""grain input pipelines: the one image normalisation, sharded checkpointable training batches, whole-image eval."""

import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from nucjax.data import augment, targets

# Percentiles of all pixel values (channels together, so colours keep their balance) mapped to 0 and 1.
LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.8


def normalize_image(image: np.ndarray, *, grey: bool = False, invert_bright: bool = False) -> np.ndarray:
    """float32[H, W, 3] from an image [H, W] or [H, W, C] (uint8, uint16 or float; grey, grey + alpha, RGB, RGBA).

    Alpha is dropped and grey is replicated to 3 channels; values are scaled so that the 1st and 99.8th
    percentiles of all pixel values become 0 and 1 (not clipped; when these coincide, the minimum and maximum are
    used, and a constant image gives zeros). `grey`: replace the colour by the channel mean first.
    `invert_bright`: then invert (1 - x) images whose median is above 0.5, i.e. whose background is bright.
    """
    pixels, levels = image_levels(image, grey=grey, invert_bright=invert_bright)
    out = levels(pixels)
    return out if out.shape[2] == 3 else np.repeat(out, 3, axis=2)


@dataclasses.dataclass(frozen=True)
class Levels:
    """`normalize_image`'s map of one image's values, for any part of its `image_levels` pixels."""

    low: float
    scale: float
    invert: bool = False
    divisor: int = 1  # the pixels hold sums of this many channels: their mean is taken first

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """float32[h, w, C]: (pixels / divisor - low) * scale, then 1 - x when `invert`, of pixels [h, w, C]."""
        values = pixels.astype(np.float32)
        if self.divisor != 1:
            values = np.true_divide(values, self.divisor)
        values = (values - np.float32(self.low)) * np.float32(self.scale)
        return np.subtract(1.0, values, out=values) if self.invert else values


def image_levels(image: np.ndarray, *, grey: bool = False, invert_bright: bool = False) -> tuple[np.ndarray, Levels]:
    """(pixels [H, W, C], levels) such that normalize_image(image, ...) = levels(pixels), repeated to 3 channels
    when C = 1; levels(a crop of pixels) is the same crop of it, so augmentation need only map what it samples.

    `pixels` is a view of the image without alpha, of one channel when the image is grey (one channel, or three
    equal ones), or, when `grey`, the channel mean (for uint8/uint16 images their exact integer sum, divisor 3).
    Percentiles of uint8/uint16 values come from their histogram, with np.percentile's linear interpolation.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    elif image.ndim == 3 and image.shape[2] in (1, 2):
        image = image[:, :, :1]
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[:, :, :3]
    else:
        raise ValueError(f"image must be [H, W] or [H, W, C] with C in 1..4, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image must hold integers or floats, got dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError(f"image has {np.count_nonzero(~np.isfinite(image))} NaN or infinite values")
    counted = image.dtype in (np.uint8, np.uint16)  # percentiles from a histogram
    copies, divisor = 1, 1
    if image.shape[2] == 3 and grey:
        if counted:  # sum / 3 in float32 is what image.mean(axis=2, dtype=float32) gives
            image, divisor = image.sum(axis=2, keepdims=True, dtype=np.uint16 if image.itemsize == 1 else np.uint32), 3
        else:
            image = image.mean(axis=2, keepdims=True, dtype=np.float32)
    if image.size == 0:
        return image, Levels(0.0, 0.0)
    pixels = image
    if image.shape[2] == 3 and _equal_channels(image):
        pixels = image[:, :, :1]
        if counted:
            image, copies = pixels, 3  # one channel's histogram, each value counted three times
    if counted:
        low, high, median, lowest, highest = _histogram_levels(image, copies, divisor)
    else:
        low, high, median = (float(v) for v in np.percentile(image, (LOW_PERCENTILE, HIGH_PERCENTILE, 50.0)))
        lowest, highest = image.min(), image.max()
    if high <= low:
        low, high = lowest, highest
    scale = 1.0 / (high - low) if high > low else 0.0
    invert = bool(invert_bright and (median - low) * scale > 0.5)
    return pixels, Levels(float(low), float(scale), invert, divisor)


def _equal_channels(image: np.ndarray) -> bool:
    """Whether the three channels of image [H, W, 3] are equal."""
    return np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(image[:, :, 0], image[:, :, 2])


def _histogram_levels(image: np.ndarray, copies: int, divisor: int) -> tuple:
    """(1st, 99.8th, 50th percentile, minimum, maximum) of the values of a non-negative integer image divided by
    `divisor`, each value counted `copies` times; percentiles as np.percentile's linear interpolation gives them."""
    counts = np.cumsum(np.bincount(image.ravel()))  # counts[v] = number of values <= v
    if copies != 1:
        counts *= copies
    last = int(counts[-1]) - 1
    out = []
    for q in (LOW_PERCENTILE, HIGH_PERCENTILE, 50.0):
        rank = q / 100.0 * last
        below = int(np.floor(rank))
        at = np.searchsorted(counts, [below, min(below + 1, last)], side="right")  # sorted values at those ranks
        out.append(float(at[0] + (rank - below) * (at[1] - at[0])) / divisor)
    lowest, highest = int(np.searchsorted(counts, 0, side="right")), len(counts) - 1
    if divisor != 1:  # the mean image's float32 minimum and maximum
        return (*out, np.float32(lowest) / np.float32(divisor), np.float32(highest) / np.float32(divisor))
    return (*out, lowest, highest)


# Targets whose values fit in uint8, and the dtypes the losses take them in (see `train_loader(compact=True)`).
COMPACT_DTYPES = {"valid": np.float32, "foreground": np.float32, "boundary": np.float32, "three_class": np.int32}


def widen(batch: dict[str, Any]) -> dict[str, Any]:
    """A compact batch (`train_loader(compact=True)`) with the dtypes of a full one: the same values, as float32
    masks and int32 classes. Takes NumPy or JAX arrays; inside a jitted step the conversion runs on the device."""
    return {k: v.astype(COMPACT_DTYPES[k]) if k in COMPACT_DTYPES and v.dtype != COMPACT_DTYPES[k] else v
            for k, v in batch.items()}


class _Prepare(grain.transforms.RandomMap):
    """A source example -> a training example: normalise, augment, targets (seeded by grain's per-record rng).

    Unpickled in a grain worker process, it makes that process leave SIGINT and SIGTERM to the main process."""

    def __init__(self, config: Any, target_names: tuple[str, ...], compact: bool = False):
        self._data = config.data
        self._targets = config.targets
        self._names = target_names
        self._compact = compact
        self._main_pid = os.getpid()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if os.getpid() != self._main_pid:
            _leave_signals_to(self._main_pid)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.from_parts(*self.parts(element), rng)

    def parts(self, element: dict[str, Any]) -> tuple[np.ndarray, Levels, np.ndarray]:
        """What augmentation needs of an example, whatever its rng: (pixels, levels, label) (`image_levels`)."""
        image, label = _checked(element)
        pixels, levels = image_levels(image, grey=self._data.grey, invert_bright=self._data.invert_bright)
        return pixels, levels, label

    def from_parts(self, pixels: np.ndarray, levels: Levels, label: np.ndarray,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The training example: geometric augmentation, the drawn intensity changes (made on the device by
        `nucjax.intensity` in the train step), targets."""
        image, label, valid, intensity = augment.augment(pixels, label, rng, self._data.augment,
                                                         self._data.crop_size, levels=levels,
                                                         zoom=self._data.input_scale)
        out = {"image": image, "valid": valid, "intensity": intensity,
               **_valid_targets(label, valid, self._names, self._targets)}
        if self._compact:
            out.update({k: out[k].astype(np.uint8) for k in COMPACT_DTYPES if k in out})
        return out


_signals_left = False


def _leave_signals_to(main_pid: int) -> None:
    """In a worker process (once): ignore SIGINT and SIGTERM, which a terminal, `timeout` or a batch scheduler send
    to the whole process group, so that the main process can save its state and then stop the workers itself;
    and exit as soon as the main process is gone (the worker's parent changes, or the main pid no longer exists),
    so that a worker never outlives it."""
    global _signals_left
    if _signals_left or threading.current_thread() is not threading.main_thread():
        return
    _signals_left = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and _exists(main_pid):
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="nucjax-main-process-watch", daemon=True).start()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _valid_targets(label: np.ndarray, valid: np.ndarray, names: tuple[str, ...], config: Any) -> dict[str, np.ndarray]:
    """Targets of the valid rectangle of a crop, zero in its padding: the image edge is no boundary there either,
    and padding does not count as background in the weight map's class balance. Boxes are in crop pixels."""
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    if rows.size == 0 or (rows.size, cols.size) == label.shape:
        return targets.compute(label, names, config)
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    out = targets.compute(label[y0:y1, x0:x1], names, config)
    for key, value in out.items():
        if key == "boxes":
            out[key] = value + np.float32([y0, x0, y0, x0]) * out["instance_valid"][:, None]
        elif value.shape == (y1 - y0, x1 - x0):
            out[key] = np.zeros(label.shape, value.dtype)
            out[key][y0:y1, x0:x1] = value
    return out


def _checked(element: dict[str, Any], index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The example's image and label, or a ValueError naming the example when they do not fit together."""
    name = _text(element.get("id", "")) or (f"index {index}" if index is not None else "?")
    if "image" not in element or "label" not in element:
        raise ValueError(f"example {name}: needs keys 'image' and 'label', got {sorted(element)}")
    image, label = np.asarray(element["image"]), np.asarray(element["label"])
    if label.ndim == 3 and label.shape[2] == 1:
        label = label[:, :, 0]
    if label.ndim != 2 or image.shape[:2] != label.shape:
        raise ValueError(f"example {name}: image {image.shape} and label {label.shape} differ in height/width")
    return image, label


def _text(value: Any) -> str:
    """A str from a str, bytes or NumPy scalar feature."""
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode() if isinstance(value, bytes) else str(value)


def _batch_size(config: Any, shard_count: int) -> int:
    """The per-process batch: train.batch_size / shard_count, which must divide evenly."""
    total = config.train.batch_size
    if total < 1 or total % shard_count:
        raise ValueError(
            f"train.batch_size={total} must be a positive multiple of the number of processes ({shard_count})"
        )
    return total // shard_count


class _Batch(grain.transforms.Map):
    """Batch j of one process: its slots p = 0..B-1 hold global positions (j * shard_count + shard_index) * B + p
    of `sampler`'s endless shuffled order, each prepared with the sampler's rng for that position: the processes'
    parts, stacked in process order, are the global batch in position order.

    Each process (or grain worker) keeps the decoded pixels, levels and label of the records it reads, up to
    `cache_bytes` (first come, kept for the run; labels as uint16 when their ids fit): later epochs skip decoding
    and the percentile pass, with the same results."""

    def __init__(self, source: Any, sampler: grain.samplers.IndexSampler, prepare: _Prepare, batch: int,
                 shard_index: int, shard_count: int, cache_bytes: int):
        self._source, self._sampler, self._prepare = source, sampler, prepare
        self._batch, self._index, self._count = batch, shard_index, shard_count
        self._cache_bytes = cache_bytes
        self._cache: dict[int, tuple[np.ndarray, Levels, np.ndarray]] = {}
        self._cached = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}, "_cached": 0}  # each worker fills its own

    def map(self, j: int) -> dict[str, np.ndarray]:
        examples = []
        for p in range(self._batch):
            record = self._sampler[(j * self._count + self._index) * self._batch + p]
            examples.append(self._prepare.from_parts(*self._parts(record.record_key), record.rng))
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

    def _parts(self, key: int) -> tuple[np.ndarray, Levels, np.ndarray]:
        parts = self._cache.get(key)
        if parts is None:
            pixels, levels, label = self._prepare.parts(self._source[key])
            if self._cached < self._cache_bytes:
                if label.size and label.min() >= 0 and label.max() <= np.iinfo(np.uint16).max:
                    label = label.astype(np.uint16)
                pixels = np.ascontiguousarray(pixels)  # not a view keeping the whole decoded image alive
                size = pixels.nbytes + label.nbytes
                if self._cached + size <= self._cache_bytes:
                    self._cache[key] = (pixels, levels, label)
                    self._cached += size
            parts = pixels, levels, label
        return parts


class TrainBatches:
    """This process's endless training batches, addressable by number: batch j is a pure function of the source,
    the config, the seed, j and the shard, so the input position of a run is its step, whatever the number of
    processes and grain workers that compute it (see `train_loader`)."""

    def __init__(self, batches: grain.MapDataset, workers: int, prefetch: int):
        self._batches, self._workers, self._prefetch = batches, workers, prefetch

    def __getitem__(self, j: int) -> dict[str, np.ndarray]:
        return self._batches[j]

    def iterate(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches start, start + 1, ...; with data.num_workers > 0 computed by that many processes (worker w
        computes batches w, w + workers, ...; they come back in order), else by one thread ahead of the caller.
        Workers ignore SIGINT/SIGTERM: the process iterating stops them, with the iterator's `close()`."""
        if start < 0:
            raise ValueError(f"TrainBatches.iterate: start must be >= 0, got {start}")
        dataset = self._batches[start:].to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        if self._workers > 0:
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()  # grain reads its absl flags when it starts workers; outside an app: defaults
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._workers, per_worker_buffer_size=self._prefetch))
        return iter(dataset)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate(0)


def train_loader(
    source: Any,
    config: Any,
    *,
    target_names: Sequence[str],
    seed: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    compact: bool = False,
) -> TrainBatches:
    """This process's endless training batches {"image": f32[B, S, S, 3], "valid": f32[B, S, S], "intensity":
    f32[B, 6] (each image's intensity changes, which the train step makes: `nucjax.intensity`), targets}.

    B = train.batch_size / shard_count, S = data.crop_size. Records are shuffled over the whole source (seed, new
    order each epoch; grain's IndexSampler); process k's batch j holds global positions j * batch_size + k * B, ...,
    j * batch_size + (k + 1) * B - 1 (so row r of the assembled global batch is position r, which the device-side
    augmentation relies on: its noise is drawn per row), each augmented with the sampler's rng
    for its position. So the sequence of global batches and their augmentations is the same whatever the number of
    shards and of grain workers (data.num_workers, which compute whole batches), and a run resumes at any step
    under any of them: `loader.iterate(step)`. Shards default to the JAX processes, seed to config.seed.
    data.cache_mb: decoded examples each process or worker keeps (see `_Batch`; DSB2018's train split takes ~250 MB).
    `compact`: "valid", "foreground", "boundary" and "three_class" come as uint8 (the same values in a quarter of
    the bytes that workers write to shared memory and the host sends to the device); `widen` restores the dtypes.
    """
    names = targets.check_names(target_names)
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither (then the JAX processes are used)")
    if shard_count is None:
        import jax  # only here: the rest of the data layer does not need JAX

        shard_index, shard_count = jax.process_index(), jax.process_count()
    batch = _batch_size(config, shard_count)
    if len(source) == 0:
        raise ValueError("train_loader: the training source is empty")
    seed = config.seed if seed is None else seed
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=grain.sharding.NoSharding(), shuffle=True, num_epochs=None, seed=seed
    )
    if config.data.cache_mb < 0:
        raise ValueError(f"data.cache_mb must be >= 0 (0 = no cache), got {config.data.cache_mb}")
    prepare = _Prepare(config, names, compact)
    batches = grain.MapDataset.range(sys.maxsize).map(
        _Batch(source, sampler, prepare, batch, shard_index, shard_count, int(config.data.cache_mb * 2**20)))
    return TrainBatches(batches, config.data.num_workers, max(config.data.prefetch, 1))


def pad_to_multiple(array: np.ndarray, stride: int) -> np.ndarray:
    """`array` [H, W, ...] mirrored ("symmetric") at the bottom and right up to multiples of `stride`."""
    height, width = array.shape[:2]
    pad = [(0, -height % stride), (0, -width % stride)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="symmetric")


def eval_examples(
    source: Any, config: Any, *, stride: int, target_names: Sequence[str] = ()
) -> Iterator[dict[str, Any]]:
    """Per-image dicts in source order: {"id", "image": f32[1, Hp, Wp, 3] (mirror-padded to multiples of stride),
    "valid": f32[1, Hp, Wp], "label": int32[H, W], "modality", "size": (H, W)} plus the named targets (unpadded)."""
    names = targets.check_names(target_names)
    if stride < 1:
        raise ValueError(f"eval_examples: stride must be >= 1, got {stride}")
    for index in range(len(source)):
        element = source[index]
        image, label = _checked(element, index)
        image = normalize_image(image, grey=config.data.grey, invert_bright=config.data.invert_bright)
        label = label.astype(np.int32)
        image = pad_to_multiple(image, stride)
        valid = np.zeros(image.shape[:2], np.float32)
        valid[: label.shape[0], : label.shape[1]] = 1
        yield {
            "id": _text(element.get("id", str(index))),
            "image": image[None],
            "valid": valid[None],
            "label": label,
            "modality": _text(element.get("modality", "")),
            "size": label.shape,
            **targets.compute(label, names, config.targets),
        }
