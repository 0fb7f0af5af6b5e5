"""U-Net train-step speed (forward + backward + AdamW, BCE + Dice) of nucjax against the identical PyTorch U-Net.

Both frameworks run in one process, steps interleaved, best of --rounds; prints s/step, images/s, the ratio to
each PyTorch form, parameters, GFLOPs per image (XLA cost analysis), achieved GFLOP/s and peak memory.

  python benchmarks/bench_train.py --base-width 16 --batch 8 --crop 256 --steps 2 --rounds 3
  python benchmarks/bench_train.py --device gpu --precision bfloat16 --batch 128 --steps 20 --compile \
      --peak-tflops 989  # H100 SXM dense bf16
"""

import argparse
import ctypes
import os
import sys
import threading
import time

# Set before torch and jax load: idle OpenMP threads sleep instead of spinning (they slow the other framework's
# step by 20-40 % otherwise), and JAX does not grab most of the GPU memory that PyTorch needs too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--norm", choices=("group", "none"), default="group")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="steps per timed run (one sync at the end)")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per implementation; the best is kept")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--upsample", default="",
                   help="JAX up-sampling forms, comma-separated; +cpu-options compiles with unet.CPU_COMPILER_OPTIONS "
                        "(default: dense,dense+cpu-options,transpose,resize on CPU, dense,transpose,resize on GPU)")
    p.add_argument("--torch", default="nchw,channels_last", help="PyTorch forms: nchw, channels_last (or none)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (channels_last)")
    p.add_argument("--profile", default="",
                   help="after timing, trace --steps steps of the first JAX form with jax.profiler into this "
                        "directory and print the top costs")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak TFLOP/s at this precision, to print model FLOP utilisation (MFU)")
    args = p.parse_args()
    default = "dense,dense+cpu-options,transpose,resize" if args.device == "cpu" else "dense,transpose,resize"
    args.upsample = args.upsample or default
    return args


ARGS = parse_args()
if ARGS.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch_unet import TorchUNet, load_flax_params  # noqa: E402
from trace_summary import print_top  # noqa: E402

from nucjax import losses  # noqa: E402
from nucjax.models.cost import count_params, forward_flops  # noqa: E402
from nucjax.models.unet import CPU_COMPILER_OPTIONS, UNet  # noqa: E402

LR, WEIGHT_DECAY = 1e-3, 1e-4


class RssSampler:
    """Polls this process's resident set size (Linux /proc) in a thread; `peak` is the maximum since reset()."""

    def __init__(self, interval: float = 0.005):
        self.peak = 0
        self.peak_ever = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        threading.Thread(target=self._run, args=(interval,), daemon=True).start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def reset(self) -> None:
        """Return freed heap pages to the OS first (glibc), so that the resident size is the live memory."""
        if self._libc is not None:
            self._libc.malloc_trim(0)
        self.peak = self.rss()

    def _run(self, interval: float) -> None:
        while True:
            rss = self.rss()
            self.peak = max(self.peak, rss)
            self.peak_ever = max(self.peak_ever, rss)
            time.sleep(interval)


def make_batch(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random images float32[B, S, S, 3] and random-square foreground targets float32[B, S, S]."""
    s = ARGS.crop
    images = rng.normal(size=(ARGS.batch, s, s, 3)).astype(np.float32)
    targets = np.zeros((ARGS.batch, s, s), np.float32)
    for b in range(ARGS.batch):
        for _ in range(8):
            y, x = rng.integers(0, s - s // 8, size=2)
            targets[b, y : y + s // 8, x : x + s // 8] = 1.0
    return images, targets


def step_cost(step, *args) -> dict:
    """XLA's cost analysis of `step` compiled for the CPU: the GPU backend's leaves out cuDNN's convolutions."""
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with jax.default_device(jax.devices("cpu")[0]):
        cost = jax.jit(step).lower(*abstract).compile().cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def jax_runner(form: str, images: np.ndarray, targets: np.ndarray):
    """A jitted nucjax train step on the batch for form = UPSAMPLE[+cpu-options]; returns (run(n) -> loss, info)."""
    upsample, _, options = form.partition("+")
    if options not in ("", "cpu-options") or (options and ARGS.device != "cpu"):
        raise SystemExit(f"--upsample {form}: the only suffix is +cpu-options, and only with --device cpu")
    dtype = jnp.bfloat16 if ARGS.precision == "bfloat16" else jnp.float32
    model = UNet(base_width=ARGS.base_width, depth=ARGS.depth, norm=ARGS.norm, upsample=upsample, dtype=dtype)
    x = jnp.asarray(images)
    y = jnp.asarray(targets)
    valid = jnp.ones(targets.shape, jnp.float32)
    params = model.init(jax.random.key(0), x[:1], train=False)["params"]
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    def loss_fn(params, x, y, valid):
        logits = model.apply({"params": params}, x, train=True)[..., 0]
        return losses.sigmoid_bce(logits, y, valid) + losses.soft_dice(logits, y, valid)

    def step(params, opt_state, x, y, valid):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, valid)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = [params, tx.init(params)]
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*state, x, y, valid).compile(
        compiler_options=CPU_COMPILER_OPTIONS if options else None
    )
    cost = step_cost(step, *state, x, y, valid)
    mem = compiled.memory_analysis()
    info = {
        "params": count_params(params),
        "fwd_gflop": forward_flops(model.apply, {"params": params}, (1,) + images.shape[1:]) / 1e9,
        "step_gflop": float(cost["flops"]) / ARGS.batch / 1e9,
        "xla_mem": mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes,
        "model": model,
        "params_tree": params,
    }

    def run(n: int) -> float:
        loss = None
        for _ in range(n):
            state[0], state[1], loss = compiled(state[0], state[1], x, y, valid)
        return float(jax.block_until_ready(loss))

    return run, info


