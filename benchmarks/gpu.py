"""The one script a GPU session runs: paraseq's kernels against cuDNN and the peers (issue 15).

    python benchmarks/gpu.py [--budget 480] [--sections tests,bandwidth,scan,gru,peers,attention]
                             [--out DIR] [--peers DIR] [--newton-method NAME] [--dry-run]

Sections, in this order, each under its own share of the time budget (``--budget`` seconds in
all, 480 by default: a GPU window is minutes). A section checks the clock before each
measurement; when its share or the whole budget is spent the rest of it is recorded as
"skipped (budget)" and the next section starts. An exception inside a section is printed with
its traceback and makes the script exit 1 at the end (the other sections still run); a
failure of one measurement (out of memory, a peer's error) is a row with the error in its note.

1. ``tests``: ``pytest -m cuda -q`` (the kernels' tests, on the GPU), its summary line.
2. ``bandwidth``: torch's copy (read + write) against the diagonal Triton scan (read a and b,
   write x) in GB/s at (B*D, T) in {(64, 1e6), (4096, 1e5), (1, 1e7)}, float32, laid out as
   (B, T, D) with D = min(B*D, 64); the scan's rate as a fraction of the copy's (target
   >= 70% at (4096, 1e5)). Timed twice: the kernel alone (``paraseq.scan.gpu.triton_scan``)
   and ``paraseq.linear_scan`` (checks, the non-finite check's reduction).
3. ``scan``: dense a, ``linear_scan(backend="parallel")`` (the pure-torch tree) against
   ``backend="triton"`` (the chunked kernels) at D in {4, 16, 64}, forward and forward +
   backward.
4. ``gru``: torch.nn.GRU (cuDNN) against paraseq.nn.GRU (``method="auto"`` and the forced
   Newton method, ``--newton-method``) over hidden {1, 8, 64, 256}, T {1e3, 1e4, 1e5}, batch
   {1, 16, 64}, float32 and bfloat16, forward (no_grad) and forward + backward (the outputs'
   sum); the same weights; column ``err``: the largest difference from cuDNN's output;
   ``path``: the module's ``last_path``. Cells ordered by T so that a budget cut loses the
   long ones; an implementation whose time at the previous T extrapolates (linearly in T) past
   ``--cell-cap`` seconds is skipped at the next. The forced Newton on CUDA is
   ``paraseq.gpu.dense_newton`` (per iteration a GEMM, one Triton kernel forming the dense
   Jacobian, the dense Triton scan) where the state fits its kernels (hidden <= 64; ``path``
   "fused newton (triton)"), the general Newton of ``paraseq.solve`` beyond (hidden 256:
   "parallel (newton), general path: state D=256 > 64"). At batch 16, float32 and hidden 8
   and 64, one more row, ``<forced> (general)``, runs the same method with
   ``paraseq.gpu.routing.DENSE_FUSED = False``: the general torch Newton, which also forms
   the dense Jacobians, so that ratio is what the fusion buys (no matrix-free variant exists
   on the GPU: a parallel scan needs the products of the J_t, i.e. the matrices).
5. ``peers``: paraseq.nn.DiagGRU (auto, and the forced method) against pararnn-torch's
   ParaGRU (``mix="diag"``, ``NewtonConfig(max_iters=3, scan_backend="fused")``) at its own
   setting (B 8, d_h 256, T 2048, K 3) and at T 1e5, the same function (weights mapped by
   ``paraseq.bench.peers.diag_gru_from_paragru``); and paraseq.nn.GRU against DEER's
   ``seq1d`` (JAX) at the DEER paper's setting (GRU, input 2, batch 16, T 1e4, hidden 1, 8
   and 32). Peers are imported only if present: put them in ``peers/`` (git-ignored; see
   benchmarks/README.md), which this script puts on sys.path with each of its subfolders.
6. ``attention``: ``benchmarks/attention_gpu.py``'s ``gpu_section`` one T at a time (T 1e3,
   1e4, 1e5; d 64): ``paraseq.attention.linear_attention`` chunked and Triton forms against
   fla's ``chunk_linear_attn`` and ``chunk_gla`` (if importable) and torch's causal
   ``scaled_dot_product_attention``, forward and forward + backward, errors against float64
   and peak memory (its own files under ``attention/``); ratio = SDPA's time / the row's.
   Without that file, a plain comparison of the same APIs.

Output (``--out``, default paraseq-out/gpu): ``gpu.csv`` (one row per measurement: section,
case, implementation, pass, dtype, sizes, ms, the ratio against the section's baseline, error,
path, note) and ``gpu.png`` (the GRU section: cuDNN time / paraseq auto time against T, one
line per hidden size, batch 16, float32; the DEER paper's figure), and the tables printed.
Timing: CUDA events around each call after a warm-up call, median of up to ``--repeats``.

``--dry-run``: every section on the CPU with tiny sizes, Triton kernels through triton's
interpreter (``TRITON_INTERPRET=1``, set here before triton is imported); the tests section
only collects the ``cuda``-marked tests. Under a minute; CI runs it. Its numbers mean nothing.

Shape letters: B batch, T length, D state size, H hidden size, d head size.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's paraseq

SECTIONS = ("tests", "bandwidth", "scan", "gru", "peers", "attention")
SHARE = {"tests": 0.30, "bandwidth": 0.07, "scan": 0.07, "gru": 0.33, "peers": 0.13,
         "attention": 0.10}
"""Each section's share of the budget; time a section leaves unused goes to the next ones."""


