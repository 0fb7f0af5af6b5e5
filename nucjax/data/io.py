"""Reading and writing images and instance label images (PNG, TIFF, JPEG, NPY, mask folders) and Kaggle RLE CSVs."""

import csv
import pathlib
from collections.abc import Mapping

import numpy as np
import tifffile
from PIL import Image

PathLike = str | pathlib.Path

_TIFF = (".tif", ".tiff")
_MASK_SUFFIXES = (".png", ".tif", ".tiff")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
"""File types of label images that `read_labels` and `write_labels` know."""
# Pillow modes that np.asarray turns into arrays as they are; any other mode is converted to RGB first.
_PILLOW_SINGLE_CHANNEL = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F")
_PILLOW_NATIVE = _PILLOW_SINGLE_CHANNEL + ("LA", "RGB", "RGBA")
# Pillow decodes these 16-bit PNG layouts to 8 bits, so they are refused rather than read wrongly.
_PILLOW_16BIT_COLOUR = ("RGB;16B", "RGBA;16B", "LA;16B")
_INT32_MAX = np.iinfo(np.int32).max


class ReadError(ValueError):
    """A file that cannot be read as what was asked for; the message starts with the file's path."""


def _pillow_pixels(path: pathlib.Path, expand_palette: bool) -> np.ndarray:
    """Decoded pixels of a Pillow-readable file: [H, W] or [H, W, C] (palette indices unless expand_palette)."""
    with Image.open(path) as im:
        if im.format == "PNG" and any(tile[3] in _PILLOW_16BIT_COLOUR for tile in im.tile):
            raise ReadError(f"{path}: 16-bit colour PNG is not supported (Pillow reduces it to 8 bits); save as TIFF")
        if im.mode not in _PILLOW_NATIVE or (expand_palette and im.mode == "P"):
            im = im.convert("RGB")
        arr = np.asarray(im)
    return arr.astype(arr.dtype.newbyteorder("=")) if arr.dtype.byteorder == ">" else arr


def _tiff_pixels(path: pathlib.Path) -> np.ndarray:
    """Decoded pixels of a TIFF's first series with singleton axes dropped and channels last: [H, W] or [H, W, C]."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        arr, axes = series.asarray(), series.axes
    keep = [i for i, n in enumerate(arr.shape) if n > 1 or axes[i] in "YX"]
    arr, axes = arr.reshape([arr.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    if arr.ndim == 3 and axes[0] in "SC" and axes[1:] == "YX":
        arr = np.moveaxis(arr, 0, -1)
    return arr


def _pixels(path: PathLike, expand_palette: bool = True) -> np.ndarray:
    """Decoded pixels of an image file; any failure to decode becomes a ReadError naming the file."""
    path = pathlib.Path(path)
    try:
        if path.suffix.lower() in _TIFF:
            return _tiff_pixels(path)
        return _pillow_pixels(path, expand_palette)
    except ReadError:
        raise
    except Exception as e:  # any decoder failure (missing, truncated, corrupt, unknown format) means unreadable
        raise ReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def read_image(path: PathLike) -> np.ndarray:
    """An image: uint8/uint16/float32 [H, W] grey or [H, W, 3] colour (alpha dropped, palette expanded)."""
    arr = _pixels(path)
    if arr.ndim == 3 and arr.shape[-1] in (1, 2):
        arr = arr[..., 0]  # grey, or grey + alpha
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim != 2 and not (arr.ndim == 3 and arr.shape[-1] == 3):
        raise ReadError(f"{path}: expected a 2-D grey or colour image, got an array of shape {arr.shape}")
    if arr.size == 0:
        raise ReadError(f"{path}: the image is empty (shape {arr.shape})")
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() <= 65535:
        return arr.astype(np.uint16)
    if np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        with np.errstate(over="ignore"):  # values beyond float32's range become inf, and are counted below
            values = arr.astype(np.float32)
        bad = np.count_nonzero(~np.isfinite(values))
        if bad:
            raise ReadError(f"{path}: {bad} pixels are NaN or infinite (as float32); fill or mask them first")
        return values
    raise ReadError(f"{path}: unsupported pixel type {arr.dtype}")


def _single_channel(arr: np.ndarray, where: str, error: type[ValueError]) -> np.ndarray:
    """[H, W] from [H, W] or from [H, W, C] whose channels are all equal; anything else is an error."""
    if arr.ndim == 3 and all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[-1])):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise error(f"{where}: expected a single-channel 2-D image, got shape {arr.shape}")
    return arr


def _as_labels(arr: np.ndarray, where: str, error: type[ValueError] = ValueError) -> np.ndarray:
    """int32[H, W] from an integer, boolean or integral float [H, W] array of non-negative ids."""
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise error(f"{where}: a label image must be 2-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int32)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise error(f"{where}: label image has type {arr.dtype}, expected integers")
    if arr.size == 0:
        return arr.astype(np.int32)
    if np.issubdtype(arr.dtype, np.floating) and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise error(f"{where}: label image has non-integral values (type {arr.dtype})")
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise error(f"{where}: label image has negative ids (min {lo})")
    if hi > _INT32_MAX:
        raise error(f"{where}: label image has ids above {_INT32_MAX} (max {hi})")
    return arr.astype(np.int32, copy=False)


def read_labels(path: PathLike) -> np.ndarray:
    """An instance label image int32[H, W] from a PNG/TIFF/NPY file, or from a folder of binary masks."""
    path = pathlib.Path(path)
    if path.is_dir():
        return read_mask_folder(path)[0]
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:  # any failure to load means unreadable
            raise ReadError(f"{path}: cannot read array ({type(e).__name__}: {e})") from e
    else:
        arr = _single_channel(_pixels(path, expand_palette=False), str(path), ReadError)
    return _as_labels(arr, str(path), ReadError)


def read_shape(path: PathLike) -> tuple[int, int]:
    """(H, W) of an image or label file (from the header where the format allows) or of a mask folder."""
    path = pathlib.Path(path)
    if path.is_dir():
        files = _mask_files(path)
        if not files:
            raise ReadError(f"{path}: no mask files (.png/.tif/.tiff), so the image size is unknown")
        return read_shape(files[0])
    if path.suffix.lower() == ".npy":
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except Exception as e:  # any failure to load means unreadable
            raise ReadError(f"{path}: cannot read array ({type(e).__name__}: {e})") from e
        return shape[:2]
    if path.suffix.lower() in _TIFF:
        return read_image(path).shape[:2]
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception as e:  # any failure to read the header means unreadable
        raise ReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    return height, width


def _mask_content(path: pathlib.Path) -> tuple[tuple[int, int], np.ndarray, tuple[int, int]]:
    """((H, W), the mask cropped to its non-zero pixels, the crop's (top, left)); Pillow crops before copying."""
    if path.suffix.lower() not in _TIFF:
        try:
            with Image.open(path) as im:
                if im.mode in _PILLOW_SINGLE_CHANNEL:
                    box = im.getbbox() or (0, 0, 0, 0)
                    return (im.height, im.width), np.asarray(im.crop(box)), (box[1], box[0])
        except Exception as e:  # any decoder failure (missing, truncated, corrupt, unknown format) means unreadable
            raise ReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    mask = _single_channel(_pixels(path, expand_palette=False), str(path), ReadError)
    return mask.shape, mask, (0, 0)


def _mask_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The mask files of a folder (.png/.tif/.tiff, not hidden) in sorted order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _MASK_SUFFIXES and not p.name.startswith("."))


