"""Several processes: two local JAX processes (127.0.0.1, gloo CPU collectives) train, checkpoint, validate and fail
as one process with the same devices and global batch does; start-up settings from flags, SLURM, Open MPI, JobSet."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from PIL import Image

from nucjax import checkpoint, data, distributed
from nucjax.data import io, synthetic
from nucjax.evaluate import evaluate_checkpoint
from nucjax.train import train_and_evaluate
from tests.conftest import REPO, TINY_OVERRIDES, tiny_config

TIMEOUT = 240


# ---- start-up settings (no processes) ----


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0"}, None),
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "3"}, distributed.Launch("SLURM")),
    ({"SLURM_NTASKS": "8"}, None),  # inside sbatch but not under srun: this process is alone
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5"},
     distributed.Launch("Open MPI")),
    ({"OMPI_COMM_WORLD_SIZE": "4", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     distributed.Launch("JAX_COORDINATOR_ADDRESS", "h:1", 4, 3)),
    ({"JAX_COORDINATOR_ADDRESS": "run-0.svc:1234", "JAX_NUM_PROCESSES": "4", "JOB_COMPLETION_INDEX": "2"},
     distributed.Launch("JAX_COORDINATOR_ADDRESS", "run-0.svc:1234", 4, 2)),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     distributed.Launch("JAX_COORDINATOR_ADDRESS", "h:1", 2, 1)),
])
def test_launch_settings_come_from_slurm_open_mpi_or_jobset_variables(env, expected):
    assert distributed.detect(environ=env) == expected


def test_flags_override_the_environment_and_one_process_needs_nothing():
    slurm = {"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "3"}
    assert distributed.detect("h:5", 2, 1, environ=slurm) == distributed.Launch("flags", "h:5", 2, 1)
    assert distributed.detect("h:5", 1, 0, environ={}) is None


@pytest.mark.parametrize("flags, env, message", [
    (("h:5", None, 0), {}, "missing --num_processes"),
    (("h:5", 2, 2), {}, "id in 0..1"),
    (("h", 2, 0), {}, "must be HOST:PORT"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1"}, "also set JAX_NUM_PROCESSES"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' must be an integer"),
    ((None, None, None), {"OMPI_COMM_WORLD_SIZE": "4"}, "set JAX_COORDINATOR_ADDRESS"),
])
def test_bad_launch_settings_are_named(flags, env, message):
    with pytest.raises(ValueError, match=message):
        distributed.detect(*flags, environ=env)


def test_per_process_results_go_back_to_index_order():
    # shard(7) over 3 processes: [0, 3, 6], [1, 4], [2, 5]
    assert distributed.in_index_order([[0, 3, 6], [1, 4], [2, 5]]) == list(range(7))
    assert distributed.shard(5) == range(5)  # one process handles everything
    assert distributed.gather({"a": 1}) == [{"a": 1}]


# ---- two processes ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _started(commands, logs, devices):
    """Starts each command (argv) on its number of CPU devices, stdout+stderr into its log file; kills whatever is
    still running at the end."""
    processes = []
    try:
        for command, log, count in zip(commands, logs, devices):
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
            with open(log, "w") as out:
                processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO))
        yield processes
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()


def _wait(processes, timeout=TIMEOUT):
    """Exit codes (and the times they exited, from the start of waiting); fails the test on a timeout."""
    start, done = time.monotonic(), {}
    while len(done) < len(processes):
        for i, p in enumerate(processes):
            if i not in done and p.poll() is not None:
                done[i] = (p.returncode, time.monotonic() - start)
        if time.monotonic() - start > timeout:
            raise AssertionError(f"processes still running after {timeout} s")
        time.sleep(0.1)
    return [done[i] for i in range(len(processes))]


def _group(argv, count, port):
    """The command line of each of `count` processes of a plain launch."""
    return [[*argv, "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(count), "--process_id", str(k)]
            for k in range(count)]


def _train_argv(workdir, data_dir, *overrides, program=("-m", "nucjax.train")):
    args = [f"--config.{o}" for o in (f"data.data_dir={data_dir}", *TINY_OVERRIDES, *overrides)]
    return [sys.executable, *program, "--config", str(REPO / "configs" / "quickstart.py"), "--workdir", str(workdir),
            *args]


def _lines(workdir, split):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("split") == split]


def _records(workdir, split):
    return {r["step"]: r for r in _lines(workdir, split)}


def _params(workdir, step):
    return checkpoint.load(workdir, step=step).variables


@pytest.mark.multiprocess
def test_two_processes_train_checkpoint_and_validate_as_one_process_does(tmp_path, data_dir, capsys):
    """2 processes x 2 devices (one grain worker each) vs 1 process x 4 devices (no workers), global batch 4: same
    losses, validation and parameters; the 2-process checkpoint then loads, and resumes training, in this single
    1-device process."""
    data.source_for(tiny_config(data_dir), "train")  # prepared here, not by two runs at once
    two, one = tmp_path / "two", tmp_path / "one"
    logs = [tmp_path / "p0.log", tmp_path / "p1.log", tmp_path / "one.log"]
    commands = _group(_train_argv(two, data_dir, "data.num_workers=1"), 2, _free_port())
    commands += [_train_argv(one, data_dir)]
    with _started(commands, logs, devices=[2, 2, 4]) as processes:
        codes = _wait(processes)
    text = [log.read_text() for log in logs]
    assert [c for c, _ in codes] == [0, 0, 0], text
    assert "4 cpu device(s) in 2 processes" in text[0] and "4 cpu device(s), global batch 4" in text[2]
    assert "step 4/4" not in text[1] and "step 2 validation" not in text[1], "only process 0 logs"
    assert [r["step"] for r in _lines(two, "train")] == [2, 4], "only process 0 writes metrics.jsonl"

    train_two, train_one = _records(two, "train"), _records(one, "train")
    assert sorted(train_two) == sorted(train_one) == [2, 4]
    for step in (2, 4):
        assert train_two[step]["loss"] == pytest.approx(train_one[step]["loss"], rel=1e-5)
    val_two, val_one = _records(two, "validation"), _records(one, "validation")
    assert sorted(val_two) == [2, 4]
    for step in (2, 4):
        for key in ("dsb2018_score", "aji_plus", "accuracy@0.5", "f1@0.5"):
            assert val_two[step][key] == pytest.approx(val_one[step][key], abs=1e-6), (step, key)

    # The 2-process checkpoint in 1 process: for inference, and to resume training (from step 2, to step 4).
    reference = _params(one, 4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _params(two, 4), reference)
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    (resumed / "metrics.jsonl").unlink()
    capsys.readouterr()
    train_and_evaluate(tiny_config(data_dir, "train.eval_every=0"), resumed)  # validation does not change training
    err = capsys.readouterr().err
    assert "resumed from step 2" in err
    assert _records(resumed, "train")[4]["loss"] == pytest.approx(train_one[4]["loss"], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _params(resumed, 4), reference)


@pytest.mark.multiprocess
def test_two_processes_evaluate_and_predict_as_one_process_does(tmp_path, trained_workdir):
    out = tmp_path / "report.json"
    argv = [sys.executable, "-m", "nucjax.evaluate", "--checkpoint", str(trained_workdir), "--split", "train",
            "--json", str(out)]
    logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
    with _started(_group(argv, 2, _free_port()), logs, devices=[1, 1]) as processes:
        codes = _wait(processes)
    assert [c for c, _ in codes] == [0, 0], [log.read_text() for log in logs]
    assert "DSB2018 score" in logs[0].read_text() and "DSB2018 score" not in logs[1].read_text()  # process 0 prints
    alone = evaluate_checkpoint(trained_workdir, "train", progress=False).to_dict()
    two = json.loads(out.read_text())
    assert [row["name"] for row in two["per_image"]] == [row["name"] for row in alone["per_image"]]
    assert len(two["per_image"]) > 2  # both processes had images to predict
    assert two == json.loads(json.dumps(alone))

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(synthetic.generate(i, height=64 + 8 * i, width=72)[0]).save(images / f"im{i}.png")
    argv = [sys.executable, "-m", "nucjax.predict", "--checkpoint", str(trained_workdir), "--input", str(images),
            "--output", str(tmp_path / "labels"), "--format", "npy", "--rle", str(tmp_path / "labels.csv")]
    with _started(_group(argv, 2, _free_port()), logs, devices=[1, 1]) as processes:
        codes = _wait(processes)
    assert [c for c, _ in codes] == [0, 0], [log.read_text() for log in logs]
    predictor = checkpoint.load(trained_workdir)
    alone = {f"im{i}": predictor.predict(io.read_image(images / f"im{i}.png")) for i in range(3)}
    for name, labels in alone.items():
        np.testing.assert_array_equal(np.load(tmp_path / "labels" / f"{name}.npy"), labels, err_msg=name)
    rle = io.read_rle_csv(tmp_path / "labels.csv", {n: v.shape for n, v in alone.items()})  # written by process 0
    assert sorted(rle) == sorted(alone)
    for name, labels in alone.items():
        np.testing.assert_array_equal(rle[name] > 0, labels > 0, err_msg=name)


FAIL_AT_SECOND_BATCH = """
import sys, jax
from nucjax import parallel, train
put_batch, calls = parallel.put_batch, []
def failing(batch, mesh):
    calls.append(1)
    if jax.process_index() == 1 and len(calls) == 2:
        raise ValueError("the second batch of process 1 is broken")
    return put_batch(batch, mesh)
parallel.put_batch = failing
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.multiprocess
def test_a_failing_process_stops_the_other_with_its_message(tmp_path, data_dir):
    argv = _train_argv(tmp_path / "run", data_dir, "train.eval_every=0", program=("-c", FAIL_AT_SECOND_BATCH))
    logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
    with _started(_group(argv, 2, _free_port()), logs, devices=[1, 1]) as processes:
        (code0, time0), (code1, time1) = _wait(processes)
    text0, text1 = logs[0].read_text(), logs[1].read_text()
    message = "error: process 1 failed: the second batch of process 1 is broken"
    assert code1 == 1 and message in text1, text1
    assert code0 == 1 and message in text0, text0  # process 0 was inside step 2's collective, waiting for process 1
    assert time0 - time1 < 15, "process 0 must stop within seconds, not the 100 s heartbeat timeout"
    assert "Traceback" not in text0 + text1
