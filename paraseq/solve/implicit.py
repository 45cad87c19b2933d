"""The implicit gradient of ``solve_recurrence`` and what shares its structure.

The adjoint recurrence lambda_t = g_t + J_{t+1}^T lambda_{t+1} (``_Adjoint``), its tangent
twin w_t = v_t + J_t w_{t-1} (``_Adjoint.tangent``), the autograd Functions that make the
implicit gradient exact to second order (``_Implicit``, ``_AdjointSolve``, ``_NoThirdOrder``),
the tensors a cell reads that the second-order correction goes to (``_anchors``,
``_held_tensors``), and the float32 Newton polish (``_polish``), which solves the tangent
recurrence. Split from ``api.py``, which calls them.

Shape letters: B batch rows, T time, n input size, D state size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..scan import linear_scan
from .cell import FlatCell
from .iterate import _eval, block_scan, evaluate, from_blocks, residual_max, shift, to_blocks

POLISH_MAX_D = 64
"""The largest state size (with a dense Jacobian) whose float32 solves at the default tolerance
get the Newton polish of ``_polish``; cells with diagonal or block Jacobians get it at any
size."""


POLISH_SKIP = 2.5e-7
"""A float32 residual at or under this (about two ulps of a unit state) is already at the
rounding floor: ``_polish`` then costs one evaluation of the cell and changes nothing."""


def _polish(fc: FlatCell, X: Tensor, H: Tensor, h0: Tensor, cell_dtype: torch.dtype,
            chunk_T: int, source: str | None = None, F0: Tensor | None = None,
            J: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One exact Newton step from a solution H (B, T, D) accepted at the default float32
    tolerance, kept when it lowers the residual.

    The tolerance bounds each step's residual r_t = f(x_t, h_{t-1}) - h_t, but the states'
    error e solves e_t = J_t e_{t-1} + r_t: on a near-neutral cell (J close to I, e.g.
    h + 0.1 tanh(MLP(x, h))) the residuals of an accepted solve add up along the trajectory
    (measured 1e-4 relative at T = 600 with picard, 100x the loop's own float32 error). The
    step solves that recurrence with the true Jacobian (``_Adjoint.tangent``: the implicit
    gradient's structure, diagonal, blocks or dense, and its time chunks), which leaves the
    states at the rounding floor: about the cost of one implicit backward pass.

    Returns the states and f at them (B, T, D) each; ``F0``, where given, is f at H already
    (the solve's own last evaluation), and ``source`` the solve's Jacobians ("compiled": the
    compiled cell and Jacobian serve the polish too). ``J`` (B, T, D, D), where given, is a
    Newton solve's last dense Jacobians, at H or at the iterate before it: the step then
    reuses them (a Newton step with a Jacobian one iterate old, its error the product of two
    converged corrections, far under the rounding floor), and costs one scan and one
    evaluation of the cell."""
    Hp = shift(H, h0)
    if F0 is None:
        F0 = _eval(fc, source, X, Hp, cell_dtype).to(H.dtype)
    r0 = residual_max(H, F0)
    if not r0 > POLISH_SKIP:  # at the rounding floor already (Newton, usually)
        return H, F0
    if J is not None and J.shape[:2] == H.shape[:2]:  # w_t = v_t + J_t w_{t-1}, w_0 = v_0
        e = linear_scan(J, (F0 - H).to(J.dtype), torch.zeros_like(h0, dtype=J.dtype),
                        structure="dense").to(H.dtype)
    else:
        e = _Adjoint(fc, X, Hp, cell_dtype, chunk_T, source).tangent(F0 - H)
    H1 = H + e
    F1 = _eval(fc, source, X, shift(H1, h0), cell_dtype).to(H.dtype)
    r1 = residual_max(H1, F1)
    return (H1, F1) if r1 <= r0 else (H, F0)


