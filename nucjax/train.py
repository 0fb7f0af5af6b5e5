"""python -m nucjax.train: a config -> the training loop, validation with the real post-processing, checkpoints.

`train_and_evaluate(config, workdir)` is the whole public surface; the CLI only parses flags, joins the other
processes when it is one of several (`nucjax.distributed`), and calls it.
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import signal
import sys
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nucjax import checkpoint as checkpoint_lib
from nucjax import config as config_lib
from nucjax import distributed, intensity, parallel, variants
from nucjax.data import pipeline
from nucjax.inference import Predictor, evaluate_source
from nucjax.models import cost
from nucjax.runlog import RunLog

VALIDATION_KEYS = ("dsb2018_score", "accuracy@0.5", "accuracy@0.75", "f1@0.5", "f1@0.75", "aji_plus")  # logged

def _integer(low: int, note: str = "") -> tuple[str, Callable[[Any], bool]]:
    return f"an integer >= {low}{note}", lambda v: isinstance(v, int) and v >= low


# The keys `check_config` bounds: key -> (what a value must be, the test). Validation is off at eval_every = 0.
_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "train.steps": _integer(1),
    "train.batch_size": _integer(1),
    "train.log_every": _integer(1),
    "train.eval_every": _integer(0),
    "train.checkpoint_every": _integer(1),
    "train.keep_checkpoints": _integer(1),
    "train.eval_max_images": _integer(0, " (0 = all)"),
    "optim.learning_rate": ("a number > 0", lambda v: v > 0),
    "optim.warmup_steps": _integer(0),
    "optim.weight_decay": ("a number >= 0", lambda v: v >= 0),
    "optim.clip_norm": ("a number > 0", lambda v: v > 0),
    "optim.b1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optim.b2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "data.crop_size": _integer(1),
    "data.input_scale": ("a number > 0", lambda v: v > 0),
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises config.ConfigError naming the key whose value cannot train: before any data or model is touched, so
    that a bad value fails at once instead of deep in the loop (or at the first checkpoint, hours later)."""
    variants.get(config.variant)
    variants.compute_dtype(config)
    for key, (must, test) in _RANGES.items():
        section, name = key.split(".")
        value = config[section][name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
            raise config_lib.ConfigError(f"config key {key!r} must be {must}, got {value!r}")
    if config.train.best_metric not in VALIDATION_KEYS:
        raise config_lib.ConfigError(f"config key 'train.best_metric' must be one of the validation metrics "
                                     f"{list(VALIDATION_KEYS)}, got {config.train.best_metric!r}")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (saved whole in every checkpoint)."""

    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any
    rng: jax.Array

    def variables(self) -> dict[str, Any]:
        """The flax variables for `module.apply` (parameters, and batch statistics when the model has them)."""
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, for instance); the message says at which step and what is intact."""


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to `optim.learning_rate`, then cosine decay to zero at `train.steps`."""
    warmup = min(config.optim.warmup_steps, max(config.train.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.optim.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.train.steps, warmup + 1), end_value=0.0,
    )


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with the warm-up + cosine schedule and global-norm gradient clipping."""
    return optax.chain(
        optax.clip_by_global_norm(config.optim.clip_norm),
        optax.adamw(create_learning_rate_fn(config), b1=config.optim.b1, b2=config.optim.b2,
                    weight_decay=config.optim.weight_decay),
    )


def create_train_state(config: ml_collections.ConfigDict, module: Any, tx: optax.GradientTransformation) -> TrainState:
    """Initialises parameters from `config.seed` on a crop-sized dummy batch."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    size = config.data.crop_size
    variables = module.init({"params": init_rng, "dropout": init_rng}, jnp.zeros((1, size, size, 3)), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      batch_stats=variables.get("batch_stats", {}), rng=state_rng)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, module: Any, tx: optax.GradientTransformation,
               variant: variants.Variant, config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step: the batch's intensity augmentation, loss and gradients on the global batch, the AdamW
    update, the metrics of the step."""
    step_key = jax.random.fold_in(state.rng, state.step)
    batch = pipeline.widen(batch)
    if "intensity" in batch:  # from pipeline.train_loader; a batch made by hand is used as it is
        batch = {**batch, "image": intensity.apply(batch["image"], batch["intensity"], jax.random.fold_in(step_key, 1))}
    rngs = {"dropout": step_key}

    def loss_fn(params):
        variables = {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
        loss, parts, new_model_state = variant.loss(module, variables, batch, rngs, True, config)
        return loss, (parts, new_model_state)

    (loss, (parts, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_stats = new_model_state.get("batch_stats", state.batch_stats) if new_model_state else state.batch_stats
    finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(params)]))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": finite, **parts}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats), metrics


def jit_train_step(config: ml_collections.ConfigDict, variant: variants.Variant, module: Any,
                   tx: optax.GradientTransformation, mesh: Any, state_sharding: Any) -> Any:
    """`train_step` jitted over `mesh`: state with `state_sharding` (donated), batch sharded, metrics replicated."""
    return jax.jit(
        functools.partial(train_step, module=module, tx=tx, variant=variant, config=config),
        in_shardings=(state_sharding, parallel.data_sharded(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=0,
    )


def model_cost(variant: variants.Variant, module: Any, variables: Any, config: ml_collections.ConfigDict,
               size: int) -> tuple[int, float]:
    """(parameter count, forward FLOPs per image at size×size from XLA's cost analysis)."""
    flops = cost.forward_flops(lambda v, x, train: variant.apply(module, v, x, config), variables, (1, size, size, 3))
    return cost.count_params(variables["params"]), flops


def local_copy(tree: Any) -> Any:
    """This process's copy of replicated global arrays (on its first local device), for computations that each
    process runs on its own (prediction on its part of the validation split, cost analysis)."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)


def validate(predictor: Predictor, state: TrainState, source: Any, limit: int = 0) -> dict[str, float]:
    """Runs the real post-processing and instance metrics on the validation split with the current parameters
    (one Predictor for the whole run, so each image size is compiled once). With several processes each predicts
    its part of the split and the per-image counts are gathered before the metrics are formed."""
    predictor.variables = local_copy(state.variables())
    report, _ = evaluate_source(predictor, source, limit=limit)
    return validation_summary(report)


def validation_summary(report: Any) -> dict[str, float]:
    """The headline validation numbers of a metrics Report, keyed as logged."""
    data = report.to_dict()
    pooled = {round(row["threshold"], 2): row for row in data["pooled"]}
    summary = {
        "dsb2018_score": data["dsb2018_score"], "aji_plus": data["aji_plus"],
        "accuracy@0.5": pooled[0.5]["accuracy"], "accuracy@0.75": pooled[0.75]["accuracy"],
        "f1@0.5": pooled[0.5]["f1"], "f1@0.75": pooled[0.75]["f1"],
    }
    return {key: summary[key] for key in VALIDATION_KEYS}


class _Stop:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint and returns."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> TrainState:
    """Trains `config.variant` as the config says, in `workdir`; resumes from the workdir's latest checkpoint."""
    from nucjax import data

    check_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    variant = variants.get(config.variant)
    log = RunLog(workdir, total_steps=config.train.steps)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config_lib.to_json(config))

    # Data: prepared by process 0 alone (TFDS cannot prepare from several processes at once), then opened by all;
    # each process reads only its shard of every global batch.
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.train.batch_size, mesh)
    train_source, eval_source = distributed.process_0_first(lambda: (
        data.source_for(config, config.data.train_split),
        data.source_for(config, config.data.eval_split) if config.train.eval_every else None,
    ), "nucjax: data prepared")
    loader = pipeline.train_loader(train_source, config, target_names=variant.target_names(config), seed=config.seed,
                                   compact=True)  # uint8 masks from the workers, widened inside the jitted step

    # Model and train state.
    module = variant.model(config)
    tx = create_optimizer(config)
    abstract = jax.eval_shape(functools.partial(create_train_state, config, module, tx))
    state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), abstract)
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep=config.train.keep_checkpoints,
                                             best_metric=config.train.best_metric)
    start = checkpoints.latest_step()
    if start is not None:
        restore_target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, state_sharding)
        state = checkpoints.restore_training(start, restore_target)
        log.info(f"resumed from step {start} in {checkpoints.directory}")
    else:
        state = jax.jit(functools.partial(create_train_state, config, module, tx), out_shardings=state_sharding)()
        start = 0
    n_params, flops = model_cost(variant, module, local_copy(state.variables()), config, config.data.crop_size)
    processes = f" in {jax.process_count()} processes" if distributed.is_multiprocess() else ""
    log.info(f"{variant.name}: {n_params:,} parameters, {flops / 1e9:.2f} GFLOPs per {config.data.crop_size}² image "
             f"(forward); {jax.device_count()} {jax.devices()[0].platform} device(s){processes}, global batch "
             f"{config.train.batch_size}")
    log.write({"step": start, "event": "start", "params": n_params, "gflops_per_image": flops / 1e9,
               "devices": jax.device_count(), "processes": jax.process_count(), "platform": jax.devices()[0].platform})

    step_fn = jit_train_step(config, variant, module, tx, mesh, state_sharding)

    predictor = Predictor(config, state.variables()) if eval_source is not None else None
    learning_rate = create_learning_rate_fn(config)
    stop = _Stop()
    pending: list[dict[str, jax.Array]] = []
    last_good = start or None
    step = start
    iterator = loader.iterate(start)  # the input position is the step: batch j is a function of j
    try:
        log.start(step)
        while step < config.train.steps:
            batch = parallel.put_batch(next(iterator), mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append(metrics)
            eval_due = config.train.eval_every and (step % config.train.eval_every == 0 or step == config.train.steps)
            stopping = _stop_agreed(stop, step, config, eval_due)
            checkpoint_due = step % config.train.checkpoint_every == 0 or step == config.train.steps or stopping
            if step % config.train.log_every == 0 or checkpoint_due or eval_due:
                means = _check_finite(pending, step, last_good, checkpoints.directory)
                pending = []
                log.train(step, means, lr=float(learning_rate(step - 1)), images=config.train.batch_size)
            val = None
            if eval_due:
                val = validate(predictor, state, eval_source, config.train.eval_max_images)
                log.validation(step, val)
            if checkpoint_due or val is not None:
                checkpoints.save(step, state, config, metrics=val)
                last_good = step
            if stopping:
                log.info(f"stopped by a signal at step {step}; checkpoint saved in {checkpoints.directory}")
                break
    finally:
        iterator.close()  # stops grain's worker processes
        stop.restore()
        checkpoints.close()
        log.close()
    return state


def _stop_agreed(stop: _Stop, step: int, config: ml_collections.ConfigDict, eval_due: bool) -> bool:
    """Whether to save and stop now. One process stops at the first step after a signal; several agree at the next
    log, checkpoint or validation step (any of them signalled) so that all save the same step and stop together."""
    if not distributed.is_multiprocess():
        return stop.requested
    boundary = (step % config.train.log_every == 0 or step % config.train.checkpoint_every == 0
                or step == config.train.steps or eval_due)
    return boundary and distributed.any_process(stop.requested)


def _check_finite(pending: list[dict[str, jax.Array]], step: int, last_good: int | None,
                  directory: pathlib.Path) -> dict:
    """Means of the pending step metrics; raises TrainingError at the first non-finite loss or parameter update."""
    values = jax.device_get(pending)
    first = step - len(values) + 1
    for i, m in enumerate(values):
        problem = (f"the loss became {float(m['loss'])}" if not math.isfinite(float(m["loss"]))
                   else None if m["params_finite"] else "the update made the parameters non-finite")
        if problem:
            kept = (f"The last good checkpoint (step {last_good}) in {directory} is intact" if last_good
                    else "No checkpoint had been written yet")
            raise TrainingError(f"{problem} at step {first + i}; training stopped. {kept}: lower "
                                f"optim.learning_rate or check the data, then resume.")
    return {k: float(np.mean([m[k] for m in values])) for k in values[0] if k != "params_finite"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits `--config.key=value` overrides from the other flags."""
    parser = argparse.ArgumentParser(prog="python -m nucjax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config file, e.g. configs/unet_boundary.py")
    parser.add_argument("--workdir", required=True, help="where checkpoints, metrics.jsonl and config.json go")
    distributed.add_arguments(parser)
    overrides, rest = [], []
    for arg in argv:
        (overrides if arg.startswith("--config.") else rest).append(arg)
    args = parser.parse_args(rest)
    return args, [o[len("--config."):] for o in overrides]


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: a bad flag or config, 1: training failed in some process)."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_lib.load_config(args.config, overrides)
        check_config(config)
        launch = distributed.detect_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distributed.initialize(launch)

    def work() -> None:
        with checkpoint_lib.quiet_libraries():
            train_and_evaluate(config, args.workdir)

    return distributed.run(work, expected=(TrainingError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
