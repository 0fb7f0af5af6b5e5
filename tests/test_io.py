"""Tests for nucjax.data.io: image and label files, mask folders, Kaggle RLE."""

import pathlib
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from nucjax.data import io

# ---------------------------------------------------------------- Kaggle RLE

# Column-major numbering from 1 of a 3x4 image:    foreground pixels and their numbers:
#   1  4  7 10                                     (2,0)=3 (0,1)=4 (1,1)=5 (0,2)=7 (2,3)=12
#   2  5  8 11                                     runs: 3..5 -> "3 3", 7 -> "7 1", 12 -> "12 1"
#   3  6  9 12
HAND_MASK = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [1, 0, 0, 1]], bool)
HAND_RLE = "3 3 7 1 12 1"


def test_rle_encode_hand_computed_example():
    assert io.rle_encode(HAND_MASK) == HAND_RLE


def test_rle_decode_hand_computed_example():
    decoded = io.rle_decode(HAND_RLE, (3, 4))
    assert decoded.dtype == bool and decoded.shape == (3, 4)
    np.testing.assert_array_equal(decoded, HAND_MASK)


def test_rle_empty_and_full_masks():
    assert io.rle_encode(np.zeros((4, 5), bool)) == ""
    assert io.rle_encode(np.ones((4, 5), np.uint8)) == "1 20"
    assert not io.rle_decode("", (4, 5)).any()


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (13, 29), (64, 48)])
def test_rle_round_trip_on_random_masks(shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    for density in (0.05, 0.5, 0.95):
        mask = rng.random(shape) < density
        np.testing.assert_array_equal(io.rle_decode(io.rle_encode(mask), shape), mask)


def _reference_rle(mask: np.ndarray) -> str:
    """Kaggle's kernel formulation: pad the column-major pixels with zeros, runs between value changes."""
    pixels = np.concatenate([[0], mask.T.flatten().astype(int), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def test_rle_encode_matches_kaggle_kernel_formulation():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((17, 23)) < rng.random()
        assert io.rle_encode(mask) == _reference_rle(mask)


@pytest.mark.parametrize(
    "rle, message",
    [
        ("3 3 7", "odd number"),
        ("3 3 5 2", "overlaps or precedes"),
        ("7 1 3 3", "overlaps or precedes"),
        ("0 2", "below 1"),
        ("11 3", "beyond the 12 pixels"),
        ("3 0", "length below 1"),
        ("3 x", "not an integer"),
        ("3 1.5", "not an integer"),
    ],
)
def test_rle_decode_rejects_malformed_runs(rle, message):
    with pytest.raises(ValueError, match=message):
        io.rle_decode(rle, (3, 4))


def test_rle_decode_accepts_touching_runs():
    np.testing.assert_array_equal(io.rle_decode("3 2 5 1 7 1 12 1", (3, 4)), HAND_MASK)


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def test_read_rle_csv_hand_made(tmp_path):
    csv_path = _write(
        tmp_path / "s.csv",
        "ImageId,EncodedPixels,Height,Width,Usage\n"
        "b,3 3 7 1,3,4,Public\n"
        "a,,2,2,Public\n"
        "b,12 1,3,4,Public\n",
    )
    labels = io.read_rle_csv(csv_path)
    assert list(labels) == ["b", "a"]
    expected_b = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [1, 0, 0, 2]], np.int32)
    np.testing.assert_array_equal(labels["b"], expected_b)
    assert labels["b"].dtype == np.int32
    np.testing.assert_array_equal(labels["a"], np.zeros((2, 2), np.int32))


def test_read_rle_csv_sizes_from_shapes_argument(tmp_path):
    csv_path = _write(tmp_path / "s.csv", "ImageId,EncodedPixels\nb,3 3 7 1 12 1\n")
    with pytest.raises(io.ReadError, match="no size for ImageId b: the CSV has no Height/Width"):
        io.read_rle_csv(csv_path)
    np.testing.assert_array_equal(io.read_rle_csv(csv_path, {"b": (3, 4)})["b"], HAND_MASK.astype(np.int32))


def test_read_rle_csv_shapes_must_agree_with_columns(tmp_path):
    csv_path = _write(tmp_path / "s.csv", "ImageId,EncodedPixels,Height,Width\nb,3 3,3,4\n")
    with pytest.raises(io.ReadError, match="ImageId b"):
        io.read_rle_csv(csv_path, {"b": (4, 3)})


@pytest.mark.parametrize(
    "row, message",
    [
        ("b,3 3 7,3,4", "odd number"),
        ("b,7 1 3 3,3,4", "overlaps or precedes"),
        ("b,11 3,3,4", "beyond"),
        ("b,3 y,3,4", "not an integer"),
        ("b,3 3,three,4", "not integers"),
    ],
)
def test_read_rle_csv_malformed_row_names_line_and_image(tmp_path, row, message):
    csv_path = _write(tmp_path / "s.csv", f"ImageId,EncodedPixels,Height,Width\na,1 1,3,4\n{row}\n")
    with pytest.raises(io.ReadError, match=f"s.csv: line 3 \\(ImageId b\\).*{message}"):
        io.read_rle_csv(csv_path)


def test_read_rle_csv_overlapping_rows(tmp_path):
    csv_path = _write(tmp_path / "s.csv", "ImageId,EncodedPixels,Height,Width\nb,3 3,3,4\nb,4 4,3,4\n")
    with pytest.raises(io.ReadError, match="line 3 \\(ImageId b\\): nucleus overlaps the one on line 2"):
        io.read_rle_csv(csv_path)
    labels = io.read_rle_csv(csv_path, overlap="first")["b"]
    np.testing.assert_array_equal(labels.T.reshape(-1), [0, 0, 1, 1, 1, 2, 2, 0, 0, 0, 0, 0])


def test_read_rle_csv_inconsistent_sizes_and_missing_columns(tmp_path):
    with pytest.raises(io.ReadError, match="line 3 .*differs"):
        io.read_rle_csv(_write(tmp_path / "a.csv", "ImageId,EncodedPixels,Height,Width\nb,1 1,3,4\nb,5 1,4,4\n"))
    with pytest.raises(io.ReadError, match="needs columns ImageId and EncodedPixels"):
        io.read_rle_csv(_write(tmp_path / "b.csv", "Id,Pixels\nb,1 1\n"))
    with pytest.raises(io.ReadError, match="missing.csv"):
        io.read_rle_csv(tmp_path / "missing.csv")


def test_write_rle_csv_hand_made_text(tmp_path):
    labels = np.array([[0, 5, 5, 0], [0, 5, 0, 0], [2, 0, 0, 2]])
    io.write_rle_csv({"x": labels, "empty": np.zeros((2, 3), int)}, tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text() == (
        "ImageId,EncodedPixels,Height,Width\nx,3 1 12 1,3,4\nx,4 2 7 1,3,4\nempty,,2,3\n"
    )


def test_write_rle_csv_checks_every_image_before_writing(tmp_path):
    with pytest.raises(ValueError, match="labels_by_id\\['b'\\]: label image has negative ids"):
        io.write_rle_csv({"a": np.ones((2, 2), int), "b": -np.ones((2, 2), int)}, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_write_then_read_rle_csv_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    by_id = {f"img{i}": rng.choice([0, 0, 0, 3, 9, 70000], size=(11 + i, 7 + 2 * i)) for i in range(5)}
    by_id["none"] = np.zeros((5, 5), np.int32)
    for with_size in (True, False):
        io.write_rle_csv(by_id, tmp_path / "s.csv", with_size=with_size)
        shapes = None if with_size else {k: v.shape for k, v in by_id.items()}
        read = io.read_rle_csv(tmp_path / "s.csv", shapes)
        assert list(read) == list(by_id)
        for name, labels in by_id.items():
            relabelled = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)  # ids in order, 1..N
            np.testing.assert_array_equal(read[name], relabelled if labels.any() else labels)


# ---------------------------------------------------------------- label files


@pytest.mark.parametrize("suffix, top_id", [(".png", 65535), (".tif", 2**31 - 1), (".tiff", 70000), (".npy", 123456)])
def test_write_read_labels_round_trip(tmp_path, suffix, top_id):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 50, size=(19, 23)).astype(np.int32)
    labels[3, 4], labels[0, 0] = top_id, 300
    io.write_labels(tmp_path / f"l{suffix}", labels)
    read = io.read_labels(tmp_path / f"l{suffix}")
    assert read.dtype == np.int32
    np.testing.assert_array_equal(read, labels)


def test_png_labels_are_16_bit(tmp_path):
    labels = np.array([[0, 256], [1000, 65535]], np.int32)
    io.write_labels(tmp_path / "l.png", labels)
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(im), labels)


