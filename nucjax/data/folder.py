"""What the nucjax TFDS builders share (features, modality, splits, configs), and `nuclei_folder` for a user's
images + labels.

Every builder stores `id`, `image` (uint8 H×W×3; grey images are stored as one-channel PNG and decode to three equal
channels), `label` (int32 H×W, ids 1..N, zlib-compressed) and `modality` (see `modality`).
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import inspect
import io as bytes_io
import math
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from nucjax.data import io

MODALITIES = ("fluorescence", "brightfield", "histology-colour")
COLOUR_SPREAD = 2.0  # mean (max - min over channels) above which an image counts as colour, in grey levels
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
DEFAULT_CONFIG = "default"
BASE_FIELDS = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
_MAX_NAME = 120


def modality(image: np.ndarray) -> str:
    """The modality of a uint8[H, W, 3] image: "histology-colour" if its channels differ (mean spread > COLOUR_SPREAD),
    else "brightfield" if its median is above 127 (a bright background), else "fluorescence".

    On DSB2018 stage1_train this gives 546 fluorescence, 16 brightfield and 108 histology-colour images.
    """
    channels = image[..., 0], image[..., 1], image[..., 2]
    spread = np.maximum(np.maximum(*channels[:2]), channels[2]) - np.minimum(np.minimum(*channels[:2]), channels[2])
    if spread.mean() > COLOUR_SPREAD:
        return "histology-colour"
    return "brightfield" if np.median(image[..., 0]) > 127 else "fluorescence"


def file_modality(path: pathlib.Path) -> str:
    """The modality of an image file (see `modality`)."""
    return modality(as_rgb(io.read_image(path)))


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] from `io.read_image`'s output: grey is replicated; other dtypes are scaled from [min, max]."""
    if image.dtype != np.uint8:
        low, high = float(image.min()), float(image.max())
        image = ((image.astype(np.float64) - low) * (255 / max(high - low, 1e-12)) + 0.5).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of a uint8[H, W, 3] image, with one channel when its three channels are equal."""
    grey = np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
    buffer = bytes_io.BytesIO()
    Image.fromarray(image[..., 0] if grey else image).save(buffer, format="PNG")
    return buffer.getvalue()


def compact_labels(label: np.ndarray) -> np.ndarray:
    """int32[H, W] with the same instances renumbered 1..N in order of their old ids (0 stays background)."""
    ids = np.unique(label)
    ids = ids[ids > 0]
    if ids.size == 0 or ids[-1] == ids.size:
        return label.astype(np.int32)
    lookup = np.zeros(int(ids[-1]) + 1, np.int32)
    lookup[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lookup[label]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _share(n: int, fraction: float, reserved: int) -> int:
    """Images of an n-image group for a split of this fraction: rounded, at least 1 if fraction > 0 and the group
    has room for it beside `reserved` images and one training image."""
    count = math.floor(fraction * n + 0.5)
    if fraction > 0 and n >= reserved + 2:
        count = max(count, 1)
    return max(0, min(count, n - reserved - 1))


def assign_splits(
    modalities: Mapping[str, str], validation_fraction: float, holdout_fraction: float = 0.0
) -> dict[str, list[str]]:
    """{"train", "validation"[, "holdout"]: sorted ids} from {id: modality}, deterministic and stratified.

    Each modality group of n images is taken in order of the SHA-256 of the ids: the first
    round(validation_fraction * n) go to validation, the last round(holdout_fraction * n) to holdout, the rest to
    train (so adding a holdout leaves validation as it was). Validation and holdout each get at least one image of
    a group when their fraction is > 0 and the group can still leave one image to train.
    """
    names = ["train", "validation"] + (["holdout"] if holdout_fraction > 0 else [])
    splits: dict[str, list[str]] = {name: [] for name in names}
    for group in sorted(set(modalities.values())):
        ids = sorted((i for i, m in modalities.items() if m == group), key=_hash)
        held = _share(len(ids), holdout_fraction, 1 if validation_fraction > 0 else 0)
        validation = _share(len(ids), validation_fraction, held)
        splits["validation"].extend(ids[:validation])
        splits["train"].extend(ids[validation : len(ids) - held])
        if held:
            splits["holdout"].extend(ids[len(ids) - held :])
    return {name: sorted(splits[name]) for name in names}


def _coerce(key: str, value: object, kind: type) -> object:
    """`value` (possibly a command-line string) as a bool, int, float or str; a ValueError names the key."""
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if kind is int and float(value) != int(float(value)):
            raise ValueError(value)
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"builder setting {key}={value!r} is not a valid {kind.__name__}") from None


def _name_value(value: object) -> str:
    """A value as it appears in a config name: paths become `<basename>-<hash>`."""
    if isinstance(value, str) and os.sep in value:
        return f"{pathlib.Path(value).name}-{_hash(value)[:8]}"
    return str(value)


@dataclasses.dataclass(eq=False, kw_only=True)
class NucleiConfig(tfds.core.BuilderConfig):
    """Settings every nucjax builder has: the validation and held-apart fractions of its training images."""

    validation_fraction: float = 0.1
    holdout_fraction: float = 0.0

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> "NucleiConfig":
        """A checked config from keyword settings, named by its non-default values ("default" when there are none)."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in BASE_FIELDS}
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise ValueError(f"unknown builder setting {unknown[0]!r}; valid settings: {', '.join(sorted(fields))}")
        values = {k: _coerce(k, v, type(fields[k].default)) for k, v in kwargs.items()}
        changed = sorted((k, v) for k, v in values.items() if v != fields[k].default)
        name = ",".join(f"{k}={_name_value(v)}" for k, v in changed) or DEFAULT_CONFIG
        if len(name) > _MAX_NAME:
            name = f"{name[:_MAX_NAME - 9]}-{_hash(name)[:8]}"
        config = cls(name=name, **values)
        config.check()
        return config

    def check(self) -> None:
        """Raises ValueError naming the setting that is out of range."""
        for key in ("validation_fraction", "holdout_fraction"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"builder setting {key}={getattr(self, key)} must be in [0, 1)")
        if self.validation_fraction + self.holdout_fraction >= 1:
            raise ValueError("builder settings validation_fraction + holdout_fraction must be below 1")


