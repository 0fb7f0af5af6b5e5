"""Orbax checkpoints of a run (train state, config; the step is the input pipeline's position) and `load()`, which
rebuilds a Predictor.

Every process of a multi-process run takes part in each save into the one directory (a shared filesystem), and the
step appears only when all of it is written. A checkpoint written by N processes restores in any number of
processes, with any number of grain workers.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Any, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

import nucjax
from nucjax import config as config_lib

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
POSTPROCESS_FILE = "postprocess.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or from an incompatible version; the message names the path."""


def _best_mode(metric: str) -> str:
    return "min" if "loss" in metric else "max"


class Checkpoints:
    """The checkpoints of one workdir: the last `keep` plus the best by `best_metric`, each written atomically."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, best_metric: str = "dsb2018_score",
                 read_only: bool = False):
        self.directory = pathlib.Path(workdir).resolve() / CHECKPOINT_DIR
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {pathlib.Path(workdir)}: {self.directory} does not exist")
        mode = _best_mode(best_metric)
        metric = lambda m: m[best_metric]  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            best_fn=metric,
            best_mode=mode,
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=metric, reverse=mode == "min", n=1, keep_checkpoints_without_metrics=False),
            ]),
            enable_async_checkpointing=False,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best validation metric (the latest step when none has metrics)."""
        best = self.manager.best_step()
        return best if best is not None else self.manager.latest_step()

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict,
             metrics: Mapping[str, float] | None = None) -> None:
        """Writes the train state and the config at `step` (atomically); every process must call it. The input
        pipeline's position is the step itself (`pipeline.train_loader`'s batch j is a function of j), so a run
        resumes under any number of processes and grain workers."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config_lib.to_json(config))),
            meta=ocp.args.JsonSave({"format_version": FORMAT_VERSION, "nucjax": nucjax.__version__}),
        )
        self.manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=True)
        self.manager.wait_until_finished()

    def restore_training(self, step: int, abstract_state: Any) -> Any:
        """The train state at `step`, with the shardings of `abstract_state` (whatever the process and device count
        that wrote it). Checkpoints of earlier nucjax versions also hold a `data` item (grain iterator positions):
        it is not read, the step gives the position."""
        self._check_meta(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def restore_for_inference(self, step: int) -> tuple[ml_collections.ConfigDict, Any]:
        """The config and the raw train state (NumPy leaves) at `step`, with no model needed beforehand; read by this
        process alone, whatever the number of processes and devices that wrote it."""
        self._check_meta(step)
        path = self.directory / str(step)
        try:
            handler = ocp.StandardCheckpointHandler()
            tree = handler.metadata(epath.Path(path / "state"))  # shapes and dtypes: no devices needed
            handler.close()
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(restore_args=as_numpy), config=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # orbax raises many types for unreadable files
            raise CheckpointError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
        return config_lib.from_dict(restored["config"]), restored["state"]

    def _check_meta(self, step: int) -> None:
        path = self.directory / str(step)
        meta_file = path / "meta" / "metadata"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            raise CheckpointError(f"checkpoint {path} is missing or corrupt (cannot read {meta_file})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format version {meta.get('format_version')}, this nucjax reads version "
                f"{FORMAT_VERSION}: it was written by an incompatible nucjax ({meta.get('nucjax')})"
            )

    def resolve_step(self, step: int | str) -> int:
        """Turns "best", "latest" or a number into a saved step; raises naming the directory when there is none."""
        steps = self.manager.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        if step == "latest":
            return self.manager.latest_step()
        if step == "best":
            return self.best_step()
        if not (isinstance(step, int) or str(step).isdigit()):
            raise CheckpointError(f"step must be 'best', 'latest' or a step number, got {step!r}")
        if int(step) not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; saved steps: {sorted(steps)}")
        return int(step)

    def close(self) -> None:
        self.manager.close()


def find_workdir(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
    """Accepts a workdir, its checkpoints/ folder or one step folder; returns the workdir and the step if one was named."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / CHECKPOINT_DIR).is_dir():
        return path, None
    if path.name == CHECKPOINT_DIR:
        return path.parent, None
    if path.parent.name == CHECKPOINT_DIR and path.name.isdigit():
        return path.parent.parent, int(path.name)
    raise CheckpointError(f"{path} is neither a nucjax workdir (with {CHECKPOINT_DIR}/) nor a checkpoint inside one")


def read_postprocess(workdir: str | pathlib.Path, step: int) -> dict | None:
    """Tuned post-processing parameters stored for `step` of the workdir, or None."""
    file = pathlib.Path(workdir) / CHECKPOINT_DIR / POSTPROCESS_FILE
    if not file.is_file():
        return None
    entry = json.loads(file.read_text()).get(str(step))
    return None if entry is None else entry["params"]


def write_postprocess(workdir: str | pathlib.Path, step: int, params: Mapping[str, Any], score: float) -> pathlib.Path:
    """Stores tuned post-processing parameters for `step` beside the checkpoints (written atomically)."""
    file = pathlib.Path(workdir) / CHECKPOINT_DIR / POSTPROCESS_FILE
    table = json.loads(file.read_text()) if file.is_file() else {}
    table[str(step)] = {"params": dict(params), "dsb2018_score": float(score)}
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=2, sort_keys=True))
    tmp.replace(file)
    return file


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silences absl warnings (orbax's notes on read-only checkpoints, TFDS's on configs) that are not for users."""
    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(previous)


def load(path: str | pathlib.Path, step: int | str = "best", **predictor_kwargs: Any):
    """Rebuilds a `Predictor` from a workdir (or a checkpoint in it): config and post-processing come from the checkpoint."""
    from nucjax.inference import Predictor

    workdir, named_step = find_workdir(path)
    with quiet_libraries():
        checkpoints = Checkpoints(workdir, read_only=True)
        try:
            step = checkpoints.resolve_step(named_step if named_step is not None else step)
            config, state = checkpoints.restore_for_inference(step)
        finally:
            checkpoints.close()
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    params = read_postprocess(workdir, step)
    variables = jax.tree.map(jax.numpy.asarray, variables)
    return Predictor(config, variables, postprocess=params, step=step, workdir=workdir, **predictor_kwargs)