@dataclass
class Row:
    section: str
    case: str
    impl: str
    pass_: str = ""
    dtype: str = ""
    B: int | str = ""
    H: int | str = ""
    T: int | str = ""
    ms: float | str = ""
    ratio: float | str = ""  # the section's baseline time / this time (> 1: faster)
    err: float | str = ""
    path: str = ""
    note: str = ""


@dataclass
class Run:
    """The clock, the device, the rows, and the sizes of this run (full or dry)."""

    args: argparse.Namespace
    device: object = None
    start: float = field(default_factory=time.perf_counter)
    rows: list[Row] = field(default_factory=list)
    section_end: float = 0.0
    failures: list[str] = field(default_factory=list)
    peer_paths: list[str] = field(default_factory=list)

    @property
    def dry(self) -> bool:
        return self.args.dry_run

    def left(self) -> float:
        """Seconds left to the current section (and never past the whole budget)."""
        now = time.perf_counter()
        return min(self.section_end, self.start + self.args.budget) - now

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def skip(self, section: str, case: str, why: str = "skipped (budget)") -> None:
        self.add(Row(section, case, "-", note=why))


# --- timing ---

def _sync(run: Run) -> None:
    import torch

    if run.device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(run: Run, fn: Callable[[], object], repeats: int | None = None,
            cap: float | None = None) -> float:
    """Median milliseconds of fn() after one warm-up call: CUDA events on a GPU, the wall
    clock on the CPU. Stops repeating when ``cap`` seconds (default ``--cell-cap``) are spent."""
    import torch

    repeats = repeats or run.args.repeats
    cap = run.args.cell_cap if cap is None else cap
    t0 = time.perf_counter()
    fn()
    _sync(run)
    if time.perf_counter() - t0 > cap:  # one more call would pass the cap: the warm-up's time
        return (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(repeats):
        if run.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - s) * 1e3)
        if time.perf_counter() - t0 > cap or run.left() <= 0:
            break
    return statistics.median(times)


def _oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


def _note(exc: BaseException) -> str:
    import torch

    if run_device_is_cuda():
        torch.cuda.empty_cache()
    if _oom(exc):
        return "out of memory"
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"


def run_device_is_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


# --- 1. the CUDA-marked tests ---

