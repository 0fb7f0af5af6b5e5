"""Shared test fixtures: where DSB2018 lives, a CPU-only JAX, and one compilation cache for the whole run."""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_compilations() -> None:
    """JAX's persistent compilation cache in a folder made for this run (kept if $JAX_COMPILATION_CACHE_DIR names
    one): the pytest-xdist workers and the training processes the tests start inherit it, so a step that several
    tests compile is compiled once. The suite took 434 s instead of 596 s with it (2 cores, -n 2, 2026-11-27)."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="nucjax-tests-jax-cache-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # only in the process that made it: run's end
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # small steps add up, too


_share_compilations()

REPO = pathlib.Path(__file__).resolve().parents[1]


def dsb2018_dir() -> pathlib.Path | None:
    """The DSB2018 folder (holding stage1_train/) from NUCJAX_DSB2018_DIR or ../shared/data/dsb2018, else None."""
    env = os.environ.get("NUCJAX_DSB2018_DIR")
    path = pathlib.Path(env) if env else REPO.parent / "shared" / "data" / "dsb2018"
    return path if (path / "stage1_train").is_dir() else None


@pytest.fixture(scope="session")
def dsb2018() -> pathlib.Path:
    """Path to DSB2018; skips the test when the data set is not present."""
    path = dsb2018_dir()
    if path is None:
        pytest.skip("DSB2018 not found: set NUCJAX_DSB2018_DIR to the folder holding stage1_train/")
    return path


TINY_OVERRIDES = (
    "data.builder_kwargs.num_images=12", "data.builder_kwargs.height=64", "data.builder_kwargs.width=64",
    "data.crop_size=64", "model.base_width=8", "model.depth=2", "train.batch_size=4", "train.steps=4",
    "train.log_every=2", "train.eval_every=2", "train.checkpoint_every=2", "optim.warmup_steps=1",
    "predict.tile_size=64", "predict.tile_overlap=16",
)


def tiny_config(data_dir, *overrides: str):
    """The quickstart config shrunk to seconds: 12 synthetic 64² images, a width-8 depth-2 U-Net, 4 steps."""
    from nucjax.config import load_config

    return load_config(REPO / "configs" / "quickstart.py",
                       [f"data.data_dir={data_dir}", *TINY_OVERRIDES, *overrides])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
    """A session-wide folder for prepared test datasets."""
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, data_dir) -> pathlib.Path:
    """A workdir holding a tiny quickstart run (4 steps, checkpoints at 2 and 4): for predictor and CLI tests."""
    from nucjax.train import train_and_evaluate

    workdir = tmp_path_factory.mktemp("quickstart")
    train_and_evaluate(tiny_config(data_dir), workdir)
    return workdir
