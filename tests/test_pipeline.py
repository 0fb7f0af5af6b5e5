"""The image normalisation, the grain training batches (seeds, shards, workers, resume at a step) and whole-image
evaluation."""

import grain
import numpy as np
import pytest

from nucjax.config import load_config
from nucjax.data import pipeline, synthetic, targets
from tests.conftest import REPO

ALL_TARGETS = ["foreground", "boundary", "three_class", "weight_map", "distance", "instances"]


def _config(batch_size=4, workers=0):
    config = load_config(REPO / "configs" / "default.py")
    config.data.crop_size = 32
    config.data.num_workers = workers
    config.train.batch_size = batch_size
    config.targets.max_instances = 8
    config.targets.mask_size = 8
    return config


def _source(count=6):
    """A list of small examples (varied sizes, some smaller than the crop) with a few rectangles each."""
    rng = np.random.default_rng(0)
    examples = []
    for i in range(count):
        height, width = (24, 40) if i % 3 == 0 else (48 + 4 * i, 56)
        label = np.zeros((height, width), np.int32)
        for k in range(1, 5):
            y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
            label[y : y + rng.integers(4, 9), x : x + rng.integers(4, 9)] = k
        image = (rng.integers(0, 60, (height, width, 3)) + 150 * (label > 0)[..., None]).astype(np.uint8)
        examples.append({"id": f"img{i}", "image": image, "label": label, "modality": "fluorescence"})
    return examples


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _loader(config, names, seed=1, shard=(0, 1)):
    index, count = shard
    return pipeline.train_loader(_source(), config, target_names=names, seed=seed, shard_index=index, shard_count=count)


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_normalize_maps_the_percentiles_to_zero_and_one():
    image = np.arange(1001, dtype=np.float32).reshape(7, 143)  # percentiles 1 and 99.8 of 0..1000: 10 and 998
    out = pipeline.normalize_image(image)
    assert out.shape == (7, 143, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], (image - 10) / 988, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 4000), (np.float32, 1.0)])
def test_normalize_equals_the_percentile_formula(dtype, top):
    rng = np.random.default_rng(4)
    image = (rng.random((37, 41, 3)) ** 3 * top).astype(dtype)  # skewed: mostly dark, like fluorescence
    low, high = np.percentile(image, (1.0, 99.8))
    np.testing.assert_allclose(pipeline.normalize_image(image), (image - low) / (high - low), rtol=1e-5, atol=1e-5)


def test_normalize_handles_dtypes_channels_and_constant_images():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    reference = pipeline.normalize_image(rgb)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(pipeline.normalize_image(rgba), reference)
    np.testing.assert_allclose(pipeline.normalize_image(rgb.astype(np.uint16) * 257), reference, atol=1e-5)
    np.testing.assert_allclose(pipeline.normalize_image(rgb / 255.0), reference, atol=1e-5)
    grey = pipeline.normalize_image(rgb, grey=True)
    np.testing.assert_allclose(grey[..., 1], pipeline.normalize_image(rgb.mean(axis=2))[..., 0], atol=1e-5)
    np.testing.assert_array_equal(pipeline.normalize_image(np.full((5, 5), 7, np.uint8)), 0)
    sparse = np.zeros((50, 50), np.uint8)
    sparse[0, 0] = 200  # the 99.8th percentile is 0: the maximum is used instead
    assert pipeline.normalize_image(sparse)[0, 0, 0] == 1.0
    with pytest.raises(ValueError, match="shape"):
        pipeline.normalize_image(np.zeros((4, 4, 5)))


def test_normalize_inverts_bright_background_when_asked():
    image = np.full((20, 20), 230, np.uint8)
    image[5:10, 5:10] = 40  # dark nucleus on a bright background
    plain = pipeline.normalize_image(image)
    inverted = pipeline.normalize_image(image, invert_bright=True)
    np.testing.assert_allclose(inverted, 1 - plain)
    assert inverted[7, 7, 0] > inverted[0, 0, 0]
    dark = 255 - image
    np.testing.assert_array_equal(pipeline.normalize_image(dark, invert_bright=True), pipeline.normalize_image(dark))


