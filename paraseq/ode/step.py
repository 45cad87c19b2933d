"""One implicit step as a recurrent cell: y_k = Phi((t_{k-1}, t_k), y_{k-1}).

Shape letters: N rows of a cell call (batch x steps, batch-major, as ``solve_recurrence``
makes them), m steps in a call, B the batch, D the state size, S the unknowns of one step.

Phi solves the scheme's local equations R(Z; y_{k-1}) = 0 (``paraseq.ode.schemes``) by Newton,
for all m steps of a call at once: each Newton iteration is one evaluation of func and its
Jacobian at every stage of every step, and m batched (S, S) linear solves. Nothing here is
sequential in time; the time coupling is ``solve_recurrence``'s business, which sees Phi as a
cell with an analytic Jacobian (``forward_with_jacobian``):

    dPhi/dy_prev = d (dZ/dy_prev),  dZ/dy_prev = -(dR/dZ)^{-1} dR/dy_prev  (implicit functions)

So newton, quasi_newton, damped_newton and picard over the time grid, the fallback, the
failure policies and the adjoint are ``solve_recurrence``'s, unchanged; and ``sequential`` is
the scheme stepped in time, one Newton solve per step.

Gradients. Under grad mode Phi returns ONE Newton correction from its (detached) solution Z*,
with the Jacobian dR/dZ detached: Z* - (dR/dZ)^{-1} R(Z*; y_prev, t, theta). Its value is Z* (to
rounding: R(Z*) ~ 0) and its first derivatives with respect to y_prev, the times and func's
parameters are exactly the implicit function theorem's, so the adjoint of ``solve_recurrence``
(and autograd through the sequential loop) gives the gradients of the discrete scheme.

Warm starts. Newton needs a first guess for every step. By default it is the previous state
(every stage at y_prev). A call on the same step times as the previous call (the next outer
iteration) starts from the previous stages moved to first order, Z + dZ/dy_prev (y_prev - y_old);
a call on the next step of a sequential loop starts from the previous stages shifted by the
last increment. Only the starting point depends on them: the result is Newton's, to ``tol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CLIP = 1e8
WARM_RADIUS = 1e-2
"""A warm start from the previous call on the same steps is used for a step whose y_prev moved
by at most this much (scaled: |dy| / (1 + |y|)) and whose previous solve converged."""


@dataclass
class StageSolution:
    Z: Tensor  # (m, B, S) the stages after the last Newton update
    M: Tensor  # (m, B, S, S) dR/dZ at the last linearisation
    dZdy0: Tensor | None  # (m, B, S, D)
    delta: Tensor  # (m, B) the last Newton correction, |dZ| / (1 + |Z|), max over the stages
    iterations: int


def newton(scheme, y0: Tensor, tau: Tensor, Z: Tensor, *, tol: float, max_iter: int,
           need_dy0: bool) -> StageSolution:
    """Solve R(Z; y0, tau) = 0 for all m x B steps at once, from Z (m, B, S).

    Newton with a per-step backtracking line search: a step whose |R| grew after its last
    update goes back to halfway along that update (down to 1/64 of it) instead of taking a new
    Newton step; this costs no extra evaluations. Stops when every step's Newton correction is
    under ``tol`` (its stages then sit far closer than that to the root: Newton is quadratic),
    after ``max_iter`` iterations, or once the largest correction is within 1e3 tol and no
    longer halves (rounding). Corrections that are not finite (a singular dR/dZ on a wild
    outer iterate) reset that step to its first guess."""
    ctx = scheme.prepare(y0, tau, need_dy0)
    start = Z
    prev = float("inf")
    Z_prev = dZ_prev = merit_prev = None
    lam = None
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        R, M, dR = scheme.linearise(Z, y0, tau, ctx, need_dy0)
        merit = (R * R).sum(-1)  # (m, B)
        rhs = -R.unsqueeze(-1) if dR is None else -torch.cat([R.unsqueeze(-1), dR], dim=-1)
        sol, _ = torch.linalg.solve_ex(M, rhs)  # (m, B, S, 1 [+ D])
        dZ = sol[..., 0]
        Z_new = Z + dZ
        delta = (dZ.abs() / (1 + Z_new.abs())).amax(-1)  # (m, B)
        back = None
        if merit_prev is not None:  # worse (or nan) and not yet at rounding level: retreat
            back = ~(merit <= merit_prev) & (lam > 1 / 64) & ~(delta <= tol)  # (m, B)
            lam = torch.where(back, lam / 2, torch.ones_like(lam))
        if back is not None and bool(back.any()):
            b = back.unsqueeze(-1)
            Z_new = torch.where(b, Z_prev + lam.unsqueeze(-1) * dZ_prev, Z_new)
            delta = delta.masked_fill(back, float("inf"))
            Z_prev = torch.where(b, Z_prev, Z)
            dZ_prev = torch.where(b, dZ_prev, dZ)
            merit_prev = torch.where(back, merit_prev, merit)
        else:
            Z_prev, dZ_prev, merit_prev = Z, dZ, merit
            if lam is None:
                lam = torch.ones_like(merit)
        bad = ~torch.isfinite(delta)  # (m, B)
        if back is not None:  # a retreating step keeps its line search
            bad = bad & ~back
        if bool(bad.any()):
            Z_new = torch.where(bad.unsqueeze(-1), start, Z_new)
        Z = Z_new.clamp(-CLIP, CLIP)
        worst = float(delta.max()) if delta.numel() else 0.0
        if worst <= tol or (worst <= 1e3 * tol and worst > 0.5 * prev):
            break
        prev = worst
    dZdy0 = sol[..., 1:] if need_dy0 else None
    return StageSolution(Z, M, dZdy0, delta, iterations)


class StepMap:
    """The cell ``Phi(x, y_prev) -> y`` for ``solve_recurrence``: x = (t_{k-1}, t_k) per row.

    Rows come batch-major, (B, m) flattened, every batch element on the same m steps; the
    batch is y0's leading dims (func sees them as it was written for). ``tol`` and
    ``max_iter`` govern the local Newton solves. Counters: ``calls``, ``newton_iterations``.
    """

    def __init__(self, scheme, B: int, tol: float, max_iter: int = 12):
        self.scheme = scheme
        self.B = B
        self.D = scheme.D
        self.tol = tol
        self.max_iter = max_iter
        self.calls = 0
        self.newton_iterations = 0
        self._cache: dict | None = None

    # -- rows <-> steps -----------------------------------------------------------------------

    def _split(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Rows (N, 2), (N, D) -> step times (m, 2) and states (m, B, D)."""
        N = x.shape[0]
        if N % self.B:
            raise RuntimeError(f"odeint: internal: {N} rows are not a whole number of the "
                               f"batch's {self.B} systems")
        m = N // self.B
        x3 = x.reshape(self.B, m, 2)  # (B, m, 2)
        tau = x3[0]  # (m, 2)
        if self.B > 1 and not torch.equal(x3.detach(), tau.detach().expand_as(x3)):
            raise RuntimeError("odeint: internal: the rows of one cell call are not the same "
                               "steps for every batch element")
        return tau, h.reshape(self.B, m, self.D).transpose(0, 1)  # (m, B, D)

    def _rows(self, a: Tensor) -> Tensor:
        """(m, B, ...) -> (B m, ...), the rows' order."""
        return a.transpose(0, 1).reshape(-1, *a.shape[2:])

    # -- the local solve -----------------------------------------------------------------------

    def _start(self, x: Tensor, tau: Tensor, y0: Tensor) -> Tensor:
        """The first guess of each step's stages: warm where the cache knows a converged
        solve close by (module doc), else every stage at y_prev."""
        base = self.scheme.initial(y0)  # (m, B, S)
        c = self._cache
        if c is None or c["Z"].shape[:2] != y0.shape[:2]:
            return base
        dy = y0 - c["y0"]  # (m, B, D)
        if c["ptr"] == x.data_ptr() and c["shape"] == tuple(x.shape) \
                and c["version"] == x._version:
            # the same steps again (the next outer iteration): first order in y_prev
            near = (dy.abs() / (1 + y0.abs())).amax(-1) <= WARM_RADIUS  # (m, B)
            if c["dZdy0"] is not None:
                warm = c["Z"] + (c["dZdy0"] @ dy.unsqueeze(-1)).squeeze(-1)
            else:
                warm = c["Z"] + dy.repeat(1, 1, self.scheme.s)
        elif tau.shape[0] == 1 and bool((tau[:, 0] == c["tau"][:, 1]).all()):
            # the next step of a sequential loop: shift the stages by the last increment
            near = torch.ones_like(c["ok"])
            warm = c["Z"] + dy.repeat(1, 1, self.scheme.s)
        else:
            return base
        return torch.where((near & c["ok"]).unsqueeze(-1), warm, base)

    def _solve(self, x: Tensor, h: Tensor, need_dy0: bool):
        tau, y0 = self._split(x.detach(), h.detach())
        sol = newton(self.scheme, y0, tau, self._start(x, tau, y0), tol=self.tol,
                     max_iter=self.max_iter, need_dy0=need_dy0)
        self.calls += 1
        self.newton_iterations += sol.iterations
        self._cache = dict(ptr=x.data_ptr(), shape=tuple(x.shape), version=x._version,
                           x=x.detach(),
                           tau=tau, y0=y0, Z=sol.Z, dZdy0=sol.dZdy0,
                           ok=sol.delta <= self.tol)
        return tau, y0, sol

    # -- the cell protocol ---------------------------------------------------------------------

    def __call__(self, x: Tensor, h: Tensor) -> Tensor:
        with torch.no_grad():
            _, y0, sol = self._solve(x, h, need_dy0=False)
        if not torch.is_grad_enabled():
            return self._rows(self.scheme.output(sol.Z, y0))
        # one Newton correction with a detached dR/dZ: exact first derivatives (module doc)
        tau_g, y0_g = self._split(x, h)
        R = self.scheme.residual(sol.Z, y0_g, tau_g)  # (m, B, S)
        corr = torch.linalg.solve_ex(sol.M, R.unsqueeze(-1))[0].squeeze(-1)
        return self._rows(self.scheme.output(sol.Z - corr, y0_g))

    def forward_with_jacobian(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            _, y0, sol = self._solve(x, h, need_dy0=True)
            y = self.scheme.output(sol.Z, y0)  # (m, B, D)
            J = self.scheme.output_jacobian(sol.dZdy0)  # (m, B, D, D)
        return self._rows(y), self._rows(J)

    def step_residual(self, x: Tensor, h: Tensor, y: Tensor) -> Tensor:
        """How far each row's y is from satisfying the scheme from h, (N,): the larger of
        |y - Phi(h)| / (1 + |Phi(h)|) and Phi's last Newton correction (which bounds the
        distance of its stages from the exact root)."""
        with torch.no_grad():
            _, y0, sol = self._solve(x, h, need_dy0=False)
            phi = self._rows(self.scheme.output(sol.Z, y0))  # (N, D)
            gap = ((y - phi).abs() / (1 + phi.abs())).amax(-1)  # (N,)
            return torch.maximum(gap, self._rows(sol.delta))