def section_tests(run: Run) -> None:
    # --continue-on-collection-errors: a test file importing a package the GPU machine lacks
    # (hypothesis, say) is reported and the marked tests of the others still run
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors"]
    # the dry run collects the marked tests of the kernels' own files (collecting the whole
    # suite imports every test module: tens of seconds on a small machine)
    cmd += ["--collect-only", "tests/test_dense_triton.py", "tests/test_triton.py"] if run.dry \
        else ["tests"]
    timeout = max(5.0, run.left())
    env = dict(os.environ)
    if not run.dry:
        env.pop("TRITON_INTERPRET", None)
    # the peers' folders (which may carry test-only packages too) for the tests' process
    env["PYTHONPATH"] = os.pathsep.join([*run.peer_paths, env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env=env)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")
        tail = tail.decode() if isinstance(tail, bytes) else tail
        print(tail[-2000:])
        run.add(Row("tests", "pytest -m cuda", "pytest", note=f"timed out after {timeout:.0f} s"))
        return
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    summary = lines[-1] if lines else "(no output)"
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    print("\n".join(failed[-20:]))
    print(f"pytest -m cuda: {summary}  (exit {p.returncode}, {time.perf_counter() - t0:.0f} s)")
    run.add(Row("tests", "pytest -m cuda" + (" --collect-only" if run.dry else ""), "pytest",
                ms=round((time.perf_counter() - t0) * 1e3), note=f"exit {p.returncode}: "
                                                                  f"{summary}"))
    if p.returncode not in (0, 5) or (run.dry and p.returncode != 0):
        raise RuntimeError(f"pytest -m cuda exited {p.returncode}: {summary}")


# --- 2. copy bandwidth against the diagonal scan's ---

def section_bandwidth(run: Run) -> None:
    import torch

    import paraseq
    from paraseq.scan import gpu

    cases = [(64, 10**6), (4096, 10**5), (1, 10**7)]
    if run.dry:
        cases = [(8, 100)]
    for BD, T in cases:
        case = f"B*D={BD}, T={T:.0e}"
        if run.left() <= 0:
            run.skip("bandwidth", case)
            continue
        D = min(BD, 64)
        B = BD // D
        try:
            gen = torch.Generator(device=run.device).manual_seed(0)
            a = torch.rand(B, T, D, device=run.device, generator=gen)  # (B, T, D)
            b = torch.randn(B, T, D, device=run.device, generator=gen)
            dst = torch.empty_like(a)
            n = a.numel()
            copy = time_ms(run, lambda a=a, dst=dst: dst.copy_(a))
            copy_gbs = 2 * 4 * n / copy / 1e6
            run.add(Row("bandwidth", case, "torch copy", "fwd", "float32", B, D, T, copy, 1.0,
                        note=f"{copy_gbs:.3g} GB/s"))
            for impl, fn in (
                    ("triton scan kernel",
                     lambda a=a, b=b: gpu.triton_scan(a, b, None, dense=False, reverse=False)),
                    ("linear_scan auto", lambda a=a, b=b: paraseq.linear_scan(a, b))):
                ms = time_ms(run, fn)
                gbs = 3 * 4 * n / ms / 1e6
                run.add(Row("bandwidth", case, impl, "fwd", "float32", B, D, T, ms,
                            note=f"{gbs:.3g} GB/s = {gbs / copy_gbs:.1%} of copy"))
            del a, b, dst
        except Exception as exc:
            run.add(Row("bandwidth", case, "-", note=_note(exc)))


# --- 3. the dense scan: torch tree against the chunked Triton kernels ---

def op_counts(T: int, D: int) -> tuple[int, int, int]:
    """Ops one dense scan of (1, T, D, D) issues, counted on the CPU without a GPU: the torch
    tree's non-view aten ops (each a kernel launch on a GPU), and the chunked path's Triton
    launches and its own non-view aten ops (the Triton kernels are counted, not run: the
    recursion's shape depends on T alone). Returns (tree ops, triton launches, triton-path
    torch ops)."""
    import types

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from paraseq.scan import gpu
    from paraseq.scan.parallel import parallel_scan

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            self.ops += not func.is_view
            return func(*args, **(kwargs or {}))

    launches: list[object] = []

    class Launch:
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(grid)

    a, b = torch.zeros(1, T, D, D), torch.zeros(1, T, D)  # (1, T, D, D), (1, T, D)
    with Count() as tree:
        parallel_scan(a, b, None, dense=True)
    real = gpu._kernels
    gpu._kernels = lambda: types.SimpleNamespace(dense_chunk_reduce_kernel=Launch(),
                                                 dense_chunk_apply_kernel=Launch())
    try:
        with Count() as chunked:
            gpu._dense_rows(a, b, torch.zeros(1, D), False)
    finally:
        gpu._kernels = real
    return tree.ops, len(launches), chunked.ops


def section_scan(run: Run) -> None:
    import torch

    import paraseq

    for T in (10**3, 10**4, 10**5):  # counted on the CPU in either run: cheap at D = 4
        tree, launches, ops = op_counts(T, 4)
        run.add(Row("scan", "op count, dense D=4", "parallel vs triton", "fwd", "", 1, 4, T,
                    ratio=tree / (launches + ops),
                    note=f"torch tree {tree} ops; chunked {launches} Triton launches + "
                         f"{ops} torch ops"))

    B, T = (8, 10**4) if not run.dry else (1, 20)
    for D in (4, 16, 64) if not run.dry else (2, 16):
        gen = torch.Generator(device=run.device).manual_seed(D)
        a = torch.randn(B, T, D, D, device=run.device, generator=gen) / (1.2 * math.sqrt(D))
        b = torch.randn(B, T, D, device=run.device, generator=gen)
        want = None
        for pass_ in ("fwd", "fwd+bwd"):
            base = None
            for backend in ("parallel", "triton"):
                case = f"dense D={D}"
                if run.left() <= 0:
                    run.skip("scan", f"{case} {backend} {pass_}")
                    continue
                try:
                    def fn(backend=backend, pass_=pass_, a=a, b=b):
                        if pass_ == "fwd":
                            with torch.no_grad():
                                return paraseq.linear_scan(a, b, backend=backend,
                                                           structure="dense")
                        ar, br = a.detach().requires_grad_(), b.detach().requires_grad_()
                        x = paraseq.linear_scan(ar, br, backend=backend, structure="dense")
                        x.sum().backward()
                        return x
                    x = fn()
                    if want is None:
                        want = x.detach()
                    err = float((x.detach() - want).abs().max())
                    ms = time_ms(run, fn)
                    base = ms if backend == "parallel" else base
                    run.add(Row("scan", case, f"linear_scan {backend}", pass_, "float32", B, D,
                                T, ms, "" if base is None else base / ms, err))
                except Exception as exc:
                    run.add(Row("scan", case, f"linear_scan {backend}", pass_, "float32", B, D,
                                T, note=_note(exc)))


# --- 4. GRU: cuDNN against paraseq.nn.GRU ---

def _gru_grid(run: Run):
    """The cells in the order they run: first the plot's (float32, batch 16, every hidden
    size and T), then the rest by T, so that a budget cut loses the least informative."""
    if run.dry:
        return [(100, 4, 2, "float32"), (100, 4, 2, "bfloat16")]
    grid = [(T, H, B, dt) for T in (10**3, 10**4, 10**5) for H in (1, 8, 64, 256)
            for B in (1, 16, 64) for dt in ("float32", "bfloat16")]
    return sorted(grid, key=lambda c: (not (c[3] == "float32" and c[2] == 16), c[0]))


def dense_iteration_counts(T: int, H: int) -> tuple[int, int, int]:
    """What one Newton iteration of ``paraseq.gpu.dense_newton`` issues on a GPU, counted on
    the CPU without one (the Triton kernels counted, not run): (GEMMs, Triton launches, other
    non-view torch ops), for a GRU of hidden H, batch 1, length T, float32. The iteration:
    the iterate's hidden projection, the cell kernel (J, rhs, residual), the dense scan, the
    clean-up of the new iterate, and the one host read of the residual's max."""
    import types

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from paraseq.gpu import dense
    from paraseq.scan import gpu

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.gemms = 0, 0

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            gemm = func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm,
                                           torch.ops.aten.addmm)
            self.gemms += gemm
            self.ops += not func.is_view and not gemm
            return func(*args, **(kwargs or {}))

    launches: list[object] = []

    class Launch:
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(grid)

    fake = types.SimpleNamespace(dense_chunk_reduce_kernel=Launch(),
                                 dense_chunk_apply_kernel=Launch(), dense_cell_kernel=Launch())
    real = gpu._kernels, dense._kernels, gpu.triton_available, set(dense._LAUNCHED)
    gpu._kernels, dense._kernels = (lambda: fake), fake
    gpu.triton_available = lambda device=None: True
    try:
        gi = torch.zeros(1, T, 3 * H)  # (B, T, 3 H)
        P = dense._Problem("gru", gi, torch.zeros(1, H), torch.zeros(3 * H, H),
                           torch.zeros(3 * H), "triton")
        J, rhs, _, _ = P.linearise(P.zeros(), torch.zeros(1, T, 3 * H), 1e-6, True)
        launches.clear()
        with Count() as c:  # one iteration
            x = P.scan(J, rhs)
            _, _, r, _ = P.linearise(x, P.project(x), 1e-6, True)
            float(r.max())
    finally:  # (the fake launches must not count as compiled kernels: _LAUNCHED restored)
        gpu._kernels, dense._kernels, gpu.triton_available, dense._LAUNCHED = real
    return c.gemms, len(launches), c.ops


