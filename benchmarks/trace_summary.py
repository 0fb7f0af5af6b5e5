"""The top costs of a `jax.profiler` trace: total time per (process, event name), from its Perfetto JSON.

`jax.profiler.trace(DIR, create_perfetto_trace=True)` writes DIR/plugins/profile/<run>/perfetto_trace.json.gz;
on a GPU its device processes hold the kernels (fusions, convolutions), the host ones the Python and runtime.

  python benchmarks/trace_summary.py DIR [--top 20] [--python]
"""

import argparse
import collections
import gzip
import json
import pathlib


def top_events(trace_dir: str | pathlib.Path, count: int = 20,
               python: bool = False) -> list[tuple[float, str, str, int]]:
    """(total ms, process name, event name, calls) of the `count` costliest complete events of the newest trace;
    Python frames (names starting with "$") only when `python`."""
    files = sorted(pathlib.Path(trace_dir).glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}: trace with create_perfetto_trace=True")
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    total: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and (python or not e.get("name", "").startswith("$")):
            key = (names.get(e.get("pid"), str(e.get("pid"))), e.get("name", "?"))
            total[key] += e.get("dur", 0.0) / 1e3
            calls[key] += 1
    return [(ms, process, name, calls[(process, name)]) for (process, name), ms in total.most_common(count)]


def kind(name: str) -> str:
    """A device kernel's kind: convolutions and matmuls (cuDNN, cuBLAS, XLA's GEMM fusions), other XLA fusions, or
    other kernels."""
    lowered = name.lower()
    if any(k in lowered for k in ("xmma", "gemm", "nvjet", "convolve", "cudnn", "cutlass", "wgrad", "dgrad", "fprop")):
        return "convolutions / matmuls"
    if "fusion" in lowered:
        return "XLA fusions"
    return "other kernels (copies, sorts, scatters, ...)"


def print_top(trace_dir: str | pathlib.Path, count: int = 20, python: bool = False) -> None:
    """The costliest events and, where the trace has device processes (GPU), the device time by kind of kernel."""
    events = top_events(trace_dir, 100_000, python)
    device = [(ms, name) for ms, process, name, _ in events if process.startswith("/device:")]
    if device:
        busy = sum(ms for ms, _ in device)
        by_kind: collections.Counter = collections.Counter()
        for ms, name in device:
            by_kind[kind(name)] += ms
        print(f"device kernels: {busy:.1f} ms in all; "
              + "; ".join(f"{k} {ms / busy:.0%}" for k, ms in by_kind.most_common()))
    print(f"{'total ms':>10}{'calls':>7}  process / event")
    for ms, process, name, n in events[:count]:
        print(f"{ms:>10.2f}{n:>7}  {process[:30]} / {name[:90]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--python", action="store_true", help="include Python frames")
    args = parser.parse_args()
    print_top(args.trace_dir, args.top, args.python)
