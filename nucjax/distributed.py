"""Running as one of several JAX processes: start-up (SLURM, Open MPI, a Kubernetes JobSet or explicit flags),
what the processes do together (process 0 first, barriers, gathering Python objects), and stopping them all,
with the failing process's message, when one of them fails.

One process alone needs none of it: every function here is then a no-op or the trivial case. JAX is imported only
by the functions that use it, so that a command can take the flags without paying for it.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import pickle
import sys
import threading
import time
import traceback
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

FAILURE_DIR = "nucjax/failure/"
"""Coordination-service key directory where a failing process writes its message (one key per failing process)."""
ACK_DIR = "nucjax/failure_ack/"
"""Where the other processes acknowledge that they saw it, before they exit."""
DONE_DIR = "nucjax/failure_done/"
"""Where a failing process says it is about to exit (process 0, which hosts the coordination service, exits last:
a process that loses the service is aborted by JAX with a stack dump instead of the failure's message)."""
POLL_SECONDS = 0.25
ACK_TIMEOUT_SECONDS = 10.0
LAST_EXIT_GRACE_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the others; None fields are left to `jax.distributed.initialize` to find (SLURM,
    Open MPI). `how` says where the settings came from, for messages."""

    how: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --coordinator_address, --num_processes and --process_id (a plain multi-process launch)."""
    group = parser.add_argument_group(
        "several processes", "a plain launch of N processes (under SLURM, Open MPI or a JobSet with "
        "JAX_COORDINATOR_ADDRESS set, nothing is needed; see docs/scaling.md)")
    group.add_argument("--coordinator_address", metavar="HOST:PORT", help="process 0's host and a free port")
    group.add_argument("--num_processes", type=int, metavar="N", help="the number of processes")
    group.add_argument("--process_id", type=int, metavar="K", help="this process's index, 0..N-1")


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def detect(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
           environ: Mapping[str, str] | None = None) -> Launch | None:
    """How to join the other processes, or None when this process runs alone.

    In order: the flags (all three needed); SLURM (inside `srun` with SLURM_NTASKS > 1); Open MPI's `mpirun`
    (OMPI_COMM_WORLD_SIZE > 1 and OMPI_MCA_orte_hnp_uri, which JAX reads); JAX_COORDINATOR_ADDRESS with
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (or a Kubernetes indexed Job's JOB_COMPLETION_INDEX). Raises ValueError
    naming what is missing or inconsistent.
    """
    environ = os.environ if environ is None else environ
    flags = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if any(v is not None for v in flags.values()):
        missing = [k for k, v in flags.items() if v is None]
        if missing:
            raise ValueError(f"a multi-process launch needs --coordinator_address, --num_processes and --process_id; "
                             f"missing {', '.join(missing)}")
        return _checked(Launch("flags", coordinator_address, num_processes, process_id))
    slurm_tasks = _int_env(environ, "SLURM_NTASKS")
    if slurm_tasks and slurm_tasks > 1 and "SLURM_STEP_NODELIST" in environ and "SLURM_PROCID" in environ:
        return Launch("SLURM")
    mpi_size = _int_env(environ, "OMPI_COMM_WORLD_SIZE")
    if mpi_size and mpi_size > 1 and "OMPI_MCA_orte_hnp_uri" in environ:
        return Launch("Open MPI")
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        count = _int_env(environ, "JAX_NUM_PROCESSES")
        index = _int_env(environ, "JAX_PROCESS_ID")
        index = _int_env(environ, "JOB_COMPLETION_INDEX") if index is None else index
        if count is None or index is None:
            raise ValueError("JAX_COORDINATOR_ADDRESS is set: also set JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                             "(or run as a Kubernetes indexed Job, which sets JOB_COMPLETION_INDEX)")
        return _checked(Launch("JAX_COORDINATOR_ADDRESS", address, count, index))
    if mpi_size and mpi_size > 1:
        raise ValueError(
            f"started by MPI as one of {mpi_size} processes, but without OMPI_MCA_orte_hnp_uri (Open MPI 5 or another "
            "MPI), from which JAX finds its coordinator: set JAX_COORDINATOR_ADDRESS=HOST:PORT (rank 0's host), "
            "JAX_NUM_PROCESSES, JAX_PROCESS_ID and JAX_LOCAL_DEVICE_IDS from the MPI rank variables")
    return None


def _checked(launch: Launch) -> Launch | None:
    """The launch, or None for one process; ValueError for an impossible process index or count."""
    if launch.num_processes < 1 or not 0 <= launch.process_id < launch.num_processes:
        raise ValueError(f"process id {launch.process_id} of {launch.num_processes} processes ({launch.how}): "
                         f"the count must be >= 1 and the id in 0..{launch.num_processes - 1}")
    if ":" not in launch.coordinator_address:
        raise ValueError(f"coordinator address {launch.coordinator_address!r} ({launch.how}) must be HOST:PORT")
    return launch if launch.num_processes > 1 else None


_leaving = threading.Event()  # a normal end has begun: losing the coordinator is expected
_stop_watch = threading.Event()
_watch_thread: threading.Thread | None = None
_peer_failed = threading.Event()  # set by the watch: this process is about to exit with another's message
_reported = False


def initialize(launch: Launch | None) -> bool:
    """Joins the other processes (`jax.distributed.initialize`; CPU collectives over gloo) and starts watching for
    their failures; True when this process is one of several. Call it before anything else touches JAX."""
    import jax

    if launch is None:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=launch.coordinator_address, num_processes=launch.num_processes,
                               process_id=launch.process_id)
    _start_watchdog()
    return True


def detect_from_args(args: argparse.Namespace) -> Launch | None:
    """`detect` with the flags of `add_arguments`."""
    return detect(args.coordinator_address, args.num_processes, args.process_id)


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`initialize(detect_from_args(args))` for a command line: False, after printing the error (which names the
    flag or environment variable), when the launch settings are inconsistent."""
    try:
        initialize(detect_from_args(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True


def is_multiprocess() -> bool:
    """Whether this process is one of several."""
    import jax

    return jax.process_count() > 1


def _client() -> Any:
    """JAX's coordination-service client (its key-value store carries failure messages)."""
    from jax._src.distributed import global_state

    return global_state.client


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing with one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_0_first(fn: Callable[[], T], name: str) -> T:
    """fn() on process 0, then, after a barrier, on the others: for steps that must not run concurrently (preparing
    a dataset into a shared folder) and whose result every process needs."""
    import jax

    if not is_multiprocess():
        return fn()
    result = fn() if jax.process_index() == 0 else None
    barrier(name)
    return fn() if jax.process_index() != 0 else result


def gather(value: Any) -> list[Any]:
    """[value of process 0, value of process 1, ...] on every process, for any picklable value."""
    if not is_multiprocess():
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(value), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(1 << max(int(sizes.max()) - 1, 1023).bit_length(), np.uint8)  # few sizes: few compilations
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [pickle.loads(row[:size].tobytes()) for row, size in zip(every, sizes)]


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (every process must call it at the same point)."""
    if not is_multiprocess():
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag], np.int32))).any())


def shard(n: int) -> range:
    """The indices of 0..n-1 this process handles: k, k + N, k + 2N, ... for process k of N."""
    import jax

    return range(jax.process_index(), n, jax.process_count())


def in_index_order(parts: Sequence[Sequence[T]]) -> list[T]:
    """Interleaves the per-process results of `shard(n)` (as returned by `gather`) back into index order."""
    out: list[T] = []
    for i in range(max((len(p) for p in parts), default=0)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


# ---- failures: one process fails, all stop with its message ----


def _start_watchdog() -> None:
    import jax

    global _watch_thread
    _watch_thread = threading.Thread(target=_watch, args=(_client(), jax.process_index()),
                                     name="nucjax-failure-watch", daemon=True)
    _watch_thread.start()
    atexit.register(_end_watch)  # before JAX's own shutdown: a thread inside a client call at exit aborts Python


def _end_watch() -> None:
    """Stops the failure watch and waits for it."""
    _leaving.set()
    _stop_watch.set()
    if _watch_thread is not None and _watch_thread is not threading.current_thread():
        _watch_thread.join(timeout=2 * POLL_SECONDS + 5)


def _watch(client: Any, me: int) -> None:
    """Polls the coordination service for another process's failure; prints its message and ends this process."""
    while not _stop_watch.is_set():
        try:
            entries = client.key_value_dir_get(FAILURE_DIR)
        except Exception:  # the coordinator is gone: at shutdown that is expected, else process 0 died
            if _leaving.is_set():
                return
            print("error: lost contact with the coordinator (process 0): it stopped or was killed", file=sys.stderr)
            _exit(1)
        others = sorted((key, value) for key, value in entries if not key.endswith(f"/{me}"))
        if others and not _reported:
            _peer_failed.set()
            print(f"error: {others[0][1]}", file=sys.stderr, flush=True)
            try:
                client.key_value_set(f"{ACK_DIR}{me}", "seen")
                if me == 0:
                    failed = {key.rsplit("/", 1)[1] for key, _ in others}
                    _wait_for(client, DONE_DIR, lambda done: failed <= {key.rsplit("/", 1)[1] for key in done})
            except Exception:
                pass
            _exit(1)
        _stop_watch.wait(POLL_SECONDS)


def _wait_for(client: Any, directory: str, ready: Callable[[set[str]], bool]) -> set[str]:
    """Polls the keys under `directory` until `ready(keys)` or ACK_TIMEOUT_SECONDS have passed; the last keys."""
    deadline = time.monotonic() + ACK_TIMEOUT_SECONDS
    while not ready(keys := {key for key, _ in client.key_value_dir_get(directory)}) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS / 5)
    return keys