def section_gru(run: Run) -> None:
    import torch

    import paraseq.nn as pnn

    for T in (10**3, 10**4, 10**5):  # counted on the CPU in either run: cheap at H = 8
        gemms, launches, ops = dense_iteration_counts(T, 8)
        run.add(Row("gru", "op count, one fused Newton iteration", "paraseq.gpu.dense_newton",
                    "fwd", "float32", 1, 8, T,
                    note=f"{gemms} GEMM, {launches} Triton launches, {ops} other torch ops"))
    last: dict[tuple, tuple[int, float]] = {}  # (impl, H, B, dtype, pass) -> (T, seconds)
    for T, H, B, dt in _gru_grid(run):
        dtype = getattr(torch, dt)
        case = f"H={H} B={B} T={T:.0e} {dt}"
        if run.left() <= 0:
            run.skip("gru", case)
            continue
        torch.manual_seed(H * 7 + B)
        ref = torch.nn.GRU(H, H, batch_first=True, device=run.device, dtype=dtype)
        impls = {"cuDNN torch.nn.GRU": ref}
        for method in ("auto", run.args.newton_method):
            m = pnn.GRU(H, H, batch_first=True, method=method, device=run.device, dtype=dtype)
            m.load_state_dict(ref.state_dict())
            impls[f"paraseq.nn.GRU {method}"] = m
        if dt == "float32" and ((B == 16 and H in (8, 64)) or run.dry):  # fused vs general
            impls[f"paraseq.nn.GRU {run.args.newton_method} (general)"] = _Unfused(m)
        x = torch.randn(B, T, H, device=run.device, dtype=dtype)
        with torch.no_grad():
            want = ref(x)[0].float()
        for pass_ in ("fwd", "fwd+bwd"):
            base = None
            for name, mod in impls.items():
                key = (name, H, B, dt, pass_)
                prev = last.get(key)
                if prev is not None and prev[1] * T / prev[0] > run.args.cell_cap:
                    run.add(Row("gru", case, name, pass_, dt, B, H, T,
                                note=f"skipped (~{prev[1] * T / prev[0]:.0f} s from T="
                                     f"{prev[0]:.0e})"))
                    continue
                if run.left() <= 0:
                    run.skip("gru", f"{case} {name} {pass_}")
                    continue
                try:
                    def fn(mod=mod, pass_=pass_, x=x):
                        if pass_ == "fwd":
                            with torch.no_grad():
                                return mod(x)[0]
                        xr = x.detach().requires_grad_()
                        y = mod(xr)[0]
                        y.float().sum().backward()
                        return y
                    y = fn()
                    err = float((y.detach().float() - want).abs().max())
                    path = getattr(mod, "last_path", "cuDNN")
                    ms = time_ms(run, fn)
                    last[key] = (T, ms / 1e3)
                    base = ms if mod is ref else base
                    run.add(Row("gru", case, name, pass_, dt, B, H, T, ms,
                                "" if base is None else base / ms, err, path))
                except Exception as exc:
                    last[key] = (T, float("inf"))
                    run.add(Row("gru", case, name, pass_, dt, B, H, T, note=_note(exc)))
    _crossover(run)


