"""Tests of nucjax.predict (the command line end to end on a tiny trained checkpoint) and of tiled prediction."""

import csv
import pathlib
import shutil

import jax
import numpy as np
import pytest
import tifffile
from PIL import Image

from nucjax import checkpoint, predict, variants
from nucjax.data import io, synthetic
from nucjax.inference import Predictor
from tests.conftest import tiny_config


def _grey16(seed: int, height: int, width: int) -> np.ndarray:
    image, _ = synthetic.generate(seed, height=height, width=width)
    return (image.mean(axis=2) * 200).astype(np.uint16)


@pytest.fixture()
def inputs(tmp_path) -> list[pathlib.Path]:
    """Three small images: an RGB PNG wider than one 64² tile, a 16-bit grey TIFF and an RGB JPEG, in imgs/."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb, _ = synthetic.generate(1, height=96, width=80)
    Image.fromarray(rgb).save(folder / "a.png")
    tifffile.imwrite(folder / "b.tif", _grey16(2, 48, 56))
    Image.fromarray(synthetic.generate(3, height=64, width=64)[0]).save(folder / "c.jpg", quality=95)
    return [folder / "a.png", folder / "b.tif", folder / "c.jpg"]


@pytest.fixture(scope="module")
def predictor(trained_workdir) -> Predictor:
    return checkpoint.load(trained_workdir)


def _run(capfd, *argv) -> tuple[int, str]:
    code = predict.main([str(a) for a in argv])
    return code, capfd.readouterr().err


def _same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b have the same background and a one-to-one correspondence of ids."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def _decode_rle_csv(path: pathlib.Path, shapes: dict) -> tuple[dict[str, np.ndarray], list[dict]]:
    """A reference decoder of Kaggle RLE rows (1-based starts, column-major, one row per nucleus); and the rows."""
    out = {name: np.zeros(np.prod(shape), np.int32) for name, shape in shapes.items()}
    counts = dict.fromkeys(shapes, 0)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if not row["EncodedPixels"]:
            continue
        counts[row["ImageId"]] += 1
        runs = np.array(row["EncodedPixels"].split(), int).reshape(-1, 2)
        for start, length in runs:
            out[row["ImageId"]][start - 1:start - 1 + length] = counts[row["ImageId"]]
    return {name: flat.reshape(shapes[name][::-1]).T for name, flat in out.items()}, rows


def _outline_reference(labels: np.ndarray) -> np.ndarray:
    """Labelled pixels with a 4-neighbour inside the image holding a different value."""
    edge = np.zeros(labels.shape, bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge & (labels > 0)


def _check_table(path: pathlib.Path, labels: np.ndarray, image: np.ndarray) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    ids = np.unique(labels[labels > 0])
    assert [int(r["label"]) for r in rows] == ids.tolist()
    area = np.bincount(labels.ravel())
    grey = image if image.ndim == 2 else image[..., 0]
    intensity = np.bincount(labels.ravel(), weights=grey.ravel().astype(float))
    rr, cc = np.indices(labels.shape)
    for r in rows:
        k = int(r["label"])
        ys, xs = rr[labels == k], cc[labels == k]
        assert float(r["area"]) == area[k]
        assert float(r["centroid-0"]) == pytest.approx(ys.mean()) and float(r["centroid-1"]) == pytest.approx(xs.mean())
        assert [int(r[f"bbox-{i}"]) for i in range(4)] == [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
        assert float(r["equivalent_diameter_area"]) == pytest.approx(np.sqrt(4 * area[k] / np.pi))
        mean_key = "intensity_mean" if image.ndim == 2 else "intensity_mean-0"
        assert float(r[mean_key]) == pytest.approx(intensity[k] / area[k])
        assert 0 <= float(r["eccentricity"]) <= 1 and 0 < float(r["solidity"]) <= 1


def test_cli_writes_labels_overlay_table_and_rle(tmp_path, inputs, predictor, trained_workdir, capfd):
    out, rle = tmp_path / "out", tmp_path / "sub.csv"
    code, err = _run(capfd, "--checkpoint", trained_workdir, "--input", *inputs, "--output", out,
                     "--overlay", "--table", "--rle", rle)
    assert code == 0, err
    assert "img/s" in err or "s/img" in err  # the progress bar
    written, shapes = {}, {}
    for path in inputs:
        image = io.read_image(path)
        labels = tifffile.imread(out / f"{path.stem}.tif")
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, predictor.predict(image))
        written[path.stem], shapes[path.stem] = labels, labels.shape
        _check_table(out / f"{path.stem}.csv", labels, image)

        shown = np.asarray(Image.open(out / f"{path.stem}_overlay.png"))
        assert shown.shape == (*labels.shape, 3) and shown.dtype == np.uint8
        edge = _outline_reference(labels)
        np.testing.assert_array_equal(shown[edge], predict.label_colours(labels.max())[labels[edge]])
        np.testing.assert_array_equal(shown[~edge], predict.display_image(image)[~edge])
    assert written["a"].max() >= 5  # the checks above saw real nuclei
    decoded, rows = _decode_rle_csv(rle, shapes)
    assert list(rows[0]) == ["ImageId", "EncodedPixels"]  # Kaggle's submission columns
    for stem, labels in written.items():
        assert _same_up_to_renumbering(decoded[stem], labels)


def test_overlay_outlines_each_nucleus_in_its_own_colour():
    labels = np.zeros((8, 9), np.int32)
    labels[1:4, 1:4] = 1
    labels[1:4, 4:7] = 2  # touches nucleus 1
    labels[5:8, 2:5] = 3  # touches the bottom edge of the image
    image = np.zeros((8, 9), np.uint8)
    image[::2] = 255  # percentiles 0 and 255: the display image is the image itself
    shown = predict.overlay(image, labels)
    colours = predict.label_colours(3)
    assert len({tuple(c) for c in colours[1:]}) == 3
    expected = np.repeat(image[..., None], 3, axis=2)
    edge = _outline_reference(labels)
    expected[edge] = colours[labels[edge]]
    np.testing.assert_array_equal(shown, expected)
    assert edge[2, 3] and edge[2, 4] and not edge[2, 2] and not edge[7, 3]  # shared edge in, image edge out


def test_measure_matches_numpy_on_a_hand_made_image():
    labels = np.zeros((6, 7), np.int32)
    labels[0:2, 0:3] = 1
    labels[3:6, 4:6] = 2
    image = np.arange(42, dtype=np.uint8).reshape(6, 7)
    table = predict.measure(labels, image)
    np.testing.assert_array_equal(table["area"], [6, 6])
    np.testing.assert_allclose(table["centroid-0"], [0.5, 4.0])
    np.testing.assert_allclose(table["centroid-1"], [1.0, 4.5])
    np.testing.assert_allclose(table["intensity_mean"], [image[0:2, 0:3].mean(), image[3:6, 4:6].mean()])
    with pytest.raises(ValueError, match="do not match"):
        predict.measure(labels, image[:5])


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_cli_formats_steps_folders_and_globs(tmp_path, inputs, trained_workdir, capfd, fmt):
    out = tmp_path / "out"
    folder, glob = [inputs[0].parent], [str(inputs[0].parent / "*.png"), inputs[1]]
    step, given = ("2", folder) if fmt == "png" else ("latest", glob)
    code, err = _run(capfd, "--checkpoint", trained_workdir, "--input", *given, "--output", out, "--format", fmt,
                     "--step", step)
    assert code == 0, err
    expected = checkpoint.load(trained_workdir, step=int(step) if step.isdigit() else step)
    stems = sorted(p.stem for p in (inputs if fmt == "png" else inputs[:2]))
    assert sorted(p.stem for p in out.iterdir()) == stems and all(p.suffix == f".{fmt}" for p in out.iterdir())
    for path in inputs:
        if path.stem in stems:
            np.testing.assert_array_equal(io.read_labels(out / f"{path.stem}.{fmt}"),
                                          expected.predict(io.read_image(path)))


def test_cli_tile_options_and_tta(tmp_path, inputs, trained_workdir, capfd):
    out = tmp_path / "out"
    code, err = _run(capfd, "--checkpoint", trained_workdir, "--input", inputs[0], "--output", out,
                     "--tile-size", 32, "--tile-overlap", 8, "--tta")
    assert code == 0, err
    expected = checkpoint.load(trained_workdir, tile_size=32, tile_overlap=8, tta=True)
    default = checkpoint.load(trained_workdir)
    image = io.read_image(inputs[0])
    labels = tifffile.imread(out / "a.tif")
    np.testing.assert_array_equal(labels, expected.predict(image))
    assert not np.array_equal(labels, default.predict(image))  # the options changed the prediction


def test_cli_input_scale(tmp_path, inputs, trained_workdir, capfd):
    out = tmp_path / "out"
    code, err = _run(capfd, "--checkpoint", trained_workdir, "--input", inputs[0], "--output", out, "--input-scale", 2)
    assert code == 0, err
    image = io.read_image(inputs[0])
    labels = tifffile.imread(out / "a.tif")
    assert labels.shape == image.shape[:2]
    np.testing.assert_array_equal(labels, checkpoint.load(trained_workdir, input_scale=2.0).predict(image))
    with pytest.raises(SystemExit) as stop:  # argparse: usage and the message, exit status 2
        predict.main(["--checkpoint", str(trained_workdir), "--input", str(inputs[0]), "--output", str(tmp_path / "o2"),
                      "--input-scale", "0"])
    assert stop.value.code == 2 and "--input-scale: '0': expected a number > 0" in capfd.readouterr().err


def test_unreadable_inputs_are_reported_and_skipped(tmp_path, inputs, trained_workdir, capfd):
    broken, missing = tmp_path / "broken.png", tmp_path / "missing.tif"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    code, err = _run(capfd, "--checkpoint", trained_workdir, "--input", broken, inputs[0], missing, "--output", out)
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and str(broken) in lines[0] and str(missing) in lines[1]
    assert sorted(p.name for p in out.iterdir()) == ["a.tif"]


def test_existing_outputs_are_not_overwritten_without_overwrite(tmp_path, inputs, trained_workdir, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.tif").write_bytes(b"keep me")
    # a bad checkpoint path shows that the existing file is found before any work is done
    code, err = _run(capfd, "--checkpoint", tmp_path / "nowhere", "--input", *inputs, "--output", out)
    assert code != 0 and str(out / "b.tif") in err and "--overwrite" in err and "nowhere" not in err
    assert sorted(p.name for p in out.iterdir()) == ["b.tif"] and (out / "b.tif").read_bytes() == b"keep me"

    rle = tmp_path / "sub.csv"
    rle.write_text("keep")
    code, err = _run(capfd, "--checkpoint", trained_workdir, "--input", inputs[0], "--output", tmp_path / "o2",
                     "--rle", rle)
    assert code != 0 and str(rle) in err and rle.read_text() == "keep"

    code, err = _run(capfd, "--checkpoint", trained_workdir, "--input", *inputs, "--output", out, "--overwrite")
    assert code == 0, err
    assert tifffile.imread(out / "b.tif").dtype == np.int32


def test_bad_checkpoint_gives_one_line_naming_the_path(tmp_path, inputs, trained_workdir, capfd):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained_workdir, corrupt)
    for meta in corrupt.glob("checkpoints/*/meta/metadata"):
        meta.write_text("{not json")
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (tmp_path / "nowhere", empty, corrupt):
        code, err = _run(capfd, "--checkpoint", bad, "--input", inputs[0], "--output", tmp_path / "out")
        assert code != 0
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and str(bad) in err


def test_inputs_that_would_collide_or_match_nothing_are_errors(tmp_path, inputs, trained_workdir, capfd):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(inputs[0], other / "a.png")
    code, err = _run(capfd, "--checkpoint", trained_workdir, "--input", inputs[0], other, "--output", tmp_path / "o")
    assert code != 0 and str(inputs[0]) in err and str(other / "a.png") in err
    code, err = _run(capfd, "--checkpoint", trained_workdir, "--input", str(tmp_path / "*.jpeg"), "--output",
                     tmp_path / "o")
    assert code != 0 and "*.jpeg" in err and "no " in err
    assert not (tmp_path / "o").exists()


# ---- tiled prediction ----

# The tiny U-Net (depth 2) has a receptive field 45 px wide (radius 22, measured from an impulse response); tiles of
# 128 overlapping by 96 >= 4 x 22 leave every pixel at least 22 px inside some tile's fully weighted part.
TILE, OVERLAP = 128, 96


def test_tiled_prediction_equals_untiled(data_dir):
    """An image 3 x 5 tiles large with random blobs crossing the seams: tiled maps and labels equal the untiled ones.

    The model has no normalisation ("none"): GroupNorm statistics depend on the tile, so a GroupNorm model's tiles
    cannot equal the whole image exactly; BatchNorm at inference (running averages) would do as well as "none".
    """
    config = tiny_config(data_dir, "model.norm=none", "variant=unet_mask")
    module = variants.get(config.variant).model(config)
    variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 3), np.float32), train=False)
    image, _ = synthetic.generate(0, height=192, width=256)
    whole = Predictor(config, variables, tile_size=256, tile_overlap=0)
    maps = whole.predict_outputs(image)["maps"]
    params = {"threshold": float(np.median(maps)), "min_size": 5}  # a random network: blobs on half the image
    tiled = Predictor(config, variables, postprocess=params, tile_size=TILE, tile_overlap=OVERLAP, tile_batch=16)
    expected = whole.to_instances({"maps": maps}, params)

    # Tiles start every TILE - OVERLAP = 32 pixels: lines every 16 pixels cross every tile edge and the middles.
    cuts = [(0, e) for e in range(16, 192, 16)] + [(1, e) for e in range(16, 256, 16)]
    crossing = {int(k) for axis, e in cuts
                for k in np.intersect1d(np.take(expected, e - 1, axis), np.take(expected, e, axis)) if k}
    assert len(crossing) >= 5

    tiled_maps = tiled.predict_outputs(image)["maps"]
    np.testing.assert_allclose(tiled_maps, maps, atol=1e-5, rtol=0)
    assert _same_up_to_renumbering(tiled.predict(image), expected)


def _magnify_twice(x: np.ndarray) -> np.ndarray:
    """Bilinear 2x magnification of [H, W, C] at pixel centres (output i samples (i + 0.5) / 2 - 0.5, edges held)."""
    for axis in (0, 1):
        n = x.shape[axis]
        src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        low = np.floor(src).astype(int)
        high, frac = np.minimum(low + 1, n - 1), src - low
        shape = [1, 1, 1]
        shape[axis] = 2 * n
        x = np.take(x, low, axis) * (1 - frac).reshape(shape) + np.take(x, high, axis) * frac.reshape(shape)
    return x


def test_input_scale_runs_the_network_on_the_magnified_image(data_dir):
    """input_scale=2: the network sees the bilinear 2x magnification, and its maps come back as the means of 2x2
    blocks, at the image's size; predict_many gives what predict does."""
    config = tiny_config(data_dir, "model.norm=none", "variant=unet_mask")
    module = variants.get(config.variant).model(config)
    variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 3), np.float32), train=False)
    image, _ = synthetic.generate(0, height=40, width=56)
    plain = Predictor(config, variables, tile_size=128, tile_overlap=0)
    scaled = Predictor(config, variables, tile_size=128, tile_overlap=0, input_scale=2.0)
    big = _magnify_twice(plain._normalize(image))
    x, factors = scaled.network_input(image)
    np.testing.assert_allclose(x, big, atol=1e-5)
    np.testing.assert_array_equal(factors, [2.0, 2.0])

    maps_big = plain._padded_run(big[None].astype(np.float32))[0]
    expected = maps_big.reshape(40, 2, 56, 2, -1).mean(axis=(1, 3))
    maps = scaled.predict_outputs(image)["maps"]
    assert maps.shape == (40, 56, 1)
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    assert not np.allclose(maps, plain.predict_outputs(image)["maps"], atol=1e-3)  # a different view, indeed
    params = {"threshold": float(np.median(maps)), "min_size": 3}
    scaled.postprocess_params.update(params)
    many = scaled.predict_many([image, image[::-1].copy()])
    np.testing.assert_array_equal(many[0], scaled.predict(image))
    np.testing.assert_array_equal(many[1], scaled.predict(image[::-1].copy()))
    with pytest.raises(ValueError, match="input_scale must be a number > 0, got 0.0"):
        Predictor(config, variables, input_scale=0.0)