def test_tiff_labels_are_int32_single_page(tmp_path):
    io.write_labels(tmp_path / "l.tif", np.array([[0, 7], [70000, 1]]))
    with tifffile.TiffFile(tmp_path / "l.tif") as tif:
        assert len(tif.pages) == 1 and tif.pages[0].dtype == np.int32 and tif.pages[0].shape == (2, 2)


def test_write_labels_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="do not fit a 16-bit PNG"):
        io.write_labels(tmp_path / "l.png", np.array([[0, 65536]]))
    with pytest.raises(ValueError, match="negative"):
        io.write_labels(tmp_path / "l.tif", np.array([[0, -1]]))
    with pytest.raises(ValueError, match="non-integral"):
        io.write_labels(tmp_path / "l.npy", np.array([[0, 1.5]]))
    with pytest.raises(ValueError, match="unknown label file type '.jpg'"):
        io.write_labels(tmp_path / "l.jpg", np.array([[0, 1]]))
    with pytest.raises(ValueError, match="2-D"):
        io.write_labels(tmp_path / "l.npy", np.zeros((2, 2, 2), int))


def test_read_labels_other_encodings(tmp_path):
    ids = np.array([[0, 1, 2], [3, 200, 0]], np.uint8)
    Image.fromarray(ids).save(tmp_path / "grey8.png")
    palette = Image.fromarray(ids, mode="L").convert("P")
    palette.putpalette([255 - (i % 256) for i in range(768)])
    palette.save(tmp_path / "palette.png")
    Image.fromarray(np.stack([ids] * 3, -1)).save(tmp_path / "rgb_grey.png")
    np.save(tmp_path / "float.npy", ids.astype(np.float32))
    tifffile.imwrite(tmp_path / "u16.tif", ids.astype(np.uint16))
    for name in ("grey8.png", "palette.png", "rgb_grey.png", "float.npy", "u16.tif"):
        read = io.read_labels(tmp_path / name)
        assert read.dtype == np.int32, name
        np.testing.assert_array_equal(read, ids, err_msg=name)


