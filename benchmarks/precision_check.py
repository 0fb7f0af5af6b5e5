"""How far a bfloat16 train step's loss and gradients are from float32's, at a trained checkpoint on real batches.

    python benchmarks/precision_check.py --checkpoint runs/cpu/unet_boundary-s0 --batches 4
    python benchmarks/precision_check.py --config configs/unet_boundary.py --override model.base_width=32
    python benchmarks/precision_check.py --sum-check

For each batch of the checkpoint's own training pipeline: the loss in both precisions and the relative L2 error
of the bf16 gradient, ||g_bf16 - g_f32|| / ||g_f32||, over all parameters and for the worst layer. Mixed
precision should change neither the loss nor the gradient's direction by much more than bf16's rounding
(2**-8 relative per value).
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from nucjax import checkpoint, data, intensity, variants  # noqa: E402
from nucjax.config import load_config  # noqa: E402
from nucjax.data import pipeline  # noqa: E402

def sum_check() -> None:
    """Does this backend sum a bf16 bias add's gradient in bf16? Random data of batch 8 x 128² x 16 channels: the
    relative error of the bias gradient and of a 3×3 convolution's kernel gradient, bf16 against float32 on the
    same rounded values (XLA:CPU, 2026-11-26: 21% and 0.15%)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 128, 128, 16)) + 0.5, jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(8, 128, 128, 16)) + 0.1, jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(3, 3, 16, 16)) * 0.1, jnp.bfloat16)
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    relative = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
    f32 = lambda a: a.astype(jnp.float32)
    bias16 = jax.vjp(lambda b: x + b, jnp.zeros(16, jnp.bfloat16))[1](g)[0]
    kernel16 = jax.vjp(lambda k: conv(x, k), k)[1](g)[0]
    kernel32 = jax.vjp(lambda k: conv(f32(x), k), f32(k))[1](f32(g))[0]
    print(f"{jax.devices()[0].platform}: bf16 bias-add gradient {relative(bias16, f32(g).sum((0, 1, 2))):.2%} off, "
          f"bf16 convolution kernel gradient {relative(kernel16, kernel32):.2%} off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--sum-check", action="store_true", help="only the bias-add / convolution check on random data")
    where.add_argument("--checkpoint", help="a workdir (its best checkpoint is used)")
    where.add_argument("--config", help="a config file: the parameters at initialisation (config.seed)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="with --config")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--layers", type=int, default=0, help="also list this many worst layers per batch")
    args = parser.parse_args()
    if args.sum_check:
        return sum_check()
    if args.checkpoint:
        predictor = checkpoint.load(args.checkpoint)
        config = predictor.config
        params, step = predictor.variables["params"], predictor.step
    else:
        config = load_config(args.config, args.override)
        sample = jnp.zeros((1, config.data.crop_size, config.data.crop_size, 3), jnp.float32)
        params = variants.get(config.variant).model(config).init(jax.random.key(config.seed), sample, train=False)
        params, step = params["params"], 0
    variant = variants.get(config.variant)
    source = data.source_for(config, config.data.train_split)
    loader = iter(pipeline.train_loader(source, config, target_names=variant.target_names(config), seed=123))

    def loss_and_grads(precision: str):
        """A jitted (params, batch) -> (loss, gradients) in `precision`, compiled once for every batch."""
        cfg = config.copy_and_resolve_references()
        cfg.precision = precision
        module = variant.model(cfg)
        loss_fn = lambda p, b: variant.loss(module, {"params": p}, b, {"dropout": jax.random.key(0)}, True, cfg)[0]
        return jax.jit(jax.value_and_grad(loss_fn))

    step_f32, step_bf16 = loss_and_grads("float32"), loss_and_grads("bfloat16")

    print(f"{args.checkpoint or args.config} (step {step}), {config.variant}, batch {config.train.batch_size} of "
          f"{config.data.crop_size}², jax {jax.__version__} on {jax.devices()[0].platform}")
    print("batch  loss f32  loss bf16  rel. loss diff  grad rel. err (all)  worst layer")
    for k in range(args.batches):
        batch = pipeline.widen(next(loader))
        batch = {**batch, "image": intensity.apply(batch["image"], batch["intensity"], jax.random.key(k))}
        (l32, g32), (l16, g16) = step_f32(params, batch), step_bf16(params, batch)
        flat32 = jax.tree_util.tree_flatten_with_path(g32)[0]
        flat16 = jax.tree.leaves(g16)
        diffs = [(jax.tree_util.keystr(path), float(jnp.linalg.norm(b - a)), float(jnp.linalg.norm(a)))
                 for (path, a), b in zip(flat32, flat16)]
        total = np.sqrt(sum(d * d for _, d, _ in diffs)) / np.sqrt(sum(n * n for _, _, n in diffs))
        name, d, n = max(diffs, key=lambda t: t[1] / max(t[2], 1e-12))
        print(f"{k:5d}  {float(l32):8.4f}  {float(l16):9.4f}  {abs(float(l16) - float(l32)) / float(l32):14.2e}"
              f"  {total:19.3e}  {d / n:.3e} {name}")
        for name, d, n in sorted(diffs, key=lambda t: -t[1] / max(t[2], 1e-12))[:args.layers]:
            print(f"       {d / n:.3e} {name} (|g| {n:.2e})")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # a missing checkpoint or config file, a bad override (CheckpointError, ConfigError)
        sys.exit(f"error: {e}")
