"""Fused Newton for the dense built-in cells (torch.nn's GRU, Elman tanh/relu and LSTM): the
driver (iteration, stopping rule, failure handling, dtypes) and the autograd Function (the
implicit adjoint). The diagonal cells' counterpart is ``paraseq.gpu.newton``.

Shape letters: B batch, T time, H hidden size, K gates (Elman 1, GRU 3, LSTM 4), D state size
(H; the LSTM 2 H: its state is the concatenation [h, c], and its Jacobian the dense 2 H x 2 H
matrix over it, scanned as one D x D system).

One Newton iteration from the iterate x (B, T, D) is three steps, with no host
synchronisation inside (the tol mode reads one scalar after each iteration):

1. G = h W_hh^T over all B T rows: ONE GEMM (torch.matmul: cuBLAS on a GPU), h the iterate's
   first H features;
2. ONE Triton kernel (``_dense_kernels.dense_cell_kernel``, mode 0) that reads gi, G and x,
   evaluates the cell at every step (gates from gi_t + G_{t-1} + b_hh, state x_{t-1}), forms
   the dense Jacobian J_t = sum_k diag(R_k) W_k (+ the diagonal parts: the GRU's diag(z), the
   LSTM's diag(s f) and diag(f) blocks) and the scan's right-hand side f_t - J_t x_{t-1}, and
   the residual of x itself, max_t |x_t - f_t| / (1 + |f_t|) (``paraseq.solve``'s scaled
   residual) with the first step above tol;
3. ``paraseq.scan.gpu.dense_triton_scan`` over (J, rhs) from x0 (the chunked Triton dense
   scan, D <= ``DENSE_MAX_D`` = 64: 1 launch up to T = 64, 3 up to 4096, 5 up to 262144), then
   the new iterate cleaned (nan -> 0, clip to +-1e8, two elementwise ops, as paraseq.solve).

The residual of the new iterate is not a pass of its own: the kernel of step 2 forms it from
the same evaluation of the cell it needs for the next linearisation (a residual needs
f(x_{t-1}), i.e. G of the new iterate, exactly what the next iteration computes), so an
iteration costs one GEMM, one kernel and one scan, and the solve's last evaluation forms one
Jacobian it does not use (skipped at the iteration cap and in fixed-iteration mode).
``benchmarks/gpu.py`` counts what one iteration issues (its "op count" rows).

The backward pass at the solution x*: G = h* W_hh^T (a GEMM), the kernel in mode 2 writes
J_t^T and J_t^T g_t, the reverse dense scan (``dense_triton_scan(reverse=True)``) gives
mu_t = J_t^T lambda_t with lambda_t = g_t + mu_{t+1} the adjoint, the kernel in mode 3 the
gradients of the gate pre-activations (dgi, and dgh one step back), and dweight_hh =
dgh^T h + dgh_0^T h0 and dbias_hh as a GEMM and sums; d x0 = mu_0. ``backend="torch"`` runs
the pure-torch twin (``dense_twin``) of each kernel and ``paraseq.scan``'s pure-torch dense
scan instead: for CUDA machines without triton, and for any D.

Where it runs: states with D <= ``DENSE_MAX_D`` (GRU and Elman H <= 64, LSTM H <= 32: the
dense scan's kernels hold a D x D tile per program). Wider states go to the general path of
``paraseq.solve`` from ``paraseq.nn`` and ``solve_recurrence`` (``routing``), whose
``last_path`` says so; ``dense_newton`` itself runs them on the twin (backend "auto") or
refuses them (backend "triton").

Dense Jacobian, not matrix-free. A matrix-free Newton (the CPU sweeps' way,
``paraseq.cells.newton``) never forms J but cannot scan in parallel: the linear recurrence
x'_t = J_t x'_{t-1} + rhs_t needs the products of the J_t, i.e. the matrices. So the fused
path forms J (B T D^2 numbers, written once and read twice by the chunked scan), which bounds
it to small D; which of this and cuDNN wins at each (B, T, H) is ``benchmarks/gpu.py``'s to
measure (no GPU figures yet).

Conventions as ``paraseq.gpu.newton.diag_newton``: iterations start from x = 0; tol mode stops
at tol/target, after ``PATIENCE`` iterations without halving the residual, at once on a
non-finite residual, or at max_iter (default min(T, 50)); on_failure "fallback" finishes with
the sequential loop (the twin's cell in torch ops) from the first step above tol, "raise"
raises ``paraseq.ConvergenceError``, "warn" warns; ``iterations=K`` runs exactly K iterations
without host synchronisation and reports the residual reached. float32 and float64 run in
their dtype; bfloat16/float16 inputs are read in their dtype and everything else (G, J, the
scans, the adjoint, the weight gradients) is float32, with the default tolerance
``LOW_PRECISION_TOL``; the states are returned in the input dtype.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..result import ConvergenceError, SolveInfo
from ..scan import gpu as scan_gpu
from ..scan.parallel import parallel_scan
from . import dense_twin as twin
from .newton import (
    BACKENDS,
    DEFAULT_MAX_ITER,
    PATIENCE,
    SUPPORTED,
    _check_shared,
    _compile_failure,
    default_tol,
    work_dtype,
)

__all__ = ["CELLS", "STEPS", "backend_for", "dense_flat", "dense_newton", "fits"]

CELLS = twin.CELLS
"""The dense cells with a fused kernel: torch.nn's GRU, Elman (tanh, relu) and LSTM."""