class _Unfused:
    """A paraseq.nn module run with ``paraseq.gpu.routing.DENSE_FUSED = False``: its Newton on
    the general path (the backward too: it is routed when the forward runs)."""

    def __init__(self, mod):
        self.mod = mod

    @property
    def last_path(self) -> str:
        return self.mod.last_path

    def __call__(self, x):
        from paraseq.gpu import routing

        routing.DENSE_FUSED = False
        try:
            return self.mod(x)
        finally:
            routing.DENSE_FUSED = True


def _crossover(run: Run) -> None:
    """Per (hidden, batch, dtype, pass): the smallest T at which the forced Newton beat cuDNN
    in this run (what paraseq.gpu.routing's CUDA_RULE is to be calibrated from)."""
    forced = f"paraseq.nn.GRU {run.args.newton_method}"
    timed = [r for r in run.rows if r.section == "gru" and isinstance(r.ms, float)]
    keys = sorted({(r.H, r.B, r.dtype, r.pass_) for r in timed})
    for H, B, dt, pass_ in keys:
        cells = [r for r in timed if (r.H, r.B, r.dtype, r.pass_) == (H, B, dt, pass_)]
        Ts = sorted({r.T for r in cells})
        wins = []
        for T in Ts:
            by = {r.impl: r.ms for r in cells if r.T == T}
            if forced in by and "cuDNN torch.nn.GRU" in by:
                wins.append((T, by["cuDNN torch.nn.GRU"] / by[forced]))
        if wins:
            first = next((T for T, ratio in wins if ratio > 1), None)
            run.add(Row("gru", "crossover", forced, pass_, dt, B, H, "" if first is None
                        else first, note="cuDNN/newton by T: " + ", ".join(
                            f"{T:.0e} {ratio:.2g}x" for T, ratio in wins)))


# --- 5. peers: pararnn-torch's fused ParaGRU and DEER ---

def _peers_on_path(folder: Path) -> list[str]:
    """peers/ and its subfolders that are not packages themselves, on sys.path."""
    added = []
    if folder.is_dir():
        for p in [folder, *sorted(q for q in folder.iterdir() if q.is_dir())]:
            if p == folder or not (p / "__init__.py").exists():
                sys.path.insert(0, str(p))
                added.append(str(p))
    return added


def section_peers(run: Run) -> None:
    with warnings.catch_warnings():  # on_failure="warn" at K = 3 warns on every call
        warnings.simplefilter("ignore")
        _pararnn(run)
        _deer(run)


