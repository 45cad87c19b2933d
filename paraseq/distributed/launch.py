"""Run a function on N local processes joined by a gloo group: the demo's, the benchmarks' and
the tests' launcher (users with a cluster use ``torchrun --nproc-per-node N script.py``)."""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import socket
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_local"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, threads: int, timeout_s: float, fn: Callable,
            args: tuple, out) -> None:
    try:
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            result = fn(rank, size, *args)
        finally:
            dist.destroy_process_group()
        out.put((rank, True, result))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def run_local(fn: Callable, nprocs: int, *args, threads: int = 1, timeout_s: float = 300.0,
              collective_timeout_s: float = 60.0) -> list:
    """Spawn ``nprocs`` processes, join them in one gloo group (the default group), run
    ``fn(rank, nprocs, *args)`` on each and return the results in rank order.

    ``fn`` must be importable by name (a module-level function: processes are spawned, not
    forked). Each process runs ``threads`` torch threads. A process that raises makes this
    raise RuntimeError with its traceback; one that does not answer within ``timeout_s``
    is killed. ``collective_timeout_s`` bounds how long gloo waits in one collective for a
    rank that died."""
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"run_local: nprocs must be an int >= 1; got {nprocs!r}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        procs = [ctx.Process(target=_worker, args=(r, nprocs, port, threads,
                                                   collective_timeout_s, fn, args, out),
                             daemon=True) for r in range(nprocs)]
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    results: dict[int, object] = {}
    errors: list[str] = []
    try:
        for _ in range(nprocs):
            try:
                rank, ok, value = out.get(timeout=timeout_s)
            except queue_mod.Empty:
                missing = sorted(set(range(nprocs)) - set(results))
                raise RuntimeError(f"run_local: ranks {missing} gave no result within "
                                   f"{timeout_s} s") from None
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("run_local: a process failed\n" + "\n".join(errors))
    return [results[r] for r in range(nprocs)]
