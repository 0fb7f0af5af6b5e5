"""The maskrcnn variant on the shared entry points: train, evaluate and predict CLIs with configs/maskrcnn.py."""

import numpy as np
import pytest
import tifffile

from experiments import maskrcnn_limits
from nucjax import checkpoint, evaluate, metrics, postprocess, predict, train
from nucjax.data import io, synthetic
from nucjax.inference import view
from nucjax.models.maskrcnn.inference import unview_detections
from tests.conftest import REPO

TINY_MASKRCNN = (
    "data.name=synthetic_nuclei", "data.builder_kwargs.num_images=12", "data.builder_kwargs.height=64",
    "data.builder_kwargs.width=64", "data.crop_size=64", "train.batch_size=2", "train.steps=2", "train.log_every=1",
    "train.eval_every=0", "train.checkpoint_every=2", "optim.warmup_steps=1", "model.resnet_width=8",
    "model.fpn_width=16", "model.box_head_dim=32", "model.mask_head_width=8", "targets.max_instances=64",
    "model.score_threshold=0.0",
)


def test_maskrcnn_trains_evaluates_and_predicts_through_the_clis(tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    overrides = [f"--config.{o}" for o in (f"data.data_dir={data_dir}", *TINY_MASKRCNN)]
    assert train.main(["--config", str(REPO / "configs" / "maskrcnn.py"), "--workdir", str(workdir), *overrides]) == 0

    predictor = checkpoint.load(workdir)
    assert predictor.variant.name == "maskrcnn" and predictor.step == 2
    image, _ = synthetic.generate(5, height=64, width=80)
    outputs = predictor.predict_outputs(image)
    assert outputs["boxes"].shape[1] == 4 and tuple(outputs["size"]) == (64, 80)
    labels = predictor.predict(image)
    assert labels.shape == (64, 80) and labels.dtype == np.int32
    # Ids are 1..N with N the number of valid detections that kept pixels.
    assert set(np.unique(labels)) - {0} == set(range(1, labels.max() + 1))
    # input_scale=2: the detections of the 2x magnified image (128 x 160, one tile), boxes in the image's pixels.
    scaled = checkpoint.load(workdir, input_scale=2.0)
    magnified, factors = scaled.network_input(image)
    assert magnified.shape == (128, 160, 3) and tuple(factors) == (2.0, 2.0)
    got, on_magnified = scaled.predict_outputs(image), predictor._detections(magnified)
    np.testing.assert_array_equal(got["valid"], on_magnified["valid"])
    np.testing.assert_allclose(got["boxes"], on_magnified["boxes"] / 2, rtol=1e-6)
    assert tuple(got["size"]) == (64, 80) and scaled.predict(image).shape == (64, 80)
    # Test-time augmentation fuses the detections of the image's 8 views: those of a turned or mirrored image are
    # the same 8 views, so its fused detections, turned back, are the image's; the plain detector's are not. (A
    # quarter turn and a mirror generate all 8 views.)
    tta = checkpoint.load(workdir, tta=True)
    fused = tta.predict_outputs(image)
    assert fused["valid"].all() and len(fused["scores"]) > 10 and tuple(fused["size"]) == (64, 80)
    for turns, flip in ((1, False), (0, True)):
        seen = view(image[None], turns, flip)[0]
        back = unview_detections(tta.predict_outputs(seen), turns, flip, seen.shape[:2])
        np.testing.assert_allclose(back["scores"], fused["scores"], rtol=1e-5)
        np.testing.assert_allclose(back["boxes"], fused["boxes"], atol=1e-3)
        np.testing.assert_allclose(back["masks"], fused["masks"], atol=1e-4)
    seen = view(image[None], 1, False)[0]
    back = unview_detections(predictor.predict_outputs(seen), 1, False, seen.shape[:2])
    plain = predictor.predict_outputs(image)
    assert back["boxes"].shape != plain["boxes"].shape or not np.allclose(back["boxes"], plain["boxes"], atol=1e-3)
    labels = tta.predict(image)
    assert labels.shape == (64, 80) and set(np.unique(labels)) - {0} == set(range(1, labels.max() + 1))

    # Tiled detection: 5 copies of a 64x32 pattern in tiles 64 wide overlapping by 32 (starts 0, 32, 64, 96; they
    # own x in [0, 48), [48, 80), [80, 112), [112, 160)). Every tile sees the same crop (two periods: the same
    # intensity percentiles), so the detections are the crop's, moved to each tile and kept where it owns the centre.
    period = np.full((64, 32), 10, np.uint8)
    yy, xx = np.mgrid[:64, :32]
    period[((yy - 20) ** 2 + (xx - 16) ** 2 <= 36) | ((yy - 45) ** 2 + (xx - 8) ** 2 <= 16)] = 200
    wide = np.tile(period, (1, 5))
    tiled = checkpoint.load(workdir, tile_size=64, tile_overlap=32, tile_batch=1)  # batch 1, as the crop runs
    got, crop = tiled.predict_outputs(wide), tiled.predict_outputs(wide[:, :64])
    expected = []
    for start, low, high in [(0, 0, 48), (32, 48, 80), (64, 80, 112), (96, 112, 160)]:
        boxes = crop["boxes"] + np.array([0, start, 0, start], np.float32)  # float32, as pasting receives them
        keep = crop["valid"] & (low <= (boxes[:, 1] + boxes[:, 3]) / 2) & ((boxes[:, 1] + boxes[:, 3]) / 2 < high)
        expected += [(tuple(b), float(s)) for b, s in zip(boxes[keep], crop["scores"][keep])]
    found = [(tuple(b), float(s)) for b, s in zip(got["boxes"][got["valid"]], got["scores"][got["valid"]])]
    assert sorted(found) == sorted(expected) and len(found) >= 4
    assert tuple(got["size"]) == (64, 160) and tiled.predict(wide).shape == (64, 160)

    # experiments.maskrcnn_limits on this checkpoint: its first row is what predict gives; images within one tile
    # give the same whole-image row (64² images: one tile); the other rows are scored on the same images.
    examples = [dict(zip(("image", "label"), synthetic.generate(s, height=64, width=w)), id=str(s))
                for s, w in ((1, 64), (2, 64))]
    reports, funnels = maskrcnn_limits.checkpoint_reports(str(workdir), examples, progress=False)
    assert list(reports) == list(maskrcnn_limits.CHECKPOINT_ROWS)
    direct = metrics.evaluate([e["label"] for e in examples], [predictor.predict(e["image"]) for e in examples])
    assert reports["tiled"].to_dict()["pooled"] == direct.to_dict()["pooled"]
    assert reports["whole"].to_dict()["pooled"] == direct.to_dict()["pooled"]
    assert all(r.n_images == 2 for r in reports.values())
    # The funnel's last stage is the whole-image row's matches at IoU 0.5, nucleus by nucleus.
    assert [len(f["segmented"]) for f in funnels] == [len(np.unique(e["label"])) - 1 for e in examples]
    assert sum(int(f["segmented"].sum()) for f in funnels) == reports["whole"].pooled[0]["tp"]

    assert evaluate.main(["--checkpoint", str(workdir), "--split", "validation", "--json", str(tmp_path / "v.json")]) == 0
    assert "DSB2018 score" in capsys.readouterr().out
    # --tune searches the detection post-processing on the validation split and stores it beside the checkpoint.
    assert evaluate.main(["--checkpoint", str(workdir), "--split", "validation", "--tune"]) == 0
    tuned = checkpoint.load(workdir).postprocess_params
    grid = postprocess.search_space("detections")
    assert set(grid) == {"threshold", "min_score", "min_visible", "min_size"}
    assert all(tuned[key] in values for key, values in grid.items())
    assert checkpoint.read_postprocess(workdir, 2) is not None
    labels = checkpoint.load(workdir).predict(image)  # what predict writes below, with the tuned parameters

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    tifffile.imwrite(inputs / "cells.tif", image)
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(workdir), "--input", str(inputs / "cells.tif"), "--output", str(out)]) == 0
    np.testing.assert_array_equal(io.read_labels(out / "cells.tif"), labels)
