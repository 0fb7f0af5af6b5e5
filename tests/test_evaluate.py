"""Tests for python -m nucjax.evaluate on small fixtures in every input form."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nucjax import evaluate, metrics
from nucjax.data import io

NAMES = ("img_a", "img_b", "img_c", "img_d")


def _labels(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """int32 labels 1..k of up to n non-overlapping rectangles (ids in raster order of their corners)."""
    labels = np.zeros(shape, np.int32)
    for _ in range(n):
        top, left = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        h, w = rng.integers(2, 7, size=2)
        if not labels[top : top + h, left : left + w].any():
            labels[top : top + h, left : left + w] = labels.max() + 1
    return labels


@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (gt, pred)}: pred is gt shifted by one pixel with one object dropped and one added; img_d is empty."""
    rng = np.random.default_rng(0)
    out = {}
    for i, name in enumerate(NAMES):
        shape = (24 + 4 * i, 32 - 2 * i)
        gt = _labels(rng, shape, 0 if name == "img_d" else 6)
        pred = np.roll(gt, 1, axis=int(i % 2))
        pred[pred == 2] = 0
        pred[-3:, -3:] = 0 if name == "img_d" else 9
        out[name] = (gt, pred)
    return out


def _expected(pairs, names=NAMES, thresholds=metrics.DEFAULT_THRESHOLDS) -> dict:
    gts, preds = [pairs[n][0] for n in names], [pairs[n][1] for n in names]
    report = metrics.evaluate(gts, preds, names=list(names), thresholds=thresholds)
    return json.loads(json.dumps(report.to_dict()))


def _label_folder(folder: pathlib.Path, by_name: dict[str, np.ndarray], suffixes=(".png",)) -> pathlib.Path:
    folder.mkdir()
    for i, (name, labels) in enumerate(by_name.items()):
        io.write_labels(folder / f"{name}{suffixes[i % len(suffixes)]}", labels)
    return folder


def _kaggle_folder(folder: pathlib.Path, by_name: dict[str, np.ndarray]) -> pathlib.Path:
    """<id>/images/<id>.png and <id>/masks/<k>.png (mask k = id k, plus one empty mask file)."""
    for name, labels in by_name.items():
        (folder / name / "masks").mkdir(parents=True)
        (folder / name / "images").mkdir()
        Image.fromarray(np.zeros(labels.shape + (4,), np.uint8)).save(folder / name / "images" / f"{name}.png")
        for k in range(1, labels.max() + 1):
            Image.fromarray(((labels == k) * 255).astype(np.uint8)).save(folder / name / "masks" / f"m{k:03d}.png")
        if labels.any():
            Image.fromarray(np.zeros(labels.shape, np.uint8)).save(folder / name / "masks" / "zz_empty.png")
    return folder


def _run(capsys, *argv) -> tuple[int, str, str]:
    status = evaluate.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_folder_vs_folder_json_equals_metrics_evaluate(tmp_path, pairs, capsys):
    gt = _label_folder(tmp_path / "gt", {n: p[0] for n, p in pairs.items()}, (".png", ".tif", ".npy"))
    pred = _label_folder(tmp_path / "pred", {n: p[1] for n, p in pairs.items()}, (".npy", ".png"))
    status, out, err = _run(capsys, "--gt", gt, "--pred", pred, "--json", tmp_path / "r.json")
    assert status == 0
    expected = _expected(pairs)
    assert json.loads((tmp_path / "r.json").read_text()) == expected
    assert f"DSB2018 score {expected['dsb2018_score']:.4f}" in out  # the summary goes to stdout
    assert "evaluate" in err and "4/4" in err  # the progress bar goes to stderr


def test_kaggle_layout_vs_rle_csv_sizes_from_the_other_side(tmp_path, pairs, capsys):
    gt = _kaggle_folder(tmp_path / "gt", {n: p[0] for n, p in pairs.items()})
    io.write_rle_csv({n: p[1] for n, p in pairs.items()}, tmp_path / "pred.csv", with_size=False)
    status, _, _ = _run(capsys, "--gt", gt, "--pred", tmp_path / "pred.csv", "--json", tmp_path / "r.json")
    assert status == 0
    assert json.loads((tmp_path / "r.json").read_text()) == _expected(pairs)