def _pararnn(run: Run) -> None:
    """paraseq.nn.DiagGRU against pararnn-torch's fused ParaGRU, the same function."""
    import torch

    import paraseq.nn as pnn
    from paraseq.bench.peers import diag_gru_from_paragru

    # pararnn-torch's fused ParaGRU against DiagGRU holding the same function
    settings = [(8, 256, 2048), (8, 256, 10**5)] if not run.dry else [(2, 4, 80)]
    try:
        from pararnn import NewtonConfig, ParaGRU, ParaRNN
        have_pararnn = True
    except Exception as exc:
        have_pararnn = False
        run.add(Row("peers", "pararnn", "pararnn-torch ParaGRU", note=f"not importable "
                    f"({type(exc).__name__}: {str(exc)[:60]})"))
    for B, H, T in settings:
        case = f"ParaGRU setting B={B} d_h={H} T={T:.0e} K=3"
        if run.left() <= 0:
            run.skip("peers", case)
            continue
        torch.manual_seed(0)
        x = torch.randn(B, T, H, device=run.device)  # (B, T, H)
        para = None
        mods: dict[str, Callable] = {}
        if have_pararnn:
            cell = ParaGRU(H, H).to(run.device)
            for backend in ("fused", "auto"):
                try:
                    para = ParaRNN(cell, config=NewtonConfig(max_iters=3, scan_backend=backend,
                                                             residual_atol=None),
                                   solver="newton").to(run.device)
                    with torch.no_grad():
                        para(x)
                    mods[f"pararnn ParaGRU ({backend})"] = para
                    break
                except Exception as exc:
                    run.add(Row("peers", case, f"pararnn ParaGRU ({backend})", note=_note(exc)))
            source = cell
        else:
            source = None
        for method in ("auto", run.args.newton_method):
            # K = 3 as ParaGRU: the modules' fixed-iteration mode (iterations=3) where they
            # have one, else at most 3 with on_failure="warn" (the third iterate, a warning)
            for kw in (dict(iterations=3), dict(max_iter=3, on_failure="warn")):
                try:
                    if source is not None:
                        m = diag_gru_from_paragru(source, method=method, **kw).to(run.device)
                    else:
                        m = pnn.DiagGRU(H, H, batch_first=True, device=run.device,
                                        method=method, **kw)
                    break
                except (TypeError, ValueError):
                    continue
            label = ", ".join(f"{k}={v}" for k, v in kw.items())
            mods[f"paraseq.nn.DiagGRU {method} {label}"] = m
        base = None
        want = None
        for pass_ in ("fwd", "fwd+bwd"):
            base = None
            for name, mod in mods.items():
                if run.left() <= 0:
                    run.skip("peers", f"{case} {name} {pass_}")
                    continue
                try:
                    diag = name.startswith("paraseq")

                    def fn(mod=mod, pass_=pass_, diag=diag, x=x):
                        if pass_ == "fwd":
                            with torch.no_grad():
                                out = mod(x)
                        else:
                            out = mod(x.detach().requires_grad_())
                        y = out[0] if diag else out
                        if pass_ != "fwd":
                            y.sum().backward()
                        return y
                    y = fn().detach()
                    want = y if want is None else want
                    ms = time_ms(run, fn)
                    base = ms if base is None else base
                    run.add(Row("peers", case, name, pass_, "float32", B, H, T, ms, base / ms,
                                float((y - want).abs().max()),
                                getattr(mod, "last_path", "")))
                except Exception as exc:
                    run.add(Row("peers", case, name, pass_, "float32", B, H, T,
                                note=_note(exc)))


def _deer(run: Run) -> None:
    """paraseq.nn.GRU against DEER's seq1d at the DEER paper's setting (GRU, input 2, batch
    16, T 1e4), the same weights, forward."""
    import numpy as np
    import torch

    import paraseq.nn as pnn

    try:
        import jax
        from deer.fseq1d import seq1d  # noqa: F401

        from paraseq.bench.peers import _jax_fns, _jax_program
    except Exception as exc:
        run.add(Row("peers", "DEER", "DEER seq1d", note=f"not importable ({type(exc).__name__}: "
                                                        f"{str(exc)[:60]})"))
        return
    _, _, deer_gru = _jax_fns()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()  # torch's cached blocks, for XLA
    B, n_in, T = (16, 2, 10**4) if not run.dry else (2, 2, 200)
    for H in (1, 8, 32) if not run.dry else (1, 4):
        case = f"DEER setting H={H} input={n_in} B={B} T={T:.0e}"
        if run.left() <= 0:
            run.skip("peers", case)
            continue
        torch.manual_seed(H)
        ref = torch.nn.GRU(n_in, H, batch_first=True, device=run.device)
        x = torch.randn(B, T, n_in, device=run.device)
        with torch.no_grad():
            want = ref(x)[0]
        base = None
        try:
            sd = ref.state_dict()
            params = tuple(jax.device_put(np.asarray(sd[k].cpu().numpy())) for k in (
                "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"))
            xj = jax.device_put(np.asarray(x.transpose(0, 1).contiguous().cpu().numpy()))
            prog = _jax_program(jax, deer_gru, False, aux=True).lower(params, xj).compile()
            out, ok, _ = jax.block_until_ready(prog(params, xj))
            err = float(np.abs(np.asarray(out) - want.transpose(0, 1).cpu().numpy()).max())
            ms = time_ms(run, lambda p=prog, w=params, xj=xj: jax.block_until_ready(p(w, xj)))
            base = ms
            run.add(Row("peers", case, "DEER seq1d (JAX)", "fwd", "float32", B, H, T, ms, 1.0,
                        err, note=f"converged {bool(np.asarray(ok).all())}; "
                                  f"{jax.devices()[0].platform}"))
        except Exception as exc:
            run.add(Row("peers", case, "DEER seq1d (JAX)", "fwd", "float32", B, H, T,
                        note=_note(exc)))
        for method in ("auto", run.args.newton_method):
            if run.left() <= 0:
                run.skip("peers", f"{case} paraseq {method}")
                continue
            try:
                m = pnn.GRU(n_in, H, batch_first=True, method=method, device=run.device)
                m.load_state_dict(ref.state_dict())

                def fn(m=m, x=x):
                    with torch.no_grad():
                        return m(x)[0]
                err = float((fn() - want).abs().max())
                ms = time_ms(run, fn)
                run.add(Row("peers", case, f"paraseq.nn.GRU {method}", "fwd", "float32", B, H,
                            T, ms, "" if base is None else base / ms, err, m.last_path))
            except Exception as exc:
                run.add(Row("peers", case, f"paraseq.nn.GRU {method}", "fwd", "float32", B,
                            H, T, note=_note(exc)))


