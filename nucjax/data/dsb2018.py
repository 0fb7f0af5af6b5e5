"""TFDS builder `dsb2018` (Kaggle's 2018 Data Science Bowl nuclei): train / validation [/ holdout] from stage1_train,
and test from stage1_test with labels from stage1_solution.csv when those are present."""

import logging
import pathlib
import shutil
import tempfile
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from nucjax.data import folder, io

INSTRUCTIONS = """\
Download from https://www.kaggle.com/competitions/data-science-bowl-2018/data stage1_train.zip (required) and,
for a test split, stage1_test.zip and stage1_solution.csv. Put them, zipped or unzipped
(stage1_train/<id>/images/<id>.png with stage1_train/<id>/masks/*.png), in one folder and pass that folder as
manual_dir (python -m nucjax.data.prepare dsb2018 --manual_dir DIR), or set NUCJAX_DSB2018_DIR to it."""


def _extract(archive: pathlib.Path, into: pathlib.Path) -> pathlib.Path:
    """The folder a zip file is extracted to under `into` (once per version of the zip; written whole or not at all)."""
    stat = archive.stat()
    target = into / f"{archive.name}-{stat.st_size}-{int(stat.st_mtime)}"
    if not target.is_dir():
        into.mkdir(parents=True, exist_ok=True)
        scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=into))
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(scratch)
            scratch.rename(target)
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{archive}: cannot extract ({type(e).__name__}: {e})") from e
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _stage_folder(root: pathlib.Path, stage: str, extracted: pathlib.Path) -> pathlib.Path | None:
    """The folder of a Kaggle stage (`root/stage/`, or `root/stage.zip` extracted under `extracted`), or None."""
    if (root / stage).is_dir():
        return root / stage
    if (root / f"{stage}.zip").is_file():
        unpacked = _extract(root / f"{stage}.zip", extracted)
        return unpacked / stage if (unpacked / stage).is_dir() else unpacked
    return None


def _image_folders(stage: pathlib.Path) -> dict[str, pathlib.Path]:
    """{id: image file} of a Kaggle stage folder laid out as <id>/images/<id>.png."""
    images = {}
    for entry in sorted(stage.iterdir()):
        if not entry.is_dir() or entry.name.startswith((".", "__")):
            continue
        image = entry / "images" / f"{entry.name}.png"
        if not image.is_file():
            raise ValueError(f"{entry}: expected the image at images/{entry.name}.png (Kaggle layout)")
        images[entry.name] = image
    if not images:
        raise ValueError(f"{stage}: no <id>/images/<id>.png folders (Kaggle layout)")
    return images


def _solution_csv(root: pathlib.Path, extracted: pathlib.Path) -> pathlib.Path | None:
    """stage1_solution.csv in root (or extracted from stage1_solution.csv.zip), or None if absent."""
    if (root / "stage1_solution.csv").is_file():
        return root / "stage1_solution.csv"
    if (root / "stage1_solution.csv.zip").is_file():
        return next(_extract(root / "stage1_solution.csv.zip", extracted).rglob("*.csv"), None)
    return None


class Dsb2018(folder.NucleiBuilder):
    """DSB2018 stage 1 nuclei: id, image, label (instance k = k-th non-empty mask file in sorted order), modality,
    empty_masks (empty mask files skipped). Settings: validation_fraction, holdout_fraction, overlap."""

    name = "dsb2018"
    BUILDER_CONFIGS = [folder.LabelledConfig(name=folder.DEFAULT_CONFIG)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {"empty_masks": tfds.features.Scalar(dtype=np.int32, doc="empty mask files skipped")}

    def _split_generators(self, dl_manager):
        try:
            root = pathlib.Path(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS: the manual_dir is missing or empty
            raise ValueError(f"dsb2018: {e}") from None
        extracted = pathlib.Path(dl_manager.download_dir) / "extracted"
        train = _stage_folder(root, "stage1_train", extracted)
        if train is None:
            found = ", ".join(sorted(p.name for p in root.iterdir())[:10])
            raise ValueError(f"{root}: no stage1_train/ or stage1_train.zip here (found: {found}).\n{INSTRUCTIONS}")
        images = _image_folders(train)
        modalities = dict(zip(images, folder.threaded(folder.file_modality, images.values())))
        overlap = self.builder_config.overlap

        def load(image_id: str) -> tuple[str, dict]:
            image = folder.as_rgb(io.read_image(images[image_id]))
            masks = images[image_id].parent.parent / "masks"
            label, empty = io.read_mask_folder(masks, image_path=images[image_id], overlap=overlap)
            return folder.example(image_id, image, folder.compact_labels(label), empty_masks=empty)

        splits = self._training_splits(modalities, load)
        test = self._test_split(root, extracted)
        if test is not None:
            splits["test"] = test
        return splits

    def _test_split(self, root: pathlib.Path, extracted: pathlib.Path):
        """Examples of stage1_test labelled by stage1_solution.csv, or None (with a warning) when either is absent."""
        stage, csv = _stage_folder(root, "stage1_test", extracted), _solution_csv(root, extracted)
        if stage is None or csv is None:
            if stage is not None or csv is not None:
                logging.warning("dsb2018: no test split: it needs stage1_test and stage1_solution.csv in %s", root)
            return None
        images = _image_folders(stage)
        labels = io.read_rle_csv(csv, overlap=self.builder_config.overlap)
        unpaired = sorted(set(images) ^ set(labels))
        if unpaired:
            listed = ", ".join(f"{i} ({'image' if i in images else 'CSV'} only)" for i in unpaired[:10])
            raise ValueError(f"{csv} and {stage}: {len(unpaired)} ids are not in both: {listed}")

        def load(image_id: str) -> tuple[str, dict]:
            image = folder.as_rgb(io.read_image(images[image_id]))
            label = folder.compact_labels(labels[image_id])
            if label.shape != image.shape[:2]:
                raise ValueError(
                    f"{csv}: ImageId {image_id} is {label.shape[0]}x{label.shape[1]} but {images[image_id]} is "
                    f"{image.shape[0]}x{image.shape[1]}"
                )
            return folder.example(image_id, image, label, empty_masks=0)

        return self._generate_examples(sorted(images), load)
