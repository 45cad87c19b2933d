"""Which kernel a problem runs on (lanes or rows) and on how many threads, from the
measurements in the docstrings below; ``_run_split`` runs the threads."""

from __future__ import annotations

import itertools
import os

import torch

_SPLIT_MIN_WORK = 1 << 28
"""The lanes kernel splits the batch across threads only when T B K P (the multiply-adds of the
recurrent products) reaches this, with at least two pieces of ``_LANES_MIN_GROUPS`` groups.
Measured on the 2-core machine while others loaded it (load 2.6 to 3.4; wall time, two
threads against one): GRU H = 32, B = 256, T = 1e3 (T B K P = 7.9e8): 53 against 64 to 110 ms;
H = 64, B = 128 (1.6e9): 66 against 66 ms; tanh RNN H = 16, B = 512 (1.3e8): 15 to 17 against
12 ms; GRU H = 1, B = 256, T = 1e4: 22 against 10 ms. A step at small H is latency-bound, and
lockstep over all groups on one thread beats pieces on two. The rows kernel never splits: at
H = 64, B = 8 two threads took 12 to 15 ms against 12 ms."""

_pool = None
_pool_pid = None


def _width(dtype: torch.dtype) -> int:
    return 16 if dtype == torch.float32 else 8


def _plan(B: int, T: int, H: int, P: int, K: int, dtype: torch.dtype) -> tuple[str, int]:
    """(kernel, threads) for a problem.

    kernel: "lanes" when B >= min(W, max(2, H)), else "rows". Measured (2-core AMD EPYC, kernel
    CPU time, T chosen for ~0.1 s; rows time / lanes time, > 1 where lanes is faster), GRU
    forward float32 (W = 16):

        H \\ B   1     2     4     8     16
        2      0.75  1.35  2.58  4.43  8.88
        4      0.44  0.84  1.62  3.08  4.47
        8      0.46  0.60  0.79  1.62  2.61
        16     0.46  0.58  0.69  1.29  1.18
        32     0.25  0.36  0.60  0.70  1.89
        64     0.24  0.24  0.46  0.83  1.73

    The same crossover (within one step of B) for the GRU backward, the LSTM and the tanh
    RNN in float32, and in float64 (W = 8): at H = 8 rows 0.71x at B = 4, lanes 1.19x at
    B = 8. Rows wins at B = 1 everywhere: a lane kernel then fills one lane in W.

    threads: the lanes kernel's batch is split across torch.get_num_threads() threads (the
    kernels release the GIL) when T B K P >= ``_SPLIT_MIN_WORK`` and there are at least two
    pieces of ``_LANES_MIN_GROUPS`` groups of W rows; see ``_SPLIT_MIN_WORK`` for the
    measurements.
    """
    W = _width(dtype)
    lanes = B >= min(W, max(2, H))
    nt = 1
    if lanes and T * B * K * P >= _SPLIT_MIN_WORK:
        nt = max(1, min(torch.get_num_threads(), -(-B // W) // _LANES_MIN_GROUPS))
    return ("lanes" if lanes else "rows"), nt


_PIECES_PER_THREAD = 4

_LANES_MIN_GROUPS = 4
"""A piece of the lanes kernel's batch has at least this many groups of W rows: the groups of
a piece advance in lockstep, and at small H fewer leave the step's latency exposed (GRU, H = 1,
B = 256, T = 1e4 on one thread: one piece of 16 groups 14.7 ms, eight pieces of 2 groups one
after another 54 ms)."""


def _run_split(fn, B: int, W: int, nt: int, lanes: bool) -> list:
    """fn(lo, hi) over ranges of batch rows (whole groups of W rows for the lanes kernel) on
    nt threads, the calling one and nt - 1 from a pool; returns the results in range order.
    With more than one thread the batch is cut into up to ``_PIECES_PER_THREAD`` nt pieces
    that the threads take in turn, so a thread the operating system does not schedule (another
    process holds the core) leaves its pieces to the others instead of holding up the call."""
    if nt <= 1:
        return [fn(0, B)]
    global _pool, _pool_pid
    units = -(-B // W) if lanes else B
    n = min(units // _LANES_MIN_GROUPS if lanes else units, _PIECES_PER_THREAD * nt)
    if n <= 1:
        return [fn(0, B)]
    bounds = [units * i // n for i in range(n + 1)]
    if lanes:
        bounds = [min(B, u * W) for u in bounds]
    if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < nt - 1:
        from concurrent.futures import ThreadPoolExecutor

        _pool, _pool_pid = ThreadPoolExecutor(max_workers=nt - 1,
                                              thread_name_prefix="paraseq-cells"), os.getpid()
    results: list = [None] * n
    counter = itertools.count()  # next() is atomic under the GIL

    def work() -> None:
        while (i := next(counter)) < n:
            results[i] = fn(bounds[i], bounds[i + 1])

    futures = [_pool.submit(work) for _ in range(nt - 1)]
    work()
    for f in futures:
        f.result()
    return results