def test_levels_of_image_levels_map_a_crop_as_normalize_image_maps_the_image():
    rng = np.random.default_rng(6)
    colour = (rng.random((30, 34, 3)) ** 3 * 255).astype(np.uint8)
    grey3 = np.repeat(colour[..., :1], 3, axis=2)
    cases = [(colour, {}), (grey3, {}), (grey3[..., 0], {}), ((colour * 16.0).astype(np.uint16), {}),
             (colour / 255.0, {}), (colour, {"grey": True}), (grey3, {"grey": True, "invert_bright": True}),
             (255 - grey3, {"invert_bright": True}), (np.concatenate([grey3, grey3[..., :1]], axis=2), {})]
    crop = (slice(5, 21), slice(3, 30))
    for image, options in cases:
        pixels, levels = pipeline.image_levels(image, **options)
        assert pixels.shape[:2] == image.shape[:2] and pixels.shape[2] in (1, 3)
        part = levels(pixels[crop])
        whole = pipeline.normalize_image(image, **options)
        np.testing.assert_array_equal(np.broadcast_to(part, whole[crop].shape), whole[crop])
    _, levels = pipeline.image_levels(grey3)  # one channel's histogram stands for all three channels' values
    low, high = np.percentile(grey3, (pipeline.LOW_PERCENTILE, pipeline.HIGH_PERCENTILE))
    assert levels.low == pytest.approx(low, abs=1e-9) and levels.scale == pytest.approx(1 / (high - low), rel=1e-9)


def test_compact_batches_hold_the_same_values_in_uint8():
    config = _config()
    names = ["foreground", "boundary", "three_class", "weight_map"]
    full = _take(iter(_loader(config, names, seed=4)), 2)
    compact = _take(iter(pipeline.train_loader(_source(), config, target_names=names, seed=4, shard_index=0,
                                               shard_count=1, compact=True)), 2)
    for a, b in zip(full, compact):
        assert {k for k, v in b.items() if v.dtype == np.uint8} == {"valid", "foreground", "boundary", "three_class"}
        _assert_same([a], [pipeline.widen(b)])
        assert all(pipeline.widen(b)[k].dtype == a[k].dtype for k in a)


def test_batches_have_fixed_shapes_and_consistent_targets():
    config = _config()
    for batch in _take(iter(_loader(config, ALL_TARGETS)), 3):
        expected = {
            "image": ((4, 32, 32, 3), np.float32), "valid": ((4, 32, 32), np.float32),
            "intensity": ((4, 6), np.float32),
            "foreground": ((4, 32, 32), np.float32), "boundary": ((4, 32, 32), np.float32),
            "three_class": ((4, 32, 32), np.int32), "weight_map": ((4, 32, 32), np.float32),
            "distance": ((4, 32, 32), np.float32), "boxes": ((4, 8, 4), np.float32),
            "masks": ((4, 8, 8, 8), np.uint8), "instance_valid": ((4, 8), bool),
        }  # fmt: skip
        assert {key: (value.shape, value.dtype) for key, value in batch.items()} == expected
        np.testing.assert_array_equal(batch["foreground"], batch["three_class"] > 0)
        np.testing.assert_array_equal(batch["boundary"], batch["three_class"] == 2)
        assert (batch["foreground"][batch["valid"] == 0] == 0).all()
        assert batch["instance_valid"].any()


@pytest.mark.parametrize("input_scale", [1.0, 2.0])
def test_input_scale_magnifies_the_training_crops(input_scale):
    """data.input_scale=2 with no random zoom: every crop (of an image larger than it) is made of 2x2 blocks."""
    config = _config()
    config.data.input_scale = input_scale
    config.data.augment.scale_range = (1.0, 1.0)
    batch = next(iter(_loader(config, ["foreground"])))
    foreground = batch["foreground"][batch["valid"].all(axis=(1, 2))]
    assert len(foreground) and foreground.any()
    blocks = all((foreground[:, a::2, b::2] == foreground[:, ::2, ::2]).all() for a in (0, 1) for b in (0, 1))
    assert blocks == (input_scale == 2.0)


