"""The maskrcnn variant on the shared entry points: train, evaluate and predict CLIs with configs/maskrcnn.py."""

import numpy as np
import tifffile

from nucjax import checkpoint, evaluate, postprocess, predict, train
from nucjax.data import io, synthetic
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
