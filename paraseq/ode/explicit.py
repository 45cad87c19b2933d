"""Explicit Runge-Kutta steps as a recurrent cell: y_k = Phi((t_{k-1}, t_k), y_{k-1}).

Shape letters: N rows of a cell call (batch x steps, batch-major, as ``solve_recurrence``
makes them), m steps in a call, B the batch, D the state size, s the stages.

An explicit step is a recurrence like an implicit one (``paraseq.ode.step``), only cheaper:
Phi is s evaluations of func, its stages in order, and no local solve. ``solve_recurrence``
solves the recurrence over the whole grid in parallel (Newton: a dense linear scan per
iteration, with dPhi/dy_prev from ``forward_with_jacobian``), and ``"sequential"`` steps it in
time, the reference. Gradients are autograd's through Phi (the cell is differentiable), by
``solve_recurrence``'s adjoint over the grid.

The embedded pairs (``e``: the weights of the difference between the propagated solution and
the embedded one) give every step's local error estimate in one batched evaluation over the
grid: that is what ``paraseq.ode.adaptive`` refines the grid by.

    euler          order 1                 midpoint  order 2
    heun2          order 2                 heun3     order 3
    rk4            order 4 (the 3/8 rule, as torchdiffeq's 'rk4')
    adaptive_heun  2(1)   fehlberg2  2(1)   bosh3  3(2)   dopri5  5(4)   (embedded pairs)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .field import VectorField


@dataclass(frozen=True)
class ExplicitTableau:
    name: str
    order: int  # of the propagated solution
    A: tuple[tuple[float, ...], ...]  # strictly lower triangular, row i has i entries
    b: tuple[float, ...]
    c: tuple[float, ...]
    e: tuple[float, ...] | None = None  # b - b_embedded: the local error estimate's weights
    err_order: int = 0  # the order of the embedded solution (its error is O(h^(err_order+1)))


def _t(*rows):
    return tuple(tuple(float(v) for v in r) for r in rows)


EXPLICIT: dict[str, ExplicitTableau] = {
    tab.name: tab
    for tab in (
        ExplicitTableau("euler", 1, _t(()), (1.0,), (0.0,)),
        ExplicitTableau("midpoint", 2, _t((), (0.5,)), (0.0, 1.0), (0.0, 0.5)),
        ExplicitTableau("heun2", 2, _t((), (1.0,)), (0.5, 0.5), (0.0, 1.0)),
        ExplicitTableau("heun3", 3, _t((), (1 / 3,), (0.0, 2 / 3)), (0.25, 0.0, 0.75),
                        (0.0, 1 / 3, 2 / 3)),
        ExplicitTableau("rk4", 4, _t((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                        (1 / 8, 3 / 8, 3 / 8, 1 / 8), (0.0, 1 / 3, 2 / 3, 1.0)),
        # Heun's method with Euler embedded
        ExplicitTableau("adaptive_heun", 2, _t((), (1.0,)), (0.5, 0.5), (0.0, 1.0),
                        (-0.5, 0.5), 1),
        # Runge-Kutta-Fehlberg 2(1): the third stage is the first-order solution (FSAL)
        ExplicitTableau("fehlberg2", 2, _t((), (0.5,), (1 / 256, 255 / 256)),
                        (1 / 512, 255 / 256, 1 / 512), (0.0, 0.5, 1.0),
                        (-1 / 512, 0.0, 1 / 512), 1),
        # Bogacki-Shampine 3(2), the fourth stage is f(t1, y1)
        ExplicitTableau("bosh3", 3, _t((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
                        (2 / 9, 1 / 3, 4 / 9, 0.0), (0.0, 0.5, 0.75, 1.0),
                        (-5 / 72, 1 / 12, 1 / 9, -1 / 8), 2),
        # Dormand-Prince 5(4), the seventh stage is f(t1, y1)
        ExplicitTableau(
            "dopri5", 5,
            _t((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
               (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
               (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
               (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
            (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
            (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40), 4),
    )
}
"""The explicit Runge-Kutta methods by name (torchdiffeq's names); those with ``e`` are
adaptive."""

ADAPTIVE = tuple(n for n, tab in EXPLICIT.items() if tab.e is not None)
FIXED = tuple(n for n, tab in EXPLICIT.items() if tab.e is None)


def _split(x: Tensor, h: Tensor, B: int, D: int) -> tuple[Tensor, Tensor]:
    """Rows (N, 2), (N, D) -> step times (m, 2) and states (m, B, D) (batch-major rows)."""
    N = x.shape[0]
    if N % B:
        raise RuntimeError(f"odeint: internal: {N} rows are not a whole number of the batch's "
                           f"{B} systems")
    m = N // B
    return x.reshape(B, m, 2)[0], h.reshape(B, m, D).transpose(0, 1)


def _rows(a: Tensor) -> Tensor:
    """(m, B, ...) -> (B m, ...), the rows' order."""
    return a.transpose(0, 1).reshape(-1, *a.shape[2:])


class ExplicitStep:
    """The cell ``Phi(x, y_prev) -> y`` of an explicit RK method, x = (t_{k-1}, t_k) per row.

    ``perturb`` evaluates func just after the step's start and just before its end (the
    neighbouring floats: torchdiffeq's ``perturb`` option, for fields with jumps at grid
    points). Counters: ``calls`` (cell calls), ``evaluations`` (func points evaluated)."""

    def __init__(self, tab: ExplicitTableau, field: VectorField, B: int, dtype: torch.dtype,
                 device: torch.device, perturb: bool = False):
        self.tab, self.field, self.B, self.D = tab, field, B, field.D
        self.perturb = perturb
        self.s = len(tab.b)
        kw = dict(dtype=dtype, device=device)
        self.c = torch.tensor(tab.c, **kw)
        self.b = [float(v) for v in tab.b]
        self.e = None if tab.e is None else [float(v) for v in tab.e]
        self.calls = 0
        self.newton_iterations = 0  # the implicit StepMap's counter; none here
        self.evaluations = 0

    def _time(self, tau: Tensor, i: int) -> Tensor:
        t0, h = tau[:, 0], tau[:, 1] - tau[:, 0]
        ci = float(self.tab.c[i])
        t = t0 + ci * h  # (m,)
        if self.perturb and ci in (0.0, 1.0):
            end = tau[:, 0] if ci == 0.0 else tau[:, 1]
            toward = end + h if ci == 0.0 else end - h  # into the step
            t = t + (torch.nextafter(end.detach(), toward.detach()) - end.detach())
        return t

    def stages(self, tau: Tensor, y0: Tensor) -> list[Tensor]:
        """The stage derivatives k_i (m, B, D), i < s, for steps tau (m, 2) from y0 (m, B, D)."""
        h = (tau[:, 1] - tau[:, 0]).reshape(-1, 1, 1)  # (m, 1, 1)
        ks: list[Tensor] = []
        for i in range(self.s):
            y = y0
            for j, a in enumerate(self.tab.A[i]):
                if a:
                    y = y + (h * a) * ks[j]
            ks.append(self.field(self._time(tau, i), y))
            self.evaluations += tau.shape[0]
        return ks

    def step(self, tau: Tensor, y0: Tensor, with_error: bool = False):
        """y1 (m, B, D) and, with_error, the local error estimate (m, B, D)."""
        h = (tau[:, 1] - tau[:, 0]).reshape(-1, 1, 1)
        ks = self.stages(tau, y0)
        inc = sum((h * b) * k for b, k in zip(self.b, ks, strict=True) if b)
        y1 = y0 + inc
        if not with_error:
            return y1
        assert self.e is not None
        err = sum((h * e) * k for e, k in zip(self.e, ks, strict=True) if e)
        return y1, err

    # -- the cell protocol ---------------------------------------------------------------------

    def __call__(self, x: Tensor, h: Tensor) -> Tensor:
        self.calls += 1
        tau, y0 = _split(x, h, self.B, self.D)
        return _rows(self.step(tau, y0))

    def forward_with_jacobian(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Phi and dPhi/dy_prev (N, D, D), by D vector-Jacobian products through the step in
        one backward pass (the m steps replicated D times, one basis cotangent each)."""
        self.calls += 1
        D = self.D
        tau, y0 = _split(x.detach(), h.detach(), self.B, D)
        m = tau.shape[0]
        with torch.enable_grad():
            reps = y0.repeat(D, 1, 1).requires_grad_(True)  # (D m, B, D)
            y1 = self.step(tau.repeat(D, 1), reps)  # (D m, B, D)
            eye = torch.eye(D, dtype=y0.dtype, device=y0.device)
            cot = eye.reshape(D, 1, 1, D).expand(D, m, self.B, D).reshape(D * m, self.B, D)
            if y1.requires_grad:
                (g,) = torch.autograd.grad(y1, reps, cot, allow_unused=True)
            else:
                g = None
        if g is None:  # func does not depend on y: Phi(y) = y + const
            g = cot
        J = g.detach().reshape(D, m, self.B, D).permute(1, 2, 0, 3)  # (m, B, D, D): row i
        return _rows(y1[:m].detach()), _rows(J)

    def step_residual(self, x: Tensor, h: Tensor, y: Tensor) -> Tensor:
        """|y - Phi(h)| / (1 + |Phi(h)|) per row, (N,); a row whose y equals Phi(h) exactly,
        non-finite values included (an explicit step that blows up, as it does stepped in
        time), is 0."""
        with torch.no_grad():
            tau, y0 = _split(x, h, self.B, self.D)
            phi = _rows(self.step(tau, y0))  # (N, D)
            same = (y == phi) | (torch.isnan(y) & torch.isnan(phi))
            gap = torch.where(same, torch.zeros_like(y), (y - phi).abs() / (1 + phi.abs()))
            return gap.amax(-1) if gap.shape[-1] else gap.new_zeros(gap.shape[0])
