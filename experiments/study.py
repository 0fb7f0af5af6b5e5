"""python -m experiments.study: every registered variant × seeds as ordinary `nucjax.train` runs, then post-processing
tuning, evaluation on held-apart images, costs, the classical baselines, the aggregated tables and the figures.

A budget is a config file `configs/study/<budget>.py` (see `configs/study/cpu.py` for its keys). The study only orders
runs and gathers their results: a finished run is skipped, an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fnmatch
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from experiments import stats

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
BUDGET_DIR = CONFIG_DIR / "study"
RESULTS_DIR = REPO / "experiments" / "results"
FIGURES_DIR = REPO / "experiments" / "figures"
REPORT_THRESHOLDS = (0.5, 0.75, 0.9)
COST_SIZE = 256  # GFLOPs are reported per COST_SIZE² image
BUDGET_KEYS = (
    "variants", "seeds", "baseline", "eval_split", "tune_split", "tune_images", "overrides",
    "variant_overrides", "classical", "classical_tune_images", "stain", "panel", "bootstrap_samples",
)
STAIN_KEYS = ("settings", "chosen", "variant", "seeds")
PANEL_KEYS = ("crops", "size")


class StudyError(ValueError):
    """A budget or command line the study cannot use; the message names the file or flag and what is wrong."""


# ---- budgets and runs ----


def load_budget(name_or_path: str) -> tuple[str, ml_collections.ConfigDict]:
    """(budget name, its config) from `configs/study/<name>.py` or a path to such a file; checks the keys."""
    from nucjax import config as config_lib

    path = pathlib.Path(name_or_path) if name_or_path.endswith(".py") else BUDGET_DIR / f"{name_or_path}.py"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BUDGET_DIR.glob("*.py")))
        raise StudyError(f"budget {name_or_path!r}: {path} does not exist (budgets in {BUDGET_DIR}: {known})")
    budget = config_lib.load_config(path)
    for keys, section, where in ((BUDGET_KEYS, budget, ""), (STAIN_KEYS, budget.get("stain"), "stain."),
                                 (PANEL_KEYS, budget.get("panel"), "panel.")):
        missing = [k for k in keys if section is None or k not in section]
        if missing:
            raise StudyError(f"budget {path}: missing key {where}{missing[0]!r} (a budget sets {', '.join(keys)})")
    if budget.stain.chosen not in budget.stain.settings:
        raise StudyError(f"budget {path}: stain.chosen={budget.stain.chosen!r} is not one of stain.settings "
                         f"({', '.join(budget.stain.settings)})")
    return path.stem, budget


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study: `method` names its row (the variant, or the stain setting)."""

    experiment: str  # "main" or "stain"
    method: str
    variant: str
    seed: int
    workdir: pathlib.Path
    overrides: tuple[str, ...]


def select_variants(budget: ml_collections.ConfigDict, requested: Sequence[str] | None) -> list[str]:
    """The variants to run: `requested`, else the budget's, else every registered one; an unregistered `maskrcnn`
    is skipped with a note, any other unknown name is an error."""
    from nucjax import variants

    names = list(requested or budget.variants or variants.VARIANTS)
    chosen = []
    for name in names:
        if name in variants.VARIANTS:
            chosen.append(name)
        elif name == "maskrcnn":
            _say("skipping maskrcnn: it is not registered in nucjax.variants yet")
        else:
            raise StudyError(f"--variants: unknown variant {name!r}; registered: {', '.join(variants.VARIANTS)}")
    return chosen


def _common_overrides(budget: ml_collections.ConfigDict, args: argparse.Namespace) -> list[str]:
    out = list(budget.overrides) + list(args.override or ())
    if args.data_dir:
        out.append(f"data.data_dir={args.data_dir}")
    if args.manual_dir:
        out.append(f"data.manual_dir={args.manual_dir}")
    return out


def variant_overrides(budget: ml_collections.ConfigDict, variant: str) -> list[str]:
    """The budget's extra overrides of `variant`: those of every matching pattern key (`unet_*`, in sorted order),
    then those of its exact name."""
    out: list[str] = []
    for key, values in sorted(budget.variant_overrides.items()):
        if key != variant and fnmatch.fnmatchcase(variant, key):
            out += list(values)
    return out + list(budget.variant_overrides.get(variant, ()))


def plan(budget: ml_collections.ConfigDict, args: argparse.Namespace, variant_names: Sequence[str],
         seeds: Sequence[int]) -> list[Run]:
    """The main runs, seed-major (every variant at the first seed before any at the second)."""
    common = _common_overrides(budget, args) + list(budget.stain.settings[budget.stain.chosen])
    return [
        Run("main", v, v, s, pathlib.Path(args.workdir) / f"{v}-s{s}",
            tuple(common + variant_overrides(budget, v) + [f"seed={s}"]))
        for s in seeds for v in variant_names
    ]