def _view(x: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """One of the 8 symmetries of the square applied to an image [H, W, ...]: `turns` quarter turns, then a mirror."""
    x = np.rot90(x, turns, axes=(0, 1))
    return np.ascontiguousarray(x[:, ::-1] if flip else x)


def _unview(y: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """The inverse of `_view`: mirror back, then turn back."""
    return np.rot90(y[:, ::-1] if flip else y, -turns, axes=(0, 1))


def test_tta_averages_the_eight_flips_and_rotations(data_dir):
    """predict.tta: the maps are the mean of the plain network's maps of the 8 views of the image, each turned back;
    hence a rotated or mirrored image gives rotated or mirrored maps, which the plain network's are not."""
    config = tiny_config(data_dir, "variant=unet_boundary")  # two map channels, GroupNorm
    module = variants.get(config.variant).model(config)
    variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 3), np.float32), train=False)
    image, _ = synthetic.generate(0, height=48, width=64)  # not square; sides multiples of the stride (no padding)
    plain = Predictor(config, variables, tile_size=128, tile_overlap=0)
    tta = Predictor(config, variables, tile_size=128, tile_overlap=0, tta=True)
    views = [(turns, flip) for turns in range(4) for flip in (False, True)]
    expected = np.mean([_unview(plain.predict_outputs(_view(image, *v))["maps"], *v) for v in views], axis=0)
    maps = tta.predict_outputs(image)["maps"]
    assert maps.shape == (48, 64, 2)
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    for v in views[1:]:
        np.testing.assert_allclose(tta.predict_outputs(_view(image, *v))["maps"], _view(maps, *v), atol=1e-5)
    turned = plain.predict_outputs(_view(image, 1, False))["maps"]
    assert not np.allclose(turned, _view(plain.predict_outputs(image)["maps"], 1, False), atol=1e-3)


def test_tile_ownership_cuts_each_overlap_in_the_middle():
    from nucjax.inference import tile_ownership

    assert tile_ownership(160, 64, 32) == [(0, 0.0, 48.0), (32, 48.0, 80.0), (64, 80.0, 112.0), (96, 112.0, 160.0)]
    # The last tile ends at the image border: overlaps of 32 then 60 pixels, cut at 48 and 66.
    assert tile_ownership(100, 64, 32) == [(0, 0.0, 48.0), (32, 48.0, 66.0), (36, 66.0, 100.0)]
    assert tile_ownership(50, 64, 32) == [(0, 0.0, 50.0)]  # smaller than a tile: one tile owns it all


def test_predictor_refuses_images_it_cannot_segment_and_misspelt_steps(predictor, trained_workdir):
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    image[3, 4] = np.nan  # one NaN would make every percentile, hence every pixel, NaN: nothing found, silently
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        predictor.predict(image)
    with pytest.raises(ValueError, match=r"image is empty: shape \(0, 10\)"):
        predictor.predict(np.zeros((0, 10), np.uint8))
    with pytest.raises(checkpoint.CheckpointError, match="'best', 'latest' or a step number, got 'bset'"):
        checkpoint.load(trained_workdir, step="bset")
