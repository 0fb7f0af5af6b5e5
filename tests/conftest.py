"""Shared test fixtures: where DSB2018 lives, and a CPU-only JAX."""

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
