"""The study's uncertainty: mean ± standard deviation over seeds, and paired bootstrap intervals over images."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof = 1) of the finite values; NaN where there are too few."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if not len(x):
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan")


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean paired difference over `n` images and its bootstrap interval [low, high] at `level`."""

    mean: float
    low: float
    high: float
    level: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, weights: Sequence[float] | None = None,
                     n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """The mean of a - b (float[N], paired by position) and its percentile bootstrap interval: images resampled
    with replacement `n_boot` times, the (1 - level)/2 and (1 + level)/2 quantiles of the resampled means.

    With `weights` (float[N], >= 0) the statistic is the weighted mean sum(w (a - b)) / sum(w), resampled in the
    same way: a ratio of sums, e.g. merges per 100 touching pairs with a, b each image's merges per 100 of its
    pairs and w its number of pairs. A resample whose weights sum to zero is left out of the quantiles."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_bootstrap needs two 1-D sequences of equal, non-zero length; "
                         f"got {a.shape}, {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    diff = a - b
    if not np.isfinite(diff).all():
        raise ValueError(f"paired_bootstrap: non-finite values at positions {np.flatnonzero(~np.isfinite(diff))[:5]}")
    w = np.ones_like(diff) if weights is None else np.asarray(weights, np.float64)
    if w.shape != diff.shape or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"paired_bootstrap: weights must be {len(diff)} finite values >= 0 with a positive sum")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 1000):  # in chunks, so memory stays small for many images
        count = min(1000, n_boot - start)
        picked = rng.integers(0, len(diff), size=(count, len(diff)))
        if weights is None:
            means[start:start + count] = diff[picked].mean(axis=1)
        else:
            total = w[picked].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                means[start:start + count] = (w * diff)[picked].sum(axis=1) / total
    low, high = np.nanquantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(np.sum(w * diff) / w.sum()), float(low), float(high), level, len(diff))


def per_image_means(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """{image name: the image's score averaged over runs} from each run's {image name: score}; every run must
    score the same images."""
    if not runs:
        raise ValueError("per_image_means needs at least one run")
    names = set(runs[0])
    for i, run in enumerate(runs[1:], start=1):
        if set(run) != names:
            extra = sorted(set(run) ^ names)[:5]
            raise ValueError(f"run {i} scored other images than run 0 (e.g. {extra}); compare runs on one split")
    return {name: float(np.mean([run[name] for run in runs])) for name in sorted(names)}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float],
                      weights: Mapping[str, float] | None = None, **bootstrap_kwargs) -> Interval:
    """`paired_bootstrap` of a[name] - b[name] (weighted by weights[name], if given) over the image names both
    score (they must score the same ones)."""
    if set(a) != set(b):
        differ = sorted(set(a) ^ set(b))[:5]
        raise ValueError(f"paired_difference: the two sides scored different images (e.g. {differ})")
    names = sorted(a)
    w = None if weights is None else [weights[n] for n in names]
    return paired_bootstrap([a[n] for n in names], [b[n] for n in names], weights=w, **bootstrap_kwargs)


def seed_summary(rows: Sequence[Mapping], keys: Sequence[str], *, group: str = "method") -> dict[str, dict]:
    """{group value: {"runs": n, key: (mean, sd) over the rows of the group}} in first-seen order; a row without a
    key (or with None there) does not count for that key."""
    groups: dict[str, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(row[group], []).append(row)
    return {
        name: {"runs": len(members), **{key: mean_sd(r.get(key) for r in members) for key in keys}}
        for name, members in groups.items()
    }
