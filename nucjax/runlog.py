"""What a run tells its user: a human line per log step (loss, lr, images/s, ETA), JSON lines, TensorBoard, a bar."""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Mapping

import jax


class RunLog:
    """Writes `metrics.jsonl` and TensorBoard events in the workdir; prints progress on process 0 only."""

    def __init__(self, workdir: pathlib.Path, *, total_steps: int):
        self.workdir = pathlib.Path(workdir)
        self.total_steps = total_steps
        self.enabled = jax.process_index() == 0
        self._jsonl = open(self.workdir / "metrics.jsonl", "a") if self.enabled else None
        self._tb = None
        self._bar = None
        self._t0 = self._last_time = time.perf_counter()
        self._last_step = 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def start(self, step: int) -> None:
        """Marks the first step of this sitting (rates and ETA are measured from here)."""
        self._last_step, self._last_time = step, time.perf_counter()
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True, leave=False)

    def info(self, message: str) -> None:
        if self.enabled:
            self._print(message)

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends one JSON line to metrics.jsonl."""
        if self._jsonl:
            self._jsonl.write(json.dumps({"time": time.time(), **record}) + "\n")
            self._jsonl.flush()

    def train(self, step: int, means: Mapping[str, float], *, lr: float, images: int) -> None:
        """Logs the mean training metrics since the last call, with throughput and ETA."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        seconds = now - self._last_time
        rate = steps / seconds if seconds > 0 else float("nan")
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        self._last_step, self._last_time = step, now
        record = {"step": step, "split": "train", **means, "lr": lr, "images_per_s": rate * images,
                  "s_per_step": 1 / rate if rate else float("nan"), "eta_s": eta}
        self.write(record)
        if not self.enabled:
            return
        for k, v in means.items():
            self._tb.add_scalar(f"train/{k}", v, step)
        self._tb.add_scalar("train/lr", lr, step)
        self._tb.add_scalar("train/images_per_s", rate * images, step)
        parts = " ".join(f"{k}={v:.4f}" for k, v in means.items() if k != "loss")
        self._print(f"step {step}/{self.total_steps} loss={means['loss']:.4f} {parts} lr={lr:.2e} "
                    f"{rate * images:.1f} img/s ETA {_duration(eta)}")
        if self._bar:
            self._bar.update(step - self._bar.n)

    def validation(self, step: int, values: Mapping[str, float]) -> None:
        self.write({"step": step, "split": "validation", **values})
        if not self.enabled:
            return
        for k, v in values.items():
            self._tb.add_scalar(f"validation/{k}", v, step)
        self._print(f"step {step} validation " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def _print(self, message: str) -> None:
        if self._bar:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar:
            self._bar.close()
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
