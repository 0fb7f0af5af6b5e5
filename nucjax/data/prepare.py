"""Prepare a nucjax dataset once (`python -m nucjax.data.prepare NAME ...`) and open its splits for random access."""

import argparse
import dataclasses
import os
import pathlib
import sys
from typing import Any
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from nucjax.data import dsb2018, folder, synthetic

BUILDERS = {
    "dsb2018": dsb2018.Dsb2018,
    "nuclei_folder": folder.NucleiFolder,
    "synthetic_nuclei": synthetic.SyntheticNuclei,
}


def default_data_dir() -> pathlib.Path:
    """Where prepared datasets live: $NUCJAX_DATA_DIR, else ~/.cache/nucjax/datasets."""
    return pathlib.Path(os.environ.get("NUCJAX_DATA_DIR") or "~/.cache/nucjax/datasets").expanduser()


def builder(
    name: str, *, data_dir: str | os.PathLike | None = None, manual_dir: str | os.PathLike | None = None, **settings
) -> folder.NucleiBuilder:
    """The TFDS builder of `name` whose config is made from `settings` (one data directory per distinct config).

    For nuclei_folder, `manual_dir` is the user's folder (the `folder` setting).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(BUILDERS)}")
    cls = BUILDERS[name]
    if name == "nuclei_folder" and manual_dir:
        settings = {**settings, "folder": os.fspath(manual_dir)}
    config = type(cls.BUILDER_CONFIGS[0]).from_kwargs(**settings)
    named = config.name if config.name == folder.DEFAULT_CONFIG else config
    return cls(data_dir=os.fspath(data_dir or default_data_dir()), config=named)


def prepare(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    **settings,
) -> folder.NucleiBuilder:
    """The builder of `name` with its data prepared (written to a temporary folder, renamed when complete).

    DSB2018's raw data is read from `manual_dir`, else $NUCJAX_DSB2018_DIR. Prepared data is reused unless
    `overwrite`.
    """
    if name == "synthetic_nuclei" and manual_dir:
        raise ValueError("synthetic_nuclei reads no files: drop manual_dir")
    dataset = builder(name, data_dir=data_dir, manual_dir=manual_dir, **settings)
    raw = (manual_dir or os.environ.get("NUCJAX_DSB2018_DIR")) if name == "dsb2018" else None
    if name == "dsb2018" and not raw and (overwrite or not dataset.is_prepared()):
        raise ValueError(f"dsb2018: to prepare {dataset.data_dir}, name its raw data.\n{dsb2018.INSTRUCTIONS}")
    modes = tfds.download.GenerateMode
    dataset.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(raw) if raw else None,
            download_mode=modes.REUSE_CACHE_IF_EXISTS if overwrite else modes.REUSE_DATASET_IF_EXISTS,
        )
    )
    return dataset


@dataclasses.dataclass(frozen=True)
class Source:
    """Random-access examples of one prepared split: `len()`, iteration, and `[i]` -> {"id": str,
    "image": uint8[H, W, 3], "label": int32[H, W], "modality": str, ...} (text decoded, arrays writable)."""

    records: Sequence[dict]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        size = len(self.records)
        if not -size <= index < size:
            raise IndexError(f"example {index} of a split of {size}")  # also ends `for example in source`
        record = self.records[index % size]
        return {key: _decoded(value) for key, value in record.items()}


def _decoded(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        return value.copy()
    return value


def source(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    **settings,
) -> Source:
    """A split ("train", "validation", "test", "holdout", or TFDS slicing like "train[:10]") of dataset `name`,
    prepared on first use; `settings` are the builder's config values (e.g. validation_fraction=0.2)."""
    dataset = prepare(name, data_dir=data_dir, manual_dir=manual_dir, **settings)
    if split.split("[")[0] not in dataset.info.splits:
        hints = {
            "test": " (it needs stage1_test and stage1_solution.csv in manual_dir; then prepare again with overwrite)",
            "holdout": " (the holdout split needs holdout_fraction > 0)",
        }
        raise ValueError(
            f"{name} ({dataset.builder_config.name}) has no split {split!r}; it has {', '.join(dataset.info.splits)}"
            + hints.get(split.split("[")[0], "")
        )
    return Source(dataset.as_data_source(split))


def source_for(config: Any, split: str, *, data_dir: str | os.PathLike | None = None) -> Source:
    """The split of the dataset a run config names (`data.name`, `data.data_dir`, `data.manual_dir`, builder settings)."""
    data = config.data
    settings = data.builder_kwargs.to_dict() if hasattr(data.builder_kwargs, "to_dict") else dict(data.builder_kwargs)
    return source(data.name, split, data_dir=data_dir or data.data_dir or None, manual_dir=data.manual_dir or None,
                  **settings)


def _settings(extra: Sequence[str]) -> dict[str, str]:
    """{key: value} of command-line `--key=value` or `--key value` arguments."""
    settings, rest = {}, list(extra)
    while rest:
        argument = rest.pop(0)
        if not argument.startswith("--"):
            raise ValueError(f"unexpected argument {argument!r}; builder settings are written --key=value")
        key, equals, value = argument[2:].partition("=")
        if not equals:
            if not rest:
                raise ValueError(f"builder setting --{key} has no value")
            value = rest.pop(0)
        settings[key] = value
    return settings


def _settings_help() -> str:
    """Each builder's settings with their defaults, for --help."""
    lines = ["builder settings (--key=value) and their defaults:"]
    for name, cls in BUILDERS.items():
        config = cls.BUILDER_CONFIGS[0]
        fields = (f.name for f in dataclasses.fields(config) if f.name not in folder.BASE_FIELDS)
        lines.append(f"  {name}: " + ", ".join(f"{key}={getattr(config, key)!r}" for key in fields))
    return "\n".join(lines)


def _size(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> None:
    """Prepare a dataset and print its splits' sizes."""
    parser = argparse.ArgumentParser(
        prog="python -m nucjax.data.prepare",
        description="Prepare a nucjax dataset (array_record) ahead of time and print its split sizes.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("--data_dir", help="where prepared data goes ($NUCJAX_DATA_DIR or ~/.cache/nucjax/datasets)")
    parser.add_argument("--manual_dir", help="raw data: DSB2018's folder ($NUCJAX_DSB2018_DIR), or the user folder")
    parser.add_argument("--overwrite", action="store_true", help="prepare again even if prepared data exists")
    args, extra = parser.parse_known_args(argv)
    try:
        dataset = prepare(
            args.name,
            data_dir=args.data_dir,
            manual_dir=args.manual_dir,
            overwrite=args.overwrite,
            **_settings(extra),
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"{args.name} ({dataset.builder_config.name}) in {dataset.data_dir}")
    for split, info in dataset.info.splits.items():
        print(f"  {split}: {info.num_examples} images")
    print(f"  on disk: {_size(pathlib.Path(dataset.data_dir)) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