def read_mask_folder(
    folder: PathLike, *, image_path: PathLike | None = None, overlap: str = "error"
) -> tuple[np.ndarray, int]:
    """(int32[H, W] labels, number of empty masks): instance k = the k-th non-empty mask file in sorted order.

    Any non-zero pixel of a mask belongs to it. `overlap="error"` raises on a pixel claimed by two masks;
    `"first"` gives it to the earlier file (a mask covered entirely by earlier ones keeps its id but no pixels).
    Every mask must have the size of the first mask and of the image at `image_path` when given.
    """
    folder = pathlib.Path(folder)
    if overlap not in ("error", "first"):
        raise ValueError(f'overlap must be "error" or "first", got {overlap!r}')
    if not folder.is_dir():
        raise ReadError(f"{folder}: not a folder of masks")
    files = _mask_files(folder)
    shape, reference = (read_shape(image_path), pathlib.Path(image_path)) if image_path is not None else (None, None)
    if not files and shape is None:
        raise ReadError(f"{folder}: no mask files (.png/.tif/.tiff), so the image size is unknown")
    labels = np.zeros(np.prod(shape), np.int32) if shape is not None else None
    owners: list[pathlib.Path] = []
    n_empty = 0
    for file in files:
        mask_shape, content, (top, left) = _mask_content(file)
        if shape is None:
            shape, reference, labels = mask_shape, file, np.zeros(np.prod(mask_shape), np.int32)
        elif mask_shape != shape:
            raise ReadError(f"{file}: mask is {mask_shape[0]}x{mask_shape[1]} but {reference} is {shape[0]}x{shape[1]}")
        rows, cols = np.nonzero(content)
        if rows.size == 0:
            n_empty += 1
            continue
        values = content[rows, cols]
        pixels = (rows + top) * shape[1] + (cols + left)
        if values.min() != values.max():
            raise ReadError(f"{file}: not a binary mask (foreground values {values.min()} to {values.max()})")
        taken = labels[pixels]
        if taken.any():
            if overlap == "error":
                other = owners[taken[taken > 0][0] - 1]
                n = np.count_nonzero(taken)
                raise ReadError(f"{folder}: masks {other.name} and {file.name} overlap ({n} pixels claimed twice)")
            pixels = pixels[taken == 0]
        owners.append(file)
        labels[pixels] = len(owners)
    return labels.reshape(shape), n_empty


