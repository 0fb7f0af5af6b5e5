"""Tests of the study (experiments/): the bootstrap against closed forms, the training-log costs against a hand-written
log, budget checks, and the runner end to end on tiny synthetic runs (rows, skipping and re-evaluation, figures)."""

import json
import math
import pathlib
import shutil

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import stats, study

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---- stats ----


def test_mean_sd_is_the_sample_standard_deviation():
    assert stats.mean_sd([1.0, 2.0, 3.0, 6.0]) == pytest.approx((3.0, math.sqrt(14 / 3)))
    mean, sd = stats.mean_sd([0.5, None, float("nan")])
    assert mean == 0.5 and math.isnan(sd)
    assert all(math.isnan(x) for x in stats.mean_sd([]))


def test_bootstrap_of_a_constant_difference_is_that_constant():
    a = np.linspace(0.2, 0.9, 25)
    interval = stats.paired_bootstrap(a + 0.1, a, n_boot=500)
    assert interval.mean == pytest.approx(0.1)
    assert interval.low == pytest.approx(0.1) and interval.high == pytest.approx(0.1)
    assert interval.excludes_zero() and interval.n == 25


def test_bootstrap_interval_of_plus_minus_one_differences_matches_the_binomial_quantiles():
    # Differences: ten +1 and ten -1. A resampled mean is (2K - 20) / 20 with K ~ Binomial(20, 1/2), whose 2.5% and
    # 97.5% quantiles are K = 6 and 14 (cdf(5) = 0.021 and cdf(6) = 0.058 are far from 0.025 at 200k draws).
    a = np.array([1.0] * 10 + [0.0] * 10)
    interval = stats.paired_bootstrap(a, a[::-1], n_boot=200_000, seed=1)
    binom = scipy_stats.binom(20, 0.5)
    expected = tuple((2 * binom.ppf(q) - 20) / 20 for q in (0.025, 0.975))
    assert expected == (-0.4, 0.4)
    assert (interval.low, interval.high) == pytest.approx(expected, abs=1e-12)
    assert interval.mean == 0.0 and not interval.excludes_zero()


def test_paired_difference_pairs_images_by_name_and_checks_they_agree():
    a = {"x": 0.9, "y": 0.5, "z": 0.7}
    b = {"z": 0.6, "x": 0.8, "y": 0.4}
    assert stats.paired_difference(a, b, n_boot=200).mean == pytest.approx(0.1)
    with pytest.raises(ValueError, match="different images"):
        stats.paired_difference(a, {"x": 0.1})
    assert stats.per_image_means([{"x": 0.2, "y": 1.0}, {"x": 0.4, "y": 0.0}]) == pytest.approx({"x": 0.3, "y": 0.5})
    with pytest.raises(ValueError, match="run 1 scored other images"):
        stats.per_image_means([{"x": 0.2}, {"y": 0.4}])


def test_weighted_bootstrap_is_the_difference_of_ratios_of_sums():
    # Merges per 100 touching pairs: image i has pairs[i] pairs, A merges ma[i] of them and B mb[i].
    pairs = np.array([4.0, 1.0, 5.0, 10.0])
    ma, mb = np.array([2.0, 1.0, 0.0, 5.0]), np.array([1.0, 0.0, 0.0, 2.0])
    interval = stats.paired_bootstrap(100 * mb / pairs, 100 * ma / pairs, weights=pairs, n_boot=2000)
    assert interval.mean == pytest.approx(100 * mb.sum() / pairs.sum() - 100 * ma.sum() / pairs.sum())  # -25
    assert interval.low <= interval.mean <= interval.high and interval.n == 4
    # Two images, differences +1 and -1 with weights 1 and 3: a resample is both of one image (+1 or -1, 1/4
    # each) or one of each ((1 - 3) / 4 = -0.5, 1/2), so the 95% interval is [-1, +1] and the mean -0.5.
    two = stats.paired_bootstrap([1.0, 0.0], [0.0, 1.0], weights=[1.0, 3.0], n_boot=4000, seed=2)
    assert (two.mean, two.low, two.high) == (-0.5, -1.0, 1.0)
    # The middle 40% of the resamples lie on -0.5 (unweighted resampling would give 0 there).
    mid = stats.paired_bootstrap([1.0, 0.0], [0.0, 1.0], weights=[1.0, 3.0], n_boot=4000, seed=2, level=0.4)
    assert (mid.low, mid.high) == (-0.5, -0.5)
    # Equal weights give the unweighted bootstrap, draw for draw.
    a, b = np.linspace(0.1, 0.8, 9), np.linspace(0.3, 0.5, 9) ** 2
    assert stats.paired_bootstrap(a, b, weights=np.full(9, 2.0), n_boot=3000) == pytest.approx(
        stats.paired_bootstrap(a, b, n_boot=3000))
    with pytest.raises(ValueError, match="weights must be 2 finite values >= 0"):
        stats.paired_bootstrap([1.0, 0.0], [0.0, 1.0], weights=[0.0, 0.0])


