"""Two study results files side by side, e.g. the same runs in bfloat16 and in float32: for each method in both,
mean ± sd over seeds, and the paired per-image difference (B - A) in DSB2018 score with its bootstrap interval.

    python -m experiments.compare runs/gpu/results/gpu.jsonl runs/gpu-fp32/results/gpu.jsonl --method unet_boundary
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Mapping, Sequence

from experiments import stats
from experiments.study import read_rows

KEYS = ("dsb2018_score", "accuracy@0.5", "touching_dsb2018_score", "merges_per_100_pairs")


def compare(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], methods: Sequence[str] | None = None,
            n_boot: int = 10_000) -> list[dict]:
    """Per method in both (or `methods`): {"method", "a": seed summary, "b": seed summary, "b_minus_a": Interval}."""
    in_both = [m for m in dict.fromkeys(r["method"] for r in rows_a) if any(r["method"] == m for r in rows_b)]
    for m in methods or ():
        if m not in in_both:
            raise ValueError(f"method {m!r} is not in both results files (both have: {', '.join(in_both) or 'none'})")
    out = []
    for method in methods or in_both:
        sides = [[r for r in rows if r["method"] == method] for rows in (rows_a, rows_b)]
        means = [stats.per_image_means([{p["id"]: p["dsb2018_score"] for p in r["per_image"]} for r in side])
                 for side in sides]
        summaries = [stats.seed_summary(side, KEYS)[method] for side in sides]
        out.append({"method": method, "a": summaries[0], "b": summaries[1],
                    "b_minus_a": stats.paired_difference(means[1], means[0], n_boot=n_boot)})
    return out


def markdown(results: Sequence[Mapping], name_a: str, name_b: str) -> str:
    """A Markdown table: one line per method and side, the difference on B's line."""
    pm = lambda pair: f"{pair[0]:.3f}" + (f" ± {pair[1]:.3f}" if pair[1] == pair[1] else "")
    lines = ["| method | results | runs | " + " | ".join(KEYS) + " | paired Δ (B − A) [95% CI] |",
             "|---" * (len(KEYS) + 4) + "|"]
    for r in results:
        d = r["b_minus_a"]
        for side, name, delta in (("a", f"A: {name_a}", "–"),
                                  ("b", f"B: {name_b}", f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]")):
            s = r[side]
            lines.append(f"| {r['method']} | {name} | {s['runs']} | " + " | ".join(pm(s[k]) for k in KEYS)
                         + f" | {delta} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.splitlines()[0])
    parser.add_argument("a", type=pathlib.Path, help="results file A (.jsonl)")
    parser.add_argument("b", type=pathlib.Path, help="results file B (.jsonl)")
    parser.add_argument("--method", action="append", help="compare only this method (repeatable)")
    parser.add_argument("--n-boot", type=int, default=10_000)
    args = parser.parse_args(argv)
    try:
        for path in (args.a, args.b):
            if not path.is_file():
                raise ValueError(f"{path}: no such results file")
        print(markdown(compare(read_rows(args.a), read_rows(args.b), args.method, args.n_boot), str(args.a),
                       str(args.b)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
