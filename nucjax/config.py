"""Run configs: load a config file, apply `--config.key=value` overrides with checked keys and types, save/restore as JSON."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import pathlib
from typing import Any, Sequence

import ml_collections


# Sections whose keys are not fixed by the base config (they are passed on to a builder that checks them).
OPEN_SECTIONS = ("data.builder_kwargs",)

# Keys the base config (configs/default.py) gained after the first checkpoints were written, with its values for
# them (tests check that the two agree). `from_dict` adds the missing ones, so a run saved by an earlier nucjax
# reloads into the config a new run has, and every tool that reads a key can rely on it being there.
ADDED_KEYS: dict[str, Any] = {
    "data.cache_mb": 1024.0,  # decoded-example cache: speed only
    "postprocess.min_score": 0.0,  # detections: no filtering beyond model.score_threshold, as before
    "postprocess.min_visible": 0.5,
    "data.input_scale": 1.0,  # images as they are, as before
}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and what is wrong."""


def load_config(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the config file at `path`, then applies `key=value` overrides (keys as in `train.steps`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"nucjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    try:
        config = module.get_config()
    except (AttributeError, KeyError) as e:  # the base config is locked: a misspelt key cannot be added
        raise ConfigError(f"{path}: unknown config key: {_clean(e)}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        set_value(config, key, value)
    return config


def set_value(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets the dotted `key` from its command-line text, parsed to the type the key already has."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if i == len(parts) - 1 and ".".join(parts[:i]) in OPEN_SECTIONS and part not in node:
            with node.unlocked():
                node[part] = _parse(key, text, None)
            return
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            here = ".".join(parts[:i]) or "the config"
            keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            hint = difflib.get_close_matches(part, keys, n=1)
            suggestion = f"; did you mean {'.'.join(parts[:i] + hint)!r}?" if hint else ""
            raise ConfigError(f"unknown config key {key!r}: {here} has no {part!r}{suggestion}")
        if i < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    node[parts[-1]] = _parse(key, text, old)


def _parse(key: str, text: str, old: Any) -> Any:
    """Parses `text` to the type of `old`; raises naming `key` when it cannot."""
    if isinstance(old, ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; set one of its keys instead: {sorted(old.keys())}")
    if isinstance(old, str):
        return text
    if isinstance(old, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key {key!r} expects true or false, got {text!r}")
    if isinstance(old, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config key {key!r} expects float, got {text!r}") from None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if old is None:
        return value
    if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(old)(value)
    if type(value) is not type(old):
        raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got {text!r}")
    return value


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON text (what is written to the workdir and the checkpoint)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_dict(data: dict) -> ml_collections.ConfigDict:
    """Rebuilds a ConfigDict from `to_json`'s data (lists where the file had tuples stay lists); `ADDED_KEYS` that
    the data lacks (a config saved by an earlier nucjax) get their default."""
    config = ml_collections.ConfigDict(data)
    for key, default in ADDED_KEYS.items():
        *sections, name = key.split(".")
        node = config
        for section in sections:
            if section not in node:
                node[section] = ml_collections.ConfigDict()
            node = node[section]
        if name not in node:
            node[name] = default
    return config


def _clean(error: Exception) -> str:
    return str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'")