def write_labels(path: PathLike, labels: np.ndarray) -> None:
    """Write int[H, W] labels as a 16-bit PNG (ids <= 65535), an int32 TIFF, or an NPY file, by suffix."""
    path = pathlib.Path(path)
    labels = _as_labels(labels, str(path))
    suffix = path.suffix.lower()
    if suffix == ".png":
        if labels.size and labels.max() > 65535:
            raise ValueError(f"{path}: ids up to {labels.max()} do not fit a 16-bit PNG; write .tif or .npy")
        Image.fromarray(labels.astype(np.uint16)).save(path, format="PNG")
    elif suffix in _TIFF:
        tifffile.imwrite(path, labels, photometric="minisblack")
    elif suffix == ".npy":
        np.save(path, labels)
    else:
        raise ValueError(f"{path}: unknown label file type {suffix!r}; use one of {', '.join(LABEL_SUFFIXES)}")


def _runs(positions: np.ndarray) -> np.ndarray:
    """int64[R, 2] (1-based start, length) runs of sorted, distinct, 0-based flat positions."""
    if positions.size == 0:
        return np.zeros((0, 2), np.int64)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = positions[np.r_[0, breaks]]
    ends = positions[np.r_[breaks - 1, positions.size - 1]]
    return np.stack([starts + 1, ends - starts + 1], axis=1).astype(np.int64)


def _format_runs(runs: np.ndarray) -> str:
    """Kaggle's "start length start length ..." text of int[R, 2] runs."""
    return " ".join(map(str, runs.reshape(-1).tolist()))