def test_targets_of_a_padded_crop_are_the_image_targets_with_no_boundary_at_its_edge():
    label = np.zeros((20, 24), np.int32)
    label[:, :10] = 1  # touches three image edges
    label[5:10, 15:20] = 2
    image = (50 + 100 * (label > 0)[..., None] * np.ones(3)).astype(np.uint8)
    config = _config(batch_size=2)
    config.data.augment.update(scale_range=(1.0, 1.0), flip=False, rot90=False, nuclei_crop_prob=0.0)
    names = ["boundary", "weight_map", "distance", "instances"]
    source = [{"image": image, "label": label}] * 2
    batch = next(iter(pipeline.train_loader(source, config, target_names=names, seed=0, shard_index=0, shard_count=1)))
    want = targets.compute(label, names, config.targets)
    for b in range(2):
        y0, x0 = np.flatnonzero(batch["valid"][b].any(axis=1))[0], np.flatnonzero(batch["valid"][b].any(axis=0))[0]
        inside = (slice(y0, y0 + 20), slice(x0, x0 + 24))
        assert batch["valid"][b][inside].all() and batch["valid"][b].sum() == 20 * 24
        for key in ("boundary", "weight_map", "distance"):
            np.testing.assert_allclose(batch[key][b][inside], want[key], err_msg=key)
            assert (batch[key][b][batch["valid"][b] == 0] == 0).all()
        assert batch["boundary"][b][inside][:, 0].sum() == 0  # the image's left edge
        np.testing.assert_array_equal(batch["boxes"][b][:2], want["boxes"][:2] + [y0, x0, y0, x0])
        np.testing.assert_array_equal(batch["masks"][b], want["masks"])


def test_same_seed_same_batches_other_seed_other_batches():
    config = _config()
    make = lambda seed: _take(iter(_loader(config, ["three_class"], seed=seed)), 4)
    first, again, other = make(3), make(3), make(4)
    _assert_same(first, again)
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_seed_defaults_to_the_config_seed_and_shards_to_the_jax_processes():
    config = _config()
    config.seed = 5
    default = _take(iter(pipeline.train_loader(_source(), config, target_names=["foreground"])), 2)
    _assert_same(default, _take(iter(_loader(config, ["foreground"], seed=5)), 2))


def test_shards_split_the_global_batches_whatever_the_shard_count():
    config = _config(batch_size=4)
    whole = _take(iter(_loader(config, ["boundary"], seed=2)), 3)
    shards = [_take(iter(_loader(config, ["boundary"], seed=2, shard=(k, 2))), 3) for k in range(2)]
    for step, batch in enumerate(whole):
        for k in range(2):
            assert shards[k][step]["image"].shape == (2, 32, 32, 3)
            for key in batch:  # process k's rows are the k-th half of the step's global batch
                np.testing.assert_array_equal(shards[k][step][key], batch[key][2 * k : 2 * k + 2], err_msg=key)


def _reference_batches(config, names, seed, count):
    """The global batches as grain's DataLoader makes them in one process without workers (the reference): records
    in the IndexSampler's shuffled order, each prepared with the sampler's rng, batched in order."""
    source = _source()
    sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=grain.sharding.NoSharding(),
                                          shuffle=True, num_epochs=None, seed=seed)
    loader = grain.DataLoader(data_source=source, sampler=sampler, worker_count=0, operations=[
        pipeline._Prepare(config, tuple(names)),
        grain.transforms.Batch(batch_size=config.train.batch_size, drop_remainder=True)])
    return _take(iter(loader), count)


@pytest.mark.parametrize("workers,shard_count,start", [(0, 1, 0), (0, 2, 3), (2, 1, 3), (2, 2, 1)])
def test_batches_are_the_same_for_any_process_and_worker_count_and_any_start(workers, shard_count, start):
    config = _config(batch_size=4, workers=workers)
    names = ["foreground", "instances"]
    want = _reference_batches(config, names, seed=9, count=start + 4)[start:]  # 6 records: crosses epochs
    shards = [_take(_loader(config, names, seed=9, shard=(k, shard_count)).iterate(start), 4)
              for k in range(shard_count)]
    for step, batch in enumerate(want):
        for key in batch:  # the processes' parts, stacked in process order, are the step's global batch
            joined = np.concatenate([shards[k][step][key] for k in range(shard_count)])
            np.testing.assert_array_equal(joined, batch[key], err_msg=f"step {start + step} {key}")