# --- 6. linear attention ---

def section_attention(run: Run) -> None:
    """benchmarks/attention_gpu.py's ``gpu_section`` (paraseq chunked and Triton, fla, SDPA;
    errors against float64, peak memory) one T at a time under this section's clock, at
    d = 64; where that file is missing, the plain comparison below."""
    try:
        import attention_gpu
    except ImportError:
        return _attention_plain(run)
    out = Path(run.args.out_dir) / "attention"
    for T in (10**3, 10**4, 10**5) if not run.dry else (50,):
        if run.left() <= 0:
            run.skip("attention", f"T={T:.0e}")
            continue
        rows = attention_gpu.gpu_section(run.dry, out / f"T{T}", lengths=(T,),
                                         dims=(64,) if not run.dry else (16,))
        base: dict[tuple, float] = {}
        for r in rows:
            if r["ms"] is not None and r["form"] == "torch sdpa":
                base[r["pass"]] = r["ms"]
        for r in rows:
            ms = r["ms"]
            sdpa = base.get(r["pass"])
            note = r["note"] or ""
            if r["peak_mib"] is not None:
                note = f"peak {r['peak_mib']:.0f} MiB; {note}".rstrip("; ")
            if r["max_err_dq"] is not None:
                note = f"{note}; dq err {r['max_err_dq']:.1e}".lstrip("; ")
            run.add(Row("attention", f"{r['op']} T={T:.0e} d={r['d']} heads={r['heads']}",
                        r["form"], r["pass"], r["dtype"], r["batch"], r["heads"], T,
                        "" if ms is None else ms,
                        "" if ms is None or sdpa is None else sdpa / ms,
                        "" if r["max_err"] is None else r["max_err"],
                        note="error: " + note if note.startswith("failed") else note))


def _attention_plain(run: Run) -> None:
    import torch
    import torch.nn.functional as F

    import paraseq.attention as pa

    impls: dict[str, Callable] = {  # the first is the baseline of the ratio column
        "torch SDPA causal": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True),
        "paraseq chunked": lambda q, k, v: pa.linear_attention(q, k, v, form="chunked"),
    }
    if "triton" in getattr(pa, "FORMS", ()):
        impls["paraseq triton"] = lambda q, k, v: pa.linear_attention(q, k, v, form="triton")
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn

        # fla's layout is (B, T, H, d); its outputs are (o, final_state)
        impls["fla chunk_linear_attn"] = lambda q, k, v: chunk_linear_attn(
            *(t.transpose(1, 2) for t in (q, k, v)))[0]
        impls["fla chunk_gla"] = lambda q, k, v: chunk_gla(
            *(t.transpose(1, 2) for t in (q, k, v)),
            g=torch.zeros_like(k).transpose(1, 2))[0]
    except Exception as exc:
        run.add(Row("attention", "fla", "fla", note=f"not importable ({type(exc).__name__}: "
                                                    f"{str(exc)[:60]})"))
    B, nh, d = 1, 4, 64
    for T in (10**3, 10**4, 10**5) if not run.dry else (128,):
        for dt in ("float32", "bfloat16"):
            dtype = getattr(torch, dt)
            case = f"T={T:.0e} heads={nh} d={d} {dt}"
            if run.left() <= 0:
                run.skip("attention", case)
                continue
            torch.manual_seed(T)
            q, k, v = (torch.randn(B, nh, T, d, device=run.device, dtype=dtype) / math.sqrt(d)
                       for _ in range(3))  # (B, H, T, d)
            for pass_ in ("fwd", "fwd+bwd"):
                base = None
                for name, f in impls.items():
                    if run.left() <= 0:
                        run.skip("attention", f"{case} {name} {pass_}")
                        continue
                    try:
                        def fn(f=f, pass_=pass_, q=q, k=k, v=v):
                            if pass_ == "fwd":
                                with torch.no_grad():
                                    return f(q, k, v)
                            ts = [t.detach().requires_grad_() for t in (q, k, v)]
                            o = f(*ts)
                            o.float().sum().backward()
                            return o
                        ms = time_ms(run, fn)
                        base = ms if base is None else base
                        run.add(Row("attention", case, name, pass_, dt, B, nh, T, ms,
                                    base / ms))
                    except Exception as exc:
                        run.add(Row("attention", case, name, pass_, dt, B, nh, T,
                                    note=_note(exc)))


# --- output ---

def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if v == v else "nan"
    return str(v)