def stain_plan(budget: ml_collections.ConfigDict, args: argparse.Namespace, seeds: Sequence[int] | None) -> list[Run]:
    """The stain-robustness runs: `stain.variant` trained with each of `stain.settings`."""
    v = budget.stain.variant
    common = _common_overrides(budget, args)
    return [
        Run("stain", name, v, s, pathlib.Path(args.workdir) / f"stain-{name}-s{s}",
            tuple(common + list(settings) + variant_overrides(budget, v) + [f"seed={s}"]))
        for s in (seeds or budget.stain.seeds) for name, settings in budget.stain.settings.items()
    ]


def run_config(run: Run) -> ml_collections.ConfigDict:
    """`configs/<variant>.py` with the run's overrides."""
    from nucjax import config as config_lib

    return config_lib.load_config(CONFIG_DIR / f"{run.variant}.py", run.overrides)


# ---- measuring ----


class PeakRss:
    """Samples this process's resident memory (Linux /proc) every `interval` s while in the `with` block."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _rss_mb(self) -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _sample(self) -> None:
        while True:
            rss = self._rss_mb()
            if rss is not None:
                self.peak_mb = max(self.peak_mb or 0.0, rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def device_peak_mb() -> float | None:
    """Peak device memory of this process in MiB where the backend reports it (GPUs), else None."""
    import jax

    try:
        memory = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics raise various errors
        return None
    peak = memory.get("peak_bytes_in_use")
    return peak / 2**20 if peak is not None else None


def machine() -> dict[str, Any]:
    """The machine that produced a number: CPU model and cores, memory, JAX backend and device kind."""
    import jax

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    device = jax.devices()[0]
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_gib": memory, "platform": device.platform,
            "device_kind": device.device_kind, "device_count": jax.device_count()}


def commit() -> str:
    """The repository's HEAD commit, with "+dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def training_log(workdir: pathlib.Path) -> dict[str, Any]:
    """Training costs from a workdir's metrics.jsonl, over every sitting of the run.

    train_wall_s: the sum over sittings of (last record - "start" record) time, so validation and checkpoints
    count and the time between sittings does not; images_per_s: the median of the train lines' rates;
    validation_curve: [elapsed s, step, dsb2018_score] per validated step (the latest record of a step);
    final_validation_score: the score at the last validated step; time_to_95_s: the elapsed time of the first
    validation reaching 95% of it.
    """
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl") if line.strip()]
    offset, sitting_start, last = 0.0, None, None
    curve: dict[int, tuple[float, int, float]] = {}
    rates = []
    for r in records:
        if r.get("event") == "start":
            if sitting_start is not None:
                offset += last - sitting_start
            sitting_start = last = r["time"]
            continue
        if sitting_start is None:
            continue
        last = r["time"]
        elapsed = offset + r["time"] - sitting_start
        if r.get("split") == "validation":
            curve[r["step"]] = (elapsed, r["step"], r["dsb2018_score"])
        elif r.get("split") == "train":
            rates.append(r["images_per_s"])
    points = [curve[s] for s in sorted(curve)]
    final = points[-1][2] if points else float("nan")
    reached = [t for t, _, score in points if final > 0 and score >= 0.95 * final]
    return {
        "train_wall_s": offset + (last - sitting_start) if sitting_start is not None else float("nan"),
        "images_per_s": float(np.median(rates)) if rates else float("nan"),
        "validation_curve": [list(p) for p in points],
        "final_validation_score": final,
        "time_to_95_s": min(reached) if reached else float("nan"),
    }


# ---- evaluation ----