def torch_runner(form: str, images: np.ndarray, targets: np.ndarray, params_tree: dict):
    """A PyTorch train step on the same batch and initial parameters; returns (run(n) -> last loss, info)."""
    device = torch.device("cuda" if ARGS.device == "gpu" else "cpu")
    model = TorchUNet(ARGS.base_width, ARGS.depth, ARGS.norm)
    load_flax_params(model, params_tree)
    model = model.to(device)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(targets)[:, None].to(device)
    if form != "nchw":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=ARGS.precision == "bfloat16")

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        probs = torch.sigmoid(logits)
        inter = (probs * y).sum(dim=(2, 3))
        dice = (2 * inter + 1.0) / (probs.sum(dim=(2, 3)) + y.sum(dim=(2, 3)) + 1.0)
        return F.binary_cross_entropy_with_logits(logits, y) + 1.0 - dice.mean()

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(x))
        loss.backward()
        opt.step()
        return loss.detach()

    step_fn = torch.compile(step) if form == "compile" else step

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(n: int) -> float:
        loss = None
        for _ in range(n):
            loss = step_fn()
        sync()
        return float(loss)

    return run, {"params": sum(p.numel() for p in model.parameters())}


def check_identical(model: UNet, params_tree: dict) -> float:
    """Max |JAX − PyTorch| of the float32 forward pass with the same parameters, on one small random image."""
    s = 4 * 2**ARGS.depth
    x = np.random.default_rng(1).normal(size=(1, s, s, 3)).astype(np.float32)
    ref = UNet(base_width=model.base_width, depth=model.depth, norm=model.norm, upsample=model.upsample)
    out = np.asarray(ref.apply({"params": params_tree}, x, train=False))[..., 0]
    tmodel = TorchUNet(ARGS.base_width, ARGS.depth, ARGS.norm)
    load_flax_params(tmodel, params_tree)
    with torch.no_grad():
        tout = tmodel(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()[:, 0]
    return float(np.abs(out - tout).max())


def main() -> None:
    torch.manual_seed(0)
    images, targets = make_batch(np.random.default_rng(0))
    sampler = RssSampler()
    print(
        f"devices: jax {jax.devices()[0].device_kind} ({jax.__version__}), torch {torch.__version__} "
        f"({'cuda ' + torch.cuda.get_device_name() if ARGS.device == 'gpu' else 'cpu'}, "
        f"{torch.get_num_threads()} threads); OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(
        f"U-Net base {ARGS.base_width} depth {ARGS.depth} norm {ARGS.norm}, batch {ARGS.batch} of {ARGS.crop}², "
        f"{ARGS.precision}, AdamW, BCE + Dice; best of {ARGS.rounds} runs of {ARGS.steps} steps"
    )
    runners: dict[str, tuple] = {}
    for up in [u for u in ARGS.upsample.split(",") if u]:
        t0 = time.perf_counter()
        runners[f"jax {up}"] = jax_runner(up, images, targets)
        print(f"  compiled jax {up} in {time.perf_counter() - t0:.1f} s")
    reference = next((info for _, info in runners.values() if info["model"].upsample in ("dense", "transpose")), None)
    if reference is not None:
        diff = check_identical(reference["model"], reference["params_tree"])
        print(f"forward max |JAX − PyTorch| with shared parameters: {diff:.2e}")
    torch_forms = [f for f in ARGS.torch.split(",") if f and f != "none"] + (["compile"] if ARGS.compile else [])
    for form in torch_forms:
        if reference is None:
            raise SystemExit("PyTorch forms need a JAX run with --upsample dense or transpose (the same network)")
        runners[f"torch {form}"] = torch_runner(form, images, targets, reference["params_tree"])
    for name, (run, _) in runners.items():  # warm-up: compilation, autotuning, allocator
        t0 = time.perf_counter()
        run(1)
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s")

    best, best_cpu, peak = time_interleaved(runners, sampler)
    report(runners, best, best_cpu, peak, sampler.peak_ever, reference)
    if ARGS.profile:
        name, (run, _) = next((n, r) for n, r in runners.items() if n.startswith("jax"))
        with jax.profiler.trace(ARGS.profile, create_perfetto_trace=True):
            run(ARGS.steps)
        print(f"\njax.profiler trace of {ARGS.steps} steps of {name} in {ARGS.profile}; top costs:")
        print_top(ARGS.profile, 20)


def time_interleaved(runners: dict, sampler: RssSampler) -> tuple[dict, dict, dict]:
    """Best wall and CPU seconds per step and peak memory of each runner, over ARGS.rounds interleaved rounds."""
    best = {name: float("inf") for name in runners}
    best_cpu = dict(best)
    peak = {name: 0 for name in runners}
    for _ in range(ARGS.rounds):
        for name, (run, _) in runners.items():
            torch_gpu = ARGS.device == "gpu" and name.startswith("torch")
            if torch_gpu:
                torch.cuda.reset_peak_memory_stats()
            sampler.reset()
            idle = sampler.peak
            t0, c0 = time.perf_counter(), time.process_time()
            run(ARGS.steps)
            best[name] = min(best[name], (time.perf_counter() - t0) / ARGS.steps)
            best_cpu[name] = min(best_cpu[name], (time.process_time() - c0) / ARGS.steps)
            peak[name] = max(peak[name], torch.cuda.max_memory_allocated() if torch_gpu else sampler.peak - idle)
    return best, best_cpu, peak


def report(runners: dict, best: dict, best_cpu: dict, peak: dict, rss_ever: int, reference: dict | None) -> None:
    """Print the table, the ratios to each PyTorch form, and the parameter-count check."""
    gpu = ARGS.device == "gpu"
    header = f"{'implementation':<22}{'s/step':>9}{'cpu s':>8}{'img/s':>9}{'params':>11}{'GF/img fwd':>11}"
    print(f"\n{header}{'GF/img step':>12}{'GFLOP/s':>9}{'torch MiB' if gpu else '+RSS MiB':>10}{'XLA MiB':>9}")
    for name, (_, info) in runners.items():
        info = {**(reference or {}), **info}  # PyTorch rows take the FLOPs of the identical JAX network
        xla = f"{info['xla_mem'] / 2**20:>9.0f}" if name.startswith("jax") else f"{'':>9}"
        mem = f"{'':>10}" if gpu and name.startswith("jax") else f"{peak[name] / 2**20:>10.0f}"
        print(
            f"{name:<22}{best[name]:>9.3f}{best_cpu[name]:>8.2f}{ARGS.batch / best[name]:>9.1f}{info['params']:>11,}"
            f"{info['fwd_gflop']:>11.2f}{info['step_gflop']:>12.2f}"
            f"{info['step_gflop'] * ARGS.batch / best[name]:>9.1f}{mem}{xla}"
        )
        if ARGS.peak_tflops > 0:
            print(f"  MFU {info['step_gflop'] * ARGS.batch / best[name] / (ARGS.peak_tflops * 1e3):.1%} "
                  f"of {ARGS.peak_tflops:g} TFLOP/s")
    jax_names = [n for n in runners if n.startswith("jax")]
    for tname in [n for n in runners if n.startswith("torch")]:
        ratios = ", ".join(f"{j} {best[tname] / best[j]:.2f}x (cpu {best_cpu[tname] / best_cpu[j]:.2f}x)"
                           for j in jax_names)
        print(f"speed vs {tname} (>1 = JAX faster): {ratios}")
    print("XLA MiB: the compiled JAX step's arguments, outputs and scratch (XLA memory analysis)")
    if gpu:
        print("torch MiB: torch.cuda.max_memory_allocated() over the timed steps")
    else:
        print("cpu s: process CPU time per step, all threads (the work done; less sensitive to other load than s/step)")
        print(f"+RSS MiB: peak resident memory during the step above that before it (process peak "
              f"{rss_ever / 2**20:.0f} MiB)")
    same = [n for n in runners if n.startswith("torch") or runners[n][1]["model"].upsample in ("dense", "transpose")]
    counts = {runners[n][1]["params"] for n in same}
    print(f"parameters equal across {', '.join(same)}: {len(counts) == 1}")


if __name__ == "__main__":
    main()