def _separation_row(method, seed, images):
    """A results row whose per-image entries are (dsb2018_score, touching score or None, pairs, merged pairs)."""
    per_image = [{"id": f"img{i}", "modality": "fluorescence", "dsb2018_score": d, "touching_dsb2018_score": t,
                  "touching_pairs": p, "merged_pairs": m} for i, (d, t, p, m) in enumerate(images)]
    return {"method": method, "seed": seed, "kind": "learned", "eval_split": "holdout", "n_images": len(images),
            "dsb2018_score": float(np.mean([d for d, *_ in images])), "per_image": per_image,
            "machine": {"cpu": "test"}, "command": "test", "commit": "0" * 40}


def test_aggregate_pairs_touching_scores_and_merges_against_the_baseline():
    base = [_separation_row("unet_mask", 0, [(0.5, 0.2, 4, 4), (0.6, None, 0, 0), (0.4, 0.1, 6, 3)]),
            _separation_row("unet_mask", 1, [(0.5, 0.4, 4, 2), (0.6, None, 0, 0), (0.4, 0.3, 6, 3)])]
    # The other method: +0.1 DSB2018 on every image, +0.05 touching on each touching image (over the baseline's
    # seed means 0.3 and 0.2), and 2 of 10 pairs merged against the baseline's 7 and 5 (mean 6) of 10.
    other = [_separation_row("unet_3class", 0, [(0.6, 0.35, 4, 1), (0.7, None, 0, 0), (0.5, 0.25, 6, 1)])]
    old = dict(other[0], method="old", per_image=[{"id": p["id"], "dsb2018_score": p["dsb2018_score"]}
                                                  for p in other[0]["per_image"]])
    summary = {e["method"]: e for e in study.aggregate(base + other + [old], "unet_mask", n_boot=500)}
    assert summary["unet_mask"]["vs_baseline"] is None
    d = summary["unet_3class"]["vs_baseline"]
    assert [d["dsb2018_score"][k] for k in ("mean", "low", "high", "n")] == pytest.approx([0.1, 0.1, 0.1, 3])
    assert [d["touching_dsb2018_score"][k] for k in ("mean", "low", "high", "n")] == pytest.approx([0.05] * 3 + [2])
    assert d["merges_per_100_pairs"]["mean"] == pytest.approx(100 * 2 / 10 - 100 * 6 / 10)
    assert d["merges_per_100_pairs"]["n"] == 2
    # Rows written before the per-image separation fields were recorded get the DSB2018 comparison only.
    assert summary["old"]["vs_baseline"]["dsb2018_score"]["mean"] == pytest.approx(0.1)
    assert summary["old"]["vs_baseline"]["touching_dsb2018_score"] is None
    table = study.markdown(list(summary.values()), base, title="t", baseline="unet_mask")
    assert "## Paired difference on touching nuclei against unet_mask" in table
    assert "the 2 images with touching nuclei" in table
    assert "| unet_3class | +0.0500 | [+0.0500, +0.0500] | -40.0 |" in table
    assert "| old |" not in table.split("on touching nuclei")[1].split("## Cost")[0]


# ---- costs from a training log ----


