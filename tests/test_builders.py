"""Tests for the TFDS builders (dsb2018, nuclei_folder, synthetic_nuclei), nucjax.data.source and the prepare CLI."""

import hashlib
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import nucjax.data
from nucjax.data import folder, io, prepare, synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
SPLITS = ("train", "validation")
# 6 fluorescence, 3 brightfield, 3 colour images: every modality has >= 2 images.
STYLES = ["fluorescence"] * 6 + ["brightfield"] * 3 + ["histology"] * 3


def make_image(seed: int, style: str, shape=(40, 48)) -> tuple[np.ndarray, np.ndarray]:
    return synthetic.generate(seed, height=shape[0], width=shape[1], num_nuclei=(3, 7), radius=(3.0, 6.0), style=style)


def mask_names(seed: int, n: int) -> list[str]:
    """n distinct mask file names whose sorted order is unrelated to creation order."""
    return [hashlib.md5(f"{seed}-{k}".encode()).hexdigest()[:10] + ".png" for k in range(n)]


def write_masks(masks: pathlib.Path, label: np.ndarray, empty: int = 0) -> np.ndarray:
    """One mask file per instance (plus `empty` blank ones) under names whose sorted order is shuffled; returns the
    labels the builder must give: instance k = the k-th non-empty mask file in sorted order."""
    masks.mkdir(parents=True)
    n = int(label.max())
    names = mask_names(int(label.sum()), n + empty)
    for k, name in enumerate(names):
        Image.fromarray(((label == k + 1) * 255).astype(np.uint8)).save(masks / name)
    expected = np.zeros_like(label)
    for rank, name in enumerate(sorted(names[:n]), start=1):
        expected[label == names.index(name) + 1] = rank
    return expected


def write_kaggle(stage: pathlib.Path, image_id: str, image: np.ndarray, label: np.ndarray, empty: int = 0):
    """Writes <id>/images/<id>.png (RGBA) and <id>/masks/; returns the expected labels (see write_masks)."""
    (stage / image_id / "images").mkdir(parents=True)
    alpha = np.full(image.shape[:2], 255, np.uint8)
    Image.fromarray(np.dstack([image, alpha])).save(stage / image_id / "images" / f"{image_id}.png")
    return write_masks(stage / image_id / "masks", label, empty)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """A DSB2018-like manual_dir with stage1_train (12 images, one with 2 empty masks) and its expected examples."""
    root = tmp_path_factory.mktemp("kaggle")
    expected = {}
    for i, style in enumerate(STYLES):
        image, label = make_image(i, style)
        image_id = hashlib.sha1(str(i).encode()).hexdigest()[:12]
        empty = 2 if i == 4 else 0
        expected[image_id] = (image, write_kaggle(root / "stage1_train", image_id, image, label, empty), empty)
    return root, expected


def read_all(source) -> dict[str, dict]:
    return {item["id"]: item for item in (source[i] for i in range(len(source)))}


def read_splits(name: str, splits=SPLITS, **kwargs) -> dict[str, dict[str, dict]]:
    """{split: {id: item}} of a dataset's splits, prepared with `kwargs`."""
    return {split: read_all(nucjax.data.source(name, split, **kwargs)) for split in splits}


def test_dsb2018_examples_equal_the_files(kaggle, tmp_path):
    root, expected = kaggle
    splits = read_splits("dsb2018", data_dir=tmp_path, manual_dir=root)
    train, validation = splits["train"], splits["validation"]
    assert not set(train) & set(validation)
    assert set(train) | set(validation) == set(expected)
    for image_id, item in {**train, **validation}.items():
        image, label, empty = expected[image_id]
        assert item["image"].dtype == np.uint8 and item["label"].dtype == np.int32
        np.testing.assert_array_equal(item["image"], image)
        np.testing.assert_array_equal(item["label"], label)
        assert item["empty_masks"] == empty
        assert item["modality"] == folder.modality(image)
        assert isinstance(item["id"], str) and isinstance(item["modality"], str)


def test_splits_are_stratified_by_modality(kaggle, tmp_path):
    root, expected = kaggle
    splits = read_splits("dsb2018", data_dir=tmp_path, manual_dir=root)
    modalities = {folder.modality(image) for image, _, _ in expected.values()}
    assert modalities == set(folder.MODALITIES)
    for name, items in splits.items():
        assert {item["modality"] for item in items.values()} == modalities, name