class _Adjoint:
    """The linear recurrences of the implicit gradient, with J_t = d f(x_t, h_{t-1}) / d h_{t-1}
    the true Jacobian at the solution, solved by scans over time chunks:

    - ``__call__(g)``: the adjoint, lambda_t = g_t + J_{t+1}^T lambda_{t+1} (reverse, from the
      last chunk back);
    - ``tangent(v)``: its transpose, w_t = v_t + J_t w_{t-1} (forward): the derivative of the
      solution along a perturbation v of the residual, and the backward of the adjoint
      (``_AdjointSolve``).

    Both run without a graph; ``_Implicit`` makes them differentiable where a backward builds
    a graph."""

    def __init__(self, fc: FlatCell, X: Tensor, Hp: Tensor | None, cell_dtype: torch.dtype,
                 chunk_T: int, source: str | None = None):
        self.fc, self.X, self.Hp, self.cell_dtype, self.chunk_T = fc, X, Hp, cell_dtype, chunk_T
        self.source = source  # "compiled": dense Jacobians by the compiled function
        self.diagonal = fc.diag_exact
        self.blocks = fc.has_blocks and not fc.diag_exact

    def _jacobians(self, s: int, e: int) -> Tensor:
        """J_t for t in [s, e): (B, Tc, D) diagonal, (B, Tc, G, k, k) blocks or (B, Tc, D, D)."""
        fc, X, Hp = self.fc, self.X, self.Hp
        B, _, D = Hp.shape
        rows_x = X[:, s:e].reshape(B * (e - s), X.shape[-1])
        rows_h = Hp[:, s:e].reshape(B * (e - s), D).to(self.cell_dtype)
        if self.diagonal:
            res = fc.analytic_diag(rows_x, rows_h)
            d = (res if res is not None else fc.autograd_diag(rows_x, rows_h))[1]
            return d.reshape(B, e - s, D).to(Hp.dtype)
        blocks = fc.analytic_blocks(rows_x, rows_h) if self.blocks else None
        if blocks is not None:
            Jb = blocks[1]
            return Jb.reshape(B, e - s, *Jb.shape[1:]).to(Hp.dtype)
        res = fc.analytic_full(rows_x, rows_h) if fc.has_full else None
        if res is None and self.source == "compiled" and not torch.is_grad_enabled():
            from . import jit

            res = jit.call(fc, "lin", rows_x, rows_h)
        J = (res if res is not None else fc.autograd_full(rows_x, rows_h))[1]
        return J.reshape(B, e - s, D, D).to(Hp.dtype)

    @staticmethod
    def _apply(J: Tensor, v: Tensor) -> Tensor:  # J v for one step: (B, D)
        if J.dim() == 2:
            return J * v
        if J.dim() == 4:  # blocks (B, G, k, k)
            return from_blocks(torch.matmul(J, to_blocks(v, J.shape[-1]).unsqueeze(-1))
                               .squeeze(-1))
        return torch.matmul(J, v.unsqueeze(-1)).squeeze(-1)

    def _scan(self, coef: Tensor, b: Tensor, x0: Tensor, reverse: bool) -> Tensor:
        if coef.dim() == 5:
            return block_scan(coef, b, x0, reverse=reverse)
        return linear_scan(coef, b, x0, reverse=reverse,
                           structure="diagonal" if self.diagonal else "dense")

    def __call__(self, g: Tensor) -> Tensor:
        T = self.Hp.shape[1]
        g = g.to(self.Hp.dtype)
        lam = torch.empty_like(g)  # (B, T, D)
        carry = None  # J_{s}^T lambda_{s} for the first step s of the chunk after this one
        with torch.no_grad():
            for e in range(T, 0, -self.chunk_T):
                s = max(0, e - self.chunk_T)
                J = self._jacobians(s, e)
                JT = J if self.diagonal else J.transpose(-1, -2)
                gc = g[:, s:e].clone()
                if carry is not None:
                    gc[:, -1] += carry
                # the chunk's last step has no J_{t+1} inside the chunk: it is the scan's
                # starting state, and the coefficients are JT[1:] (not a shifted copy with a
                # zero block appended)
                lam_c = gc if e - s == 1 else torch.cat(
                    [self._scan(JT[:, 1:], gc[:, :-1], gc[:, -1], reverse=True), gc[:, -1:]],
                    dim=1)
                lam[:, s:e] = lam_c
                carry = self._apply(JT[:, 0], lam_c[:, 0])
        return lam

    def tangent(self, v: Tensor) -> Tensor:
        T = self.Hp.shape[1]
        v = v.to(self.Hp.dtype)
        w = torch.empty_like(v)  # (B, T, D)
        carry = None  # w at the last step of the chunk before this one
        with torch.no_grad():
            for s in range(0, T, self.chunk_T):
                e = min(T, s + self.chunk_T)
                J = self._jacobians(s, e)
                # w_s = J_s carry + v_s (carry = 0 in the first chunk): the scan's own first
                # step, so J is scanned as it lies (a shifted copy of transposed compiled
                # Jacobians cost 0.8 s at D = 32)
                x0 = torch.zeros_like(v[:, 0]) if carry is None else carry
                w_c = self._scan(J, v[:, s:e], x0, reverse=False)
                w[:, s:e] = w_c
                carry = w_c[:, -1]
        return w