def evaluate_predictions(predict: Callable[[np.ndarray], np.ndarray], source: Any, *,
                         compiled_per_shape: bool) -> dict[str, Any]:
    """Every image of `source` predicted and scored: the headline metrics, separation, by modality, per image,
    and inference megapixels/s (over images whose size was already seen when `compiled_per_shape`, so that
    compilation does not count)."""
    from nucjax import metrics, separation

    everything = metrics.Accumulator()
    by_modality: dict[str, tuple[metrics.Accumulator, list]] = {}
    touching, per_image = [], []
    seen, pixels, seconds = set(), 0, 0.0
    for i in range(len(source)):
        example = source[i]
        image, gt = example["image"], np.asarray(example["label"])
        start = time.perf_counter()
        pred = predict(image)
        elapsed = time.perf_counter() - start
        if gt.shape in seen or not compiled_per_shape:
            pixels, seconds = pixels + gt.size, seconds + elapsed
        seen.add(gt.shape)
        image_stats = everything.add(gt, pred, name=str(example["id"]))
        sep = separation.image_separation(gt, pred)
        modality = str(example.get("modality", "unknown"))
        accumulator, seps = by_modality.setdefault(modality, (metrics.Accumulator(), []))
        accumulator.add_stats(image_stats)
        seps.append(sep)
        touching.append(sep)
        per_image.append({"id": str(example["id"]), "modality": modality, "dsb2018_score": image_stats.dsb2018_score,
                          "touching_dsb2018_score": sep.score, "touching_pairs": sep.n_pairs,
                          "merged_pairs": sep.merged_pairs})
    out = {**_headline(everything.report()), **separation.summarize(touching)}
    out["by_modality"] = {
        m: {**{k: v for k, v in _headline(acc.report()).items() if k != "accuracy_curve"}, **separation.summarize(s)}
        for m, (acc, s) in sorted(by_modality.items())
    }
    out["worst_modality_dsb2018_score"] = min(d["dsb2018_score"] for d in out["by_modality"].values())
    out["per_image"] = per_image
    out["inference_mpix_per_s"] = pixels / 1e6 / seconds if seconds > 0 else float("nan")
    return out


def _headline(report: Any) -> dict[str, Any]:
    """The study's numbers from a metrics Report: scores, accuracy/F1/PQ at REPORT_THRESHOLDS, error counts, and
    the pooled accuracy at every threshold."""
    d = report.to_dict()
    pooled = {round(row["threshold"], 2): row for row in d["pooled"]}
    out = {"n_images": d["n_images"], "dsb2018_score": d["dsb2018_score"], "aji": d["aji"],
           "aji_plus": d["aji_plus"], "dice": d["dice"]}
    for t in REPORT_THRESHOLDS:
        out[f"accuracy@{t:g}"] = pooled[t]["accuracy"]
        out[f"f1@{t:g}"] = pooled[t]["f1"]
        out[f"pq@{t:g}"] = pooled[t]["panoptic_quality"]
    out.update({k: d["errors"][k] for k in ("missed", "extra", "merges", "splits")})
    out["accuracy_curve"] = {"thresholds": [r["threshold"] for r in d["pooled"]],
                             "accuracy": [r["accuracy"] for r in d["pooled"]]}
    return out


# ---- one run ----


def _workdir_file(workdir: pathlib.Path) -> pathlib.Path:
    return workdir / "study.json"


def _final_checkpoint_exists(workdir: pathlib.Path, steps: int) -> bool:
    return (workdir / "checkpoints" / str(steps)).is_dir()


def execute(run: Run, budget_name: str, budget: ml_collections.ConfigDict, rows: list[dict],
            context: Mapping[str, Any]) -> dict | None:
    """Trains (or resumes) the run unless its final checkpoint exists, then tunes, evaluates and measures it; None
    when the run is finished: the results file has its row (same run, same overrides), wherever it was trained. The
    row alone is the record, so a study can go on on another machine with only the results file carried over.

    The checkpoint predicts with the run's `predict.*` settings (tiles, TTA), so another results file with
    `--override predict.tta=True` re-evaluates finished trainings with TTA (storing its tuning beside them)."""
    from nucjax import checkpoint, data, train
    from nucjax.inference import tune_postprocess

    config = run_config(run)
    workdir = run.workdir.resolve()
    done = _final_checkpoint_exists(workdir, config.train.steps)
    if finished(rows, run):
        where = "" if done else "; its checkpoints are not here (trained elsewhere, or removed)"
        _say(f"{run.method} seed {run.seed}: finished (its row is in the results file{where}), skipped")
        return None
    notes_file = _workdir_file(workdir)
    if not done:
        _say(f"{run.method} seed {run.seed}: training in {workdir}")
        with PeakRss() as rss:
            train.train_and_evaluate(config, workdir)
        notes = json.loads(notes_file.read_text()) if notes_file.is_file() else {}
        notes["peak_host_rss_mb"] = max(notes.get("peak_host_rss_mb") or 0.0, rss.peak_mb or 0.0) or None
        notes_file.write_text(json.dumps(notes))
        if not _final_checkpoint_exists(workdir, config.train.steps):
            raise StudyError(f"{run.method} seed {run.seed}: training stopped before step {config.train.steps} "
                             f"in {workdir}; run the study again to resume it")
    _say(f"{run.method} seed {run.seed}: tuning post-processing on {budget.tune_split}, evaluating on "
         f"{budget.eval_split}")
    with PeakRss() as rss:
        settings = {key: config.predict[key] for key in ("tile_size", "tile_overlap", "tile_batch", "tta")}
        predictor = checkpoint.load(workdir, "best", **settings)
        tuned = None
        if predictor.variant.postprocess_name is not None:  # stored beside the checkpoint; reloaded to apply it
            tuned = tune_postprocess(predictor, data.source_for(config, budget.tune_split), limit=budget.tune_images,
                                     progress=False)
            predictor = checkpoint.load(workdir, "best", **settings)
        result = evaluate_predictions(predictor.predict, data.source_for(config, budget.eval_split),
                                      compiled_per_shape=True)
        n_params, flops = train.model_cost(predictor.variant, predictor.module, predictor.variables, predictor.config,
                                           COST_SIZE)
    notes = json.loads(notes_file.read_text()) if notes_file.is_file() else {}
    return {
        **_identity(run, budget_name, budget, context),
        "kind": "learned",
        "workdir": str(workdir),
        "checkpoint_step": predictor.step,
        "final_step": config.train.steps,
        "train_images_seen": config.train.steps * config.train.batch_size,
        "prediction": settings,
        "postprocess": {"params": predictor.postprocess_params,
                        "validation_score": tuned[1] if tuned is not None else None},
        **result,
        "params": n_params,
        "gflops_per_256": flops / 1e9,
        **training_log(workdir),
        "peak_host_rss_mb": max(notes.get("peak_host_rss_mb") or 0.0, rss.peak_mb or 0.0) or None,
        "peak_device_mb": device_peak_mb(),
    }


