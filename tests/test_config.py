"""Config files and `--config.key=value` overrides: known keys and types only, with errors naming the key."""

import json

import ml_collections
import pytest

from nucjax import config as config_lib
from tests.conftest import REPO

CONFIGS = REPO / "configs"


def test_variant_configs_differ_from_default_only_in_the_variant():
    base = config_lib.load_config(CONFIGS / "default.py").to_dict()
    for name in ("unet_mask", "unet_boundary", "unet_3class"):
        config = config_lib.load_config(CONFIGS / f"{name}.py").to_dict()
        assert config.pop("variant") == name
        assert config == {k: v for k, v in base.items() if k != "variant"}


def test_overrides_parse_to_the_type_of_the_key():
    config = config_lib.load_config(
        CONFIGS / "quickstart.py",
        ["train.steps=7", "optim.learning_rate=1", "data.augment.flip=false", "data.name=dsb2018",
         "data.augment.scale_range=(0.5, 2.0)"],
    )
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.optim.learning_rate == 1.0 and isinstance(config.optim.learning_rate, float)
    assert config.data.augment.flip is False
    assert config.data.name == "dsb2018"
    assert tuple(config.data.augment.scale_range) == (0.5, 2.0)


@pytest.mark.parametrize("override, words", [
    ("train.stesp=3", ["train.stesp", "train.steps"]),
    ("nosuch.key=3", ["nosuch.key"]),
    ("train.steps=abc", ["train.steps", "int"]),
    ("data.augment.flip=maybe", ["data.augment.flip", "true or false"]),
    ("train=3", ["train", "section"]),
    ("train.steps", ["key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load_config(CONFIGS / "quickstart.py", [override])
    for word in words:
        assert word in str(info.value)


def test_misspelt_key_in_a_config_file_fails_at_once(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pathlib\nfrom nucjax.config import load_config\n"
        f"def get_config():\n    c = load_config(pathlib.Path({str(CONFIGS / 'default.py')!r}))\n"
        "    c.train.stesp = 5\n    return c\n"
    )
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load_config(bad)
    assert "stesp" in str(info.value) and "bad.py" in str(info.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="nope.py"):
        config_lib.load_config(tmp_path / "nope.py")


def test_json_round_trip_keeps_values():
    config = config_lib.load_config(CONFIGS / "quickstart.py")
    again = config_lib.from_dict(json.loads(config_lib.to_json(config)))
    assert again.train.steps == config.train.steps
    assert list(again.loss.class_weights) == list(config.loss.class_weights)


def test_added_keys_carry_the_base_configs_values():
    base = config_lib.load_config(CONFIGS / "default.py")
    for key, value in config_lib.ADDED_KEYS.items():
        node = base
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_a_config_saved_before_keys_were_added_gets_their_defaults_and_keeps_its_own_values():
    saved = json.loads(config_lib.to_json(config_lib.load_config(CONFIGS / "quickstart.py", ["postprocess.min_size=7"])))
    del saved["data"]["cache_mb"], saved["postprocess"]["min_score"], saved["postprocess"]["min_visible"]
    restored = config_lib.from_dict(saved)
    assert restored.data.cache_mb == 1024.0
    assert (restored.postprocess.min_score, restored.postprocess.min_visible) == (0.0, 0.5)
    assert restored.postprocess.min_size == 7
    kept = config_lib.from_dict({**saved, "data": {**saved["data"], "cache_mb": 0.0}})
    assert kept.data.cache_mb == 0.0


def _keys(node, prefix=""):
    """Every dotted leaf key of a ConfigDict (open sections count as leaves)."""
    keys = set()
    for key, value in node.items():
        name = prefix + key
        if hasattr(value, "items") and name not in config_lib.OPEN_SECTIONS:
            keys |= _keys(value, name + ".")
        else:
            keys.add(name)
    return keys


def test_a_config_saved_by_an_earlier_nucjax_restores_with_every_key_of_the_current_config():
    """tests/data/config-bf7e4b6-maskrcnn.json is the config stored in a checkpoint of the study's cpu runs (commit
    bf7e4b6). A key added to configs/default.py since must be listed in ADDED_KEYS, or this fails naming it."""
    saved = json.loads((REPO / "tests" / "data" / "config-bf7e4b6-maskrcnn.json").read_text())
    current = config_lib.load_config(CONFIGS / "maskrcnn.py")
    assert _keys(current) - _keys(ml_collections.ConfigDict(saved)) == set(config_lib.ADDED_KEYS)
    assert _keys(current) <= _keys(config_lib.from_dict(saved))