def test_training_log_sums_sittings_and_finds_the_time_to_95_percent(tmp_path):
    records = [
        {"time": 100.0, "event": "start", "step": 0},
        {"time": 110.0, "step": 10, "split": "train", "images_per_s": 4.0},
        {"time": 112.0, "step": 10, "split": "validation", "dsb2018_score": 0.30},
        {"time": 120.0, "step": 20, "split": "train", "images_per_s": 6.0},
        # killed here; resumed an hour later from step 10
        {"time": 3700.0, "event": "start", "step": 10},
        {"time": 3710.0, "step": 20, "split": "train", "images_per_s": 5.0},
        {"time": 3712.0, "step": 20, "split": "validation", "dsb2018_score": 0.58},
        {"time": 3725.0, "step": 30, "split": "train", "images_per_s": 8.0},
        {"time": 3727.0, "step": 30, "split": "validation", "dsb2018_score": 0.60},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    log = study.training_log(tmp_path)
    assert log["train_wall_s"] == pytest.approx(20 + 27)
    assert log["images_per_s"] == pytest.approx(5.5)
    assert log["validation_curve"] == [[12.0, 10, 0.30], [32.0, 20, 0.58], [47.0, 30, 0.60]]
    assert log["final_validation_score"] == 0.60
    assert log["time_to_95_s"] == pytest.approx(32.0)  # 0.58 >= 0.95 * 0.60


# ---- budgets ----


def test_shipped_budgets_load_and_a_bad_budget_names_its_missing_key(tmp_path):
    for name in ("cpu", "gpu"):
        budget_name, budget = study.load_budget(name)
        assert budget_name == name and budget.stain.chosen in budget.stain.settings
    bad = tmp_path / "bad.py"
    bad.write_text("import ml_collections\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                   "    c.seeds = (0,)\n    return c\n")
    with pytest.raises(study.StudyError, match="missing key 'variants'"):
        study.load_budget(str(bad))
    with pytest.raises(study.StudyError, match="budget 'nope'"):
        study.load_budget("nope")


def test_variant_selection_skips_an_unregistered_maskrcnn_and_rejects_unknown_names():
    from nucjax import variants

    _, budget = study.load_budget("cpu")
    chosen = study.select_variants(budget, ["unet_mask", "maskrcnn"])
    assert chosen == ["unet_mask"] + (["maskrcnn"] if "maskrcnn" in variants.VARIANTS else [])
    assert study.select_variants(budget, None) == list(variants.VARIANTS)
    with pytest.raises(study.StudyError, match="unknown variant 'unet_x'"):
        study.select_variants(budget, ["unet_x"])


# ---- end to end ----

TINY = (
    "data.name=synthetic_nuclei", "data.builder_kwargs.num_images=16", "data.builder_kwargs.height=64",
    "data.builder_kwargs.width=64", "data.builder_kwargs.holdout_fraction=0.25", "data.crop_size=64",
    "model.base_width=8", "model.depth=2", "train.batch_size=4", "train.steps=4", "train.log_every=2",
    "train.eval_every=2", "train.checkpoint_every=2", "optim.warmup_steps=1", "predict.tile_size=64",
    "predict.tile_overlap=16",
)


def _tiny_budget(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "tiny.py"
    path.write_text(
        "import pathlib\nfrom nucjax.config import load_config\n\n\ndef get_config():\n"
        f"    c = load_config(pathlib.Path({str(REPO / 'configs' / 'study' / 'cpu.py')!r}))\n"
        f"    c.overrides = {TINY!r}\n"
        "    c.seeds = (0,)\n    c.classical_tune_images = 2\n    c.panel.crops = 1\n    c.panel.size = 32\n"
        "    c.bootstrap_samples = 200\n    return c\n"
    )
    return path


def test_study_end_to_end_writes_rows_tables_figures_and_skips_finished_runs(tmp_path, data_dir, caplog):
    from nucjax import checkpoint, data
    from nucjax.inference import evaluate_source

    budget = _tiny_budget(tmp_path)
    work, results, figures = tmp_path / "runs", tmp_path / "results", tmp_path / "figures"
    argv = ["--budget", str(budget), "--workdir", str(work), "--variants", "unet_mask,unet_boundary",
            "--data-dir", str(data_dir), "--results-dir", str(results), "--figures-dir", str(figures)]
    assert study.main(argv) == 0
    # TFDS's notes on its own configs are not for users (silenced as in nucjax.train).
    assert not [r.getMessage() for r in caplog.records if "custom data configuration" in r.getMessage()]

    rows = study.read_rows(results / "tiny.jsonl")
    assert [(r["method"], r["kind"]) for r in rows] == [
        ("unet_mask", "learned"), ("unet_boundary", "learned"), ("otsu", "classical"), ("local_watershed", "classical")]
    holdout = data.source_for(checkpoint.load(rows[0]["workdir"]).config, "holdout")
    for row in rows:
        assert row["budget"] == "tiny" and row["n_images"] == len(holdout) == 4
        assert len(row["per_image"]) == 4 and 0 <= row["dsb2018_score"] <= 1
        assert row["machine"]["cpu_count"] and row["commit"]
        assert set(row["by_modality"]) == {"fluorescence"}
        # The per-image separation fields add up to the row's pooled separation figures.
        touching = [p["touching_dsb2018_score"] for p in row["per_image"] if p["touching_dsb2018_score"] is not None]
        assert touching and row["touching_dsb2018_score"] == pytest.approx(np.mean(touching))
        pairs = sum(p["touching_pairs"] for p in row["per_image"])
        assert pairs == row["touching_pairs"] and sum(p["merged_pairs"] for p in row["per_image"]) == row["merged_pairs"]
    for row in rows[:2]:
        assert row["seed"] == 0 and row["params"] > 0 and row["gflops_per_256"] > 0
        assert row["train_wall_s"] > 0 and [p[1] for p in row["validation_curve"]] == [2, 4]
        # The stored row is what the workdir's checkpoint (with its stored post-processing) scores on the holdout.
        report, _ = evaluate_source(checkpoint.load(row["workdir"]), holdout)
        assert report.dsb2018_score == pytest.approx(row["dsb2018_score"])
    table = (results / "tiny.md").read_text()
    assert "| unet_boundary |" in table and "against unet_mask" in table
    assert (results / "tiny.csv").read_text().count("\n") == 5
    pngs = sorted(p.name for p in figures.glob("*.png"))
    assert pngs == [f"tiny-{n}.png" for n in ("accuracy_vs_cost", "accuracy_vs_iou", "crowded_crops", "error_types",
                                             "validation_vs_time")]

    # Second sitting: unet_mask is finished and skipped, even without its checkpoints (as when only the results
    # file was carried to another machine); unet_boundary lost its row, so it is evaluated again from its final
    # checkpoint without training.
    logs = {r["method"]: (work / f"{r['method']}-s0" / "metrics.jsonl").read_text() for r in rows[:2]}
    kept = [r for r in rows if r["method"] != "unet_boundary"]
    shutil.rmtree(work / "unet_mask-s0" / "checkpoints")
    (results / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert study.main(argv) == 0
    again = study.read_rows(results / "tiny.jsonl")
    assert sorted(r["method"] for r in again) == sorted(r["method"] for r in rows)
    assert [r for r in again if r["method"] != "unet_boundary"] == kept
    assert {m: (work / f"{m}-s0" / "metrics.jsonl").read_text() for m in logs} == logs

    # Another results file with a prediction setting overridden: the finished training is tuned and evaluated
    # again with it (TTA), not retrained, and the row is what the checkpoint scores with that setting.
    tta_results = tmp_path / "results-tta"
    argv_tta = [*argv[:argv.index("--results-dir")], "--results-dir", str(tta_results), "--figures-dir",
                str(figures), "--no-classical", "--override", "predict.tta=True"]
    argv_tta[argv_tta.index("unet_mask,unet_boundary")] = "unet_boundary"
    assert study.main(argv_tta) == 0
    (row,) = study.read_rows(tta_results / "tiny.jsonl")
    assert row["prediction"]["tta"] is True and "predict.tta=True" in row["overrides"]
    assert (work / "unet_boundary-s0" / "metrics.jsonl").read_text() == logs["unet_boundary"]
    with_tta = checkpoint.load(row["workdir"], tta=True)
    assert with_tta.postprocess_params == row["postprocess"]["params"]
    report, _ = evaluate_source(with_tta, holdout)
    assert report.dsb2018_score == pytest.approx(row["dsb2018_score"])


def test_compilation_cache_writes_in_the_block_then_restores_and_keeps_a_cache_already_set(tmp_path):
    import jax
    import jax.numpy as jnp
    from jax.experimental.compilation_cache import compilation_cache as cache

    session = jax.config.jax_compilation_cache_dir  # the test run's own (tests/conftest.py), or None
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cache.reset_cache()
    try:
        with study.compilation_cache(tmp_path / "study") as folder:
            assert folder == str(tmp_path / "study") == jax.config.jax_compilation_cache_dir
            jax.jit(lambda x: x * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()
        assert any((tmp_path / "study").iterdir())  # the compiled step was written there
        assert jax.config.jax_compilation_cache_dir is None
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
        with study.compilation_cache(tmp_path / "other") as folder:
            assert folder == str(tmp_path / "mine") == jax.config.jax_compilation_cache_dir
        assert not (tmp_path / "other").exists() and jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", session)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        cache.reset_cache()


def test_runs_carry_the_budget_the_chosen_stain_setting_and_their_seed(tmp_path):
    _, budget = study.load_budget("cpu")
    args = study.parse_args(["--budget", "cpu", "--workdir", str(tmp_path), "--data-dir", "/data"])
    budget.stain.chosen = "grey_invert"
    runs = study.plan(budget, args, ["unet_mask", "unet_boundary"], [0, 1])
    assert [(r.method, r.seed) for r in runs] == [("unet_mask", 0), ("unet_boundary", 0), ("unet_mask", 1),
                                                  ("unet_boundary", 1)]
    config = study.run_config(runs[3])
    assert config.variant == "unet_boundary" and config.seed == 1 and runs[3].workdir == tmp_path / "unet_boundary-s1"
    assert config.data.grey and config.data.invert_bright and config.data.data_dir == "/data"
    assert config.data.crop_size == 128 and config.data.builder_kwargs.holdout_fraction == 0.1
    stain = study.stain_plan(budget, args, None)
    assert [r.workdir.name for r in stain] == [f"stain-{s}-s0" for s in budget.stain.settings]
    by_name = {r.method: study.run_config(r) for r in stain}
    colour, augmented = by_name["colour"], by_name["colour_augment"]
    assert not colour.data.grey and colour.data.augment.invert_prob == 0.0
    assert augmented.data.augment.invert_prob == 0.5 and augmented.variant == budget.stain.variant


def test_a_run_is_finished_when_the_results_hold_its_row_with_the_same_overrides(tmp_path):
    _, budget = study.load_budget("cpu")
    args = study.parse_args(["--budget", "cpu", "--workdir", str(tmp_path)])
    mask0, boundary0, mask1, _ = study.plan(budget, args, ["unet_mask", "unet_boundary"], [0, 1])
    row = {"experiment": "main", "method": "unet_mask", "seed": 0, "overrides": list(mask0.overrides),
           "workdir": "/elsewhere/unet_mask-s0"}
    assert study.finished([row], mask0)
    assert not study.finished([row], boundary0) and not study.finished([row], mask1)
    assert not study.finished([{**row, "overrides": list(mask0.overrides) + ["train.steps=7"]}], mask0)
    # The same settings in another order, or with the data elsewhere, are the same run.
    moved = list(reversed(mask0.overrides)) + ["data.data_dir=/elsewhere", "data.manual_dir=/raw"]
    assert study.finished([{**row, "overrides": moved}], mask0)
    assert not study.finished([{**row, "experiment": "stain"}], mask0) and not study.finished([], mask0)


def test_command_line_overrides_come_after_the_budget_and_before_the_seed(tmp_path):
    _, budget = study.load_budget("cpu")
    args = study.parse_args(["--budget", "cpu", "--workdir", str(tmp_path), "--override", "train.steps=7",
                             "--override", "data.crop_size=64", "--no-classical", "--gather"])
    assert not args.classical and args.gather
    (run,) = study.plan(budget, args, ["unet_mask"], [2])
    config = study.run_config(run)
    assert config.train.steps == 7 and config.data.crop_size == 64 and config.seed == 2
    assert config.train.batch_size == 8  # the budget's own overrides still apply


def _write_rows(path: str, worker: int, n: int) -> None:
    for k in range(n):
        study.write_row(pathlib.Path(path), {"experiment": "main", "method": f"m{worker}", "seed": k, "x": k})


def test_processes_sharing_a_results_file_lose_no_rows(tmp_path):
    import multiprocessing

    path = tmp_path / "shared.jsonl"
    study.write_row(path, {"experiment": "main", "method": "m0", "seed": 0, "x": -1})  # replaced by worker 0
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_rows, args=(str(path), w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    rows = study.read_rows(path)
    assert sorted((r["method"], r["seed"], r["x"]) for r in rows) == sorted(
        (f"m{w}", k, k) for w in range(3) for k in range(15))


def test_model_overrides_reach_each_family_only_through_its_variant_overrides(tmp_path):
    _, budget = study.load_budget("cpu")
    args = study.parse_args(["--budget", "cpu", "--workdir", str(tmp_path)])
    runs = {r.variant: r for r in study.plan(budget, args, ["unet_3class", "maskrcnn"], [0])}
    assert study.variant_overrides(budget, "unet_3class") == ["model.base_width=16", "model.depth=4"]
    assert study.variant_overrides(budget, "maskrcnn") == ["train.batch_size=4"]
    unet, maskrcnn = study.run_config(runs["unet_3class"]), study.run_config(runs["maskrcnn"])
    assert unet.model.base_width == 16 and unet.model.depth == 4 and unet.train.batch_size == 8
    assert maskrcnn.model.resnet_depth == 18 and maskrcnn.train.batch_size == 4 and maskrcnn.data.crop_size == 128
    budget.variant_overrides["unet_*"] = ("train.batch_size=2",)
    budget.variant_overrides["unet_3class"] = ("train.batch_size=3",)  # the exact name comes after the pattern
    assert study.run_config(study.plan(budget, args, ["unet_3class"], [0])[0]).train.batch_size == 3