def execute_classical(name: str, budget_name: str, budget: ml_collections.ConfigDict,
                      config: ml_collections.ConfigDict, context: Mapping[str, Any]) -> dict:
    """Tunes classical method `name` on `classical_tune_images` training images (evenly spaced over the train
    split) and evaluates it like a learned run."""
    from nucjax import classical, data

    train_source = data.source_for(config, config.data.train_split)
    count = min(budget.classical_tune_images, len(train_source))
    indices = sorted(set(np.linspace(0, len(train_source) - 1, count).round().astype(int).tolist()))
    examples = [train_source[i] for i in indices]
    _say(f"{name}: tuning on {len(examples)} training images, evaluating on {budget.eval_split}")
    start = time.perf_counter()
    with PeakRss() as rss:
        params = classical.tune_classical(name, [e["image"] for e in examples], [e["label"] for e in examples])
        tune_s = time.perf_counter() - start
        result = evaluate_predictions(lambda image: classical.segment(name, image, params),
                                      data.source_for(config, budget.eval_split), compiled_per_shape=False)
    run = Run("main", name, name, 0, pathlib.Path(), ())
    return {
        **_identity(run, budget_name, budget, context),
        "kind": "classical",
        "seed": None,
        "postprocess": {"params": params, "validation_score": None},
        "tune_images": len(examples),
        **result,
        "params": 0,
        "train_wall_s": tune_s,
        "peak_host_rss_mb": rss.peak_mb,
    }