@dataclasses.dataclass(eq=False, kw_only=True)
class LabelledConfig(NucleiConfig):
    """Settings of builders that read labels from files: `overlap` = "error" (raise on overlapping masks, naming the
    image) or "first" (a pixel claimed by several masks goes to the first in sorted order)."""

    overlap: str = "error"

    def check(self) -> None:
        super().check()
        if self.overlap not in ("error", "first"):
            raise ValueError(f'builder setting overlap={self.overlap!r} must be "error" or "first"')


def features(**extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
    """The common features (id, image, label, modality) plus builder-specific ones."""
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.Tensor(shape=(None, None), dtype=np.int32, encoding="zlib"),
            "modality": tfds.features.Text(),
            **extra,
        }
    )


def example(image_id: str, image: np.ndarray, label: np.ndarray, **extra: object) -> tuple[str, dict]:
    """(key, feature dict) of one image for a TFDS generator; its modality is computed from the image."""
    record = {"id": image_id, "image": png_bytes(image), "label": label, "modality": modality(image), **extra}
    return image_id, record


class NucleiBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the nucjax builders: common features, array_record files, examples stored in id order."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> tfds.core.Path:
        """The builder's source file (TFDS's own lookup needs the `importlib_resources` package, absent here)."""
        return tfds.core.Path(inspect.getfile(cls))

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        """Builder-specific features beside id, image, label and modality."""
        return {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=features(**self._extra_features()),
            disable_shuffling=True,
        )

    def _training_splits(
        self, modalities: Mapping[str, str], load: Callable[[str], tuple[str, dict]]
    ) -> dict[str, Iterator[tuple[str, dict]]]:
        """{split: examples} of the training pool {id: modality}, split by `assign_splits`, loaded by `load(id)`;
        empty splits are left out (TFDS cannot write them)."""
        config = self.builder_config
        splits = assign_splits(modalities, config.validation_fraction, config.holdout_fraction)
        return {name: self._generate_examples(ids, load) for name, ids in splits.items() if ids}

    def _generate_examples(self, ids: Sequence[str], load: Callable[[str], tuple[str, dict]]):
        yield from threaded(load, ids)


