"""Tests of experiments.compare (two results files side by side) on hand-made rows."""

import json

import pytest

from experiments import compare


def _row(method, seed, scores, merges):
    return {"method": method, "seed": seed, "dsb2018_score": sum(scores) / len(scores), "accuracy@0.5": 0.5,
            "touching_dsb2018_score": 0.2, "merges_per_100_pairs": merges,
            "per_image": [{"id": f"img{i}", "dsb2018_score": s} for i, s in enumerate(scores)]}


def test_paired_difference_is_b_minus_a_over_seed_means(tmp_path):
    a = [_row("unet", 0, [0.2, 0.4, 0.6], 50.0), _row("unet", 1, [0.4, 0.4, 0.4], 60.0), _row("otsu", 0, [0.1] * 3, 90.0)]
    # B is A's per-image seed mean + 0.1 on every image: the difference and both interval ends are exactly +0.1.
    b = [_row("unet", 0, [0.4, 0.5, 0.6], 40.0)]
    (result,) = compare.compare(a, b, n_boot=200)
    assert result["method"] == "unet"
    assert result["a"]["runs"] == 2 and result["b"]["runs"] == 1
    assert result["a"]["merges_per_100_pairs"][0] == pytest.approx(55.0)
    d = result["b_minus_a"]["dsb2018_score"]
    assert (d["mean"], d["low"], d["high"], d["n"]) == (pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.1), 3)
    # These rows have no per-image separation fields: no separation differences.
    assert result["b_minus_a"]["touching_dsb2018_score"] is None and result["b_minus_a"]["merges_per_100_pairs"] is None


def test_cli_prints_a_table_and_names_a_missing_method(tmp_path, capsys):
    paths = []
    for name, rows in (("a", [_row("unet", 0, [0.2, 0.5], 50.0)]), ("b", [_row("unet", 0, [0.3, 0.2], 50.0)])):
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert compare.main([str(p) for p in paths] + ["--n-boot", "100"]) == 0
    out = capsys.readouterr().out
    assert "| unet | B: " in out and "-0.1000" in out
    assert compare.main([str(p) for p in paths] + ["--method", "maskrcnn"]) == 1
    assert "'maskrcnn' is not in both results files (both have: unet)" in capsys.readouterr().err
    assert compare.main([str(paths[0]), str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl: no such results file" in capsys.readouterr().err