def test_read_labels_rejects_non_label_images(tmp_path):
    colour = np.zeros((2, 3, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    np.save(tmp_path / "neg.npy", np.array([[0, -2]]))
    np.save(tmp_path / "str.npy", np.array([["a", "b"]]))
    for name, message in [("colour.png", "single-channel"), ("neg.npy", "negative"), ("str.npy", "expected integers")]:
        with pytest.raises(io.ReadError, match=f"{name}: .*{message}"):
            io.read_labels(tmp_path / name)


# ---------------------------------------------------------------- images


def _png16(path: pathlib.Path, arr: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): colour_type 0 grey, 2 RGB, 6 RGBA."""
    height, width = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(6, 5, 3)).astype(np.uint8)


def test_read_image_grey_rgb_rgba(tmp_path, rgb):
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((6, 5, 1), 17, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., [0, 3]]).save(tmp_path / "grey_alpha.png")
    grey = rgb[..., 0]
    for name, expected in [("grey.png", grey), ("rgb.png", rgb), ("rgba.png", rgb), ("grey_alpha.png", grey)]:
        image = io.read_image(tmp_path / name)
        assert image.dtype == np.uint8, name
        np.testing.assert_array_equal(image, expected, err_msg=name)


def test_read_image_16_bit(tmp_path):
    grey16 = (np.arange(20).reshape(4, 5) * 3000).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    _png16(tmp_path / "hand16.png", grey16, 0)
    tifffile.imwrite(tmp_path / "rgb16.tif", np.stack([grey16, grey16 + 1, grey16 + 2], -1))
    planes = np.stack([grey16, grey16 + 1, grey16 + 2])
    tifffile.imwrite(tmp_path / "planar.tif", planes, planarconfig="separate", photometric="rgb")
    for name in ("grey16.png", "hand16.png"):
        image = io.read_image(tmp_path / name)
        assert image.dtype == np.uint16
        np.testing.assert_array_equal(image, grey16)
    for name in ("rgb16.tif", "planar.tif"):
        image = io.read_image(tmp_path / name)
        assert image.dtype == np.uint16 and image.shape == (4, 5, 3), name
        np.testing.assert_array_equal(image[..., 2], grey16 + 2)


def test_read_image_refuses_16_bit_colour_png(tmp_path):
    _png16(tmp_path / "rgb16.png", np.zeros((2, 3, 3), np.uint16) + 4000, 2)
    with pytest.raises(io.ReadError, match="rgb16.png: 16-bit colour PNG"):
        io.read_image(tmp_path / "rgb16.png")


def test_read_image_palette_expanded(tmp_path):
    indices = np.array([[0, 1], [2, 1]], np.uint8)
    colours = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], np.uint8)
    image = Image.fromarray(indices, mode="L").convert("P")
    image.putpalette(colours.reshape(-1).tolist())
    image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "palette.png"), colours[indices])


def test_read_image_bilevel_float_and_jpeg(tmp_path, rgb):
    Image.fromarray(rgb[..., 0] > 128).save(tmp_path / "bilevel.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "bilevel.png"), (rgb[..., 0] > 128) * 255)
    values = np.linspace(-1, 1, 12, dtype=np.float64).reshape(3, 4)
    tifffile.imwrite(tmp_path / "float.tif", values)
    image = io.read_image(tmp_path / "float.tif")
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, values, rtol=1e-6)
    flat = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    Image.fromarray(flat).save(tmp_path / "flat.jpg", quality=95)
    image = io.read_image(tmp_path / "flat.jpg")
    assert image.shape == (16, 16, 3) and np.abs(image.astype(int) - flat).max() <= 3


def test_read_image_rejects_stacks(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 4, 6), np.uint8))
    with pytest.raises(io.ReadError, match="stack.tif: expected a 2-D"):
        io.read_image(tmp_path / "stack.tif")


@pytest.mark.filterwarnings("ignore:.*writing zero-size array")
def test_read_image_rejects_non_finite_and_empty_images(tmp_path):
    values = np.ones((3, 4), np.float64)
    values[0, 1], values[2, 2], values[1, 3] = np.nan, np.inf, 1e300  # 1e300 overflows float32
    tifffile.imwrite(tmp_path / "holes.tif", values)
    with pytest.raises(io.ReadError, match="holes.tif: 3 pixels are NaN or infinite"):
        io.read_image(tmp_path / "holes.tif")
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros((0, 5), np.uint8))
    with pytest.raises(io.ReadError, match=r"empty.tif: the image is empty \(shape \(0, 5\)\)"):
        io.read_image(tmp_path / "empty.tif")


@pytest.mark.parametrize("name", ["garbage.png", "garbage.tif", "garbage.npy", "garbage.jpg"])
def test_corrupt_files_raise_read_error_naming_the_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not an image at all" * 10)
    reader = io.read_labels if name.endswith(".npy") else io.read_image
    with pytest.raises(io.ReadError, match=name):
        reader(tmp_path / name)


def test_truncated_and_missing_files_raise_read_error(tmp_path, rgb):
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    for path in (tmp_path / "t.png", tmp_path / "missing.png"):
        with pytest.raises(io.ReadError, match=path.name):
            io.read_image(path)
        with pytest.raises(io.ReadError, match=path.name):
            io.read_labels(path)


def test_read_shape(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", rgb)
    np.save(tmp_path / "a.npy", rgb[..., 0])
    for name in ("a.png", "a.tif", "a.npy"):
        assert io.read_shape(tmp_path / name) == (6, 5), name


# ---------------------------------------------------------------- mask folders


def _square(shape, top, left, size, value=255) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top : top + size, left : left + size] = value
    return mask


@pytest.fixture
def mask_folder(tmp_path) -> pathlib.Path:
    """Masks written out of sorted order: c (square at 5,5), a (square at 0,0, values 1), b (empty)."""
    folder = tmp_path / "masks"
    folder.mkdir()
    Image.fromarray(_square((10, 12), 5, 5, 3)).save(folder / "c.png")
    Image.fromarray(_square((10, 12), 0, 0, 2, value=1)).save(folder / "a.png")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(folder / "b.png")
    (folder / "notes.txt").write_text("not a mask")
    return folder


def test_read_mask_folder_order_and_empty_count(mask_folder):
    labels, n_empty = io.read_mask_folder(mask_folder)
    expected = np.zeros((10, 12), np.int32)
    expected[0:2, 0:2] = 1  # a.png
    expected[5:8, 5:8] = 2  # c.png (b.png is empty and skipped)
    assert labels.dtype == np.int32 and n_empty == 1
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(io.read_labels(mask_folder), expected)


def test_read_mask_folder_tiff_and_bilevel_masks(tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    tifffile.imwrite(folder / "1.tif", _square((6, 7), 1, 1, 2).astype(bool))
    Image.fromarray(_square((6, 7), 3, 4, 2) > 0).save(folder / "2.png")
    labels, n_empty = io.read_mask_folder(folder)
    np.testing.assert_array_equal(labels, (_square((6, 7), 1, 1, 2) > 0) + 2 * (_square((6, 7), 3, 4, 2) > 0))
    assert n_empty == 0


def test_read_mask_folder_overlap(mask_folder):
    Image.fromarray(_square((10, 12), 1, 1, 5)).save(mask_folder / "b2.png")  # overlaps a (1 px) and c (1 px)
    with pytest.raises(io.ReadError, match="masks a.png and b2.png overlap \\(1 pixels"):
        io.read_mask_folder(mask_folder)
    labels, n_empty = io.read_mask_folder(mask_folder, overlap="first")
    expected = np.zeros((10, 12), np.int32)
    expected[1:6, 1:6] = 2  # b2.png, sorted before c.png
    expected[0:2, 0:2] = 1  # a.png keeps its pixel
    expected[5:8, 5:8][expected[5:8, 5:8] == 0] = 3  # c.png loses (5, 5) to b2.png
    np.testing.assert_array_equal(labels, expected)
    assert n_empty == 1


def test_read_mask_folder_size_mismatch_names_both_files(mask_folder, tmp_path):
    Image.fromarray(_square((10, 13), 0, 0, 1)).save(mask_folder / "d.png")
    with pytest.raises(io.ReadError, match="d.png: mask is 10x13 but .*a.png is 10x12"):
        io.read_mask_folder(mask_folder)
    (mask_folder / "d.png").unlink()
    Image.fromarray(np.zeros((9, 12, 3), np.uint8)).save(tmp_path / "image.png")
    with pytest.raises(io.ReadError, match="a.png: mask is 10x12 but .*image.png is 9x12"):
        io.read_mask_folder(mask_folder, image_path=tmp_path / "image.png")


def test_read_mask_folder_bad_masks(mask_folder, tmp_path):
    two_values = _square((10, 12), 0, 9, 2, value=7) + _square((10, 12), 8, 9, 2, value=9)
    Image.fromarray(two_values).save(mask_folder / "d.png")
    with pytest.raises(io.ReadError, match="d.png: not a binary mask"):
        io.read_mask_folder(mask_folder)
    (mask_folder / "d.png").write_bytes(b"corrupt")
    with pytest.raises(io.ReadError, match="d.png: cannot read"):
        io.read_mask_folder(mask_folder)
    with pytest.raises(ValueError, match="overlap must be"):
        io.read_mask_folder(mask_folder, overlap="last")


def test_read_mask_folder_without_masks(tmp_path):
    (tmp_path / "masks").mkdir()
    with pytest.raises(io.ReadError, match="no mask files"):
        io.read_mask_folder(tmp_path / "masks")
    Image.fromarray(np.zeros((4, 3), np.uint8)).save(tmp_path / "image.png")
    labels, n_empty = io.read_mask_folder(tmp_path / "masks", image_path=tmp_path / "image.png")
    np.testing.assert_array_equal(labels, np.zeros((4, 3), np.int32))
    assert n_empty == 0


def test_read_mask_folder_on_dsb2018_label_k_is_mask_file_k(dsb2018):
    root = dsb2018 / "stage1_train"
    for image_id in sorted(p.name for p in root.iterdir())[:3]:
        files = sorted((root / image_id / "masks").glob("*.png"))
        image = root / image_id / "images" / f"{image_id}.png"
        labels, n_empty = io.read_mask_folder(root / image_id / "masks", image_path=image)
        assert n_empty == 0 and labels.max() == len(files)
        for k, file in enumerate(files, start=1):
            with Image.open(file) as im:
                np.testing.assert_array_equal(labels == k, np.asarray(im) > 0, err_msg=str(file))