def threaded(function: Callable, items: Iterable, workers: int = min(8, os.cpu_count() or 1)) -> Iterator:
    """function(item) for each item, in order, computed a few items ahead by threads (decoding and encoding images
    release the GIL); an exception is raised as it is."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _by_stem(folder: pathlib.Path, suffixes: Sequence[str], with_folders: bool) -> dict[str, pathlib.Path]:
    """{stem: path} of the files (and, if asked, sub-folders) of a folder; two entries with one stem raise."""
    entries: dict[str, pathlib.Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if with_folders and path.is_dir():
            stem = path.name
        elif path.is_file() and path.suffix.lower() in suffixes:
            stem = path.stem
        else:
            continue
        if stem in entries:
            raise ValueError(f"{folder}: {entries[stem].name} and {path.name} have the same name; keep one")
        entries[stem] = path
    return entries


def read_pairs(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """{stem: (image file, label file or mask folder)} of a folder holding images/ and labels/, paired by stem."""
    if not (root / "images").is_dir() or not (root / "labels").is_dir():
        raise ValueError(f"{root}: expected sub-folders images/ and labels/ (labels as label images or mask folders)")
    images = _by_stem(root / "images", IMAGE_SUFFIXES, with_folders=False)
    labels = _by_stem(root / "labels", LABEL_SUFFIXES, with_folders=True)
    unpaired = sorted(set(images) ^ set(labels))
    if unpaired:
        listed = ", ".join(f"{s} ({'images' if s in images else 'labels'}/ only)" for s in unpaired[:10])
        more = f" and {len(unpaired) - 10} more" if len(unpaired) > 10 else ""
        raise ValueError(f"{root}: {len(unpaired)} unpaired names: {listed}{more}")
    if not images:
        raise ValueError(f"{root}: images/ holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return {stem: (images[stem], labels[stem]) for stem in sorted(images)}


def read_labelled(
    image_path: pathlib.Path, labels_path: pathlib.Path, overlap: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8[H, W, 3] image, int32[H, W] labels 1..N, empty masks skipped) from an image and a label file or
    mask folder; a size mismatch raises naming both files."""
    image = as_rgb(io.read_image(image_path))
    if labels_path.is_dir():
        label, empty = io.read_mask_folder(labels_path, image_path=image_path, overlap=overlap)
    else:
        label, empty = io.read_labels(labels_path), 0
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"{labels_path}: labels are {label.shape[0]}x{label.shape[1]} but {image_path} is "
                f"{image.shape[0]}x{image.shape[1]}"
            )
    return image, compact_labels(label), empty


@dataclasses.dataclass(eq=False, kw_only=True)
class NucleiFolderConfig(LabelledConfig):
    """`folder`: the folder holding images/ and labels/ (source() fills it from manual_dir)."""

    folder: str = ""

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> "NucleiFolderConfig":
        if kwargs.get("folder"):
            kwargs["folder"] = os.path.abspath(os.path.expanduser(str(kwargs["folder"])))
        return super().from_kwargs(**kwargs)

    def check(self) -> None:
        super().check()
        if not self.folder:
            raise ValueError("nuclei_folder needs manual_dir= (or folder=): the folder holding images/ and labels/")


class NucleiFolder(NucleiBuilder):
    """A user's folder: images/<stem>.{png,tif,jpg} with labels/<stem>.{png,tif,npy} or labels/<stem>/ mask folders."""

    name = "nuclei_folder"
    BUILDER_CONFIGS = [NucleiFolderConfig(name=DEFAULT_CONFIG)]

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {"empty_masks": tfds.features.Scalar(dtype=np.int32, doc="empty mask files skipped")}

    def _split_generators(self, dl_manager):
        config = self.builder_config
        config.check()
        pairs = read_pairs(pathlib.Path(config.folder))
        modalities = dict(zip(pairs, threaded(file_modality, [image for image, _ in pairs.values()])))

        def load(stem: str) -> tuple[str, dict]:
            image, label, empty = read_labelled(*pairs[stem], config.overlap)
            return example(stem, image, label, empty_masks=empty)

        return self._training_splits(modalities, load)