class _Switch:
    """A flag shared by the nodes of one implicit solve: while on, ``_Implicit.backward``
    passes nothing on (the partial derivative at a fixed solution, see ``_Implicit``)."""

    def __init__(self) -> None:
        self.on = False


class _Implicit(torch.autograd.Function):
    """Returns the solution H; its backward hands the adjoint lambda to F = f(x, shift(H)),
    whose own autograd graph then yields the gradients for the inputs, h0 (through the first
    step) and every parameter of the cell, closed-over tensors included.

    A backward that builds a graph (create_graph=True: gradient penalties, Hessian-vector
    products, MAML) returns the same first derivatives as differentiable expressions, exact
    to second order. With a the anchors (the inputs X, h0 and the tensors the cell holds,
    ``_anchors``), the gradient is G_a = (d F / d a)(H, a)^T lambda, and both H and lambda
    depend on a. So:

    - H re-enters the graph through the inputs: H2, a fresh ``_Implicit`` node on a new
      evaluation F2 = f(x, shift(H)) (its backward is this one, lazily: no recursion until a
      derivative of that order is asked for);
    - lambda is ``_AdjointSolve`` of G = g + S^T J(H2)^T lambda (S the shift; its value is
      lambda, the fixed point), whose backward is the tangent recurrence, so lambda is
      differentiable in g, H2 and the anchors;
    - lambda goes to F's graph (built at a fixed H): the anchors' derivatives with lambda
      differentiable; what that graph lacks, the dependence of d F / d a on H, comes back as
      a correction to each anchor whose value is exactly zero: the partial derivative at H2
      (H2 muted by ``_Switch`` while it is taken) minus the same at the constant H.

    A third derivative raises (``_AdjointSolve``)."""

    @staticmethod
    def forward(ctx, F: Tensor, H: Tensor, adjoint: _Adjoint, switch: _Switch, h0: Tensor,
                *anchors: Tensor) -> Tensor:
        ctx.adjoint, ctx.switch, ctx.f_dtype, ctx.H = adjoint, switch, F.dtype, H
        ctx.h0, ctx.anchors = h0, anchors  # not save_for_backward: their graphs are needed
        return H.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        none = (None,) * (4 + len(ctx.anchors))
        if ctx.switch.on:
            return (None, *none)
        adj = ctx.adjoint
        with torch.no_grad():
            lam = adj(g.detach()).to(ctx.f_dtype)
        if not torch.is_grad_enabled():
            return (lam, *none)
        return _Implicit._differentiable(ctx, g, lam)

    @staticmethod
    def _differentiable(ctx, g: Tensor, lam: Tensor):
        adj, h0, anchors = ctx.adjoint, ctx.h0, ctx.anchors
        cdt, H = adj.cell_dtype, ctx.H
        want = [i for i, a in enumerate(anchors) if a.requires_grad]
        targets = [anchors[i] for i in want]
        # H again, on the graph of the inputs: its own backward is the implicit one
        F2 = evaluate(adj.fc, adj.X, shift(H.to(cdt), h0.to(cdt)))
        switch = _Switch()
        H2 = _Implicit.apply(F2, H, adj, switch, h0, *anchors) if F2.requires_grad else H
        P = shift(H2, h0).to(cdt)  # (B, T, D)
        F3 = evaluate(adj.fc, adj.X, P)
        switch.on = True  # partial derivatives at H2, differentiable in it
        try:
            got = torch.autograd.grad(F3, [P, *targets], lam, create_graph=True,
                                      allow_unused=True)
        finally:
            switch.on = False
        gP, at_H2 = got[0], got[1:]
        at_H = torch.autograd.grad(F2, targets, lam, create_graph=True, allow_unused=True) \
            if targets else ()
        if gP is None:
            gP = torch.zeros_like(P)
        G = g.to(lam.dtype) + torch.cat([gP[:, 1:], torch.zeros_like(gP[:, :1])], dim=1)
        lam_out = _AdjointSolve.apply(G, lam, adj)
        corr: list[Tensor | None] = [None] * len(anchors)
        for i, u, v in zip(want, at_H2, at_H, strict=True):
            if u is not None and v is not None:
                corr[i] = u - v  # zero, with the derivative along H
        return (lam_out, None, None, None, None, *corr)