@pytest.mark.parametrize("cache_records", [0, 2])
def test_the_decoded_example_cache_keeps_to_its_budget_and_changes_nothing(cache_records):
    config = _config(batch_size=4)
    names = ["foreground", "boundary"]
    source = _source()
    sizes = [3 * e["label"].size + 2 * e["label"].size for e in source]  # 3-channel uint8 pixels, uint16 labels
    config.data.cache_mb = sum(sorted(sizes)[:cache_records]) / 2**20 if cache_records else 0
    loader = _loader(config, names, seed=9)
    _assert_same(_take(loader.iterate(0), 5), _reference_batches(config, names, seed=9, count=5))
    sampler = grain.samplers.IndexSampler(num_records=6, shard_options=grain.sharding.NoSharding(), shuffle=True,
                                          num_epochs=None, seed=9)
    batch = pipeline._Batch(source, sampler, pipeline._Prepare(config, tuple(names)), 4, 0, 1,
                            int(config.data.cache_mb * 2**20))
    for j in range(3):  # two epochs of 6 records
        batch.map(j)
    assert batch._cached <= config.data.cache_mb * 2**20
    assert len(batch._cache) <= cache_records and (len(batch._cache) > 0) == (cache_records > 0)
    for key, (pixels, _, label) in batch._cache.items():
        assert label.dtype == np.uint16 and pixels.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(label, source[key]["label"])


def test_a_batch_can_be_read_by_its_number():
    loader = _loader(_config(), ["foreground"], seed=2)
    _assert_same([loader[5]], _take(loader.iterate(5), 1))
    with pytest.raises(ValueError, match="start must be >= 0"):
        loader.iterate(-1)


def test_batch_size_must_divide_over_the_processes():
    with pytest.raises(ValueError, match="train.batch_size=5"):
        _loader(_config(batch_size=5), ["foreground"], shard=(0, 2))


def test_unknown_target_name_is_rejected_before_loading():
    with pytest.raises(ValueError, match="unknown target name.*'edges'"):
        _loader(_config(), ["edges"])


def test_bad_example_is_named_in_the_error():
    source = _source(2)
    source[1] = {**source[1], "label": source[1]["label"][:-3]}
    with pytest.raises(ValueError, match="img1"):
        list(pipeline.eval_examples(source, _config(), stride=16))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_training_example_is_named_in_the_error_also_from_a_worker(workers):
    source = _source(2)
    source[1] = {**source[1], "label": source[1]["label"][:-3]}
    iterator = pipeline.train_loader(source, _config(batch_size=2, workers=workers), target_names=["foreground"],
                                     seed=0, shard_index=0, shard_count=1).iterate(0)
    try:
        with pytest.raises(ValueError, match=r"example img1: image \(52, 56, 3\) and label \(49, 56\) differ"):
            next(iterator)
    finally:
        iterator.close()


