"""Input-pipeline throughput: images/s of training batches (default 8 x 256²) per target set and grain worker count.

Each cell builds a fresh `pipeline.train_loader`, draws --warmup batches (worker start-up included there), then
times --batches batches. Source: synthetic images (`nucjax.data.synthetic.generate`, made once, in memory; --large
adds 1024² ones, as DSB2018 has a few) or DSB2018's train split through `nucjax.data.source`. --compact times the
loader's compact batches (uint8 masks and classes, `train_loader(compact=True)`).

  python benchmarks/bench_input.py --workers 0,1 --batches 10
  python benchmarks/bench_input.py --source synthetic --size 256 320 --large 4 --workers 0,1,2 --compact
  python benchmarks/bench_input.py --source dsb2018 --workers 0,1,2
  python benchmarks/bench_input.py --source dsb2018 --step configs/unet_boundary.py --override model.base_width=32 \
      precision=bfloat16 --batch 128 --workers 0,15     # does the pipeline keep up with the train step?

--step CONFIG: the pipeline of that config's variant (its targets, compact batches, its `data` section with
--override applied, then --batch and --crop), and the images/s of its jitted train step on the default device
timed on one of those batches; each cell then prints the ratio pipeline / step (>= 1: the input keeps up).
"""

import argparse
import pathlib
import time

import numpy as np

from nucjax.config import load_config
from nucjax.data import pipeline

REPO_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
TARGET_SETS = {
    "mask": ["foreground"],
    "boundary": ["foreground", "boundary"],
    "3-class": ["three_class"],
    "weight map": ["foreground", "weight_map"],
    "Mask R-CNN": ["instances"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=("synthetic", "dsb2018"), default="synthetic")
    p.add_argument("--images", type=int, default=64, help="synthetic images to make")
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), help="synthetic image height, width")
    p.add_argument("--large", type=int, default=0, help="synthetic 1024 x 1024 images to add (200-400 nuclei each)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--workers", default="0,1,2", help="grain worker counts, comma-separated")
    p.add_argument("--sets", default=",".join(TARGET_SETS), help="target sets, comma-separated")
    p.add_argument("--batches", type=int, default=10, help="timed batches per cell")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per cell")
    p.add_argument("--compact", action="store_true", help="uint8 masks and classes (train_loader(compact=True))")
    p.add_argument("--step", default="", help="a config file: time its train step too and print the ratios")
    p.add_argument("--override", nargs="*", default=[],
                   help="KEY=VALUE overrides of the --step config (or the default one), e.g. "
                        "data.builder_kwargs.holdout_fraction=0.1 to read the study's prepared DSB2018")
    p.add_argument("--step-count", type=int, default=10, help="timed train steps (after one for compilation)")
    p.add_argument("--cache-mb", type=float, default=None,
                   help="data.cache_mb, decoded examples kept per process or worker (default: the config's); time "
                        "later epochs with --warmup past the first")
    return p.parse_args()


def make_source(args: argparse.Namespace, config):
    """A random-access source of {"image", "label"} dicts: DSB2018's training split as the config names it
    (data.builder_kwargs, data.data_dir), or synthetic images."""
    if args.source == "dsb2018":
        from nucjax import data

        return data.source_for(config, "train")
    from nucjax.data import synthetic

    height, width = args.size
    pairs = [synthetic.generate(i, height=height, width=width) for i in range(args.images)]
    pairs += [synthetic.generate(args.images + i, height=1024, width=1024, num_nuclei=(200, 400))
              for i in range(args.large)]
    return [{"image": image, "label": label} for image, label in pairs]


def images_per_second(source, config, names: list[str], batches: int, warmup: int, compact: bool) -> float:
    """Training images per second delivered by a fresh loader after `warmup` batches."""
    iterator = iter(pipeline.train_loader(source, config, target_names=names, seed=0, shard_index=0, shard_count=1,
                                          compact=compact))
    try:
        for _ in range(warmup):
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
        elapsed = time.perf_counter() - start
    finally:
        iterator.close()  # stops the workers
    assert batch["image"].shape == (config.train.batch_size, config.data.crop_size, config.data.crop_size, 3)
    return batches * config.train.batch_size / elapsed


def step_images_per_second(config, batch: dict, steps: int) -> float:
    """Training images per second of `config`'s jitted train step (as nucjax.train compiles it) on `batch`."""
    import functools

    import jax

    from nucjax import parallel, train, variants

    variant = variants.get(config.variant)
    module, tx = variant.model(config), train.create_optimizer(config)
    mesh = parallel.make_mesh()
    abstract = jax.eval_shape(functools.partial(train.create_train_state, config, module, tx))
    state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), abstract)
    state = jax.jit(functools.partial(train.create_train_state, config, module, tx), out_shardings=state_sharding)()
    step = train.jit_train_step(config, variant, module, tx, mesh, state_sharding)
    device_batch = parallel.put_batch(batch, mesh)
    state, metrics = step(state, device_batch)  # compilation
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics)
    return steps * config.train.batch_size / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    config = load_config(args.step or REPO_CONFIG, args.override)
    config.train.batch_size = args.batch
    config.data.crop_size = args.crop
    if args.cache_mb is not None:
        config.data.cache_mb = args.cache_mb
    workers = [int(w) for w in args.workers.split(",")]
    sets = {s.strip(): TARGET_SETS[s.strip()] for s in args.sets.split(",")}
    if args.step:
        from nucjax import variants

        sets = {config.variant: list(variants.get(config.variant).target_names(config))}
        args.compact = True  # as nucjax.train reads them
    start = time.perf_counter()
    source = make_source(args, config)
    shown = len(source) if args.source == "synthetic" else min(len(source), 64)  # DSB2018 decodes each image read
    sizes = np.array([source[i]["label"].shape for i in range(shown)])
    print(f"source {args.source}: {len(source)} images (median size {np.median(sizes, 0).astype(int).tolist()}, "
          f"mean {np.prod(sizes, 1).mean() / 1e6:.2f} Mpixel), ready in {time.perf_counter() - start:.1f} s; "
          f"batch {args.batch} x {args.crop}², {args.batches} timed batches after {args.warmup} warm-up"
          + (", compact" if args.compact else "") + f", data.cache_mb={config.data.cache_mb:g}")
    step = None
    if args.step:
        config.data.num_workers = 0
        first = next(iter(pipeline.train_loader(source, config, target_names=next(iter(sets.values())), seed=0,
                                                shard_index=0, shard_count=1, compact=True)))
        step = step_images_per_second(config, first, args.step_count)
        import jax

        print(f"train step ({config.variant}, {args.step} {' '.join(args.override)}): {step:.1f} images/s on "
              f"{jax.devices()[0].device_kind}")
    print(f"{'targets':<14}" + "".join(f"{f'{w} workers':>14}" for w in workers) + "   (images/s"
          + ("; pipeline / step)" if step else ")"))
    for name, names in sets.items():
        row = []
        for count in workers:
            config.data.num_workers = count
            row.append(images_per_second(source, config, names, args.batches, args.warmup, args.compact))
        print(f"{name:<14}" + "".join(f"{r:>14.1f}" for r in row), flush=True)
        if step:
            print(f"{'  / step':<14}" + "".join(f"{r / step:>13.2f}x" for r in row), flush=True)


if __name__ == "__main__":
    main()