def print_table(rows: list[Row]) -> None:
    cols = ["section", "case", "impl", "pass_", "ms", "ratio", "err", "path", "note"]
    cells = [[_fmt(getattr(r, c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)))


def write_outputs(run: Run, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu.csv"
    with path.open("w", newline="") as fh:
        names = [k.rstrip("_") for k in asdict(Row("", "", ""))]  # pass_ -> pass
        w = csv.writer(fh)
        w.writerow(names)
        for r in run.rows:
            w.writerow(asdict(r).values())
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    gru = [r for r in run.rows if r.section == "gru" and r.pass_ == "fwd"
           and r.dtype == "float32" and isinstance(r.ms, float)]
    batch = 16 if any(r.B == 16 for r in gru) else (gru[0].B if gru else None)
    for H in sorted({r.H for r in gru}):
        pts = []
        for T in sorted({r.T for r in gru if r.H == H and r.B == batch}):
            by = {r.impl: r.ms for r in gru if r.H == H and r.B == batch and r.T == T}
            if "cuDNN torch.nn.GRU" in by and "paraseq.nn.GRU auto" in by:
                pts.append((T, by["cuDNN torch.nn.GRU"] / by["paraseq.nn.GRU auto"]))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"hidden {H}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("speedup: cuDNN time / paraseq.nn.GRU auto time")
    ax.set_title(f"GRU forward, batch {batch}, float32 ({run.device})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gpu.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'gpu.png'}")


def describe(run: Run) -> str:
    import torch

    import paraseq

    parts = [f"paraseq {getattr(paraseq, '__version__', '?')}", f"torch {torch.__version__}"]
    if run.device.type == "cuda":
        parts.append(f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        parts.append("CPU" + (" (dry run: triton interpreter)" if run.dry else ""))
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all sections (default 480; 600 with --dry-run, whose "
                         "tiny sizes take seconds of CPU time: no section is cut on a slow CI)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated, from {','.join(SECTIONS)}")
    ap.add_argument("--out", default=None, help="folder for gpu.csv and gpu.png")
    ap.add_argument("--peers", default=str(ROOT / "peers"),
                    help="folder of peers to put on sys.path (default peers/)")
    ap.add_argument("--newton-method", default="newton",
                    help="the method paraseq.nn.GRU/DiagGRU is forced to (default newton)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cell-cap", type=float, default=None,
                    help="seconds one measurement may take (default 8; 60 with --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes on the CPU, triton through its interpreter")
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 600.0 if args.dry_run else 480.0
    if args.cell_cap is None:
        args.cell_cap = 60.0 if args.dry_run else 8.0
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(chosen) - set(SECTIONS))
    if bad:
        ap.error(f"unknown section(s) {bad}; valid: {','.join(SECTIONS)}")
    if args.dry_run:  # before triton is imported: it reads the variable then
        os.environ["TRITON_INTERPRET"] = "1"
    # JAX (DEER) takes 75% of the GPU's memory on first use unless told not to
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    added = _peers_on_path(Path(args.peers))

    import torch

    run = Run(args, peer_paths=added)
    if args.dry_run:
        run.device = torch.device("cpu")
        if args.repeats == ap.get_default("repeats"):
            args.repeats = 1
    elif torch.cuda.is_available():
        run.device = torch.device("cuda")
        torch.zeros(1, device=run.device)  # initialise CUDA before any timing
    else:
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else ROOT / "paraseq-out" / "gpu"
    args.out_dir = str(out)
    print(f"benchmarks/gpu.py: {describe(run)}; budget {args.budget:.0f} s; sections "
          f"{','.join(chosen)}; peers on sys.path: {added or 'none'}", flush=True)
    fns = {name: globals()[f"section_{name}"] for name in SECTIONS}
    order = [s for s in SECTIONS if s in chosen]
    for i, name in enumerate(order):
        now = time.perf_counter()
        remaining = run.start + args.budget - now
        share = sum(SHARE[s] for s in order[i:])
        run.section_end = now + remaining * SHARE[name] / share
        t0 = time.perf_counter()
        print(f"\n== {name} ({max(0.0, run.left()):.0f} s) ==", flush=True)
        n_before = len(run.rows)
        try:
            fns[name](run)
        except Exception:
            traceback.print_exc()
            run.failures.append(name)
            run.add(Row(name, "-", "-", note="section raised: see the traceback"))
        print_table(run.rows[n_before:])
        print(f"({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    write_outputs(run, out)
    total = time.perf_counter() - run.start
    print(f"\ntotal {total:.0f} s of {args.budget:.0f}; {describe(run)}")
    errors = [r for r in run.rows if r.note.startswith("error:")]
    if errors:
        print(f"{len(errors)} measurement(s) failed (rows whose note says error)")
    if args.dry_run and errors:  # the dry run is CI's check that every section works
        run.failures.append("measurements: " + "; ".join(f"{r.section} {r.impl}"
                                                          for r in errors))
    if run.failures:
        print(f"FAILED: {', '.join(run.failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