_CODE = {"gru": 0, "rnn_tanh": 1, "rnn_relu": 2, "lstm": 3}

STEPS = 16
"""Time steps per program of the cell kernel (untuned: no GPU has run it yet)."""

MAX_GRID_ROWS = 65535
"""CUDA's limit on a grid's second axis, the batch rows': a larger batch is launched in
slices."""


def warps(block_d: int) -> int:
    """Warps per program of the cell kernel for a BD x BD tile. Untimed: read off ptxas (sm_90,
    float32; ``tests/test_gpu_dense.py::test_kernel_compiles_for_the_gpu`` holds it): no
    register spills up to BD = 32 (the LSTM's forward mode, four weight tiles, up to 16; at
    32 it sits at the 255-register limit and spills a little); BD = 64 holds three or four
    64 x 64 weight tiles and J per program and spills at any count."""
    return 1 if block_d <= 8 else 4 if block_d <= 16 else 8 if block_d <= 32 else 16


_kernels = None

BROKEN: str | None = None
"""Why the dense kernel failed to compile on this machine's GPU, or None (as
``paraseq.gpu.newton.BROKEN``, kept apart so that the diagonal cells' kernels stay in use)."""

_LAUNCHED: set[str] = set()


def _kern():
    global _kernels
    if _kernels is None:
        import importlib

        _kernels = importlib.import_module("._dense_kernels", __package__)
    return _kernels


def fits(cell: str, H: int) -> bool:
    """Whether the kernels serve ``cell`` with hidden size H (state D <= DENSE_MAX_D)."""
    return twin.state_size(cell, H) <= scan_gpu.DENSE_MAX_D


