"""Times nucjax.metrics.evaluate against stardist.matching.matching_dataset on DSB2018 stage1_train and checks
that every pooled number is identical.

    .venv/bin/python benchmarks/bench_metrics.py [--data-dir DIR] [--limit N] [--repeat R]

Ground truth: each image's masks (nucjax.data.io.read_mask_folder); prediction: a deterministic perturbed copy.
Data is read and perturbed once, before either timing.
"""

import argparse
import os
import pathlib
import time

import numpy as np
from skimage.segmentation import expand_labels
from stardist.matching import matching, matching_dataset

from nucjax import metrics
from nucjax.data.io import read_mask_folder


def erode(labels: np.ndarray) -> np.ndarray:
    """Each object loses the pixels whose 4-neighbourhood leaves it."""
    padded = np.pad(labels, 1, mode="edge")
    same = np.ones(labels.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        same &= padded[dy : dy + labels.shape[0], dx : dx + labels.shape[1]] == labels
    return np.where(same, labels, 0)


def perturb(labels: np.ndarray, seed: int) -> np.ndarray:
    """An imperfect prediction of labels: int[H, W]: eroded or dilated by a pixel, then about 5% of objects
    dropped, 10% of touching pairs merged, 10% of objects split down their centroid column, and three spurious
    5x5 objects added. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    out = expand_labels(labels, 1) if rng.random() < 0.5 else erode(labels)
    n = int(labels.max())
    lut = np.arange(n + 1)
    lut[1:][rng.random(n) < 0.05] = 0
    left, right = out[:, :-1].ravel(), out[:, 1:].ravel()
    touching = np.unique(np.stack([left, right], 1)[(left != right) & (left > 0) & (right > 0)], axis=0)
    for a, b in touching[rng.random(len(touching)) < 0.1]:
        lut[b] = lut[a]
    out = lut[out]
    cols = np.broadcast_to(np.arange(out.shape[1]), out.shape)
    area = np.bincount(out.ravel(), minlength=n + 1)
    centre = np.bincount(out.ravel(), cols.ravel(), minlength=n + 1) / np.maximum(area, 1)
    split = np.zeros(n + 1, bool)
    split[1:] = rng.random(n) < 0.1
    out = np.where(split[out] & (cols > centre[out]), out + n, out)
    for k in range(3):
        y, x = rng.integers(0, out.shape[0] - 5), rng.integers(0, out.shape[1] - 5)
        patch = out[y : y + 5, x : x + 5]
        patch[patch == 0] = 2 * n + 1 + k
    return out.astype(np.uint16)


def load(data_dir: pathlib.Path, limit: int | None) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Names, ground truths and perturbed predictions (uint16[H, W]) of the first `limit` stage1_train images."""
    folders = sorted(p for p in (data_dir / "stage1_train").iterdir() if p.is_dir())[:limit]
    names, gts, preds = [], [], []
    for i, folder in enumerate(folders):
        labels, _ = read_mask_folder(folder / "masks", overlap="first")
        names.append(folder.name)
        gts.append(labels.astype(np.uint16))
        preds.append(perturb(labels, seed=i))
    return names, gts, preds


def main() -> None:
    repo = pathlib.Path(__file__).resolve().parents[1]
    default_dir = os.environ.get("NUCJAX_DSB2018_DIR") or str(repo.parent / "shared" / "data" / "dsb2018")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_dir, help="folder holding stage1_train/ (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (default: all 670)")
    parser.add_argument("--repeat", type=int, default=1, help="time each R times and keep the fastest")
    args = parser.parse_args()

    start = time.perf_counter()
    names, gts, preds = load(pathlib.Path(args.data_dir), args.limit)
    n_objects = sum(int(np.count_nonzero(np.bincount(g.ravel())[1:])) for g in gts)
    print(f"loaded {len(gts)} images, {sum(g.size for g in gts) / 1e6:.1f} Mpixels, {n_objects} nuclei "
          f"in {time.perf_counter() - start:.1f} s (not timed below)")

    thresholds = metrics.DEFAULT_THRESHOLDS
    matching(gts[0], preds[0], thresh=thresholds)  # compiles StarDist's numba kernel outside the timing
    times = {"nucjax.metrics.evaluate": [], "stardist matching_dataset": []}
    for _ in range(args.repeat):
        start = time.perf_counter()
        report = metrics.evaluate(gts, preds, names=names, thresholds=thresholds)
        times["nucjax.metrics.evaluate"].append(time.perf_counter() - start)
        start = time.perf_counter()
        reference = matching_dataset(gts, preds, thresh=thresholds, by_image=False, show_progress=False)
        times["stardist matching_dataset"].append(time.perf_counter() - start)

    ours, theirs = min(times["nucjax.metrics.evaluate"]), min(times["stardist matching_dataset"])
    differences = [
        f"threshold {row['threshold']}: {field} {row[field]!r} vs {getattr(ref, field)!r}"
        for row, ref in zip(report.pooled, reference)
        for field in metrics.FIELDS
        if row[field] != getattr(ref, field)
    ]
    print(f"nucjax.metrics.evaluate (all metrics):   {ours:8.2f} s")
    print(f"stardist.matching.matching_dataset:      {theirs:8.2f} s")
    print(f"speed-up: {theirs / ours:.2f}x   ({len(thresholds)} thresholds, best of {args.repeat})")
    print(f"every pooled number identical: {not differences}")
    for line in differences:
        print("  " + line)
    print()
    print(report.summary())


if __name__ == "__main__":
    main()
