"""grain input pipelines: the one image normalisation, sharded checkpointable training batches, whole-image eval."""

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
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (1, 2):
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[:, :, :3]
    elif image.ndim != 2:
        raise ValueError(f"image must be [H, W] or [H, W, C] with C in 1..4, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image must hold integers or floats, got dtype {image.dtype}")
    if image.ndim == 3 and grey:
        image = image.mean(axis=2, dtype=np.float32)
    if image.size == 0:
        return np.zeros((*image.shape[:2], 3), np.float32)
    low, high, median = _percentiles(image, (LOW_PERCENTILE, HIGH_PERCENTILE, 50.0))
    if high <= low:
        low, high = image.min(), image.max()
    scale = 1.0 / (high - low) if high > low else 0.0
    image = (image.astype(np.float32) - np.float32(low)) * np.float32(scale)
    if invert_bright and (median - low) * scale > 0.5:
        image = 1.0 - image
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image.astype(np.float32, copy=False)


def _percentiles(image: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """np.percentile(image, qs) (linear interpolation); from the histogram for uint8/uint16 images (faster)."""
    if image.dtype not in (np.uint8, np.uint16):
        return [float(v) for v in np.percentile(image, qs)]
    counts = np.cumsum(np.bincount(image.ravel()))  # counts[v] = number of values <= v
    last = int(counts[-1]) - 1
    out = []
    for q in qs:
        rank = q / 100.0 * last
        below = int(np.floor(rank))
        at = np.searchsorted(counts, [below, min(below + 1, last)], side="right")  # sorted values at those ranks
        out.append(float(at[0] + (rank - below) * (at[1] - at[0])))
    return out


class _Prepare(grain.transforms.RandomMap):
    """A source example -> a training example: normalise, augment, targets (seeded by grain's per-record rng)."""

    def __init__(self, config: Any, target_names: tuple[str, ...]):
        self._data = config.data
        self._targets = config.targets
        self._names = target_names

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image, label = _checked(element)
        image = normalize_image(image, grey=self._data.grey, invert_bright=self._data.invert_bright)
        image, label, valid = augment.augment(image, label, rng, self._data.augment, self._data.crop_size)
        return {"image": image, "valid": valid, **_valid_targets(label, valid, self._names, self._targets)}


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


def train_loader(
    source: Any,
    config: Any,
    *,
    target_names: Sequence[str],
    seed: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.DataLoader:
    """An endless, checkpointable grain DataLoader of {"image": f32[B, S, S, 3], "valid": f32[B, S, S], targets}.

    B = train.batch_size / shard_count, S = data.crop_size. Records are shuffled over the whole source (seed, new
    order each epoch) and global position i goes to shard i mod shard_count, so the sequence of global batches and
    their augmentations is the same whatever the number of shards (process k's batch j holds global positions
    j * batch_size + k, + shard_count, ...). Shards default to the JAX processes. Seed defaults to config.seed.
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
    if config.data.num_workers > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads its absl flags when it starts workers; outside an absl app: defaults
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=grain.sharding.NoSharding(), shuffle=True, num_epochs=None, seed=seed
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[_Prepare(config, names), grain.transforms.Batch(batch_size=batch, drop_remainder=True)],
        worker_count=config.data.num_workers,
        worker_buffer_size=max(config.data.prefetch, 1),
        shard_options=grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count),
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * batch),
    )


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