def _exit(status: int) -> None:
    """Ends this process at once (no shutdown barrier: the others are gone or going); process 0 a moment later."""
    import jax

    sys.stdout.flush()
    sys.stderr.flush()
    if jax.process_index() == 0:
        time.sleep(LAST_EXIT_GRACE_SECONDS)
    os._exit(status)


def fail(message: str) -> int:
    """Reports an error: prints `error: message` on stderr and returns 1. In a multi-process run the message is
    `process K failed: message`, the other processes print it too and exit, and this process exits (status 1)
    once they have seen it (at most ACK_TIMEOUT_SECONDS), skipping the shutdown barrier they will never reach."""
    import jax

    global _reported
    if not is_multiprocess():
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    me, count = jax.process_index(), jax.process_count()
    text = f"process {me} failed: {message}"
    print(f"error: {text}", file=sys.stderr, flush=True)
    _reported = True
    client = _client()
    others = {str(k) for k in range(count) if k != me}

    def answered(keys: set[str]) -> set[str]:  # acknowledged, or failed itself (then it does not acknowledge)
        return {key.rsplit("/", 1)[1] for key in keys if key.startswith((ACK_DIR, FAILURE_DIR))}

    try:
        client.key_value_set(f"{FAILURE_DIR}{me}", text)
        silent = others - answered(_wait_for(client, "nucjax/", lambda keys: others <= answered(keys)))
        if silent:
            print(f"error: process(es) {', '.join(sorted(silent, key=int))} did not answer within "
                  f"{ACK_TIMEOUT_SECONDS:.0f} s: stopped or killed?", file=sys.stderr)
        client.key_value_set(f"{DONE_DIR}{me}", "exiting")
    except Exception:  # the coordinator is gone already: nobody is left to tell
        pass
    _exit(1)


def run(work: Callable[[], int | None], expected: tuple[type[BaseException], ...]) -> int:
    """Runs a command's work and returns its exit status: an `expected` error is one line (`fail`); in a
    multi-process run any other exception is printed with its traceback and also stops every process. After a
    normal end, processes leave the distributed runtime together."""
    try:
        status = work() or 0
    except expected as e:
        _quiet_if_peer_failed()
        return fail(" ".join(str(e).split()))
    except Exception as e:
        if not is_multiprocess():
            raise
        _quiet_if_peer_failed()
        traceback.print_exc()
        return fail(f"{type(e).__name__}: {' '.join(str(e).split())}")
    shutdown()
    return status


def _quiet_if_peer_failed() -> None:
    """When another process failed first, this one's error is only the echo (a collective that lost its peer): the
    failure watch is printing the first message and ends the process; wait for it."""
    if _peer_failed.is_set():
        while True:
            time.sleep(1)


def shutdown() -> None:
    """Leaves the distributed runtime (a barrier with the other processes); the failure watch keeps running until
    then, so a process that fails meanwhile still stops this one."""
    import jax

    if jax.distributed.is_initialized():
        _leaving.set()
        jax.distributed.shutdown()
        _end_watch()
