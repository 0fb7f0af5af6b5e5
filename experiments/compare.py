"""Two study results files side by side, e.g. the same runs in bfloat16 and in float32: for each method in both,
mean ± sd over seeds, and the paired per-image differences (B - A) with their bootstrap intervals: in DSB2018 score,
and, where the rows hold them, in the touching-nuclei DSB2018 score and in merges per 100 touching pairs.

    python -m experiments.compare runs/gpu/results/gpu.jsonl runs/gpu-fp32/results/gpu.jsonl --method unet_boundary
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Mapping, Sequence

from experiments import stats
from experiments.study import PAIRED_KEYS, paired_differences, read_rows

KEYS = ("dsb2018_score", "accuracy@0.5", "touching_dsb2018_score", "merges_per_100_pairs")


def compare(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], methods: Sequence[str] | None = None,
            n_boot: int = 10_000) -> list[dict]:
    """Per method in both (or `methods`): {"method", "a": seed summary, "b": seed summary, "b_minus_a": {key of
    PAIRED_KEYS: `stats.Interval.to_dict()` or None}}."""
    in_both = [m for m in dict.fromkeys(r["method"] for r in rows_a) if any(r["method"] == m for r in rows_b)]
    for m in methods or ():
        if m not in in_both:
            raise ValueError(f"method {m!r} is not in both results files (both have: {', '.join(in_both) or 'none'})")
    out = []
    for method in methods or in_both:
        sides = [[r for r in rows if r["method"] == method] for rows in (rows_a, rows_b)]
        summaries = [stats.seed_summary(side, KEYS)[method] for side in sides]
        out.append({"method": method, "a": summaries[0], "b": summaries[1],
                    "b_minus_a": paired_differences(sides[0], sides[1], n_boot)})
    return out


def markdown(results: Sequence[Mapping], name_a: str, name_b: str) -> str:
    """A Markdown table: one line per method and side, the differences on B's line."""
    pm = lambda pair: f"{pair[0]:.3f}" + (f" ± {pair[1]:.3f}" if pair[1] == pair[1] else "")

    def delta(d: Mapping | None, digits: int) -> str:
        return "–" if d is None else f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"

    names = ("DSB2018", "touching DSB2018", "merges / 100 pairs")
    lines = ["| method | results | runs | " + " | ".join(KEYS) + " | "
             + " | ".join(f"paired Δ {n} (B − A) [95% CI]" for n in names) + " |",
             "|---" * (len(KEYS) + 3 + len(names)) + "|"]
    for r in results:
        d = r["b_minus_a"]
        for side, name, deltas in (("a", f"A: {name_a}", ["–"] * len(names)),
                                   ("b", f"B: {name_b}", [delta(d[k], 1 if k == "merges_per_100_pairs" else 4)
                                                          for k in PAIRED_KEYS])):
            s = r[side]
            lines.append(f"| {r['method']} | {name} | {s['runs']} | " + " | ".join(pm(s[k]) for k in KEYS)
                         + " | " + " | ".join(deltas) + " |")
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
