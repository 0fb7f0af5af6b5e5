"""Tests of nucjax.report: the evaluation figures are written as valid PNGs, grouped and ranked as documented."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from nucjax import metrics, report
from nucjax.data import synthetic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _shifted(labels: np.ndarray, dx: int) -> np.ndarray:
    """The label image moved dx pixels to the right (a prediction whose IoU drops as dx grows)."""
    return np.roll(labels, dx, axis=1) * (np.arange(labels.shape[1]) >= dx)[None, :]


@pytest.fixture()
def evaluation() -> tuple[dict, list]:
    """Five synthetic images, two modalities, predictions shifted by 0..4 pixels (worse with each)."""
    examples = []
    for i in range(5):
        image, label = synthetic.generate(i, height=48, width=64)
        example = {"id": f"img{i}", "image": image, "label": label, "modality": "fluo" if i % 2 else "bright"}
        examples.append((example, {"pred": _shifted(label, i)}))
    rep = metrics.evaluate([e["label"] for e, _ in examples], [o["pred"] for _, o in examples],
                           names=[e["id"] for e, _ in examples])
    return rep.to_dict(), examples


def _check_png(path: pathlib.Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_write_report_writes_every_figure_as_a_png(tmp_path, evaluation):
    rep, examples = evaluation
    written = report.write_report(rep, examples, tmp_path / "rep", to_instances=lambda o: o["pred"], worst=3)
    assert [p.name for p in written] == list(report.FIGURES)
    for path in written:
        width, height = _check_png(path)
        assert width >= 300 and height >= 200


def test_without_examples_only_the_report_figures_are_written(tmp_path, evaluation):
    rep, _ = evaluation
    written = report.write_report(rep, [], tmp_path)
    assert [p.name for p in written] == list(report.FIGURES[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(report.FIGURES[:2])


def test_worst_panel_shows_the_lowest_scoring_images(tmp_path, evaluation):
    rep, examples = evaluation
    scores = {row["name"]: row["dsb2018_score"] for row in rep["per_image"]}
    asked = []

    def to_instances(outputs):
        asked.append(next(e["id"] for e, o in examples if o is outputs))
        return outputs["pred"]

    report.plot_worst(rep, examples, to_instances, tmp_path / "worst.png", count=2)
    assert sorted(asked) == sorted(sorted(scores, key=scores.get)[:2])
    assert max(scores[n] for n in asked) <= min(s for n, s in scores.items() if n not in asked)
    _check_png(tmp_path / "worst.png")


def test_metrics_by_modality_are_means_over_each_modality(evaluation):
    rep, examples = evaluation
    groups = report.metrics_by_modality(rep, examples)
    rows = rep["per_image"]
    assert list(groups) == ["bright", "fluo"]
    assert groups["bright"]["n_images"] == 3 and groups["fluo"]["n_images"] == 2
    for name, members in (("bright", [0, 2, 4]), ("fluo", [1, 3])):
        for key in ("dsb2018_score", "aji_plus", "f1_at_0.5"):
            assert groups[name][key] == pytest.approx(np.mean([rows[i][key] for i in members]))


def test_examples_that_do_not_match_the_report_are_refused(tmp_path, evaluation):
    rep, examples = evaluation
    with pytest.raises(ValueError, match="5 images but 4 examples"):
        report.write_report(rep, examples[:4], tmp_path, to_instances=lambda o: o["pred"])
    swapped = [examples[1], examples[0], *examples[2:]]
    with pytest.raises(ValueError, match="image 0.*'img0'.*'img1'"):
        report.metrics_by_modality(rep, swapped)
    with pytest.raises(ValueError, match="to_instances"):
        report.write_report(rep, examples, tmp_path)


def test_report_of_a_checkpoint_evaluation(tmp_path, trained_workdir):
    """The wiring `python -m nucjax.evaluate --checkpoint DIR --report DIR` uses, on the tiny trained run."""
    from nucjax import checkpoint, data
    from nucjax.inference import evaluate_source

    predictor = checkpoint.load(trained_workdir)
    source = data.source_for(predictor.config, predictor.config.data.eval_split)
    rep, kept = evaluate_source(predictor, source, limit=3, keep_outputs=True)
    written = report.write_report(rep.to_dict(), kept, tmp_path, to_instances=predictor.to_instances, worst=2)
    assert [p.name for p in written] == list(report.FIGURES)
    for path in written:
        _check_png(path)