def test_rle_csv_vs_label_folder_with_per_image_csv(tmp_path, pairs, capsys):
    io.write_rle_csv({n: p[0] for n, p in pairs.items()}, tmp_path / "gt.csv")
    pred = _label_folder(tmp_path / "pred", {n: p[1] for n, p in pairs.items()}, (".tiff", ".png"))
    status, _, _ = _run(
        capsys, "--gt", tmp_path / "gt.csv", "--pred", pred, "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv"
    )
    assert status == 0
    expected = _expected(pairs)
    assert json.loads((tmp_path / "r.json").read_text()) == expected
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == list(NAMES)
    for row, want in zip(rows, expected["per_image"]):
        assert list(row) == list(want)
        assert float(row["dsb2018_score"]) == want["dsb2018_score"] and int(row["n_pred"]) == want["n_pred"]


def test_two_csvs_and_custom_thresholds(tmp_path, pairs, capsys):
    io.write_rle_csv({n: p[0] for n, p in pairs.items()}, tmp_path / "gt.csv")
    io.write_rle_csv({n: p[1] for n, p in pairs.items()}, tmp_path / "pred.csv", with_size=False)
    status, _, _ = _run(
        capsys, "--gt", tmp_path / "gt.csv", "--pred", tmp_path / "pred.csv",
        "--thresholds", "0.3:0.5:0.1", "--json", tmp_path / "r.json",
    )
    assert status == 0
    assert json.loads((tmp_path / "r.json").read_text()) == _expected(pairs, thresholds=(0.3, 0.4, 0.5))


def test_names_on_one_side_only(tmp_path, pairs, capsys):
    gt = _label_folder(tmp_path / "gt", {n: p[0] for n, p in pairs.items()})
    pred = _label_folder(tmp_path / "pred", {n: pairs[n][1] for n in NAMES[:2]} | {"stray": pairs["img_a"][1]})
    status, out, err = _run(capsys, "--gt", gt, "--pred", pred)
    assert status == 1 and out == ""
    message = err.strip().splitlines()[-1]
    assert "only in --gt: img_c, img_d; only in --pred: stray" in message and "--missing-as-empty" in message


def test_missing_as_empty_scores_missing_images_as_empty(tmp_path, pairs, capsys):
    gt = _label_folder(tmp_path / "gt", {n: pairs[n][0] for n in NAMES[:3]})
    pred = _label_folder(tmp_path / "pred", {n: pairs[n][1] for n in ("img_a", "img_c", "img_d")})
    status, _, _ = _run(capsys, "--gt", gt, "--pred", pred, "--missing-as-empty", "--json", tmp_path / "r.json")
    assert status == 0
    with_empties = {
        "img_a": pairs["img_a"],
        "img_b": (pairs["img_b"][0], np.zeros_like(pairs["img_b"][0])),
        "img_c": pairs["img_c"],
        "img_d": (np.zeros_like(pairs["img_d"][1]), pairs["img_d"][1]),
    }
    assert json.loads((tmp_path / "r.json").read_text()) == _expected(with_empties)


def test_workers_give_the_same_report(tmp_path, pairs):
    gt = _label_folder(tmp_path / "gt", {n: p[0] for n, p in pairs.items()})
    io.write_rle_csv({n: p[1] for n, p in pairs.items()}, tmp_path / "pred.csv")
    report = evaluate.evaluate_folders(gt, tmp_path / "pred.csv", workers=2, progress=False)
    assert json.loads(json.dumps(report.to_dict())) == _expected(pairs)


def test_unreadable_file_one_line_and_nonzero_exit(tmp_path, pairs):
    gt = _label_folder(tmp_path / "gt", {n: p[0] for n, p in pairs.items()})
    pred = _label_folder(tmp_path / "pred", {n: p[1] for n, p in pairs.items()})
    (pred / "img_c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = subprocess.run(
        [sys.executable, "-m", "nucjax.evaluate", "--gt", str(gt), "--pred", str(pred)], capture_output=True, text=True
    )
    assert result.returncode != 0 and result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(pred / "img_c.png") in errors[0] and "cannot read image" in errors[0]


