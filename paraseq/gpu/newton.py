"""Fused Newton for the diagonal-recurrence GRU and LSTM: the driver (iteration, stopping rule,
failure handling, dtypes) and the autograd Function (the implicit adjoint).

Shape letters: B batch, T time, H hidden size, K gates (GRU 3, LSTM 4).

Each Newton iteration is ONE kernel launch over a (batch row, channel block) grid (see
``_kernels``): the cell at the current iterate, the Jacobian (diagonal, or 2 x 2 blocks for
the LSTM's (h_i, c_i)), the scan in log depth within tiles of time with the state carried
from tile to tile, and the residual of the new iterate, max_t |h'_t - f(h'_{t-1})| / (1 + |f|)
(``paraseq.solve``'s scaled residual, over h and c for the LSTM). The backward pass is one
more launch: the adjoint scan lambda_t = g_t + J_{t+1}^T lambda_{t+1} fused with the gradients
of gi, h0 (c0), weight_hh and bias_hh. ``backend="torch"`` runs the pure-torch twin
(``twin``) of the same iteration instead: a handful of tensor ops and a pure-torch parallel
scan, for CUDA machines without triton.

Iterations start from h = 0 (c = 0), DEER's first guess. Stopping (``tol`` mode, the default):
after each iteration the residual is read on the host; the solve stops when it is <= target,
or, above ``tol``, after ``PATIENCE`` iterations without halving it, or at once when it
is not finite (the cells are bounded: only nan or inf inputs do that), or at ``max_iter``
(default min(T, 50): T iterations always reach the exact solution, since the initial state
propagates at least one step per iteration). Converged means residual <= ``tol``; otherwise
``on_failure``: "fallback" finishes with the sequential loop (the twin's cell, in torch ops)
from the first step above tol, "raise" raises ``paraseq.ConvergenceError``, "warn" warns and
returns the last iterate.

Fixed-iteration mode (``iterations=K``): exactly K iterations with no host synchronisation in
between (ParaRNN's and pararnn-torch's way of training: K is part of the model), then one read
of the residual the K-th iterate reached, reported in ``SolveInfo.residual`` with
``converged = residual <= tol``; ``on_failure`` does not apply (the iterate is returned as it
is). The gradient is the implicit adjoint at the iterate returned: exact when that iterate is
the solution to tolerance, and otherwise the adjoint of the converged model linearised at
the reached trajectory (what ParaRNN's backward computes), not the derivative of the K
unrolled iterations.

Precision: float32 and float64 run in their own dtype. bfloat16 and float16 inputs (gi, h0
and the weights) are read in their dtype and everything else is float32: the iterate, the
Jacobians, the scans and their carries, the adjoint and the weight-gradient sums; the states
are returned in the input dtype. Their default tolerance is ``LOW_PRECISION_TOL`` (about a
quarter of the input's unit roundoff: bfloat16 1e-3, float16 1.2e-4), so that what the solve
leaves is below the rounding of the returned states; a caller's tol is used as given.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..result import ConvergenceError, SolveInfo
from ..scan import gpu as scan_gpu
from . import twin

__all__ = ["BACKENDS", "CELLS", "DEFAULT_TOL", "LOW_PRECISION_TOL", "PATIENCE", "backend_for",
           "diag_newton"]

CELLS = ("gru", "lstm")
"""The cells with fused kernels: the diagonal-recurrence GRU and LSTM (``paraseq.nn.DiagGRU``,
``DiagLSTM``, ``paraseq.cells.DiagGRUCell``, ``DiagLSTMCell``)."""

BACKENDS = ("auto", "triton", "torch")

DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
"""The default residual tolerance for float inputs (``paraseq.solve``'s)."""

LOW_PRECISION_TOL = {torch.bfloat16: 2.0 ** -10, torch.float16: 2.0 ** -13}
"""The default tolerance for bfloat16/float16 inputs: a quarter of their unit roundoff (the
states are solved in float32, so a residual far below the inputs' precision costs at most one
more Newton iteration)."""

DEFAULT_MAX_ITER = 50
PATIENCE = 8
SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BLOCK_T = 64  # time steps per tile
BLOCK_D = 32  # channels per program (at most; fewer for a smaller H)
NUM_WARPS = 4
"""The kernels' launch shape: module constants, untuned (no GPU has run them yet), for
``benchmarks/gpu.py`` to sweep."""

_kernels = None

BROKEN: str | None = None
"""Why the Triton kernels failed to compile on this machine's GPU (the first error's first
line), or None. Once set, "auto" runs the twin there (with one RuntimeWarning saying why) and
``backend="triton"`` is an error naming the reason."""

_LAUNCHED: set[str] = set()  # kernels that have compiled and run in this process


def _kern():
    global _kernels
    if _kernels is None:
        import importlib

        _kernels = importlib.import_module("._kernels", __package__)
    return _kernels


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def default_tol(dtype: torch.dtype) -> float:
    return LOW_PRECISION_TOL.get(dtype, DEFAULT_TOL.get(dtype, 1e-5))


def backend_for(device: torch.device, backend: str = "auto") -> str:
    """"triton" where the kernels run on ``device`` (a GPU with triton installed, or the CPU
    under ``TRITON_INTERPRET=1``), else "torch" (the twin); a named backend is checked."""
    if backend not in BACKENDS:
        raise ValueError(f"diag_newton: backend must be one of "
                         f"{', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    ok = scan_gpu.triton_available(device) and (BROKEN is None or device.type == "cpu")
    if backend == "triton" and not ok:
        why = (f"triton is not installed ({scan_gpu.INSTALL_HINT})" if not scan_gpu.AVAILABLE
               else f"its kernels failed to compile here ({BROKEN})" if BROKEN is not None
               else "CPU tensors need triton's interpreter (TRITON_INTERPRET=1 before triton "
               "is imported)")
        raise ValueError(f"diag_newton: backend='triton' cannot run on {device}: {why}; or use "
                         f"backend='auto' (the pure-torch twin where triton cannot run)")
    if backend == "auto":
        return "triton" if ok else "torch"
    return backend


def _compile_failure(err: BaseException, kernel: str) -> bool:
    """Whether err is a kernel that never compiled (a first launch failing in triton's
    compiler), as opposed to a failure of the computation (out of memory, a CUDA error)."""
    if kernel in _LAUNCHED or isinstance(err, torch.OutOfMemoryError):
        return False
    mod = type(err).__module__ or ""
    return mod.startswith("triton") or (isinstance(err, RuntimeError)
                                        and "cuda" not in str(err).lower())


def _launch(kernel: str, grid, *args, **kw) -> bool:
    """Launches a kernel of ``_kernels``; False (and ``BROKEN`` set, one warning) where it
    fails to compile on a GPU, so that the caller runs the twin instead."""
    global BROKEN
    try:
        getattr(_kern(), kernel)[grid](*args, num_warps=NUM_WARPS, **kw)
    except Exception as err:
        if scan_gpu.interpreted() or not _compile_failure(err, kernel):
            raise
        BROKEN = f"{kernel}: {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
        warnings.warn(f"paraseq.gpu: the fused Newton kernel failed to compile ({BROKEN}); "
                      f"running its pure-torch twin instead", RuntimeWarning, stacklevel=3)
        return False
    _LAUNCHED.add(kernel)
    return True


# ----------------------------------------------------------------------------- one iteration


def _grid(B: int, H: int) -> tuple[tuple[int, int], int]:
    bd = min(BLOCK_D, max(1, 1 << (H - 1).bit_length()))
    return (B, -(-H // bd)), bd


class _Problem:
    """One solve's tensors in the working dtype and the step function of its backend."""

    def __init__(self, kind: str, gi: Tensor, h0: Tensor, c0: Tensor | None, w: Tensor,
                 b: Tensor, backend: str):
        self.kind, self.backend = kind, backend
        self.gi = gi if gi.stride(-1) == 1 else gi.contiguous()  # (B, T, K H), any (b, t) strides
        wd = work_dtype(gi.dtype)
        self.wd = wd
        self.h0 = h0.to(wd).contiguous()  # (B, H)
        self.c0 = None if c0 is None else c0.to(wd).contiguous()
        self.w = w.detach().to(wd).contiguous()  # (K H,)
        self.b = b.detach().to(wd).contiguous()
        B, T, _ = gi.shape
        self.B, self.T, self.H = B, T, h0.shape[-1]

    def zeros(self) -> Tensor:
        return self.h0.new_zeros(self.B, self.T, self.H)

    def step(self, h: Tensor, c: Tensor | None, tol: float):
        """One iteration from (h, c): (h', c', the residual's max and the first step above
        tol, each a tensor (per program for the kernels) whose max / min the caller reads only
        when it needs it: no host synchronisation here)."""
        if self.backend == "triton":
            out = self._kernel_step(h, c, tol)
            if out is not None:
                return out
            self.backend = "torch"
        if self.kind == "gru":
            nh, res = twin.gru_iteration(self.gi, self.w, self.b, self.h0, h)
            nc = None
        else:
            nh, nc, res = twin.lstm_iteration(self.gi, self.w, self.b, self.h0, self.c0, h, c)
        bad = ~(res <= tol).all(-1).all(0)  # (T,)
        idx = torch.arange(self.T, device=res.device)
        first = torch.where(bad, idx, self.T).min()
        return nh, nc, res.amax(), first

    def _kernel_step(self, h: Tensor, c: Tensor | None, tol: float):
        grid, bd = _grid(self.B, self.H)
        nprog = grid[0] * grid[1]
        rmax = self.h0.new_empty(nprog)
        first = torch.empty(nprog, dtype=torch.int32, device=self.h0.device)
        nh = torch.empty_like(h)
        sb, st = self.gi.stride(0), self.gi.stride(1)
        if self.kind == "gru":
            nc = None
            ok = _launch("gru_newton_kernel", grid, self.gi, sb, st, self.w, self.b, self.h0, h,
                         nh, rmax, first, self.T, self.H, float(tol), BLOCK_T=BLOCK_T,
                         BLOCK_D=bd)
        else:
            nc = torch.empty_like(c)
            ok = _launch("lstm_newton_kernel", grid, self.gi, sb, st, self.w, self.b, self.h0,
                         self.c0, h, c, nh, nc, rmax, first, self.T, self.H, float(tol),
                         BLOCK_T=BLOCK_T, BLOCK_D=bd)
        return (nh, nc, rmax, first) if ok else None  # per program: reduced when read

    def adjoint(self, hs: Tensor, cs: Tensor | None, gh: Tensor, gc: Tensor | None):
        """(dgi (B, T, K H), dh0, dc0 or None, dw, db), working dtype."""
        if self.backend == "triton":
            out = self._kernel_adjoint(hs, cs, gh, gc)
            if out is not None:
                return out
        if self.kind == "gru":
            dgi, dh0, dw, db = twin.gru_adjoint(self.gi, self.w, self.b, self.h0, hs, gh)
            return dgi, dh0, None, dw, db
        return twin.lstm_adjoint(self.gi, self.w, self.b, self.h0, self.c0, hs, cs, gh, gc)

    def _kernel_adjoint(self, hs, cs, gh, gc):
        grid, bd = _grid(self.B, self.H)
        KH = self.w.shape[0]
        dgi = self.h0.new_empty(self.B, self.T, KH)
        dh0 = torch.empty_like(self.h0)
        dw = self.h0.new_empty(self.B, KH)
        db = self.h0.new_empty(self.B, KH)
        sb, st = self.gi.stride(0), self.gi.stride(1)
        gh = gh.contiguous()
        if self.kind == "gru":
            ok = _launch("gru_adjoint_kernel", grid, self.gi, sb, st, self.w, self.b, self.h0,
                         hs, gh, dgi, dh0, dw, db, self.T, self.H, BLOCK_T=BLOCK_T, BLOCK_D=bd)
            return (dgi, dh0, None, dw.sum(0), db.sum(0)) if ok else None
        dc0 = torch.empty_like(self.c0)
        ok = _launch("lstm_adjoint_kernel", grid, self.gi, sb, st, self.w, self.b, self.h0,
                     self.c0, hs, cs, gh, gc.contiguous(), dgi, dh0, dc0, dw, db, self.T, self.H,
                     BLOCK_T=BLOCK_T, BLOCK_D=bd)
        return (dgi, dh0, dc0, dw.sum(0), db.sum(0)) if ok else None

    def loop(self, start: int, hs: Tensor | None, cs: Tensor | None):
        """The sequential loop from step ``start`` (the state before it from hs, cs)."""
        h = self.h0 if start == 0 else hs[:, start - 1]
        gi = self.gi[:, start:]
        if self.kind == "gru":
            return twin.gru_loop(gi, self.w, self.b, h), None
        c = self.c0 if start == 0 else cs[:, start - 1]
        return twin.lstm_loop(gi, self.w, self.b, h, c)


# ----------------------------------------------------------------------------- the solve


def _iterate(P: _Problem, *, tol: float, target: float, max_iter: int, iterations: int | None):
    h = P.zeros()
    c = P.zeros() if P.kind == "lstm" else None
    if P.T == 0 or P.B == 0:  # nothing to solve
        return h, c, 0, [0.0], 0
    if iterations is not None:  # fixed: no host synchronisation until the end
        first = torch.zeros((), dtype=torch.int64)
        r = torch.full((), math.inf)
        for _ in range(iterations):
            h, c, r, first = P.step(h, c, tol)
        res = float(r.max()) if iterations else math.inf
        return h, c, iterations, [res], int(first.min()) if iterations else 0
    residuals: list[float] = []
    best, since, k, first = math.inf, 0, 0, 0
    while k < max_iter:
        h, c, r_t, first_t = P.step(h, c, tol)
        k += 1
        r = float(r_t.max())
        residuals.append(r)
        if r <= target or not math.isfinite(r):
            break  # the cells are bounded, so a nan or inf residual means such inputs: no cure
        if r <= tol:  # refining towards target: stop once an iteration no longer halves it
            if len(residuals) >= 2 and not r <= 0.5 * residuals[-2]:
                break
        elif r < 0.5 * best:
            best, since = r, 0
        else:
            since += 1
            if since >= PATIENCE:
                break
    if residuals[-1] > tol:
        first = int(first_t.min())
    return h, c, k, residuals, first


class _DiagNewton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, kind, backend, gi, h0, c0, w, b, opts):
        tol, target, max_iter, iterations, on_failure, out = opts
        P = _Problem(kind, gi, h0, c0, w, b, backend)
        with torch.no_grad():
            h, c, k, residuals, first = _iterate(P, tol=tol, target=target, max_iter=max_iter,
                                                 iterations=iterations)
        r = residuals[-1] if residuals else 0.0
        where = "triton kernel" if P.backend == "triton" else "torch twin"
        info = SolveInfo(method="newton", iterations=k, converged=r <= tol, residual=r,
                         jacobian=f"analytic (fused, {where})", tol=tol, residuals=residuals)
        if P.T and P.B and not info.converged and iterations is None:
            name = f"diag_newton ({kind})"
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
                    rh, rc = P.loop(first, h, c)
                    h[:, first:] = rh
                    if c is not None:
                        c[:, first:] = rc
                info.fell_back, info.fallback_from = True, first
        out["info"] = info
        ctx.P = P
        ctx.in_dtypes = (gi.dtype, h0.dtype, None if c0 is None else c0.dtype, w.dtype, b.dtype)
        ctx.save_for_backward(h, c)
        oh = h.to(gi.dtype)
        if c is None:
            return oh
        return oh, c.to(gi.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh, gc=None):
        P = ctx.P
        h, c = ctx.saved_tensors
        if gh is None:
            gh = torch.zeros_like(h)
        if c is not None and gc is None:
            gc = torch.zeros_like(c)
        gd, hd, cd, wd, bd = ctx.in_dtypes
        if P.T == 0 or P.B == 0:  # nothing was solved: zero gradients
            return (None, None, torch.zeros_like(P.gi, dtype=gd), torch.zeros_like(P.h0, dtype=hd),
                    None if P.c0 is None else torch.zeros_like(P.c0, dtype=cd),
                    torch.zeros_like(P.w, dtype=wd), torch.zeros_like(P.b, dtype=bd), None)
        dgi, dh0, dc0, dw, db = P.adjoint(h, c, gh.to(P.wd), None if c is None else gc.to(P.wd))
        return (None, None, dgi.to(gd), dh0.to(hd), None if dc0 is None else dc0.to(cd),
                dw.to(wd), db.to(bd), None)


def _check(kind, gi, h0, c0, weight_hh, bias_hh, on_failure, iterations, max_iter, tol):
    if kind not in CELLS:
        raise ValueError(f"diag_newton: cell must be one of {', '.join(map(repr, CELLS))}; "
                         f"got {kind!r}")
    for name, t in (("gi", gi), ("h0", h0), ("weight_hh", weight_hh)):
        if not isinstance(t, Tensor):
            raise TypeError(f"diag_newton: {name} must be a torch.Tensor; got "
                            f"{type(t).__name__}")
    if gi.dtype not in SUPPORTED:
        raise TypeError(f"diag_newton: gi must be float32, float64, bfloat16 or float16; got "
                        f"{gi.dtype}")
    K = 3 if kind == "gru" else 4
    if gi.dim() != 3:
        raise ValueError(f"diag_newton: gi must be (B, T, {K} H); got {tuple(gi.shape)}")
    B, KH = gi.shape[0], gi.shape[2]
    if KH % K:
        raise ValueError(f"diag_newton: gi's last dim must be {K} H for the {kind}; got {KH}")
    H = KH // K
    want = {"h0": (h0, (B, H)), "weight_hh": (weight_hh, (KH,)), "bias_hh": (bias_hh, (KH,))}
    if kind == "lstm":
        if c0 is None:
            raise ValueError("diag_newton: the lstm needs c0 (B, H)")
        want["c0"] = (c0, (B, H))
    elif c0 is not None:
        raise ValueError("diag_newton: c0 is the lstm's initial cell state; the gru has none")
    _check_shared("diag_newton", gi, want, {}, on_failure, iterations, max_iter, tol)


def _check_shared(fn: str, gi: Tensor, want: dict, others: dict, on_failure: str,
                  iterations: int | None, max_iter: int | None, tol: float | None) -> None:
    """The checks ``diag_newton`` and ``paraseq.gpu.dense_newton`` share: every tensor in
    ``want`` (name -> (tensor or None, expected shape)) has its shape, these and ``others``
    (name -> tensor) are on gi's device, and the options are valid. ``fn`` names the caller."""
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {shape} for gi "
                             f"{tuple(gi.shape)}; got {tuple(t.shape)}")
    tensors = [(name, t) for name, (t, _) in want.items()] + list(others.items())
    for name, t in tensors:
        if t is not None and t.device != gi.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but gi is on {gi.device}; "
                             f"move them to one device")
    if on_failure not in ("fallback", "raise", "warn"):
        raise ValueError(f"{fn}: on_failure must be 'fallback', 'raise' or 'warn'; got "
                         f"{on_failure!r}")
    for name, v in (("iterations", iterations), ("max_iter", max_iter)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{fn}: {name} must be a positive int or None; got {v!r}")
    if iterations is not None and max_iter is not None:
        raise ValueError(f"{fn}: give iterations (a fixed count) or max_iter (a cap), "
                         "not both")
    if tol is not None and not (isinstance(tol, (int, float)) and math.isfinite(tol)
                                and tol > 0):
        raise ValueError(f"{fn}: tol must be a positive finite number or None; got "
                         f"{tol!r}")

def diag_newton(cell: str, gi: Tensor, h0: Tensor, weight_hh: Tensor, bias_hh: Tensor | None,
                c0: Tensor | None = None, *, tol: float | None = None,
                target: float | None = None, max_iter: int | None = None,
                iterations: int | None = None, on_failure: str = "fallback",
                backend: str = "auto"):
    """The states of the diagonal GRU (``cell="gru"``) or LSTM (``"lstm"``) over the input
    pre-activations gi = W_ih x + b_ih (B, T, K H), by fused Newton: (states, SolveInfo), the
    states (B, T, H) (the LSTM: the tuple (h, c)) in gi's dtype, differentiable in gi, h0, c0,
    weight_hh and bias_hh by the implicit adjoint (one fused reverse pass).

    tol: the accepted residual (default ``default_tol(gi.dtype)``); target: where the
    iteration aims (<= tol; default tol); max_iter: a cap (default min(T, 50));
    iterations: a fixed count instead (no stopping test, the residual reached is reported);
    on_failure: "fallback", "raise", "warn"; backend: "auto" (the Triton kernels where they
    run, else the pure-torch twin), "triton", "torch". ``info.jacobian`` names what ran."""
    _check(cell, gi, h0, c0, weight_hh, bias_hh, on_failure, iterations, max_iter, tol)
    name = backend_for(gi.device, backend)
    tol = float(tol) if tol is not None else default_tol(gi.dtype)
    target = tol if target is None else min(float(target), tol)
    T = gi.shape[1]
    cap = max(1, min(T, max_iter if max_iter is not None else DEFAULT_MAX_ITER))
    b = bias_hh if bias_hh is not None else weight_hh.new_zeros(weight_hh.shape)
    out: dict = {}
    states = _DiagNewton.apply(cell, name, gi, h0, c0, weight_hh, b,
                               (tol, target, cap, iterations, on_failure, out))
    return states, out["info"]