def _parse_runs(rle: str, n_pixels: int) -> np.ndarray:
    """0-based column-major flat positions of Kaggle runs, checked: integer pairs, sorted, disjoint, in range."""
    values = []
    for token in rle.split():
        try:
            values.append(int(token))
        except ValueError:
            raise ValueError(f"RLE value {token!r} is not an integer") from None
    try:
        values = np.array(values, np.int64)
    except OverflowError:
        raise ValueError("RLE value out of range") from None
    if values.size % 2:
        raise ValueError(f"RLE has an odd number of values ({values.size}); expected 'start length' pairs")
    starts, lengths = values[0::2], values[1::2]
    if starts.size and starts.min() < 1:
        raise ValueError(f"RLE start {starts.min()} is below 1 (pixels are numbered from 1)")
    if lengths.size and lengths.min() < 1:
        i = int(np.argmin(lengths))
        raise ValueError(f"RLE run '{starts[i]} {lengths[i]}' has a length below 1")
    ends = starts + lengths - 1
    if ends.size and ends.max() > n_pixels:
        i = int(np.argmax(ends))
        raise ValueError(f"RLE run '{starts[i]} {lengths[i]}' ends at pixel {ends[i]}, beyond the {n_pixels} pixels")
    bad = np.flatnonzero(starts[1:] <= ends[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        raise ValueError(
            f"RLE run '{starts[i]} {lengths[i]}' overlaps or precedes run '{starts[i - 1]} {lengths[i - 1]}'; "
            "runs must be sorted and disjoint"
        )
    offsets = np.repeat(starts - 1 - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    return offsets + np.arange(offsets.size)


def _column_major(flat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """[H, W] C-ordered array from a column-major (Kaggle order) flat array."""
    return np.ascontiguousarray(flat.reshape(shape[1], shape[0]).T)


def rle_encode(mask: np.ndarray) -> str:
    """Kaggle DSB2018 run-length text of a [H, W] mask (non-zero = in): 1-based, column-major "start length" pairs."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode: mask must be 2-D, got shape {mask.shape}")
    return _format_runs(_runs(np.flatnonzero(mask.T)))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """bool[H, W] mask of Kaggle DSB2018 run-length text; malformed runs raise ValueError saying what is wrong."""
    height, width = shape
    flat = np.zeros(height * width, bool)
    flat[_parse_runs(rle, height * width)] = True
    return _column_major(flat, (height, width))


def _csv_size(row: dict, line: int, path: pathlib.Path, image_id: str) -> tuple[int, int]:
    """(Height, Width) of a CSV row, checked to be positive integers."""
    try:
        size = int(row["Height"]), int(row["Width"])
    except (TypeError, ValueError):
        raise ReadError(
            f"{path}: line {line} (ImageId {image_id}): Height/Width {row['Height']!r}, {row['Width']!r} "
            "are not integers"
        ) from None
    if min(size) < 1:
        raise ReadError(f"{path}: line {line} (ImageId {image_id}): Height/Width {size} must be positive")
    return size


def _read_csv_rows(path: pathlib.Path) -> tuple[dict[str, list[tuple[int, str]]], dict[str, tuple[int, int]]]:
    """({image id: [(line, rle), ...]}, {image id: (H, W)} from Height/Width columns if present) of an RLE CSV."""
    rows: dict[str, list[tuple[int, str]]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if "ImageId" not in fields or "EncodedPixels" not in fields:
                raise ReadError(f"{path}: an RLE CSV needs columns ImageId and EncodedPixels, found {fields}")
            has_size = "Height" in fields and "Width" in fields
            for row in reader:
                line, image_id = reader.line_num, (row["ImageId"] or "").strip()
                if not image_id:
                    raise ReadError(f"{path}: line {line}: empty ImageId")
                rows.setdefault(image_id, []).append((line, (row["EncodedPixels"] or "").strip()))
                if has_size:
                    size = _csv_size(row, line, path, image_id)
                    if sizes.setdefault(image_id, size) != size:
                        raise ReadError(
                            f"{path}: line {line} (ImageId {image_id}): size {size} differs from the "
                            f"size {sizes[image_id]} on earlier rows"
                        )
    except ReadError:
        raise
    except Exception as e:  # missing file, bad encoding, csv syntax: unreadable
        raise ReadError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from e
    return rows, sizes


def read_rle_csv(
    path: PathLike, shapes: Mapping[str, tuple[int, int]] | None = None, *, overlap: str = "error"
) -> dict[str, np.ndarray]:
    """{ImageId: int32[H, W] labels} from a Kaggle RLE CSV (one row per nucleus, id k = k-th non-empty row).

    Sizes come from Height/Width columns, else from `shapes`. An empty EncodedPixels means no nuclei.
    `overlap` as in `read_mask_folder`: "error" raises naming both rows, "first" gives pixels to the earlier row.
    """
    path = pathlib.Path(path)
    if overlap not in ("error", "first"):
        raise ValueError(f'overlap must be "error" or "first", got {overlap!r}')
    rows, sizes = _read_csv_rows(path)
    shapes = shapes or {}
    out = {}
    for image_id, image_rows in rows.items():
        if image_id in sizes and image_id in shapes and tuple(shapes[image_id]) != sizes[image_id]:
            raise ReadError(
                f"{path}: ImageId {image_id} is {sizes[image_id]} in the CSV but {tuple(shapes[image_id])} in shapes"
            )
        if image_id not in sizes and image_id not in shapes:
            raise ReadError(
                f"{path}: no size for ImageId {image_id}: the CSV has no Height/Width columns "
                "and no size was given for it"
            )
        height, width = sizes.get(image_id) or tuple(shapes[image_id])
        flat = np.zeros(height * width, np.int32)
        owner_lines: list[int] = []
        for line, rle in image_rows:
            if not rle:
                continue
            try:
                pixels = _parse_runs(rle, height * width)
            except ValueError as e:
                raise ReadError(f"{path}: line {line} (ImageId {image_id}): {e}") from None
            taken = flat[pixels]
            if taken.any():
                if overlap == "error":
                    other = owner_lines[taken[taken > 0][0] - 1]
                    raise ReadError(
                        f"{path}: line {line} (ImageId {image_id}): nucleus overlaps the one on line {other} "
                        f"({np.count_nonzero(taken)} pixels)"
                    )
                pixels = pixels[taken == 0]
            owner_lines.append(line)
            flat[pixels] = len(owner_lines)
        out[image_id] = _column_major(flat, (height, width))
    return out


def write_rle_csv(labels_by_id: Mapping[str, np.ndarray], path: PathLike, *, with_size: bool = True) -> None:
    """Write {ImageId: int[H, W] labels} as a Kaggle RLE CSV, one row per instance in id order.

    An image without instances gets one row with empty EncodedPixels; `with_size` adds Height/Width columns.
    """
    path = pathlib.Path(path)
    checked = {image_id: _as_labels(labels, f"labels_by_id[{image_id!r}]") for image_id, labels in labels_by_id.items()}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["ImageId", "EncodedPixels"] + (["Height", "Width"] if with_size else []))
        for image_id, labels in checked.items():
            size = list(labels.shape) if with_size else []
            flat = labels.T.reshape(-1)
            pixels = np.flatnonzero(flat)
            if pixels.size == 0:
                writer.writerow([image_id, ""] + size)
                continue
            ids = flat[pixels]
            order = np.argsort(ids, kind="stable")
            pixels, ids = pixels[order], ids[order]
            for instance in np.split(pixels, np.flatnonzero(np.diff(ids)) + 1):
                writer.writerow([image_id, _format_runs(_runs(instance))] + size)