def test_eval_examples_pad_to_the_stride_in_source_order():
    source, config = _source(3), _config()
    examples = list(pipeline.eval_examples(source, config, stride=16, target_names=["three_class"]))
    assert [e["id"] for e in examples] == ["img0", "img1", "img2"]
    for example, original in zip(examples, source):
        height, width = original["label"].shape
        padded = (-(-height // 16) * 16, -(-width // 16) * 16)
        assert example["image"].shape == (1, *padded, 3) and example["valid"].shape == (1, *padded)
        assert example["size"] == (height, width) and example["modality"] == "fluorescence"
        np.testing.assert_array_equal(example["image"][0, :height, :width], pipeline.normalize_image(original["image"]))
        assert example["valid"][0, :height, :width].all() and example["valid"].sum() == height * width
        np.testing.assert_array_equal(example["label"], original["label"])
        want = targets.compute(original["label"], ["three_class"], config.targets)["three_class"]
        np.testing.assert_array_equal(example["three_class"], want)


def _mirror(index, n):
    index = np.mod(index, 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def _reference_example(element, rng, config, names):
    """A training example the straightforward way: normalise the whole image, sample it in three channels (whole
    rows and columns mirrored), draw the intensity changes (made on the device later), targets of the valid
    rectangle."""
    data, aug, size = config.data, config.data.augment, config.data.crop_size
    image = pipeline.normalize_image(element["image"], grey=data.grey, invert_bright=data.invert_bright)
    label = np.asarray(element["label"], np.int32)
    (height, width), low_high = label.shape, tuple(aug.scale_range)
    scale = 1.0 if low_high == (1.0, 1.0) else float(np.exp(rng.uniform(np.log(low_high[0]), np.log(low_high[1]))))
    span = size / scale
    limits = [(int(np.ceil(min(0, n - span))), int(np.floor(max(0, n - span)))) for n in label.shape]
    if aug.nuclei_crop_prob > 0 and rng.random() < aug.nuclei_crop_prob and label.any():
        pixels = np.flatnonzero(label)
        centre = np.unravel_index(pixels[rng.integers(len(pixels))], label.shape)
        starts = [int(np.clip(np.round(c + 0.5 - span / 2), lo, hi)) for c, (lo, hi) in zip(centre, limits)]
    else:
        starts = [int(rng.integers(lo, hi + 1)) for lo, hi in limits]
    ys, xs = (start + (np.arange(size) + 0.5) / scale - 0.5 for start in starts)
    near_y, near_x = np.floor(ys + 0.5).astype(int), np.floor(xs + 0.5).astype(int)
    valid = (((near_y >= 0) & (near_y < height))[:, None] & ((near_x >= 0) & (near_x < width))[None, :])
    valid = valid.astype(np.float32)
    label = np.where(valid > 0, label[np.ix_(_mirror(near_y, height), _mirror(near_x, width))], 0)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    wy, wx = (ys - y0).astype(np.float32)[:, None, None], (xs - x0).astype(np.float32)[None, :, None]
    rows = image[_mirror(y0, height)] * (1 - wy) + image[_mirror(y0 + 1, height)] * wy
    image = rows[:, _mirror(x0, width)] * (1 - wx) + rows[:, _mirror(x0 + 1, width)] * wx
    if rng.random() < 0.5:
        image, label, valid = image[::-1], label[::-1], valid[::-1]
    if rng.random() < 0.5:
        image, label, valid = image[:, ::-1], label[:, ::-1], valid[:, ::-1]
    turns = int(rng.integers(4))
    image, label, valid = (np.ascontiguousarray(np.rot90(a, turns)) for a in (image, label, valid))
    image = image.astype(np.float32)
    grey = float(aug.grey_prob > 0 and rng.random() < aug.grey_prob)  # the drawn intensity changes, in order
    invert = float(aug.invert_prob > 0 and rng.random() < aug.invert_prob)
    gamma = float(np.exp(rng.uniform(-aug.gamma, aug.gamma)))
    contrast = float(rng.uniform(1 - aug.contrast, 1 + aug.contrast))
    brightness = float(rng.uniform(-aug.brightness, aug.brightness))
    noise_std = float(rng.uniform(0, aug.noise_std))
    intensity = np.float32([grey, invert, gamma, contrast, brightness, noise_std])
    out = {"image": image, "valid": valid, "intensity": intensity}
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    inside = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    for key, value in targets.compute(label[inside], names, config.targets).items():
        if key == "boxes":
            value = value + np.float32([rows[0], cols[0], rows[0], cols[0]]) * (value[:, 2:3] > 0)
        elif value.ndim == 2 and key != "instance_valid":
            value, part = np.zeros((size, size), value.dtype), value
            value[inside] = part
        out[key] = value
    return out


@pytest.mark.parametrize("settings", [
    {}, {"data.augment.scale_range": (1.0, 1.0)}, {"data.grey": True, "data.invert_bright": True},
    {"data.augment.grey_prob": 1.0, "data.augment.invert_prob": 0.5, "data.augment.nuclei_crop_prob": 1.0},
])
def test_training_examples_equal_the_whole_image_reference_bit_for_bit(settings):
    config = _config()
    config.data.crop_size = 48
    for key, value in settings.items():
        *path, name = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[name] = value
    names = ("foreground", "boundary", "three_class", "weight_map", "instances")
    images = [synthetic.generate(i, height=64, width=72, style=style)
              for i, style in enumerate(("fluorescence", "histology", "brightfield"))]
    images.append((images[1][0][:20, :30], images[1][1][:20, :30]))  # smaller than the crop: padded
    images.append((images[0][0][..., 0], images[0][1]))  # one channel
    prepare = pipeline._Prepare(config, names)
    for seed in range(12):
        image, label = images[seed % len(images)]
        element = {"image": image, "label": label}
        got = prepare.random_map(element, np.random.default_rng(seed))
        want = _reference_example(element, np.random.default_rng(seed), config, names)
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"seed {seed}: {key}")