def _identity(run: Run, budget_name: str, budget: ml_collections.ConfigDict, context: Mapping[str, Any]) -> dict:
    return {"experiment": run.experiment, "method": run.method, "variant": run.variant, "seed": run.seed,
            "budget": budget_name, "eval_split": budget.eval_split, "overrides": list(run.overrides),
            "commit": context["commit"], "machine": context["machine"], "command": context["command"],
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _same_run(row: Mapping, run: Run) -> bool:
    return (row.get("experiment"), row.get("method"), row.get("seed")) == (run.experiment, run.method, run.seed)


def _settings(overrides: Sequence[str]) -> dict[str, str]:
    """KEY=VALUE overrides as the settings they leave (the last of a key wins), without where the data lies."""
    pairs = (o.split("=", 1) for o in overrides)
    return {k: v for k, v in pairs if k not in ("data.data_dir", "data.manual_dir")}


def finished(rows: Sequence[Mapping], run: Run) -> bool:
    """Whether `rows` hold `run`'s result: the same run with the same settings (a changed one runs it again)."""
    return any(_same_run(r, run) and _settings(r.get("overrides", ())) == _settings(run.overrides) for r in rows)


# ---- results files ----


def read_rows(path: pathlib.Path) -> list[dict]:
    """The JSON lines of a results file (none when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    """An exclusive lock on `path`.lock while in the block, so that several study processes (one per seed, say)
    can share one results file."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_row(path: pathlib.Path, row: Mapping) -> list[dict]:
    """Adds `row` to the results file (atomically, under a lock), replacing an earlier row of the same run; returns
    all rows."""
    key = (row["experiment"], row["method"], row["seed"])
    with _locked(path):
        rows = [r for r in read_rows(path) if (r["experiment"], r["method"], r["seed"]) != key] + [_jsonable(row)]
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
        tmp.replace(path)
    return rows


def _jsonable(value: Any) -> Any:
    """NumPy values as Python ones, NaN and infinities as None, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- aggregation ----

TABLE_KEYS = (
    "dsb2018_score", "accuracy@0.5", "accuracy@0.75", "accuracy@0.9", "f1@0.5", "f1@0.75", "f1@0.9", "pq@0.5",
    "aji_plus", "touching_dsb2018_score", "touching_recall@0.5", "touching_accuracy@0.5", "merges_per_100_pairs",
    "missed", "extra", "merges", "splits", "worst_modality_dsb2018_score", "params", "gflops_per_256",
    "train_wall_s", "images_per_s", "time_to_95_s", "final_validation_score", "inference_mpix_per_s",
    "peak_host_rss_mb", "peak_device_mb",
)
MODALITIES = ("fluorescence", "brightfield", "histology-colour")


def _flat(row: Mapping) -> dict:
    """The row with its per-modality dsb2018_score as `dsb2018_score[<modality>]` keys."""
    out = dict(row)
    for modality, values in (row.get("by_modality") or {}).items():
        out[f"dsb2018_score[{modality}]"] = values["dsb2018_score"]
        out[f"n_images[{modality}]"] = values["n_images"]
    return out


PAIRED_KEYS = ("dsb2018_score", "touching_dsb2018_score", "merges_per_100_pairs")
"""What the paired comparisons compare, each from the rows' `per_image` entries: the DSB2018 score (every image),
the touching-nuclei DSB2018 score (images with touching nuclei) and merges per 100 touching pairs (images with
touching pairs, weighted by their number of pairs, so the mean difference is that of the pooled ratios)."""


def _per_image(rows: Sequence[Mapping], key: str) -> tuple[dict[str, float], dict[str, float] | None] | None:
    """({image id: value averaged over the rows (seeds)}, {image id: weight} or None) for one of PAIRED_KEYS; None
    when a row lacks the per-image fields (rows written before they were recorded)."""
    field = {"merges_per_100_pairs": "merged_pairs"}.get(key, key)
    if any(field not in p for r in rows for p in r["per_image"]):
        return None
    if key == "merges_per_100_pairs":
        runs = [{p["id"]: 100.0 * p["merged_pairs"] / p["touching_pairs"]
                 for p in r["per_image"] if p["touching_pairs"]} for r in rows]
        return stats.per_image_means(runs), {p["id"]: p["touching_pairs"] for p in rows[0]["per_image"]
                                             if p["touching_pairs"]}
    runs = [{p["id"]: p[key] for p in r["per_image"] if p[key] is not None} for r in rows]
    return stats.per_image_means(runs), None


def paired_differences(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], n_boot: int) -> dict[str, dict | None]:
    """{key: the paired difference B - A (`stats.Interval.to_dict()`) or None} for PAIRED_KEYS, from two methods'
    rows (each averaged over its seeds; bootstrap over images)."""
    out = {}
    for key in PAIRED_KEYS:
        sides = [_per_image(rows, key) for rows in (rows_a, rows_b)]
        if sides[0] is None or sides[1] is None or not sides[0][0]:
            out[key] = None
            continue
        (a, weights), (b, _) = sides
        out[key] = stats.paired_difference(b, a, weights, n_boot=n_boot).to_dict()
    return out


def aggregate(rows: Sequence[Mapping], baseline: str, n_boot: int) -> list[dict]:
    """One summary per method: runs, kind, (mean, sd) of TABLE_KEYS and the per-modality scores, and under
    "vs_baseline" its paired differences against `baseline` (`paired_differences`: per-image values averaged over
    each method's seeds, bootstrap over images), or None."""
    flat = [_flat(r) for r in rows]
    keys = list(TABLE_KEYS) + [f"dsb2018_score[{m}]" for m in MODALITIES] + [f"n_images[{m}]" for m in MODALITIES]
    summary = stats.seed_summary(flat, keys)
    by_method = {method: [r for r in rows if r["method"] == method] for method in summary}
    out = []
    for method, values in summary.items():
        first = by_method[method][0]
        entry = {"method": method, "kind": first.get("kind"), **values, "vs_baseline": None}
        if method != baseline and baseline in by_method:
            entry["vs_baseline"] = paired_differences(by_method[baseline], by_method[method], n_boot)
        out.append(entry)
    return out


def write_csv(summary: Sequence[Mapping], path: pathlib.Path) -> pathlib.Path:
    """One line per method: method, kind, runs, <key>_mean and <key>_sd, and for each of PAIRED_KEYS the paired
    difference against the baseline: <key>_diff, <key>_low, <key>_high, <key>_images (empty where there is none)."""
    keys = [k for k in summary[0] if k not in ("method", "kind", "runs", "vs_baseline")]
    header = ["method", "kind", "runs"] + [f"{k}_{s}" for k in keys for s in ("mean", "sd")]
    header += [f"{k}_{s}" for k in PAIRED_KEYS for s in ("diff", "low", "high", "images")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for entry in summary:
            line = [entry["method"], entry["kind"], entry["runs"]]
            line += [_csv_number(v) for k in keys for v in entry[k]]
            for key in PAIRED_KEYS:
                diff = (entry["vs_baseline"] or {}).get(key)
                line += [_csv_number(diff[k]) for k in ("mean", "low", "high")] + [diff["n"]] if diff else [""] * 4
            writer.writerow(line)
    return path


def _csv_number(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.6g}"


def _pm(pair: tuple[float, float], digits: int = 3, scale: float = 1.0) -> str:
    mean, sd = pair
    if not math.isfinite(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {sd * scale:.{digits}f}" if math.isfinite(sd) else "")


def markdown(summary: Sequence[Mapping], rows: Sequence[Mapping], *, title: str, baseline: str) -> str:
    """The tables of one results file as Markdown: accuracy, separation, by modality, paired differences, cost,
    then where the numbers come from."""
    def table(header: Sequence[str], lines: list[list[str]]) -> list[str]:
        rule = "|" + "---|" * len(header)
        return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(x) + " |" for x in lines]

    def interval(d: Mapping | None, digits: int = 4) -> list[str]:
        if d is None:
            return ["–", "–"]
        return [f"{d['mean']:+.{digits}f}", f"[{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"]

    s = list(summary)
    out = [f"# {title}", "", "Mean ± sd over seeds (classical rows: one deterministic run). Held-apart split: "
           f"{rows[0]['eval_split']}, {rows[0]['n_images']} images.", "", "## Accuracy", ""]
    out += table(["method", "runs", "DSB2018 score", "acc@0.5", "acc@0.75", "acc@0.9", "F1@0.5", "PQ@0.5", "AJI+"],
                 [[e["method"], str(e["runs"]), _pm(e["dsb2018_score"]), _pm(e["accuracy@0.5"]),
                   _pm(e["accuracy@0.75"]), _pm(e["accuracy@0.9"]), _pm(e["f1@0.5"]), _pm(e["pq@0.5"]),
                   _pm(e["aji_plus"])] for e in s])
    out += ["", "## Separation of touching nuclei", "",
            "Restricted to ground-truth nuclei touching another (8-adjacency); see `nucjax/separation.py`.", ""]
    out += table(["method", "touching DSB2018", "touching recall@0.5", "touching acc@0.5", "merges / 100 pairs",
                  "missed", "extra", "merges", "splits"],
                 [[e["method"], _pm(e["touching_dsb2018_score"]), _pm(e["touching_recall@0.5"]),
                   _pm(e["touching_accuracy@0.5"]), _pm(e["merges_per_100_pairs"], 1), _pm(e["missed"], 1),
                   _pm(e["extra"], 1), _pm(e["merges"], 1), _pm(e["splits"], 1)] for e in s])
    counts = {m: s[0][f"n_images[{m}]"][0] for m in MODALITIES}
    out += ["", "## DSB2018 score by modality", ""]
    out += table(["method"] + [f"{m} ({'–' if not math.isfinite(counts[m]) else int(counts[m])} images)"
                               for m in MODALITIES] + ["worst modality"],
                 [[e["method"]] + [_pm(e[f"dsb2018_score[{m}]"]) for m in MODALITIES]
                  + [_pm(e["worst_modality_dsb2018_score"])] for e in s])
    compared = [e for e in s if e["vs_baseline"] is not None]
    out += ["", f"## Paired difference in per-image DSB2018 score against {baseline}", "",
            "Each image's score averaged over a method's seeds, minus the baseline's; percentile bootstrap over "
            "images (95%). \"Better\" needs an interval that excludes zero.", ""]
    out += table(["method", "mean difference", "95% interval", "images", "excludes 0"],
                 [[e["method"], *interval(d), str(d["n"]), "yes" if d["low"] > 0 or d["high"] < 0 else "no"]
                  for e in compared if (d := e["vs_baseline"]["dsb2018_score"]) is not None])
    touching = [e for e in compared if e["vs_baseline"]["touching_dsb2018_score"] is not None]
    if touching:  # images with a touching nucleus are those with a touching pair: one count for both columns
        n = touching[0]["vs_baseline"]["touching_dsb2018_score"]["n"]
        out += ["", f"## Paired difference on touching nuclei against {baseline}", "",
                f"The same on the {n} images with touching nuclei: their touching-nuclei DSB2018 score, and merges per "
                "100 touching pairs (each image weighted by its pairs, so the mean is the difference of the pooled "
                "ratios; fewer merges is better).", ""]
        out += table(["method", "touching DSB2018 Δ", "95% interval", "merges / 100 pairs Δ", "95% interval"],
                     [[e["method"], *interval(e["vs_baseline"]["touching_dsb2018_score"]),
                       *interval(e["vs_baseline"]["merges_per_100_pairs"], 1)] for e in touching])
    out += ["", "## Cost", ""]
    out += table(["method", "params (M)", "GFLOPs / 256²", "train wall (min)", "train img/s", "to 95% (min)",
                  "inference MP/s", "peak RSS (MiB)", "peak device (MiB)"],
                 [[e["method"], _pm(e["params"], 3, 1e-6), _pm(e["gflops_per_256"], 2),
                   _pm(e["train_wall_s"], 1, 1 / 60), _pm(e["images_per_s"], 1), _pm(e["time_to_95_s"], 1, 1 / 60),
                   _pm(e["inference_mpix_per_s"], 2), _pm(e["peak_host_rss_mb"], 0), _pm(e["peak_device_mb"], 0)]
                  for e in s])
    machines = sorted({json.dumps(r["machine"], sort_keys=True) for r in rows})
    commands = sorted({"`" + r["command"] + "`" for r in rows})
    commits = sorted({r["commit"] for r in rows})
    out += ["", "## Provenance", "", f"- commands: {', '.join(commands)}", f"- commits: {', '.join(commits)}"]
    out += [f"- machine: {m}" for m in machines]
    return "\n".join(out) + "\n"


def write_tables(rows: Sequence[Mapping], stem: pathlib.Path, *, title: str, baseline: str,
                 n_boot: int) -> list[pathlib.Path]:
    """`<stem>.csv` and `<stem>.md` from the rows of one results file."""
    summary = aggregate(rows, baseline, n_boot)
    md = stem.with_suffix(".md")
    md.write_text(markdown(summary, rows, title=title, baseline=baseline))
    return [write_csv(summary, stem.with_suffix(".csv")), md]


# ---- the crowded-crops panel ----


def crowded_crops(rows: Sequence[Mapping], budget: ml_collections.ConfigDict,
                  config: ml_collections.ConfigDict) -> list[dict]:
    """Crops of the held-apart images with the most touching pairs, centred where touching nuclei are densest,
    with each method's prediction (a learned method: its lowest seed's run whose checkpoints are here)."""
    from scipy import ndimage

    from nucjax import checkpoint, classical, data, separation

    source = data.source_for(config, budget.eval_split)
    counts = [len(separation.touching_pairs(source[i]["label"])) for i in range(len(source))]
    chosen = [i for i in np.argsort(counts, kind="stable")[::-1][: budget.panel.crops] if counts[i] > 0]
    predictors: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for row in sorted(rows, key=lambda r: (r["kind"] == "classical", r["seed"] or 0)):  # learned first, lowest seed
        if row["method"] in predictors:
            continue
        if row["kind"] == "classical":
            predictors[row["method"]] = (lambda name, params: lambda im: classical.segment(name, im, params))(
                row["variant"], row["postprocess"]["params"])
        elif (pathlib.Path(row["workdir"]) / checkpoint.CHECKPOINT_DIR).is_dir():  # not when trained elsewhere
            predictors[row["method"]] = checkpoint.load(row["workdir"], "best", **row.get("prediction", {})).predict
    crops = []
    for i in chosen:
        example = source[int(i)]
        gt = np.asarray(example["label"])
        size = min(budget.panel.size, *gt.shape)
        density = ndimage.uniform_filter(np.isin(gt, separation.touching_ids(gt)).astype(np.float32), size)
        cy, cx = np.unravel_index(np.argmax(density), gt.shape)
        y0 = int(np.clip(cy - size // 2, 0, gt.shape[0] - size))
        x0 = int(np.clip(cx - size // 2, 0, gt.shape[1] - size))
        window = (slice(y0, y0 + size), slice(x0, x0 + size))
        crops.append({"id": example["id"], "image": np.asarray(example["image"])[window], "gt": gt[window],
                      "preds": {m: predict(example["image"])[window] for m, predict in predictors.items()}})
    return crops


# ---- the command line ----


@contextlib.contextmanager
def compilation_cache(directory: pathlib.Path) -> Iterator[str]:
    """JAX's persistent compilation cache in `directory` while in the block (unless one is set already, e.g. by
    $JAX_COMPILATION_CACHE_DIR, which is kept): seeds of a variant, and every validation, evaluation and prediction
    of one image size, then reuse one compilation instead of paying XLA's compile time again."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    previous = jax.config.jax_compilation_cache_dir
    if previous:
        yield previous
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    cache.reset_cache()
    try:
        yield str(directory)
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        cache.reset_cache()


def _say(message: str) -> None:
    print(f"[study] {message}", file=sys.stderr, flush=True)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", required=True, help="a name in configs/study/ (cpu, gpu) or a budget .py file")
    parser.add_argument("--workdir", required=True, help="runs go to WORKDIR/<variant>-s<seed>/")
    parser.add_argument("--variants", type=lambda t: [x for x in t.split(",") if x], help="a,b: a subset of variants")
    parser.add_argument("--seeds", type=_int_list, help="0,1: a subset of seeds")
    parser.add_argument("--data-dir", help="prepared datasets (default $NUCJAX_DATA_DIR or ~/.cache/nucjax/datasets)")
    parser.add_argument("--manual-dir", help="raw DSB2018 (default $NUCJAX_DSB2018_DIR)")
    parser.add_argument("--results-dir", type=pathlib.Path, default=RESULTS_DIR, help="default experiments/results")
    parser.add_argument("--figures-dir", type=pathlib.Path, default=FIGURES_DIR, help="default experiments/figures")
    parser.add_argument("--stain", action="store_true",
                        help="run the stain-robustness experiment (budget's stain section) instead of the main runs")
    parser.add_argument("--override", action="append", metavar="KEY=VALUE",
                        help="a config override for every run, after the budget's (repeatable), e.g. train.steps=1500")
    parser.add_argument("--gather", action="store_true",
                        help="train nothing: add the classical rows if missing, then write the tables and figures "
                             "from the results file as it is")
    parser.add_argument("--no-classical", dest="classical", action="store_false",
                        help="skip the classical baselines (e.g. in all but one of several processes sharing a "
                             "results file)")
    return parser.parse_args(argv)


def run_study(args: argparse.Namespace, command: str) -> list[pathlib.Path]:
    """Runs (or resumes) the study the arguments describe (`command`: how it was invoked, for the records);
    returns the tables and figures written."""
    from experiments import figures

    budget_name, budget = load_budget(args.budget)
    context = {"commit": commit(), "machine": machine(), "command": command}
    start = time.perf_counter()
    if args.stain:
        planned = stain_plan(budget, args, args.seeds)
        results = args.results_dir / f"{budget_name}-stain.jsonl"
    else:
        planned = plan(budget, args, select_variants(budget, args.variants), args.seeds or list(budget.seeds))
        results = args.results_dir / f"{budget_name}.jsonl"
    runs = [] if args.gather else planned
    rows = read_rows(results)
    for k, run in enumerate(runs, start=1):
        _say(f"run {k}/{len(runs)}")
        row = execute(run, budget_name, budget, rows, context)
        if row is not None:
            rows = write_row(results, row)
    data_config = run_config(planned[0]) if planned else None  # the data settings every run shares
    if not args.stain and data_config is not None and args.classical:
        for name in budget.classical:
            if not any(r["method"] == name and r["kind"] == "classical" for r in rows):
                rows = write_row(results, execute_classical(name, budget_name, budget, data_config, context))
    if not rows:
        raise StudyError("no runs were selected and the results file is empty: nothing to aggregate")
    baseline = budget.stain.chosen if args.stain else budget.baseline
    title = f"Study results: budget {budget_name}" + (" (stain robustness)" if args.stain else "")
    written = write_tables(rows, results.with_suffix(""), title=title, baseline=baseline,
                           n_boot=budget.bootstrap_samples)
    if not args.stain:
        crops = crowded_crops(rows, budget, data_config) if data_config is not None else []
        written += figures.write_all(rows, crops, args.figures_dir, budget_name)
    _say(f"done in {(time.perf_counter() - start) / 60:.1f} min; wrote " + ", ".join(str(p) for p in written))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    from nucjax.checkpoint import quiet_libraries
    from nucjax.train import TrainingError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        with compilation_cache(pathlib.Path(args.workdir) / "jax_cache"), quiet_libraries():  # as nucjax.train's
            run_study(args, "python -m experiments.study " + " ".join(argv))
    except (ValueError, TrainingError) as e:  # StudyError, ConfigError, CheckpointError, bad data, a NaN loss
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