def backend_for(device: torch.device, backend: str = "auto", D: int = 1) -> str:
    """"triton" where the kernels run on ``device`` for a state of size D (a GPU with triton,
    or the CPU under ``TRITON_INTERPRET=1``; D <= DENSE_MAX_D), else "torch" (the twin); a
    named backend is checked."""
    if backend not in BACKENDS:
        raise ValueError(f"dense_newton: backend must be one of "
                         f"{', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    runs = scan_gpu.triton_available(device) and (BROKEN is None or device.type == "cpu")
    ok = runs and D <= scan_gpu.DENSE_MAX_D
    if backend == "triton" and not ok:
        why = (f"triton is not installed ({scan_gpu.INSTALL_HINT})" if not scan_gpu.AVAILABLE
               else f"its kernel failed to compile here ({BROKEN})" if BROKEN is not None
               and device.type != "cpu"
               else "CPU tensors need triton's interpreter (TRITON_INTERPRET=1 before triton "
               "is imported)" if not runs
               else f"the state size D = {D} is above the kernels' {scan_gpu.DENSE_MAX_D}")
        raise ValueError(f"dense_newton: backend='triton' cannot run on {device}: {why}; or "
                         f"use backend='auto' (the pure-torch twin where triton cannot run)")
    if backend == "auto":
        return "triton" if ok else "torch"
    return backend


def _launch(grid, *args, **kw) -> bool:
    """Launches the cell kernel over grid (step blocks, B), in slices of at most
    ``MAX_GRID_ROWS`` rows (the kernel's n0); False (and ``BROKEN`` set, one warning) where it
    fails to compile on a GPU, so that the caller runs the twin instead."""
    global BROKEN
    name = f"dense_cell_kernel/{kw['CELL']}/{kw['MODE']}"
    blocks, B = grid
    try:
        for n0 in range(0, B, MAX_GRID_ROWS):
            _kern().dense_cell_kernel[(blocks, min(MAX_GRID_ROWS, B - n0))](
                *args[:18], n0, *args[18:], num_warps=warps(kw["BLOCK_D"]), **kw)
    except Exception as err:
        if scan_gpu.interpreted() or name in _LAUNCHED or not _compile_failure(err, name):
            raise  # (a kernel that has run once compiled: its failure is the computation's)
        BROKEN = f"{name}: {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
        warnings.warn(f"paraseq.gpu: the dense fused Newton kernel failed to compile ({BROKEN}); "
                      f"running its pure-torch twin instead", RuntimeWarning, stacklevel=3)
        return False
    _LAUNCHED.add(name)
    return True


# ----------------------------------------------------------------------------- one problem


class _Problem:
    """One solve's tensors in the working dtype and its backend's steps."""

    def __init__(self, cell: str, gi: Tensor, x0: Tensor, w: Tensor, b: Tensor, backend: str):
        self.cell, self.backend = cell, backend
        self.gi = gi if gi.stride(-1) == 1 else gi.contiguous()  # (B, T, K H), any (b, t) strides
        wd = work_dtype(gi.dtype)
        self.wd = wd
        self.x0 = x0.detach().to(wd).contiguous()  # (B, D)
        self.w = w.detach().to(wd).contiguous()  # (K H, H)
        self.b = b.detach().to(wd).contiguous()  # (K H,)
        self.B, self.T, self.KH = gi.shape
        self.H, self.D = w.shape[1], x0.shape[1]
        self.G0 = twin.project(self.x0, self.w)  # (B, K H), h0 W_hh^T
        self._bufs: tuple[Tensor, Tensor] | None = None

    def zeros(self) -> Tensor:
        return self.x0.new_zeros(self.B, self.T, self.D)

    def project(self, x: Tensor) -> Tensor:
        return twin.project(x, self.w)  # (B, T, K H): one GEMM

    def _args(self, G: Tensor, x: Tensor):
        return (self.gi, self.gi.stride(0), self.gi.stride(1), G, self.G0, self.w, self.b, x,
                self.x0)

    def _consts(self, mode: int):
        bd = max(1, 1 << (self.D - 1).bit_length())
        grid = (-(-self.T // STEPS), self.B)  # (step blocks, rows): _launch slices the rows
        return grid, dict(CELL=_CODE[self.cell], K=twin.GATES[self.cell], MODE=mode,
                          STEPS=STEPS, BLOCK_D=bd)

    def linearise(self, x: Tensor, G: Tensor, tol: float, want_j: bool):
        """At the iterate x, G = project(x): (J, rhs (None without want_j), the residual's max
        and the first step above tol as tensors, reduced when read: no host sync here)."""
        if self.backend == "triton":
            out = self._kernel_linearise(x, G, tol, want_j)
            if out is not None:
                return out
            self.backend = "torch"
        J, rhs, res = twin.linearise(self.cell, self.gi, G, self.G0, self.w, self.b, x,
                                     self.x0, want_j)
        bad = ~(res <= tol).all(-1).all(0)  # (T,)
        idx = torch.arange(self.T, device=res.device)
        return J, rhs, res.amax(), torch.where(bad, idx, self.T).min()

    def _kernel_linearise(self, x, G, tol, want_j):
        grid, kw = self._consts(0 if want_j else 1)
        nprog = grid[0] * grid[1]
        rmax = self.x0.new_empty(nprog)
        first = torch.empty(nprog, dtype=torch.int32, device=x.device)
        if want_j:
            if self._bufs is None:  # reused: the scan has read them before they are rewritten
                self._bufs = (self.x0.new_empty(self.B, self.T, self.D, self.D),
                              self.x0.new_empty(self.B, self.T, self.D))
            J, rhs = self._bufs
        else:
            J, rhs = x, x  # placeholders, not touched
        ok = _launch(grid, *self._args(G, x), x, x, J, rhs, rmax, first, x, x, x,
                     self.T, self.H, self.D, float(tol), **kw)
        if not ok:
            return None
        return (J, rhs, rmax, first) if want_j else (None, None, rmax, first)

    def scan(self, J: Tensor, rhs: Tensor) -> Tensor:
        if self.backend == "triton":
            return twin.sanitize(scan_gpu.dense_triton_scan(J, rhs, self.x0, reverse=False))
        return twin.scan(J, rhs, self.x0)

    def adjoint(self, x: Tensor, g: Tensor):
        """The gradients at the solution x (B, T, D) of sum(g * x): (dgi (B, T, K H), dx0
        (B, D), dweight_hh (K H, H), dbias_hh (K H,)), working dtype."""
        G = self.project(x)
        out = self._kernel_adjoint(x, G, g) if self.backend == "triton" else None
        if out is None:
            args = (self.cell, self.gi, G, self.G0, self.w, self.b, x, self.x0, g)
            a, v = twin.adjoint_scan_terms(*args)
            mu = parallel_scan(a, v, None, dense=True, reverse=True)  # (B, T, D)
            dgi, dgh_s, dgh0 = twin.gate_grads(*args, mu)
        else:
            dgi, dgh_s, dgh0, mu = out
        dw, db = twin.weight_grads(dgh_s, dgh0, x, self.x0, self.H)
        return dgi, mu[:, 0], dw, db

    def _kernel_adjoint(self, x, G, g):
        grid, kw = self._consts(2)
        a = self.x0.new_empty(self.B, self.T, self.D, self.D)  # J^T
        v = self.x0.new_empty(self.B, self.T, self.D)  # J^T g
        dummy = self.x0.new_empty(1)
        nil = torch.empty(1, dtype=torch.int32, device=x.device)
        if not _launch(grid, *self._args(G, x), g, x, a, v, dummy, nil, x, x, x,
                       self.T, self.H, self.D, 0.0, **kw):
            return None
        mu = scan_gpu.dense_triton_scan(a, v, None, reverse=True)  # (B, T, D)
        del a, v
        dgi = self.x0.new_empty(self.B, self.T, self.KH)
        dgh_s = self.x0.new_empty(self.B, self.T, self.KH)
        dgh0 = self.x0.new_empty(self.B, self.KH)
        kw["MODE"] = 3
        if not _launch(grid, *self._args(G, x), g, mu, x, x, dummy, nil, dgi, dgh_s, dgh0,
                       self.T, self.H, self.D, 0.0, **kw):
            return None
        return dgi, dgh_s, dgh0, mu

    def loop(self, start: int, x: Tensor) -> Tensor:
        """The sequential loop from step ``start`` (the state before it from x)."""
        s0 = self.x0 if start == 0 else x[:, start - 1]
        return twin.loop(self.cell, self.gi[:, start:], self.w, self.b, s0)


# ----------------------------------------------------------------------------- the solve


def _iterate(P: _Problem, *, tol: float, target: float, max_iter: int,
             iterations: int | None):
    x = P.zeros()
    if P.T == 0 or P.B == 0:  # nothing to solve
        return x, 0, [0.0], 0
    G = x.new_zeros(P.B, P.T, P.KH)  # the projection of the zero start
    J, rhs, _, _ = P.linearise(x, G, tol, True)
    if iterations is not None:  # fixed: no host synchronisation until the end
        for k in range(iterations):
            x = P.scan(J, rhs)
            J, rhs, r, first = P.linearise(x, P.project(x), tol, k < iterations - 1)
        return x, iterations, [float(r.max())], int(first.min())
    residuals: list[float] = []
    best, since, k = math.inf, 0, 0
    while k < max_iter:
        x = P.scan(J, rhs)
        k += 1
        J, rhs, r_t, first_t = P.linearise(x, P.project(x), tol, k < max_iter)
        r = float(r_t.max())
        residuals.append(r)
        if r <= target or not math.isfinite(r):
            break  # the cells are bounded (relu: clipped), so a nan or inf means such inputs
        if r <= tol:  # refining towards target: stop once an iteration no longer halves it
            if len(residuals) >= 2 and not r <= 0.5 * residuals[-2]:
                break
        elif r < 0.5 * best:
            best, since = r, 0
        else:
            since += 1
            if since >= PATIENCE:
                break
    first = int(first_t.min()) if residuals[-1] > tol else 0
    return x, k, residuals, first


class _DenseNewton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, cell, backend, gi, x0, w, b, opts):
        tol, target, max_iter, iterations, on_failure, out = opts
        P = _Problem(cell, gi, x0, w, b, backend)
        with torch.no_grad():
            x, k, residuals, first = _iterate(P, tol=tol, target=target, max_iter=max_iter,
                                              iterations=iterations)
        P._bufs = None  # the B T D^2 Jacobians: not held until the backward
        r = residuals[-1] if residuals else 0.0
        where = "triton kernel" if P.backend == "triton" else "torch twin"
        info = SolveInfo(method="newton", iterations=k, converged=r <= tol, residual=r,
                         jacobian=f"analytic (fused dense, {where})", tol=tol,
                         residuals=residuals)
        if P.T and P.B and not info.converged and iterations is None:
            name = f"dense_newton ({cell})"
            if on_failure == "raise":
                raise ConvergenceError(
                    f"{name}: Newton stopped after {k} iterations with residual {r:.3e} > tol "
                    f"{tol:.1e}; use on_failure='fallback' to finish sequentially from the "
                    f"first unconverged step, or raise max_iter", k, r, info)
            if on_failure == "warn":
                warnings.warn(f"{name}: Newton did not converge in {k} iterations (residual "
                              f"{r:.3e} > tol {tol:.1e}); returning the last iterate",
                              RuntimeWarning, stacklevel=4)
            else:
                with torch.no_grad():
                    x[:, first:] = P.loop(first, x)
                info.fell_back, info.fallback_from = True, first
        out["info"] = info
        ctx.P = P
        ctx.in_dtypes = (gi.dtype, x0.dtype, w.dtype, b.dtype)
        ctx.save_for_backward(x)
        return x.to(gi.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gx):
        P = ctx.P
        (x,) = ctx.saved_tensors
        gd, xd, wd, bd = ctx.in_dtypes
        if P.T == 0 or P.B == 0:
            return (None, None, P.gi.new_zeros(P.gi.shape), torch.zeros_like(P.x0, dtype=xd),
                    torch.zeros_like(P.w, dtype=wd), torch.zeros_like(P.b, dtype=bd), None)
        dgi, dx0, dw, db = P.adjoint(x, gx.to(P.wd).contiguous())
        return None, None, dgi.to(gd), dx0.to(xd), dw.to(wd), db.to(bd), None


def _check(cell, gi, h0, c0, weight_hh, bias_hh, on_failure, iterations, max_iter, tol):
    if cell not in CELLS:
        raise ValueError(f"dense_newton: cell must be one of {', '.join(map(repr, CELLS))}; "
                         f"got {cell!r}")
    for name, t in (("gi", gi), ("h0", h0), ("weight_hh", weight_hh)):
        if not isinstance(t, Tensor):
            raise TypeError(f"dense_newton: {name} must be a torch.Tensor; got "
                            f"{type(t).__name__}")
    if gi.dtype not in SUPPORTED:
        raise TypeError(f"dense_newton: gi must be float32, float64, bfloat16 or float16; got "
                        f"{gi.dtype}")
    K = twin.GATES[cell]
    if weight_hh.dim() != 2 or weight_hh.shape[0] != K * weight_hh.shape[1]:
        raise ValueError(f"dense_newton: weight_hh must be ({K} H, H) for the {cell}; got "
                         f"{tuple(weight_hh.shape)}")
    H = weight_hh.shape[1]
    if gi.dim() != 3 or gi.shape[2] != K * H:
        raise ValueError(f"dense_newton: gi must be (B, T, {K * H}) ({K} H for weight_hh "
                         f"{tuple(weight_hh.shape)}); got {tuple(gi.shape)}")
    B = gi.shape[0]
    want = {"h0": (h0, (B, H)), "bias_hh": (bias_hh, (K * H,))}
    if cell == "lstm":
        if c0 is None:
            raise ValueError("dense_newton: the lstm needs c0 (B, H)")
        want["c0"] = (c0, (B, H))
    elif c0 is not None:
        raise ValueError(f"dense_newton: c0 is the lstm's initial cell state; the {cell} has "
                         f"none")
    _check_shared("dense_newton", gi, want, {"weight_hh": weight_hh}, on_failure, iterations,
                  max_iter, tol)

def dense_newton(cell: str, gi: Tensor, h0: Tensor, weight_hh: Tensor, bias_hh: Tensor | None,
                 c0: Tensor | None = None, *, tol: float | None = None,
                 target: float | None = None, max_iter: int | None = None,
                 iterations: int | None = None, on_failure: str = "fallback",
                 backend: str = "auto"):
    """The states of torch.nn's GRU (``cell="gru"``), Elman RNN (``"rnn_tanh"``,
    ``"rnn_relu"``) or LSTM (``"lstm"``) over the input pre-activations gi = W_ih x + b_ih
    (B, T, K H), by fused Newton with the dense Jacobian: (states, SolveInfo), the states
    (B, T, H) (the LSTM: the tuple (h, c)) in gi's dtype, differentiable in gi, h0, c0,
    weight_hh (K H, H) and bias_hh (K H,) by the implicit adjoint (a reverse dense scan).

    tol: the accepted residual (default ``default_tol(gi.dtype)``); target: where the
    iteration aims (<= tol; default tol); max_iter: a cap (default min(T, 50));
    iterations: a fixed count instead (no stopping test, the residual reached is reported);
    on_failure: "fallback", "raise", "warn"; backend: "auto" (the Triton kernel where it
    runs and the state fits, D <= 64, else the pure-torch twin), "triton", "torch".
    ``info.jacobian`` names what ran. See the module docstring for the passes."""
    _check(cell, gi, h0, c0, weight_hh, bias_hh, on_failure, iterations, max_iter, tol)
    H = weight_hh.shape[1]
    x0 = torch.cat([h0, c0.to(h0.dtype)], -1) if cell == "lstm" else h0  # (B, D)
    x, info = _solve(cell, gi, x0, weight_hh, bias_hh, tol, target, max_iter, iterations,
                     on_failure, backend)
    return ((x[..., :H], x[..., H:]) if cell == "lstm" else x), info


def dense_flat(cell: str, gi: Tensor, x0: Tensor, weight_hh: Tensor, bias_hh: Tensor | None, *,
               tol: float | None = None, target: float | None = None,
               max_iter: int | None = None, iterations: int | None = None,
               on_failure: str = "fallback", backend: str = "auto"):
    """``dense_newton`` on the flat state x0 (B, D) ([h0, c0] for the LSTM, D = 2 H, the
    layout of ``solve_recurrence``): (x (B, T, D), SolveInfo)."""
    H = weight_hh.shape[1] if isinstance(weight_hh, Tensor) and weight_hh.dim() == 2 else 0
    lstm = cell == "lstm" and isinstance(x0, Tensor)
    _check(cell, gi, x0[..., :H] if lstm else x0, x0[..., H:] if lstm else None, weight_hh,
           bias_hh, on_failure, iterations, max_iter, tol)
    return _solve(cell, gi, x0, weight_hh, bias_hh, tol, target, max_iter, iterations,
                  on_failure, backend)


def _solve(cell, gi, x0, weight_hh, bias_hh, tol, target, max_iter, iterations, on_failure,
           backend):
    name = backend_for(gi.device, backend, twin.state_size(cell, weight_hh.shape[1]))
    tol = float(tol) if tol is not None else default_tol(gi.dtype)
    target = tol if target is None else min(float(target), tol)
    T = gi.shape[1]
    cap = max(1, min(T, max_iter if max_iter is not None else DEFAULT_MAX_ITER))
    b = bias_hh if bias_hh is not None else weight_hh.new_zeros(weight_hh.shape[0])
    out: dict = {}
    x = _DenseNewton.apply(cell, name, gi, x0, weight_hh, b,
                           (tol, target, cap, iterations, on_failure, out))
    return x, out["info"]