class _AdjointSolve(torch.autograd.Function):
    """lambda (computed) as a function of G = g + S^T J^T lambda: d lambda = (I - S^T J^T)^{-1}
    d G, so the backward is the tangent recurrence ``_Adjoint.tangent``."""

    @staticmethod
    def forward(ctx, G: Tensor, lam: Tensor, adjoint: _Adjoint) -> Tensor:
        ctx.adjoint, ctx.dtype = adjoint, G.dtype
        return lam.clone()

    @staticmethod
    def backward(ctx, v: Tensor):
        if torch.is_grad_enabled():
            return _NoThirdOrder.apply(ctx.adjoint.tangent(v.detach()).to(ctx.dtype), v), \
                None, None
        return ctx.adjoint.tangent(v).to(ctx.dtype), None, None


class _NoThirdOrder(torch.autograd.Function):
    """Passes a second-order term on; differentiating it (a third derivative) raises."""

    @staticmethod
    def forward(ctx, w: Tensor, anchor: Tensor) -> Tensor:
        return w.clone()

    @staticmethod
    def backward(ctx, _g: Tensor):
        raise RuntimeError(
            "solve_recurrence: a third derivative through grad='implicit' is not supported "
            "(the implicit adjoint is exact to second order: gradient penalties, "
            "Hessian-vector products, MAML); use grad='unrolled' (autograd through the "
            "iterations, exact to any order) or method='sequential'")


def _anchors(F: Tensor, X: Tensor, h0: Tensor, cell: Callable) -> list[Tensor]:
    """The tensors requiring grad that F = f(X, shift(H, h0)) depends on, to which the
    second-order implicit backward returns its corrections: X, h0, the tensors the cell holds
    (``_held_tensors``), and any other leaf reached by F's graph without passing through
    those (a parameter read from somewhere ``_held_tensors`` does not look)."""
    anchors = [t for t in (X, h0, *_held_tensors(cell)) if t.requires_grad]
    stop = {id(a.grad_fn) for a in (*anchors, h0) if a.grad_fn is not None}
    known = {id(a) for a in (*anchors, h0)}
    seen: set[int] = set()
    stack = [F.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) in stop:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if isinstance(var, Tensor):  # AccumulateGrad: a leaf
            if id(var) not in known:
                known.add(id(var))
                anchors.append(var)
            continue
        stack.extend(n for n, _ in node.next_functions)
    return anchors


def _held_tensors(cell: Callable) -> list[Tensor]:
    """The tensors requiring grad that a cell holds: an nn.Module's parameters (or those of the
    module a bound method belongs to), or the tensors and modules in a function's closure or a
    functools.partial's arguments. The implicit backward that builds a graph takes them as
    explicit inputs (see ``_Implicit``)."""
    found: list[Tensor] = []

    def add(obj: object, depth: int = 0) -> None:
        if isinstance(obj, Tensor):
            if obj.requires_grad:
                found.append(obj)
        elif isinstance(obj, torch.nn.Module):
            found.extend(p for p in obj.parameters() if p.requires_grad)
        elif isinstance(obj, functools.partial) and depth < 2:
            add(obj.func, depth + 1)
            for v in (*obj.args, *obj.keywords.values()):
                add(v, depth + 1)
        elif depth < 2 and callable(obj):
            owner = getattr(obj, "__self__", None)
            if owner is not None:
                add(owner, depth + 1)
            for c in getattr(obj, "__closure__", None) or ():
                try:
                    add(c.cell_contents, depth + 1)
                except ValueError:  # an empty closure cell
                    pass
        elif isinstance(obj, (tuple, list)) and depth < 2:
            for v in obj:
                add(v, depth + 1)
        elif isinstance(obj, dict) and depth < 2:
            for v in obj.values():
                add(v, depth + 1)

    add(cell)
    unique, seen = [], set()
    for t in found:
        if id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    return unique


