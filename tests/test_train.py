"""The training loop: every variant overfits a batch; kill -9 and resume is bitwise exact; devices agree; NaN stops."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nucjax import checkpoint, variants
from nucjax.data import synthetic, targets
from nucjax.data.pipeline import normalize_image
from nucjax.train import TrainingError, create_optimizer, create_train_state, train_and_evaluate, train_step
from tests.conftest import REPO, TINY_OVERRIDES, tiny_config


def _batch(variant, config, n=2, size=64):
    images, labels = zip(*[synthetic.generate(seed, height=size, width=size) for seed in range(n)])
    batch = {"image": np.stack([normalize_image(im) for im in images]), "valid": np.ones((n, size, size), np.float32)}
    per_image = [targets.compute(label, variant.target_names(config), config.targets) for label in labels]
    batch.update({k: np.stack([t[k] for t in per_image]) for k in per_image[0]})
    return batch


@pytest.mark.parametrize("name", ["unet_mask", "unet_boundary", "unet_3class"])
def test_each_unet_variant_overfits_one_batch(name, tmp_path):
    config = tiny_config(tmp_path, f"variant={name}", "optim.learning_rate=0.01", "optim.warmup_steps=0",
                         "optim.weight_decay=0.0", "train.steps=1000")
    variant = variants.get(name)
    batch = _batch(variant, config)
    module, tx = variant.model(config), create_optimizer(config)
    state = create_train_state(config, module, tx)
    step = jax.jit(functools.partial(train_step, module=module, tx=tx, variant=variant, config=config))
    losses = []
    for _ in range(100):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] <= 0.1 * losses[0], losses[::10]


def _cli(workdir, data_dir, *overrides):
    args = [f"--config.{o}" for o in (f"data.data_dir={data_dir}", *TINY_OVERRIDES, *overrides)]
    return [sys.executable, "-m", "nucjax.train", "--config", str(REPO / "configs" / "quickstart.py"),
            "--workdir", str(workdir), *args]


def _wait_for_checkpoint(process, directory, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in directory.glob("[0-9]*") if p.name.isdigit()]
        if steps:
            return min(steps)
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def _restored_params(workdir, step):
    cps = checkpoint.Checkpoints(workdir, read_only=True)
    try:
        _, state = cps.restore_for_inference(step)
    finally:
        cps.close()
    return state


def _train_losses(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r.get("split") == "train"}


RESUME = ("train.steps=120", "train.checkpoint_every=10", "train.eval_every=0", "train.log_every=1")


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, data_dir, trained_workdir):
    straight = tmp_path / "straight"
    train_and_evaluate(tiny_config(data_dir, *RESUME), straight)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli(killed, data_dir, *RESUME), stderr=subprocess.PIPE, text=True)
    first = _wait_for_checkpoint(process, killed / "checkpoints")
    process.send_signal(signal.SIGKILL)
    process.wait()
    cps = checkpoint.Checkpoints(killed, read_only=True)
    interrupted_at = cps.latest_step()
    cps.close()
    assert first <= interrupted_at < 120, "the run must be killed before it finished"
    train_and_evaluate(tiny_config(data_dir, *RESUME), killed)

    a, b = _restored_params(straight, 120), _restored_params(killed, 120)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    losses_a, losses_b = _train_losses(straight), _train_losses(killed)
    assert all(losses_a[s] == losses_b[s] for s in range(interrupted_at + 1, 121))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_dir, trained_workdir):
    workdir = tmp_path / "run"
    process = subprocess.Popen(_cli(workdir, data_dir, "train.steps=100000", "train.checkpoint_every=5",
                                    "train.eval_every=0"), stderr=subprocess.PIPE, text=True)
    first = _wait_for_checkpoint(process, workdir / "checkpoints")
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "stopped by a signal" in err
    cps = checkpoint.Checkpoints(workdir, read_only=True)
    last = cps.latest_step()
    cps.close()
    assert last > first, (first, last)


def test_four_devices_give_the_losses_of_one(tmp_path, data_dir, trained_workdir):
    overrides = ("train.steps=3", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=3")
    one = tmp_path / "one"
    train_and_evaluate(tiny_config(data_dir, *overrides), one)
    four = tmp_path / "four"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run(_cli(four, data_dir, *overrides), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "4 cpu device(s)" in done.stderr
    a, b = _train_losses(one), _train_losses(four)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, trained_workdir):
    workdir = tmp_path / "nan"
    config = tiny_config(data_dir, "optim.learning_rate=inf", "optim.warmup_steps=0", "train.checkpoint_every=1",
                         "train.eval_every=0", "train.steps=5")
    with pytest.raises(TrainingError, match="non-finite at step 1") as info:
        train_and_evaluate(config, workdir)
    assert "No checkpoint had been written yet" in str(info.value)
    assert not (workdir / "checkpoints" / "1").exists()


def test_a_nan_loss_is_reported_with_its_step(tmp_path, data_dir, trained_workdir):
    workdir = tmp_path / "nan"
    config = tiny_config(data_dir, "train.checkpoint_every=1", "train.eval_every=0", "train.steps=5")
    good = train_and_evaluate(config, workdir)  # 5 good steps; then a NaN image poisons step 6
    del good
    nan_variant = variants.Variant(**{**variants.get("unet_boundary").__dict__, "name": "nan_after_5"})
    original = nan_variant.loss

    def loss(module, variables, batch, rngs, train, config):
        total, parts, state = original(module, variables, batch, rngs, train, config)
        return total * jax.numpy.nan, parts, state

    variants.register(variants.Variant(**{**nan_variant.__dict__, "loss": loss}))
    try:
        config = tiny_config(data_dir, "variant=nan_after_5", "train.checkpoint_every=1", "train.eval_every=0",
                             "train.steps=8")
        with pytest.raises(TrainingError, match="loss became nan at step 6") as info:
            train_and_evaluate(config, workdir)
        assert "last good checkpoint (step 5)" in str(info.value)
    finally:
        del variants.VARIANTS["nan_after_5"]
    predictor = checkpoint.load(workdir, step="latest")
    assert predictor.step == 5
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(predictor.variables))


def test_workdir_holds_the_resolved_config_and_json_metrics(trained_workdir):
    saved = json.loads((trained_workdir / "config.json").read_text())
    assert saved["train"]["steps"] == 4 and saved["variant"] == "unet_boundary"
    records = [json.loads(line) for line in (trained_workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "validation"] == [2, 4]
    assert all({"loss", "lr", "images_per_s", "eta_s"} <= set(r) for r in records if r.get("split") == "train")
    assert list((trained_workdir / "tensorboard").glob("events.*"))


def test_bad_override_stops_with_the_key_named(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "nucjax.train", "--config", str(REPO / "configs" / "quickstart.py"),
         "--workdir", str(tmp_path), "--config.train.stesp=3"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "train.stesp" in done.stderr and "Traceback" not in done.stderr


def test_a_checkpoint_of_an_earlier_nucjax_reloads_with_the_keys_added_since(tmp_path, trained_workdir):
    """Checkpoints written before `data.cache_mb` and the detection post-processing keys existed (runs/cpu/* of the
    study) lack them in their stored config; reloaded, they have the base config's values and predict as before."""
    import shutil

    from nucjax import data
    from nucjax.data import pipeline

    old = tmp_path / "old"
    shutil.copytree(trained_workdir, old)
    for item in (old / "checkpoints").glob("*/config/metadata"):
        stored = json.loads(item.read_text())
        del stored["data"]["cache_mb"], stored["postprocess"]["min_score"], stored["postprocess"]["min_visible"]
        item.write_text(json.dumps(stored))
    predictor, current = checkpoint.load(old), checkpoint.load(trained_workdir)
    assert predictor.config.data.cache_mb == current.config.data.cache_mb == 1024.0
    assert predictor.postprocess_params == current.postprocess_params
    image, _ = synthetic.generate(3, height=64, width=64)
    np.testing.assert_array_equal(predictor.predict(image), current.predict(image))
    source = data.source_for(predictor.config, "train")  # the training pipeline reads data.cache_mb
    loader = pipeline.train_loader(source, predictor.config, target_names=predictor.variant.target_names(
        predictor.config), seed=0)
    assert next(iter(loader))["image"].shape == (4, 64, 64, 3)


@pytest.mark.parametrize("override, words", [
    ("train.steps=-3", "'train.steps' must be an integer >= 1, got -3"),
    ("train.log_every=0", "'train.log_every' must be an integer >= 1, got 0"),
    ("train.checkpoint_every=0", "'train.checkpoint_every' must be an integer >= 1"),
    ("train.eval_every=-1", "'train.eval_every' must be an integer >= 0"),
    ("optim.learning_rate=-1.0", "'optim.learning_rate' must be a number > 0, got -1.0"),
    ("optim.learning_rate=nan", "'optim.learning_rate' must be a number > 0, got nan"),
    ("optim.b2=1.0", "'optim.b2' must be in [0, 1)"),
    ("data.input_scale=0.0", "'data.input_scale' must be a number > 0, got 0.0"),
    ("train.best_metric=foo", "'train.best_metric' must be one of the validation metrics"),
    ("precision=float16", "'precision' must be 'float32' or 'bfloat16'"),
])
def test_train_cli_refuses_a_value_that_cannot_train_naming_the_key(tmp_path, capsys, override, words):
    """Each of these used to train silently wrong (a negative learning rate), do nothing (negative steps), or fail
    deep inside: a ZeroDivisionError in the loop, a KeyError from Orbax at the first checkpoint."""
    from nucjax.train import main

    workdir = tmp_path / "run"
    code = main(["--config", str(REPO / "configs" / "quickstart.py"), "--workdir", str(workdir), f"--config.{override}"])
    assert code == 2
    assert words in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.py")))
def test_every_shipped_config_passes_the_training_checks(name):
    from nucjax.config import load_config
    from nucjax.train import check_config

    check_config(load_config(REPO / "configs" / name))


def test_tta_is_accepted_for_every_variant():
    from nucjax.config import load_config
    from nucjax.train import check_config

    for name in ("unet_mask.py", "maskrcnn.py"):  # maps averaged for a U-Net, detections fused for a detector
        check_config(load_config(REPO / "configs" / name, ["predict.tta=True"]))
