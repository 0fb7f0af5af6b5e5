"""A stop signal sent to the whole process group (Ctrl-C in a terminal, `timeout`, scancel) reaches the grain workers
too: training still saves its checkpoint at the step it reached, exits 0, and resumes from there."""

import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from nucjax import checkpoint
from tests.conftest import REPO, TINY_OVERRIDES

pytestmark = pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="finds processes in /proc")

FAST = ("data.num_workers=2", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=100000")


def _start(workdir, data_dir, *overrides) -> tuple[subprocess.Popen, "queue.Queue[str | None]"]:
    """`python -m nucjax.train` on the tiny config in a new session (its own process group), and its stderr lines."""
    args = [f"--config.{o}" for o in (f"data.data_dir={data_dir}", *TINY_OVERRIDES, *FAST, *overrides)]
    process = subprocess.Popen(
        [sys.executable, "-m", "nucjax.train", "--config", str(REPO / "configs" / "quickstart.py"),
         "--workdir", str(workdir), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in process.stderr:
            lines.put(line)
        lines.put(None)  # end of output

    threading.Thread(target=read, daemon=True).start()
    return process, lines


def _read_until(lines: "queue.Queue[str | None]", pattern: str, seen: list[str], timeout: float = 120) -> re.Match:
    """The first stderr line matching `pattern` (every line read is appended to `seen`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            lines.put(None)
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


def _workers(pid: int) -> list[int]:
    """The multiprocessing children (grain workers) of process `pid`, from /proc."""
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        if parent == pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def _exists(pid: int, wait: float = 5.0) -> bool:
    """Whether process `pid` still exists after up to `wait` seconds."""
    deadline = time.time() + wait
    while pathlib.Path(f"/proc/{pid}").exists():
        if time.time() > deadline:
            return True
        time.sleep(0.1)
    return False


def _latest_step(workdir) -> int | None:
    cps = checkpoint.Checkpoints(workdir, read_only=True)
    try:
        return cps.latest_step()
    finally:
        cps.close()


def test_sigterm_to_the_process_group_saves_exits_0_and_resumes(tmp_path, data_dir):
    workdir = tmp_path / "run"
    process, lines = _start(workdir, data_dir, "train.steps=100000")
    seen: list[str] = []
    try:
        _read_until(lines, r"^step \d+/", seen)
        workers = _workers(process.pid)
        assert len(workers) == 2, workers
        # Freeze the workers so that the main process drains the prefetched batches and waits for the next one (as
        # a fast accelerator's does), then signal the group: the workers get SIGTERM once they are continued.
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGTERM)
        time.sleep(0.2)
        os.killpg(process.pid, signal.SIGCONT)
        stopped = int(_read_until(lines, r"stopped by a signal at step (\d+)", seen).group(1))
        assert process.wait(timeout=60) == 0, "".join(seen)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert _latest_step(workdir) == stopped > 0
    assert not [pid for pid in workers if _exists(pid)], "the workers outlived the main process"

    process, lines = _start(workdir, data_dir, f"train.steps={stopped + 2}")
    seen = []
    try:
        assert int(_read_until(lines, r"resumed from step (\d+)", seen).group(1)) == stopped
        assert int(_read_until(lines, r"^step (\d+)/", seen).group(1)) == stopped + 1
        assert process.wait(timeout=60) == 0, "".join(seen)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert _latest_step(workdir) == stopped + 2


LOADER = """
import sys
import numpy as np
from nucjax.config import load_config
from nucjax.data import pipeline
config = load_config(sys.argv[1])
config.data.crop_size, config.data.num_workers, config.train.batch_size = 16, 1, 2
source = [{"image": np.full((16, 16, 3), i, np.uint8), "label": np.eye(16, dtype=np.int32)} for i in range(4)]
iterator = iter(pipeline.train_loader(source, config, target_names=["foreground"], shard_index=0, shard_count=1))
for line in sys.stdin:
    print(next(iterator)["image"].shape, flush=True)
"""


def test_loader_workers_ignore_stop_signals_and_exit_with_the_main_process():
    process = subprocess.Popen([sys.executable, "-c", LOADER, str(REPO / "configs" / "default.py")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        process.stdin.write("next\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "(2, 16, 16, 3)"
        (worker,) = _workers(process.pid)
        os.kill(worker, signal.SIGTERM)
        os.kill(worker, signal.SIGINT)
        for _ in range(8):  # more batches than were prefetched: the worker still makes them
            process.stdin.write("next\n")
            process.stdin.flush()
            assert process.stdout.readline().strip() == "(2, 16, 16, 3)"
        process.kill()  # the main process dies without stopping its worker
        process.wait()
        assert not _exists(worker), "the worker outlived the main process"
    finally:
        process.kill()