def test_zip_layout_gives_the_same_data(kaggle, tmp_path):
    root, _ = kaggle
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    with zipfile.ZipFile(zipped / "stage1_train.zip", "w") as z:  # Kaggle's zip holds the <id>/ folders at its top
        for path in sorted((root / "stage1_train").rglob("*")):
            z.write(path, path.relative_to(root / "stage1_train"))
    plain_splits = read_splits("dsb2018", data_dir=tmp_path / "a", manual_dir=root)
    zip_splits = read_splits("dsb2018", data_dir=tmp_path / "b", manual_dir=zipped)
    for plain, from_zip in zip(plain_splits.values(), zip_splits.values()):
        assert plain.keys() == from_zip.keys()
        for image_id in plain:
            np.testing.assert_array_equal(plain[image_id]["label"], from_zip[image_id]["label"])
            np.testing.assert_array_equal(plain[image_id]["image"], from_zip[image_id]["image"])


def test_test_split_from_stage1_test_and_rle_csv(kaggle, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(kaggle[0], root)
    labels = {}
    for i, style in enumerate(["fluorescence", "histology", "brightfield"]):
        image, label = make_image(100 + i, style, shape=(36 + i, 30))
        image_id = f"test{i}"
        (root / "stage1_test" / image_id / "images").mkdir(parents=True)
        Image.fromarray(image).save(root / "stage1_test" / image_id / "images" / f"{image_id}.png")
        labels[image_id] = (image, label)
    io.write_rle_csv({k: v[1] for k, v in labels.items()}, root / "stage1_solution.csv")
    test = read_all(nucjax.data.source("dsb2018", "test", data_dir=tmp_path, manual_dir=root))
    assert set(test) == set(labels)
    for image_id, (image, label) in labels.items():
        np.testing.assert_array_equal(test[image_id]["image"], image)
        np.testing.assert_array_equal(test[image_id]["label"], label)


def test_test_split_ids_must_match_the_csv(kaggle, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(kaggle[0], root)
    image, label = make_image(200, "fluorescence")
    (root / "stage1_test" / "lonely" / "images").mkdir(parents=True)
    Image.fromarray(image).save(root / "stage1_test" / "lonely" / "images" / "lonely.png")
    io.write_rle_csv({"other": label}, root / "stage1_solution.csv")
    with pytest.raises(ValueError, match=r"lonely \(image only\).*other \(CSV only\)|other \(CSV only\).*lonely"):
        nucjax.data.source("dsb2018", "test", data_dir=tmp_path, manual_dir=root)


def test_missing_test_files_mean_no_test_split(kaggle, tmp_path):
    with pytest.raises(ValueError, match="no split 'test'.*stage1_test"):
        nucjax.data.source("dsb2018", "test", data_dir=tmp_path, manual_dir=kaggle[0])


def test_holdout_is_apart_and_leaves_validation_as_it_was(kaggle, tmp_path):
    root, expected = kaggle
    plain = read_splits("dsb2018", data_dir=tmp_path, manual_dir=root)
    held = read_splits("dsb2018", (*SPLITS, "holdout"), data_dir=tmp_path, manual_dir=root, holdout_fraction=0.2)
    ids = [set(items) for items in held.values()]
    assert sum(map(len, ids)) == len(expected) and set.union(*ids) == set(expected)
    assert set(held["validation"]) == set(plain["validation"])
    assert {item["modality"] for item in held["holdout"].values()} == set(folder.MODALITIES)
    assert len(list((tmp_path / "dsb2018").iterdir())) >= 2  # one prepared directory per distinct config


def test_assign_splits_follows_the_documented_rule():
    ids = [f"image{i}" for i in range(20)]
    by_hash = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    modalities = {i: "fluorescence" for i in ids} | {"b1": "brightfield", "b2": "brightfield", "c1": "histology-colour"}
    splits = folder.assign_splits(modalities, validation_fraction=0.1, holdout_fraction=0.15)
    first_b = min(["b1", "b2"], key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    assert set(splits["validation"]) == set(by_hash[:2]) | {first_b}
    assert set(splits["holdout"]) == set(by_hash[-3:])  # round(0.15 * 20) = 3; the 2-image group keeps 1 to train
    assert "c1" in splits["train"]  # a lone image always trains
    shuffled = dict(reversed(list(modalities.items())))
    assert folder.assign_splits(shuffled, 0.1, 0.15) == splits


def test_overlapping_masks_raise_naming_the_image_unless_overlap_first(tmp_path):
    raw = tmp_path / "raw"
    image, label = make_image(0, "fluorescence")
    write_kaggle(raw / "stage1_train", "overlapper", image, label)
    write_kaggle(raw / "stage1_train", "fine", *make_image(1, "fluorescence"))
    masks = sorted((raw / "stage1_train" / "overlapper" / "masks").iterdir())
    first, second = (np.asarray(Image.open(m)) > 0 for m in masks[:2])
    rows = np.flatnonzero(second.any(axis=1))
    grown = first.copy()
    grown[rows[0] : rows[0] + 2] |= second[rows[0] : rows[0] + 2]  # the first mask takes two rows of the second
    Image.fromarray((grown * 255).astype(np.uint8)).save(masks[0])
    with pytest.raises(ValueError, match="overlapper.*overlap"):
        nucjax.data.source("dsb2018", "train", data_dir=tmp_path / "data", manual_dir=raw)
    assert not list((tmp_path / "data" / "dsb2018").rglob("*.array_record*"))  # nothing half-written is left
    splits = read_splits("dsb2018", data_dir=tmp_path / "data", manual_dir=raw, overlap="first")
    items = splits["train"] | splits["validation"]
    np.testing.assert_array_equal(items["overlapper"]["label"] == 1, grown)  # the first file in sorted order wins
    np.testing.assert_array_equal(items["overlapper"]["label"] == 2, second & ~grown)


def test_mask_of_the_wrong_size_names_both_files(tmp_path):
    raw = tmp_path / "raw"
    write_kaggle(raw / "stage1_train", "odd", *make_image(0, "fluorescence"))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(raw / "stage1_train" / "odd" / "masks" / "zzz.png")
    with pytest.raises(ValueError, match=r"zzz\.png.*odd\.png|odd\.png.*zzz\.png"):
        nucjax.data.source("dsb2018", "train", data_dir=tmp_path / "data", manual_dir=raw)


def test_missing_manual_dir_says_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv("NUCJAX_DSB2018_DIR", raising=False)
    with pytest.raises(ValueError, match=r"(?s)nowhere.*kaggle.*stage1_train\.zip.*manual_dir.*NUCJAX_DSB2018_DIR"):
        nucjax.data.source("dsb2018", "train", data_dir=tmp_path, manual_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"(?s)to prepare .*name its raw data.*kaggle.*NUCJAX_DSB2018_DIR"):
        nucjax.data.source("dsb2018", "train", data_dir=tmp_path)
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"(?s)no stage1_train/ or stage1_train\.zip.*readme\.txt"):
        nucjax.data.source("dsb2018", "train", data_dir=tmp_path, manual_dir=tmp_path / "wrong")


def test_manual_dir_defaults_to_the_environment_variable(kaggle, tmp_path, monkeypatch):
    monkeypatch.setenv("NUCJAX_DSB2018_DIR", str(kaggle[0]))
    monkeypatch.setenv("NUCJAX_DATA_DIR", str(tmp_path))
    assert len(nucjax.data.source("dsb2018", "validation")) == 3
    assert (tmp_path / "dsb2018" / "default").is_dir()


def test_preparing_twice_gives_the_same_splits_and_reuses_prepared_data(kaggle, tmp_path):
    root, _ = kaggle
    first = read_all(nucjax.data.source("dsb2018", "validation", data_dir=tmp_path / "a", manual_dir=root))
    second = read_all(nucjax.data.source("dsb2018", "validation", data_dir=tmp_path / "b", manual_dir=root))
    assert list(first) == list(second) == sorted(first)  # deterministic, in id order
    # Prepared data is read without the raw files.
    assert len(nucjax.data.source("dsb2018", "validation", data_dir=tmp_path / "a", manual_dir=tmp_path / "gone")) == 3


def test_an_interrupted_preparation_leaves_no_dataset_and_is_redone(tmp_path):
    incomplete = tmp_path / "synthetic_nuclei" / "num_images=4" / "incomplete.ABC123_1.0.0"
    incomplete.mkdir(parents=True)  # what a killed run leaves behind
    (incomplete / "synthetic_nuclei-train.array_record-00000-of-00001").write_bytes(b"partial")
    source = nucjax.data.source("synthetic_nuclei", "train", data_dir=tmp_path, num_images=4, height=32, width=32)
    assert len(source) == 3 and source[0]["image"].shape == (32, 32, 3)


def write_user_folder(root: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """images/ + labels/ with a 16-bit PNG, a TIFF, an NPY and a mask folder; returns {stem: (image, labels)}."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    expected = {}
    for i, kind in enumerate([".png", ".tif", ".npy", "masks", ".png", ".tif"]):
        image, label = make_image(10 + i, ["fluorescence", "histology"][i % 2], shape=(32 + i, 40))
        stem = f"cell{i}"
        if i % 2 == 0:
            Image.fromarray(image[..., 0]).save(root / "images" / f"{stem}.png")  # grey file
        else:
            Image.fromarray(image).save(root / "images" / f"{stem}.tif")
        gappy = np.where(label > 0, label * 3, 0)  # ids 3, 6, 9, ...: the builder renumbers them 1..N
        if kind == "masks":
            expected[stem] = (image, write_masks(root / "labels" / stem, label))
            continue
        io.write_labels(root / "labels" / f"{stem}{kind}", gappy)
        expected[stem] = (image, label)
    return expected


def test_user_folder_examples_equal_the_files(tmp_path):
    expected = write_user_folder(tmp_path / "mine")
    splits = read_splits("nuclei_folder", data_dir=tmp_path, manual_dir=tmp_path / "mine", validation_fraction=0.34)
    assert splits["train"] and splits["validation"]
    items = splits["train"] | splits["validation"]
    assert set(items) == set(expected)
    for stem, (image, label) in expected.items():
        np.testing.assert_array_equal(items[stem]["image"], image)
        np.testing.assert_array_equal(items[stem]["label"], label)


def test_user_folder_errors(tmp_path):
    write_user_folder(tmp_path / "mine")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "mine" / "images" / "stray.png")
    np.save(tmp_path / "mine" / "labels" / "orphan.npy", np.zeros((8, 8), np.int32))
    with pytest.raises(ValueError, match=r"2 unpaired names: orphan \(labels/ only\), stray \(images/ only\)"):
        nucjax.data.source("nuclei_folder", "train", data_dir=tmp_path, manual_dir=tmp_path / "mine")
    np.save(tmp_path / "mine" / "labels" / "stray.npy", np.zeros((9, 8), np.int32))
    (tmp_path / "mine" / "labels" / "orphan.npy").unlink()
    with pytest.raises(ValueError, match=r"stray\.npy.*9x8.*stray\.png.*8x8"):
        nucjax.data.source("nuclei_folder", "train", data_dir=tmp_path, manual_dir=tmp_path / "mine")
    with pytest.raises(ValueError, match="images/ and labels/"):
        nucjax.data.source("nuclei_folder", "train", data_dir=tmp_path, manual_dir=tmp_path)
    with pytest.raises(ValueError, match="manual_dir"):
        nucjax.data.source("nuclei_folder", "train", data_dir=tmp_path)


def test_synthetic_builder_stores_generate_exactly(tmp_path):
    settings = dict(num_images=9, height=40, width=56, style="mixed", seed=3, validation_fraction=0.34)
    splits = read_splits("synthetic_nuclei", data_dir=tmp_path, **settings)
    items = splits["train"] | splits["validation"]
    assert sorted(items) == [f"synthetic-{i:05d}" for i in range(9)]
    for i in range(9):
        style = synthetic.STYLES[i % 3]
        image, label = synthetic.generate(np.random.default_rng([3, i]), height=40, width=56, style=style)
        np.testing.assert_array_equal(items[f"synthetic-{i:05d}"]["image"], image)
        np.testing.assert_array_equal(items[f"synthetic-{i:05d}"]["label"], label)
        assert items[f"synthetic-{i:05d}"]["modality"] == synthetic.STYLE_MODALITY[style]


def test_source_items_and_pickling(tmp_path):
    source = nucjax.data.source("synthetic_nuclei", "train", data_dir=tmp_path, num_images=4, height=24, width=24)
    item = source[1]
    assert set(item) == {"id", "image", "label", "modality"}
    item["label"][0, 0] = 5  # arrays are writable copies
    assert [example["id"] for example in source] == [source[i]["id"] for i in range(len(source))]
    assert source[-1]["id"] == source[len(source) - 1]["id"]
    with pytest.raises(IndexError):
        source[len(source)]
    clone = pickle.loads(pickle.dumps(source))  # grain workers receive the source pickled
    assert len(clone) == len(source) and clone[1]["id"] == source[1]["id"]
    np.testing.assert_array_equal(clone[2]["label"], source[2]["label"])


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(validation_fractio=0.2), r"setting 'validation_fractio'; valid settings: .*, validation_fraction"),
        (dict(validation_fraction="lots"), r"validation_fraction='lots' is not a valid float"),
        (dict(validation_fraction=1.5), r"validation_fraction=1.5 must be in \[0, 1\)"),
        (dict(validation_fraction=0.6, holdout_fraction=0.5), "below 1"),
        (dict(num_images=2.5), "num_images=2.5 is not a valid int"),
        (dict(style="sepia"), "style='sepia'"),
    ],
)
def test_bad_settings_raise_naming_the_key(tmp_path, settings, words):
    with pytest.raises(ValueError, match=words):
        nucjax.data.source("synthetic_nuclei", "train", data_dir=tmp_path, **settings)


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; known: dsb2018, nuclei_folder, synthetic_nuclei"):
        nucjax.data.source("mnist", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no split 'holdout'.*holdout_fraction"):
        nucjax.data.source("synthetic_nuclei", "holdout", data_dir=tmp_path, num_images=3, height=16, width=16)
    tiny = dict(data_dir=tmp_path, num_images=3, height=16, width=16, validation_fraction=0.0)
    assert len(nucjax.data.source("synthetic_nuclei", "train", **tiny)) == 3  # an empty split is not written
    with pytest.raises(ValueError, match="no split 'validation'; it has train"):
        nucjax.data.source("synthetic_nuclei", "validation", **tiny)


def test_config_names_follow_the_settings():
    make = synthetic.SyntheticConfig.from_kwargs
    assert make().name == make(num_images="256", seed=0).name == "default"
    assert make(seed="2", height=64).name == "height=64,seed=2"
    assert make(seed=2).name != make(seed=3).name
    named = folder.NucleiFolderConfig.from_kwargs(folder="/data/my cells")
    assert named.name.startswith("folder=my cells-") and "/" not in named.name


def test_prepare_command_prints_split_sizes(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "nucjax.data.prepare", "synthetic_nuclei", "--data_dir", str(tmp_path)]
    settings = ["--num_images=10", "--height", "24", "--width=24"]
    done = subprocess.run(command + settings, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "train: 9 images" in done.stdout and "validation: 1 images" in done.stdout
    bad = subprocess.run(command + ["--colour=yes"], capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode != 0 and "unknown builder setting 'colour'" in bad.stderr


@pytest.mark.slow  # about 50 s of CPU: preparing all of stage1_train
def test_real_dsb2018_stage1_train(dsb2018, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("dsb2018")
    splits = {s: nucjax.data.source("dsb2018", s, data_dir=data_dir, manual_dir=dsb2018) for s in SPLITS}
    folders = {p.name: p for p in (dsb2018 / "stage1_train").iterdir() if p.is_dir()}
    labels_only = prepare.prepare("dsb2018", data_dir=data_dir).as_data_source(
        decoders={"image": tfds.decode.SkipDecoding()}
    )
    ids = {s: [item["id"].decode() for item in labels_only[s]] for s in splits}
    assert len(folders) == 670 and sum(map(len, ids.values())) == 670
    assert not set(ids["train"]) & set(ids["validation"]) and set(ids["train"]) | set(ids["validation"]) == set(folders)
    total = 0
    for split in splits:
        for item in labels_only[split]:
            masks = [p for p in (folders[item["id"].decode()] / "masks").iterdir() if p.suffix == ".png"]
            assert item["label"].max() == len(masks), item["id"]  # DSB2018 has no empty mask files
            assert np.unique(item["label"]).size == len(masks) + 1, item["id"]  # ids 0..N, none missing
            total += int(item["label"].max())
        assert {item["modality"].decode() for item in labels_only[split]} == set(folder.MODALITIES), split
    assert total == 29461
    for source in splits.values():  # pixels of label k = mask file k, for a few images of each split
        for i in (0, len(source) // 2, len(source) - 1):
            item = source[i]
            masks = sorted((folders[item["id"]] / "masks").iterdir())
            expected = np.zeros(item["label"].shape, np.int32)
            for k, mask in enumerate(masks, start=1):
                expected[np.asarray(Image.open(mask)) > 0] = k
            np.testing.assert_array_equal(item["label"], expected)
            assert item["image"].shape == (*expected.shape, 3)
