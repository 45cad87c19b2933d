"""Newton's method for the built-in dense cells (GRU, Elman, LSTM without projection) as one
compiled sweep per iteration (numba), matrix-free.

Shape letters: B batch, T time, H hidden size, K = G H gate pre-activations (GRU G = 3, Elman
G = 1, LSTM G = 4), W the SIMD width (16 float32, 8 float64).

Newton (DEER) on h_t = f(gi_t, h_{t-1}) solves, per iteration, the linear recurrence

    h'_t = f(h_{t-1}) + J_t (h'_{t-1} - h_{t-1}),   J_t = df/dh at the current iterate h,

and the generic loop of ``paraseq.solve`` forms every J_t (a (B, T, H, H) tensor), a right-hand
side and a dense scan, each a pass over memory. For these cells J_t is never needed as a matrix:
with g_t = W_hh h_{t-1} + b_hh (the recurrent pre-activations, kept from the sweep before) and
g'_t = W_hh h'_{t-1} + b_hh, the product J_t delta (delta = h' - h) is elementwise in the gates
and u = g'_t - g_t = W_hh delta. GRU (torch's gates r, z, n):

    J delta = z delta + (1 - z)(1 - n^2)(r u_n + g_n r (1 - r) u_r) + (h - n) z (1 - z) u_z

Elman: J delta = act'(gi + g) u. LSTM, state (h, c), delta = (dh, dc):

    J delta: dc_t = f dc_{t-1} + c_{t-1} f (1 - f) u_f + g i (1 - i) u_i + i (1 - g^2) u_g
             dh_t = o (1 - o) u_o tanh(C) + o (1 - tanh(C)^2) dc_t

with the gates i, f, g, o and C = f c_{t-1} + i g at the current iterate. So one sweep over time
does the whole iteration: the cell at the current iterate, the scan step, the matrix-vector
product g'_{t+1} = W_hh h'_t + b_hh (the only O(H^2) work per step, the same as one step of the
sequential loop), and the residual of the *new* iterate, max_t |h'_t - f(h'_{t-1})| / (1 + |f|),
from the same products. The sweep runs sequentially in time, SIMD across the batch (kernel
"lanes": W rows in lockstep, threads over groups of rows) or, for a few rows, across the units
(kernel "rows"), chosen by ``compiled._plan`` as for the compiled loops. The dense scan of the
numba backend is sequential in time too (parallel over batch rows), and on a CPU a log-depth
scan of H x H products costs H times the work. The kernels, ``_lanes_newton`` and
``_rows_newton``, live in ``compiled.py`` (numba's on-disk cache keys a kernel on its own file
only).

Two savings of the sweep over the generic loop, neither changing what is computed where it
matters:
- converged prefix: rows (per group of W batch rows) before the first step whose residual is
  above the target are left alone by later sweeps (their Newton update would be below tol).
  A sweep starts at that step, with the state before it unchanged. The residuals of skipped
  steps stay valid (neither h_t nor h_{t-1} changes), so convergence is still checked on every
  step.
- no initial pass: the first guess is h = 0 (DEER's), whose g is b_hh, so the first sweep needs
  nothing computed in advance; it also reports the residual of that guess.

First call: the kernel a problem needs compiles on first use (3 to 4 s, once per layout and
dtype, then numba's on-disk cache: about 0.5 s to load in a later process;
``benchmarks/compiled.py --first-call``).

Iterates are sanitised as in ``paraseq.solve`` (nan to 0, clipped to +-1e8); a nan or inf
residual never passes a tolerance.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..result import ConvergenceError, SolveInfo
from . import compiled as C

MAX_T = 1 << 24  # per-lane step counts are kept in the data's dtype: exact below 2^24 (float32)


# ----------------------------------------------------------------------------- the iteration

PATIENCE = 8
"""Iterations without halving the best residual after which a solve above ``accept`` stops
(``paraseq.solve``'s rule)."""


def _iterate(sweep, start, first, pmax, smax, omax, T: int, *, target: float, accept: float,
             max_iter: int, patience: int):
    """Runs ``sweep()`` (one Newton sweep over every group, reading ``start`` and writing
    ``first``, ``pmax``, ``smax``, ``omax`` per group, as the kernels do) until the residual is
    <= target, or (above ``accept``) it has not halved for ``patience`` sweeps, or (at or below
    ``accept``) a sweep fails to halve it, or ``max_iter`` sweeps were made; moves each group's
    start past its converged prefix. -> (sweeps, residuals, the first step of each sweep)."""
    pre = np.zeros(start.shape[0], dtype=np.float64)  # the largest residual of steps left alone
    residuals: list[float] = []
    starts: list[int] = []
    best, since = float("inf"), 0
    k = 0
    while k < max_iter:
        starts.append(int(start.min()))
        sweep()
        k += 1
        if k == 1:
            residuals.append(float(omax.max()))
        swept = start < T
        r = float(np.maximum(pre, np.where(swept, smax, 0.0)).max())
        residuals.append(r)
        pre = np.where(swept, np.maximum(pre, pmax), pre)
        start[:] = np.where(swept, first, start)
        if r <= target:
            break
        if r <= accept:  # refining towards target: stop once a sweep no longer halves it
            if len(residuals) >= 2 and not r <= 0.5 * residuals[-2]:
                break
        else:
            if r < 0.5 * best:
                best, since = r, 0
            else:
                since += 1
            if since >= patience:
                break
    return k, residuals, starts


def _sweeps(cell: int, gi: Tensor, h0: Tensor, c0: Tensor | None, weight_hh: Tensor,
            bias_hh: Tensor, *, target: float, accept: float, max_iter: int,
            patience: int = PATIENCE):
    """Newton sweeps from h = 0 (and c = 0) until the residual is <= target, or (above
    ``accept``) it has not halved for ``patience`` sweeps, or (at or below ``accept``) a sweep
    fails to halve it, or ``max_iter`` sweeps were made. -> (h (B, T, H), c (B, T, H) or None,
    sweeps, residuals, first failing step (T if none) for ``target``, the first step each
    sweep started at)."""
    B, T, K = gi.shape
    H = h0.shape[-1]
    lstm = c0 is not None
    kernel, nt = C._plan(B, T, H, H, K, gi.dtype)
    W = C._width(gi.dtype)
    vw = (0,) * W
    dt = gi.dtype
    lanes = kernel == "lanes"
    # the iterate h (B, T, H) (and c) and g (B, T, K), g_t = W_hh h_{t-1} + b_hh, laid out for
    # the kernel's vectors: batch contiguous (lanes), or units contiguous and padded with
    # zeros to whole vectors per gate (rows)
    g0 = h0 @ weight_hh.t() + bias_hh  # (B, K)
    cv = None
    if lanes:
        hv = C._empty_like_layout(B, T, H, lanes, gi)
        gv = C._empty_like_layout(B, T, K, lanes, gi)
        hv.zero_()
        gv[:, 1:] = bias_hh
        gv[:, 0] = g0
        if lstm:
            cv = C._empty_like_layout(B, T, H, lanes, gi)
            cv.zero_()
    else:
        NQ = K // H
        Hp = -(-H // W) * W
        hbuf = C._alloc((T, B, Hp), dt)
        hbuf.zero_()
        gbuf = C._alloc((T, B, NQ, Hp), dt)
        gbuf.zero_()
        gbuf[1:, :, :, :H] = bias_hh.view(NQ, H)
        gbuf[0, :, :, :H] = g0.view(B, NQ, H)
        hv = hbuf[:, :, :H].transpose(0, 1)  # (B, T, H)
        if lstm:
            cbuf = C._alloc((T, B, Hp), dt)
            cbuf.zero_()
            cv = cbuf[:, :, :H].transpose(0, 1)
    gif, gs = C._flat(gi)
    npdt = np.float32 if dt == torch.float32 else np.float64
    empty = np.zeros(1, dtype=npdt)
    if lanes:
        hbf, hs = C._flat(hv)
        gbf, gss = C._flat(gv)
        cbf, cs = C._flat(cv) if lstm else (empty, (0, 0, 0))
    else:
        hbf, gbf = hbuf.view(-1).numpy(), gbuf.view(-1).numpy()
        hs, gss = (Hp, B * Hp), (NQ * Hp, B * NQ * Hp)  # (b, t) strides
        cbf, cs = (cbuf.view(-1).numpy(), hs) if lstm else (empty, (0, 0))
    h0f = C._vec(h0)
    c0f = C._vec(c0) if lstm else empty
    wts = C._Weights(cell, weight_hh, bias_hh, None, H, H, lanes, W)
    NG = -(-B // W) if lanes else B
    start = np.zeros(NG, dtype=np.int64)
    first = np.zeros(NG, dtype=np.int64)
    pmax, smax, omax = (np.zeros(NG, dtype=npdt) for _ in range(3))
    kern = C._build()[f"_{kernel}_newton"]
    w = wts.w if lanes else wts.wT

    def part(lo, hi):
        kern(cell, gif, gs, h0f, c0f, w, wts.bh, hbf, hs, cbf, cs, gbf, gss, start, first,
             pmax, smax, omax, npdt(target), T, H, lo, hi, vw)

    k, residuals, starts = _iterate(lambda: C._run_split(part, B, W, nt, lanes), start, first,
                                    pmax, smax, omax, T, target=target, accept=accept,
                                    max_iter=max_iter, patience=patience)
    return hv, cv, k, residuals, int(start.min()), starts


DIAG_SPLIT_MIN = 1 << 21
"""The diagonal sweep splits its groups across ``torch.get_num_threads()`` threads when
B T H reaches this (and there are at least 4 groups per thread)."""


def _diag_sweeps(cell: int, gi: Tensor, h0: Tensor, c0: Tensor | None, weight_hh: Tensor,
                 bias_hh: Tensor, *, target: float, accept: float, max_iter: int,
                 quasi: bool = False, patience: int = PATIENCE):
    """``_sweeps`` for the diagonal-recurrence cells (weight_hh (K,)): the elementwise kernel
    ``compiled.diag._diag_newton``, vectors over the batch where gi has it contiguous
    (``input_projection``'s layout at small H), else over the units. ``quasi``: the LSTM's
    diagonal quasi-Newton step instead of exact Newton on its 2 x 2 blocks."""
    B, T, _ = gi.shape
    H = h0.shape[-1]
    lstm = c0 is not None
    W = C._width(gi.dtype)
    vb = gi.stride(0) == 1 and B > 1
    hv = C._empty_like_layout(B, T, H, vb, gi)  # (B, T, H): (H, T, B) or (T, B, H) memory
    hv.zero_()
    cv = None
    if lstm:
        cv = C._empty_like_layout(B, T, H, vb, gi)
        cv.zero_()
    npdt = np.float32 if gi.dtype == torch.float32 else np.float64
    empty = np.zeros(1, dtype=npdt)
    gif, gs = C._flat(gi)
    hbf, hs = C._flat(hv)
    cbf, cs = C._flat(cv) if lstm else (empty, (0, 0, 0))
    h0f = C._vec(h0)
    c0f = C._vec(c0) if lstm else empty
    wd, bh = C._vec(weight_hh), C._vec(bias_hh)
    NG = H * -(-B // W) if vb else B * -(-H // W)
    start = np.zeros(NG, dtype=np.int64)
    first = np.zeros(NG, dtype=np.int64)
    pmax, smax, omax = (np.zeros(NG, dtype=npdt) for _ in range(3))
    kern = C._build()["_diag_newton"]
    vw = (0,) * W
    nt = min(torch.get_num_threads(), NG // 4) if B * T * H >= DIAG_SPLIT_MIN else 1

    def part(lo, hi):
        kern(cell, gif, gs, h0f, c0f, wd, bh, hbf, hs, cbf, cs, start, first, pmax, smax,
             omax, quasi, npdt(target), T, B, H, vb, lo, hi, vw)

    k, residuals, starts = _iterate(lambda: C._run_split(part, NG, 1, max(nt, 1), False),
                                    start, first, pmax, smax, omax, T, target=target,
                                    accept=accept, max_iter=max_iter, patience=patience)
    return hv, cv, k, residuals, int(start.min()), starts


def newton_sequence(cell: int, gi: Tensor, h0: Tensor, weight_hh: Tensor, bias_hh: Tensor, *,
                    target: float, accept: float, max_iter: int, on_failure: str,
                    c0: Tensor | None = None, stats: dict | None = None,
                    method: str = "newton"):
    """The states (B, T, H) by Newton sweeps (the LSTM, given c0: the tuple (h, c)), and the
    solve's ``SolveInfo``; differentiable in gi, h0, c0, weight_hh and bias_hh by the implicit
    adjoint (the compiled loop's reverse sweep at the solution: exact whatever the iterations
    did).

    Converged means residual <= ``accept`` (the sweeps aim at ``target`` <= accept). Otherwise
    ``on_failure``: "fallback" finishes with the compiled sequential loop from the first step
    above ``target`` (``info.fell_back``, ``info.fallback_from``), "raise" raises
    ``paraseq.ConvergenceError``, "warn" warns and returns the last iterate. ``stats``, if
    given, receives "starts": the first step each sweep began at (the converged prefix before
    it was left alone).

    A (K,) weight_hh is the diagonal recurrence of DiagGRU/DiagLSTM: its sweep is elementwise
    (``compiled.diag``). ``method``: "newton", or "quasi_newton" (the same exact Newton for
    the diagonal GRU; the diagonal LSTM's Jacobian cut to its diagonal); the label
    ``SolveInfo.method`` reads."""
    if (cell == C._LSTM) != (c0 is not None):
        raise ValueError("newton_sequence: c0 is the LSTM's initial cell state, needed by the "
                         "LSTM and by no other cell")
    if method not in ("newton", "quasi_newton") or (method == "quasi_newton"
                                                     and weight_hh.dim() != 1):
        raise ValueError(f"newton_sequence: method must be 'newton' (or 'quasi_newton' for a "
                         f"diagonal (K,) weight_hh); got {method!r} with weight_hh of shape "
                         f"{tuple(weight_hh.shape)}")
    if weight_hh.dim() == 1 and cell not in (C._GRU, C._LSTM):
        raise ValueError("newton_sequence: a diagonal (K,) weight_hh is the GRU's or the "
                         "LSTM's (DiagGRU, DiagLSTM); the Elman cells take (H, H)")
    info: dict = {}
    states = _NewtonSequence.apply(cell, gi, h0, c0, weight_hh, bias_hh,
                                   (target, accept, max_iter, on_failure, info, method))
    if stats is not None:
        stats["starts"] = info["starts"]
    return states, info["info"]


def supported(gi: Tensor) -> bool:
    """Whether the sweeps serve this problem (numba, CPU, float32/float64, T < 2^24)."""
    return C.supported(gi) and gi.shape[1] < MAX_T


class _NewtonSequence(torch.autograd.Function):

    @staticmethod
    def forward(ctx, cell, gi, h0, c0, weight_hh, bias_hh, opts):
        import warnings

        target, accept, max_iter, on_failure, out, method = opts
        if weight_hh.dim() == 1:
            oh, oc, k, residuals, fail, out["starts"] = _diag_sweeps(
                cell, gi, h0, c0, weight_hh, bias_hh, target=target, accept=accept,
                max_iter=max_iter, quasi=method == "quasi_newton" and cell == C._LSTM)
        else:
            oh, oc, k, residuals, fail, out["starts"] = _sweeps(
                cell, gi, h0, c0, weight_hh, bias_hh, target=target, accept=accept,
                max_iter=max_iter)
        r = residuals[-1]
        info = SolveInfo(method=method, iterations=k, converged=r <= accept, residual=r,
                         jacobian="analytic (compiled sweep)", tol=accept, residuals=residuals)
        if not info.converged:
            if on_failure == "raise":
                raise ConvergenceError(
                    f"solve_recurrence: method={method!r} stopped after {k} iterations with "
                    f"residual {r:.3e} > tol {accept:.1e}; use on_failure='fallback' to finish "
                    f"sequentially from the first unconverged step, raise max_iter, or try "
                    f"method='damped_newton'", k, r, info)
            if on_failure == "warn":
                warnings.warn(f"solve_recurrence: method={method!r} did not converge in {k} "
                              f"iterations (residual {r:.3e} > tol {accept:.1e}); returning "
                              f"the last iterate", RuntimeWarning, stacklevel=4)
            else:  # fallback: the compiled loop from the first step above target
                hs = h0 if fail == 0 else oh[:, fail - 1]
                cs = None if oc is None else (c0 if fail == 0 else oc[:, fail - 1])
                rh, rc, _, _ = C._forward(cell, gi[:, fail:], hs.contiguous(),
                                       None if cs is None else cs.contiguous(), weight_hh,
                                       bias_hh, None)
                oh[:, fail:] = rh
                if oc is not None:
                    oc[:, fail:] = rc
                info.fell_back, info.fallback_from = True, fail
        out["info"] = info
        ctx.cell = cell
        ctx.save_for_backward(gi, h0, c0, weight_hh, bias_hh, oh, oc)
        return oh if oc is None else (oh, oc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_h, g_c=None):
        gi, h0, c0, weight_hh, bias_hh, oh, oc = ctx.saved_tensors
        B, T, K = gi.shape
        H = h0.shape[-1]
        kernel = C._plan(B, T, H, H, K, gi.dtype)[0]
        dgi, dh0, dc0, dwh, dbh, _ = C._backward(ctx.cell, gi, h0, c0, weight_hh, bias_hh,
                                                 None, oh, oc, g_h, g_c, kernel)
        return None, dgi, dh0, dc0, dwh, dbh, None
