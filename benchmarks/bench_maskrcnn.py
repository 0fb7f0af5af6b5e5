"""Mask R-CNN train-step speed in JAX (and torchvision's maskrcnn_resnet50_fpn when installed): ms/step, images/s,
parameters, GFLOPs per image and peak memory, for the same image size, batch and number of ground-truth objects.

    .venv/bin/python benchmarks/bench_maskrcnn.py --depth 50 --size 256 --batch 2 --instances 32 --steps 5
    (--model KEY=VALUE overrides a config.model key of the JAX model; torchvision keeps its standard heads)
"""

import argparse
import ast
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from skimage.draw import ellipse

from nucjax.data import targets as data_targets
from nucjax.models.maskrcnn import MaskRCNN, default_model_config, loss
from trace_summary import print_top  # benchmarks/, the script's folder


def synthetic_labels(batch: int, size: int, instances: int, seed: int = 0) -> np.ndarray:
    """int32[B, S, S] label images with exactly `instances` ellipses each (one per cell of a square grid)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(instances)))
    cell = size / side
    labels = np.zeros((batch, size, size), np.int32)
    for b in range(batch):
        for k in range(instances):
            cy, cx = (k // side + 0.5) * cell, (k % side + 0.5) * cell
            ry, rx = rng.uniform(0.2, 0.45, 2) * cell
            labels[b][ellipse(cy, cx, max(ry, 2), max(rx, 2), shape=(size, size))] = k + 1
    return labels


def make_config(args) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = default_model_config()
    config.model.resnet_depth = args.depth
    for item in args.model:
        key, _, value = item.partition("=")
        if key not in config.model:
            raise ValueError(f"--model {item}: unknown config.model key {key!r}")
        config.model[key] = ast.literal_eval(value)
    config.targets = ml_collections.ConfigDict({"max_instances": args.instances, "mask_size": 28})
    return config


def bench_jax(args, labels: np.ndarray, images: np.ndarray) -> dict:
    config = make_config(args)
    inst = [data_targets.instances(label, args.instances, 28) for label in labels]
    batch = {"image": jnp.asarray(images), "valid": jnp.ones(labels.shape, jnp.float32)}
    batch.update({k: jnp.asarray(np.stack([t[k] for t in inst])) for k in ("boxes", "masks", "instance_valid")})
    module = MaskRCNN(config.model, dtype=jnp.dtype(args.precision))
    variables = jax.jit(module.init)(jax.random.key(0), batch["image"][:1])
    tx = optax.adamw(1e-4)
    opt_state = tx.init(variables)

    def step(variables, opt_state, batch, rng):
        (total, _), grads = jax.value_and_grad(lambda v: loss(module, v, batch, rng, config), has_aux=True)(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, total

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(variables, opt_state, batch, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    times = []
    for i, rng in enumerate(jax.random.split(jax.random.key(1), args.steps + 1)):
        start = time.perf_counter()
        variables, opt_state, total = compiled(variables, opt_state, batch, rng)
        total.block_until_ready()
        if i:  # the first call warms caches
            times.append(time.perf_counter() - start)
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for rng in jax.random.split(jax.random.key(2), args.steps):
                variables, opt_state, total = compiled(variables, opt_state, batch, rng)
            total.block_until_ready()
        print(f"jax.profiler trace of {args.steps} JAX steps in {args.profile}; top costs:")
        print_top(args.profile, 25)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    if peak is None:  # CPU: XLA's buffer estimate for the step
        peak = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    return {
        "framework": f"jax {jax.__version__} (GroupNorm)",
        "step_ms": 1e3 * statistics.median(times),
        "params_m": sum(x.size for x in jax.tree.leaves(variables)) / 1e6,
        "gflop_per_image": cost.get("flops", float("nan")) / 1e9 / args.batch,
        "peak_mib": peak / 2**20,
        "compile_s": compile_s,
        "final_loss": float(total),
    }


def bench_torch(args, labels: np.ndarray, images: np.ndarray) -> dict | None:
    """torchvision's maskrcnn_resnet50_fpn train step with the same anchors and sample sizes; None if not installed."""
    try:
        import torch
        from torchvision.models.detection import maskrcnn_resnet50_fpn
        from torchvision.models.detection.anchor_utils import AnchorGenerator
    except ImportError:
        return None
    m = default_model_config()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2, min_size=args.size, max_size=args.size,
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in m.anchor_sizes), (tuple(m.aspect_ratios),) * 5),
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_topk_train, rpn_post_nms_top_n_train=m.rpn_post_nms_topk_train,
        rpn_batch_size_per_image=m.rpn_batch_per_image, box_batch_size_per_image=m.roi_batch_per_image,
    ).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = [torch.as_tensor(im).permute(2, 0, 1).contiguous().to(device) for im in images]
    targets = []
    for label in labels:
        ids = np.arange(1, label.max() + 1)
        masks = torch.as_tensor((label[None] == ids[:, None, None]).astype(np.uint8), device=device)
        inst = data_targets.instances(label, args.instances, 28)["boxes"][: len(ids)]
        boxes = torch.as_tensor(inst[:, [1, 0, 3, 2]], device=device)  # (x0, y0, x1, y1)
        targets.append({"boxes": boxes, "labels": torch.ones(len(ids), dtype=torch.int64, device=device), "masks": masks})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bfloat16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        with autocast:
            total = sum(model(x, targets).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "framework": f"torchvision (BatchNorm) {torch.__version__}",
        "step_ms": 1e3 * statistics.median(times),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflop_per_image": float("nan"),
        "peak_mib": peak / 2**20,
        "compile_s": 0.0,
        "final_loss": float(total),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--instances", type=int, default=32, help="ground-truth objects per image (= max_instances)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config.model key of the JAX model, e.g. --model fpn_width=64")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--profile", default="", help="trace --steps more JAX steps with jax.profiler into this "
                        "directory and print their top costs")
    args = parser.parse_args()
    labels = synthetic_labels(args.batch, args.size, args.instances)
    images = np.repeat(np.where(labels[..., None] > 0, 0.8, 0.1), 3, axis=-1).astype(np.float32)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); image {args.size}x{args.size}, batch "
          f"{args.batch}, {args.instances} objects/image, ResNet-{args.depth}-FPN, {args.precision}")
    rows = [bench_jax(args, labels, images)]
    if not args.no_torch:
        rows.append(bench_torch(args, labels, images))
        if rows[-1] is None:
            print("torchvision not installed: its column is skipped")
            rows.pop()
    print(f"{'framework':38s} {'ms/step':>9s} {'img/s':>7s} {'params M':>9s} {'GFLOP/img':>10s} {'peak MiB':>9s} "
          f"{'compile s':>9s}")
    for r in rows:
        print(f"{r['framework']:38s} {r['step_ms']:9.1f} {1e3 * args.batch / r['step_ms']:7.2f} {r['params_m']:9.2f} "
              f"{r['gflop_per_image']:10.1f} {r['peak_mib']:9.0f} {r['compile_s']:9.1f}")
    if len(rows) == 2:
        print(f"torchvision / jax step time: {rows[1]['step_ms'] / rows[0]['step_ms']:.2f}x")


if __name__ == "__main__":
    main()