def test_unreadable_file_in_a_worker(tmp_path, pairs, capsys):
    gt = _label_folder(tmp_path / "gt", {n: p[0] for n, p in pairs.items()})
    pred = _label_folder(tmp_path / "pred", {n: p[1] for n, p in pairs.items()})
    (pred / "img_b.png").write_bytes(b"not a png")
    status, out, err = _run(capsys, "--gt", gt, "--pred", pred, "--workers", "2")
    assert status == 1 and out == ""
    assert err.strip().splitlines()[-1].startswith(f"error: {pred / 'img_b.png'}: cannot read image")


@pytest.mark.parametrize(
    "arrange, message",
    [
        ("shape", "image 'img_a': ground truth has shape"),
        ("duplicate", "two label images named 'img_a'"),
        ("nothing", "no label images"),
        ("bad_csv", "line 2 (ImageId img_a)"),
        ("absent", "no such file or folder"),
    ],
)
def test_bad_inputs_stop_with_one_line(tmp_path, pairs, capsys, arrange, message):
    gt = _label_folder(tmp_path / "gt", {n: p[0] for n, p in pairs.items()})
    pred = _label_folder(tmp_path / "pred", {n: p[1] for n, p in pairs.items()})
    if arrange == "shape":
        io.write_labels(pred / "img_a.png", pairs["img_a"][1][:-1])
    elif arrange == "duplicate":
        io.write_labels(pred / "img_a.npy", pairs["img_a"][1])
    elif arrange == "nothing":
        pred = tmp_path / "empty"
        pred.mkdir()
    elif arrange == "bad_csv":
        pred = tmp_path / "pred.csv"
        pred.write_text("ImageId,EncodedPixels\nimg_a,5 2 1 1\n")
    else:
        pred = tmp_path / "absent"
    status, out, err = _run(capsys, "--gt", gt, "--pred", pred)
    assert status == 1 and out == ""
    assert message in err.strip().splitlines()[-1]


def test_threshold_argument():
    parse = evaluate._parser().parse_args
    assert parse(["--gt", "a", "--pred", "b", "--thresholds", "0.5:0.95:0.05"]).thresholds == metrics.DEFAULT_THRESHOLDS
    assert parse(["--gt", "a", "--pred", "b"]).thresholds == metrics.DEFAULT_THRESHOLDS
    assert parse(["--gt", "a", "--pred", "b", "--thresholds", "0.5,0.75"]).thresholds == (0.5, 0.75)
    with pytest.raises(SystemExit):
        parse(["--gt", "a", "--pred", "b", "--thresholds", "0.9:0.5:0.1"])


def test_dsb2018_masks_against_their_own_rle(tmp_path, dsb2018, capsys):
    root = dsb2018 / "stage1_train"
    ids = sorted(p.name for p in root.iterdir())[:2]
    (tmp_path / "gt").mkdir()
    for image_id in ids:
        (tmp_path / "gt" / image_id).symlink_to(root / image_id)
    labels = {i: io.read_mask_folder(root / i / "masks")[0] for i in ids}
    io.write_rle_csv(labels, tmp_path / "pred.csv", with_size=False)
    status, _, _ = _run(capsys, "--gt", tmp_path / "gt", "--pred", tmp_path / "pred.csv", "--json", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())
    assert status == 0 and result["dsb2018_score"] == 1.0
    assert [r["n_true"] for r in result["per_image"]] == [len(list((root / i / "masks").glob("*.png"))) for i in ids]


def test_checkpoint_mode_predicts_with_the_prediction_options(tmp_path, trained_workdir):
    """--tta and the tile options reach the checkpoint's Predictor: the report is that Predictor's, not the plain one's."""
    from nucjax import checkpoint, data
    from nucjax.inference import evaluate_source

    out = tmp_path / "tta.json"
    argv = ["--checkpoint", trained_workdir, "--split", "train", "--tta", "--tile-size", 32, "--tile-overlap", 8,
            "--json", out]
    assert evaluate.main([str(a) for a in argv]) == 0
    options = {"tta": True, "tile_size": 32, "tile_overlap": 8}
    source = data.source_for(checkpoint.load(trained_workdir).config, "train")
    expected, _ = evaluate_source(checkpoint.load(trained_workdir, **options), source)
    plain, _ = evaluate_source(checkpoint.load(trained_workdir), source)
    got = json.loads(out.read_text())
    assert got == json.loads(json.dumps(expected.to_dict()))
    assert got["dsb2018_score"] != pytest.approx(plain.dsb2018_score)
