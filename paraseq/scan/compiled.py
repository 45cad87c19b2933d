"""The ``"numba"`` backend: compiled CPU kernels for ``linear_scan``.

Shape letters: T time steps, D state size, ``...`` leading (batch) dims; N the flattened
broadcast batch.

numba is optional. Whether it is installed is looked up when paraseq is imported (a file-system
lookup, ``AVAILABLE``); numba itself is imported, and the kernels of
``_numba_kernels.py`` compiled, only on the first call that runs them (``cache=True``: later
processes load the machine code from numba's on-disk cache instead of compiling). Without numba
``backend="auto"`` keeps to the pure-torch backends, and ``backend="numba"`` is an error that
says how to install it.

What the backend does with the tensors (``numba_scan``):

- no copies where none is needed: CPU tensors are handed to the kernels as NumPy views
  (``tensor.numpy()``), and the kernels write into a preallocated torch output through its
  view. An input is copied only when it is not contiguous (after dropping expanded, stride-0,
  batch dims) or carries torch's lazy conjugate/negative bit.
- broadcasting costs nothing: a, b and x0 keep their own batch shapes, flattened, and an index
  array per input says which of its rows each batch element reads.
- parallel over channels when there are enough of them, over time otherwise (a two-pass
  chunked scan); one real channel is scanned 16 (float32) or 8 (float64) steps at a time
  inside a vector register; on ``torch.get_num_threads()`` threads; see ``diag_plan`` for the
  rule and
  ``_numba_kernels`` for the kernels. The kernels are serial and release the GIL; this module
  hands ranges of work to the threads, the calling one and a small pool of its own
  (re-created after a fork; see ``_parallel``), rather than use numba's ``parallel=True``:
  that compiled three to five times slower, and its threading layers are either not
  fork-safe (GNU OpenMP) or abort the process when two threads call a kernel at once
  (workqueue). Problems of fewer than ``SERIAL_ELEMENTS`` outputs run on the calling thread
  alone.
- float32, float64, complex64 and complex128 (``linear_scan`` computes bfloat16 and float16 in
  float32 before any backend sees them); CPU tensors only.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import itertools
import math
import mmap
import os
import sys
import threading
import time
import warnings

import numpy as np
import torch
from torch import Tensor

AVAILABLE = importlib.util.find_spec("numba") is not None
"""Whether numba is installed (looked up at import; numba is not imported until first use)."""

INSTALL_HINT = "pip install 'numba>=0.59'"
SUPPORTED = (torch.float32, torch.float64, torch.complex64, torch.complex128)

# --- the plan: which kernel, how the work is split (see diag_plan) ---------------------------
WIDE_MIN = 16  # channels per unit of the vectorised kernel (a 64-byte line of float32)
CHAINS_PER_THREAD = 8  # narrow kernel: lockstep chains per thread when the series are split
MIN_CHUNK = 64  # time steps per chunk at least
SPLIT_ROW_MIN = 1024  # wide kernel: split rows between threads only into parts this long
TIME_SPLIT_MIN = 1 << 21  # wide kernel: split time between threads only from this many elements
FIRST_CHUNK = 2 / 3  # wide kernel, time split: chunk 0's length relative to the others
BLOCK_ELEMENTS = 512  # narrow kernel: rows per block x D, so a block of 4 chains stays in L1
# below this many output elements, the calling thread alone: handing a range to the pool and
# waiting for it costs about 20 us (measured), as much as a kernel spends on ~50k elements
SERIAL_ELEMENTS = 1 << 17
PIECES_PER_THREAD = 4  # ranges of work per thread, taken in turn (see _parallel)
SPIN_POLLS = 300_000  # a pool thread polls this long (about 0.2 ms) before it sleeps (_Pool)
HUGE_PAGES_MIN = 4 << 20  # results this large ask for transparent huge pages (see _empty)

_module = None
_the_pool = None  # a _Pool, made on first use
_NO_FLAGS = np.zeros(1, dtype=np.int64)  # the flags argument of kernels run outside the pool
_pool_lock = threading.Lock()


def numba_available(device: torch.device | None = None) -> bool:
    """Whether the ``"numba"`` backend can run here (on ``device``, if given: the CPU only):
    numba is installed and imports (the first call imports it; an installation that fails to
    import warns once and counts as absent)."""
    global AVAILABLE
    if device is not None and device.type != "cpu":
        return False
    if AVAILABLE and _module is None:
        try:
            _kernels()
        except ImportError as err:
            AVAILABLE = False
            warnings.warn(f"paraseq: numba is installed but does not import ({err}); the "
                          f"'numba' backend is off and backend='auto' uses the torch backends",
                          RuntimeWarning, stacklevel=2)
    return AVAILABLE


def _kernels():
    """Import numba and the kernel module once (compiling nothing yet)."""
    global _module
    if _module is None:
        if not AVAILABLE:
            raise ValueError(f"linear_scan: backend='numba' needs the numba package, which is "
                             f"not installed; install it ({INSTALL_HINT}) or use "
                             f"backend='auto'")
        _module = importlib.import_module("._numba_kernels", __package__)
    return _module


class _Pool:
    """Worker threads that run a task's pieces beside the calling thread, with OpenMP's trick:
    after a task a worker polls for the next one, outside the GIL, for ``SPIN_POLLS`` polls
    (a fraction of a millisecond) before it sleeps, so back-to-back calls skip the operating
    system's wake-up (35 us a wake here; with ``concurrent.futures`` a hand-off and its wait
    cost about 70 us, a third of a mid-sized scan).

    Hand-offs avoid making a thread sleep on the GIL: when every worker polls, the caller's
    first kernel publishes the task number (flags[0]) after it has released the GIL, and a
    worker publishes that it is done from inside its next polling call. A call that finds the
    pool busy (another Python thread is in it) runs its work alone. A worker that has not
    taken a task by the time the caller has run out of pieces skips it, and the caller does
    not wait for it (``started`` and ``closed`` are read and written under the GIL).
    """

    def __init__(self, workers: int):
        self.workers = workers
        # [0]: number of the latest task; [1 + w]: the last task worker w finished
        self.flags = np.zeros(1 + workers, dtype=np.int64)
        self.started = [0] * workers  # the last task each worker took
        self.polling = [False] * workers  # whether each worker polls (else it sleeps)
        self.closed = 0  # tasks up to this number are no longer open to workers
        self.task = None
        self.errors: list[BaseException] = []
        self.stop = False
        self.wake = threading.Condition()
        self.busy = threading.Lock()
        self.pid = os.getpid()
        for w in range(workers):
            threading.Thread(target=self._loop, args=(w,), daemon=True,
                             name=f"paraseq-scan-{w}").start()

    def _loop(self, w: int) -> None:
        spin = _kernels().spin_while
        seen = done = 0
        while True:
            # say that task `done` is finished, then poll for a newer one than `seen`
            self.polling[w] = True
            if not spin(self.flags, 0, seen, SPIN_POLLS, 1 + w if done else 0, done):
                with self.wake:
                    self.polling[w] = False
                    self.wake.wait_for(lambda s=seen: self.stop or int(self.flags[0]) != s)
            if self.stop:
                return
            seen = done = int(self.flags[0])
            if self.closed < seen:  # still open: take it
                self.started[w] = seen
                try:
                    self.task(0)
                except BaseException as err:  # handed to the caller
                    self.errors.append(err)

    def run(self, work) -> None:
        """work(task) on the calling thread, work(0) on every worker that starts in time. A
        nonzero task goes to the first kernel that work calls, which publishes it."""
        if not self.busy.acquire(blocking=False):
            work(0)
            return
        try:
            self.task, self.errors = work, []
            n = int(self.flags[0]) + 1
            if all(self.polling):  # the first kernel publishes n, outside the GIL
                work(n)
            else:  # someone sleeps: publish now and wake them
                with self.wake:
                    self.flags[0] = n
                    self.wake.notify_all()
                work(0)
            self.flags[0] = n  # (there already, unless no kernel ran)
            self.closed = n
            spin_until_all = _kernels().spin_until_all
            for w in range(self.workers):
                if self.started[w] == n:
                    while not spin_until_all(self.flags, 1 + w, 2 + w, n, SPIN_POLLS):
                        time.sleep(50e-6)  # a long piece: wait without burning the core
            self.task = None
            if self.errors:
                raise self.errors[0]
        finally:
            self.busy.release()

    def close(self) -> None:
        self.stop = True
        with self.wake:
            self.wake.notify_all()


def _pool(workers: int) -> _Pool:
    """The pool of ``workers`` threads; a new one after a fork (a forked child has the pool
    object but none of its threads) or when torch's thread count changed."""
    global _the_pool
    with _pool_lock:
        pool = _the_pool
        if pool is None or pool.pid != os.getpid() or pool.workers != workers:
            if pool is not None and pool.pid == os.getpid():
                pool.close()
            pool = _the_pool = _Pool(workers)
        return pool


def _parallel(kernel, args: tuple, units: int, nt: int) -> None:
    """kernel(*args, flags, task, lo, hi) over [0, units) on nt threads (the calling one and
    nt - 1 from the pool), as up to ``PIECES_PER_THREAD * nt`` contiguous ranges that each
    thread takes in turn: a thread the operating system does not schedule (another process
    holds the core) leaves its pieces to the others instead of holding up the call.
    """
    nt = max(1, min(nt, units))
    if nt == 1:
        kernel(*args, _NO_FLAGS, 0, 0, units)
        return
    n = min(units, PIECES_PER_THREAD * nt)
    bounds = [units * i // n for i in range(n + 1)]
    counter = itertools.count()  # next() is atomic under the GIL
    pool = _pool(nt - 1)

    def work(task: int) -> None:
        while (i := next(counter)) < n:
            kernel(*args, pool.flags, task, bounds[i], bounds[i + 1])
            task = 0

    pool.run(work)


def diag_plan(N: int, T: int, D: int, nt: int, real: bool = True) -> tuple:
    """How the diagonal kernels split N series of T steps and D channels over nt threads.

    - ``("series", K, 0)``, for one real channel (D = 1): the kernel that scans W steps of a
      series at a time inside a vector register, one pass per series, or, with fewer series
      than threads, K chunks in two phases by the rule of "wide" below (the same
      ``TIME_SPLIT_MIN``). Measured on one thread of the 2-core AMD EPYC (float32, one
      series, T = 1e6, into a fresh result): 0.37 ms, against 0.78 ms for the four-chain
      ``narrow`` kernel on two threads (its 16 chunks need two passes); two threads on three
      chunks took 0.35 ms there, the hand-offs and the summary pass eating the gain, and
      16 ms against 23 ms at T = 1e7.

    - ``("wide", W, K)``, for D >= 16: the vectorised kernel, units of W contiguous channels
      (whole rows, W = D, unless a row is over ``SPLIT_ROW_MIN`` channels), one pass (K = 1)
      when there are at least nt series. With fewer series than threads and at least
      ``TIME_SPLIT_MIN`` elements it splits time instead, into K = ceil(nt / N) + 1 chunks
      per series (two phases, see ``_numba_kernels.wide``): splitting short rows between
      threads ran at a third to a half of whole rows in the measurements (each thread reads
      every other pair of cache lines). Measured on 2 threads of an otherwise idle machine,
      against one thread on whole rows: 3.5 against 5.4 ms at (1, 1e5, 64), 43 against 68 ms
      at (1, 1e6, 64), but 0.65 against 0.38 ms at (1, 1e4, 64), where two hand-offs to the
      pool (each about 30 us to wake a thread here) and the 25% more bytes read do not pay.
    - ``("narrow", K, R)``, for D < 16: chains are (series, time chunk) pairs run four in
      lockstep; K = 1 (one chunk per series, a single pass) when there are at least 4 chains
      per thread anyway, else K chunks so that every thread gets about ``CHAINS_PER_THREAD``
      chains (a two-pass scan). R rows per block keep four chains' blocks of a, b and x in L1.
    Chunks are at least ``MIN_CHUNK`` steps long, so short sequences use fewer threads.
    """
    if D == 1 and real:
        K = 1
        if N < nt:
            K = -(-nt // N) + 1
            if not (T >= K * MIN_CHUNK and N * T >= TIME_SPLIT_MIN):
                K = 1
        return ("series", K, 0)
    if D >= WIDE_MIN:
        if N >= nt:
            return ("wide", D, 1)
        if D >= 2 * SPLIT_ROW_MIN:
            parts = min(D // SPLIT_ROW_MIN, -(-nt // N))
            W = -(-D // parts)
            return ("wide", -(-W // WIDE_MIN) * WIDE_MIN, 1)  # whole 64-byte lines
        K = -(-nt // N) + 1
        split = T >= K * MIN_CHUNK and N * T * D >= TIME_SPLIT_MIN
        return ("wide", D, K if split else 1)
    K = 1
    if N < 4 * nt:
        K = max(1, min(-(-CHAINS_PER_THREAD * nt // N), T // MIN_CHUNK))
    return ("narrow", K, max(1, BLOCK_ELEMENTS // D))


def wide_bounds(T: int, K: int) -> np.ndarray:
    """Chunk boundaries in processing order for the wide kernel's K chunks: chunk 0, filled
    in the first phase while the others are summarised, is ``FIRST_CHUNK`` times as long as
    the others (filling moves 12 bytes per float32 element, a summary 8)."""
    if K == 1:
        return np.array([0, T], dtype=np.int64)
    c = T / (K - 1 + FIRST_CHUNK)
    inner = [round(T - (K - 1 - k) * c) for k in range(K - 1)]  # chunks 1..K-1 end-aligned
    inner[0] = max(1, inner[0])  # chunk 0 ends on a step: its last state is chunk 1's carry
    return np.maximum.accumulate(np.array([0, *inner, T], dtype=np.int64))


_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_madvise = None  # libc's madvise, looked up on first use (Linux only)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """torch.empty, with transparent huge pages asked for on results of ``HUGE_PAGES_MIN``
    bytes or more (Linux): the first write into a fresh result faults every page in (and
    the kernel zeroes it), which with 4 KiB pages costs about as much as the scan itself
    (256 MiB: 109 ms to allocate and fill against 33 ms to fill, 41 ms with huge pages;
    NumPy asks for huge pages on its large arrays the same way, torch does not)."""
    global _madvise
    out = torch.empty(shape, dtype=dtype)  # (..., T, D)
    nbytes = out.numel() * out.element_size()
    if nbytes < HUGE_PAGES_MIN or _MADV_HUGEPAGE is None or not sys.platform.startswith("linux"):
        return out
    try:
        if _madvise is None:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
            _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = out.data_ptr()
        lo, hi = (start + 4095) & ~4095, (start + nbytes) & ~4095  # whole pages inside
        _madvise(lo, hi - lo, _MADV_HUGEPAGE)  # a hint: a failure changes nothing
    except (AttributeError, OSError):
        pass
    return out


def _compact(t: Tensor, n_lead: int) -> Tensor:
    """Drop expanded (stride-0) leading dims to size 1 and make the rest contiguous; resolve
    lazy conjugate/negative bits. The result reads as a C-contiguous NumPy array."""
    for i in range(n_lead):
        if t.stride(i) == 0 and t.shape[i] > 1:
            t = t.narrow(i, 0, 1)
    return t.resolve_conj().resolve_neg().contiguous()


def _transposed(a: Tensor) -> bool:
    """Whether a (..., T, D, D) is a transposed view of contiguous storage (its last two dims
    swapped, leading dims contiguous or expanded): the dense kernel then reads A_t^T as it is
    stored (``dense_t``) instead of copying it into A_t's layout."""
    D = a.shape[-1]
    if D < 2 or a.is_contiguous() or a.stride(-2) != 1 or a.stride(-1) != D:
        return False
    expect = D * D
    for i in range(a.dim() - 3, -1, -1):
        if a.stride(i) != expect and not (a.stride(i) == 0 or a.shape[i] == 1):
            return False
        if a.stride(i) != 0:
            expect *= a.shape[i]
    return True


def _broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast of shapes already known to broadcast (``linear_scan`` checked them);
    a few microseconds where torch.broadcast_shapes takes about 15."""
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        for i, size in enumerate(s, n - len(s)):
            if size != 1:
                out[i] = size
    return tuple(out)


def _rows(t: Tensor, n_lead: int, batch: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(flat NumPy array (M, *rest), int64 index (N,) of the row each batch element reads)."""
    lead = tuple(t.shape[:n_lead])
    m = math.prod(lead)
    index = np.arange(m, dtype=np.int64)
    if lead != batch:
        index = np.ascontiguousarray(np.broadcast_to(index.reshape(lead), batch).reshape(-1))
    return t.reshape(m, *t.shape[n_lead:]).numpy(), index


def numba_scan(
    a: Tensor,
    b: Tensor,
    x0: Tensor | None,
    *,
    dense: bool,
    reverse: bool = False,
    plan: tuple | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The ``"numba"`` backend (see the module docstring).

    For tests and benchmarks: ``plan`` overrides ``diag_plan`` (diagonal a only), and ``out``
    is a preallocated contiguous result to write into (a fresh tensor costs the operating
    system's page faults and zeroing on first touch: for results over glibc's 32 MiB mmap
    threshold that is about as much time again as the scan).
    """
    if b.device.type != "cpu":
        raise ValueError(f"linear_scan: backend='numba' runs on CPU tensors; got tensors on "
                         f"{b.device}; use backend='auto' (or move them with .cpu())")
    if b.dtype not in SUPPORTED:
        raise TypeError(f"linear_scan: backend='numba' supports float32, float64, complex64 and "
                        f"complex128; got {b.dtype}; use backend='auto'")
    kernels = _kernels()
    T, D = b.shape[-2], b.shape[-1]
    a_lead, b_lead = a.dim() - (3 if dense else 2), b.dim() - 2
    batch = _broadcast(a.shape[:a_lead], b.shape[:b_lead],
                       () if x0 is None else x0.shape[:-1])
    if out is None:
        out = _empty((*batch, T, D), b.dtype)  # (..., T, D)
    assert out.shape == (*batch, T, D) and out.dtype == b.dtype and out.is_contiguous()
    N = math.prod(batch)
    if out.numel() == 0:
        return out
    transposed = dense and _transposed(a)  # A_t^T stored contiguously: read it as such
    if transposed:
        a = a.transpose(-1, -2)
    a_np, ia = _rows(_compact(a.detach(), a_lead), a_lead, batch)  # (Na, T, D[, D])
    b_np, ib = _rows(_compact(b.detach(), b_lead), b_lead, batch)  # (Nb, T, D)
    if x0 is None:
        x0_np = np.zeros((1, D), dtype=out.numpy().dtype)  # (1, D)
        ix = np.zeros(N, dtype=np.int64)
    else:
        x_lead = x0.dim() - 1
        x0_np, ix = _rows(_compact(x0.detach(), x_lead), x_lead, batch)  # (Nx, D)
    out_np = out.numpy().reshape(N, T, D)  # a view: the kernels write into out
    nt = 1 if out.numel() < SERIAL_ELEMENTS else max(1, torch.get_num_threads())
    if dense:
        kernel = kernels.dense_t if transposed else kernels.dense
        _parallel(kernel, (a_np, b_np, x0_np, ia, ib, ix, out_np, reverse), N, nt)
        return out
    real = not b.dtype.is_complex
    kind, p, q = plan if plan is not None else diag_plan(N, T, D, nt, real)
    dt = out_np.dtype
    if kind == "series":
        if D != 1 or not real:
            raise ValueError(f"numba_scan: plan 'series' takes one real channel; got D = {D}, "
                             f"{b.dtype}")
        K = p
        bounds = wide_bounds(T, K)
        S = np.empty((N, K, 1), dtype=dt)  # (N, K, 1): the carry into each chunk
        S[:, 0] = x0_np[ix]
        S = S.reshape(N * K, 1)
        P = np.empty((N * K, 1) if K > 1 else (0, 1), dtype=dt)
        vw = (0,) * (64 // dt.itemsize)  # one 64-byte vector
        args = (a_np, b_np, out_np, ia, ib, S, P, bounds, reverse)
        _parallel(kernels.series, (*args, 0, K > 1, vw), N * max(1, K - 1), nt)
        if K > 1:
            t_first = T - bounds[1] if reverse else bounds[1] - 1  # chunk 0's last step
            kernels.carries(P, S, x0_np, ix, out_np, t_first, K, 1)
            _parallel(kernels.series, (*args, 1, False, vw), N * (K - 1), nt)
        return out
    if kind == "wide":
        W, K = p, q
        parts = -(-D // W)
        bounds = wide_bounds(T, K)
        S = np.empty((N, K, D), dtype=dt)  # (N, K, D): the carry into each chunk
        S[:, 0] = x0_np[ix]
        S = S.reshape(N * K, D)
        P = np.empty((N * K, D) if K > 1 else (0, D), dtype=dt)  # (N K, D)
        args = (a_np, b_np, out_np, ia, ib, S, P, bounds, W, reverse)
        _parallel(kernels.wide, (*args, 0, K > 1), N * parts * max(1, K - 1), nt)
        if K > 1:
            t_first = T - bounds[1] if reverse else bounds[1] - 1  # chunk 0's last step
            kernels.carries(P, S, x0_np, ix, out_np, t_first, K, 1)
            _parallel(kernels.wide, (*args, 1, False), N * parts * (K - 1), nt)
        return out
    K, R = p, q
    groups = -(-N * K // 4)
    if K == 1:
        S = np.ascontiguousarray(x0_np[ix])  # (N, D): the carry into each chain
    else:
        S = np.empty((N * K, D), dtype=dt)  # (N K, D)
        P = np.empty((N * K, D), dtype=dt)  # (N K, D)
        _parallel(kernels.narrow_summary, (a_np, b_np, out_np, ia, ib, S, P, K, R, reverse),
                  groups, nt)
        kernels.carries(P, S, x0_np, ix, out_np, 0, K, 0)
    _parallel(kernels.narrow_fill, (a_np, b_np, out_np, ia, ib, S, K, R, reverse), groups, nt)
    return out


def add_reference(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a + b for contiguous CPU tensors of one shape, by a numba kernel on the same
    threads as the scans: the bytes a diagonal scan moves at least (read a and b, write x), for
    the benchmarks' memory-copy reference."""
    n = out.numel()
    # ranges of whole 4 KiB pages, so that no two threads write one cache line
    nt = 1 if n < SERIAL_ELEMENTS else max(1, torch.get_num_threads())
    flat = [t.detach().reshape(-1).numpy() for t in (a, b, out)]
    page = max(1, 4096 // out.element_size())
    pages = -(-n // page)

    def run(flags: np.ndarray, task: int, lo: int, hi: int) -> None:
        _kernels().add(*flat, flags, task, lo * page, min(n, hi * page))

    _parallel(run, (), pages, nt)
