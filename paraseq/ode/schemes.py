"""The implicit one-step schemes: each step's local equations and their linearisation.

Shape letters: m time steps handled in one call, B the batch (y0's leading dims, flattened),
D the state size, s the scheme's implicit stages, S = s * D the unknowns of one step.

A scheme turns one step from y0 (at t0) to y1 (at t1 = t0 + h) into a small nonlinear system
R(Z; y0, t0, t1) = 0 in S unknowns Z (the implicit stages), and reads y1 off the stages by a
linear map, y1 = y0 + sum_i d_i (Z_i - y0). ``paraseq.ode.step`` solves these systems by Newton,
for every step at once, and differentiates the solution by the implicit function theorem.

Runge-Kutta schemes (Butcher tableau A, b, c; stage i is Y_i = y0 + h sum_j a_ij f(t0 + c_j h,
Y_j)). A stage whose row of A is zero is explicit (Y_j = y0, the trapezoid's first stage); the
others are the unknowns Z. With A_II the implicit block (invertible) and A_IE the explicit
columns, h f(Z) = A_II^{-1} (Z - y0 - h A_IE f_E), so y1 = y0 + h b.f is the linear map above
with d = b_I A_II^{-1}, provided the explicit stages drop out (b_E = d A_IE, true here).

    backward_euler     order 1  A = [1]                          L-stable
    trapezoid          order 2  Lobatto IIIA: f averaged over t0, t1, A-stable
    implicit_midpoint  order 2  A = [1/2], c = [1/2]             A-stable, symplectic
    radau_iia_3        order 3  2 stages, stiffly accurate       L-stable
    gauss_legendre_4   order 4  2 stages at the Gauss points     A-stable, symplectic
    radau_iia_5        order 5  3 stages, stiffly accurate       L-stable
    gauss_legendre_6   order 6  3 stages at the Gauss points     A-stable, symplectic

The implicit DAE form F(t, y, dy/dt) = 0 with backward Euler is the scheme
R(Z) = F(t1, Z, (Z - y0) / h), d = [1] (DEER's implicit form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .field import VectorField

_R3 = math.sqrt(3.0)
_R6 = math.sqrt(6.0)
_R15 = math.sqrt(15.0)


@dataclass(frozen=True)
class Tableau:
    name: str
    order: int
    A: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    description: str


SCHEMES: dict[str, Tableau] = {
    tab.name: tab
    for tab in (
        Tableau("backward_euler", 1, ((1.0,),), (1.0,), (1.0,),
                "y1 = y0 + h f(t1, y1); L-stable, first order"),
        Tableau("trapezoid", 2, ((0.0, 0.0), (0.5, 0.5)), (0.5, 0.5), (0.0, 1.0),
                "y1 = y0 + h/2 (f(t0, y0) + f(t1, y1)); A-stable, second order"),
        Tableau("implicit_midpoint", 2, ((0.5,),), (1.0,), (0.5,),
                "y1 = y0 + h f(t0 + h/2, (y0 + y1)/2); symplectic, second order"),
        Tableau("radau_iia_3", 3, ((5 / 12, -1 / 12), (3 / 4, 1 / 4)), (3 / 4, 1 / 4),
                (1 / 3, 1.0), "Radau IIA, 2 stages; L-stable, stiffly accurate, third order"),
        Tableau("gauss_legendre_4", 4, ((0.25, 0.25 - _R3 / 6), (0.25 + _R3 / 6, 0.25)),
                (0.5, 0.5), (0.5 - _R3 / 6, 0.5 + _R3 / 6),
                "Gauss-Legendre, 2 stages; symplectic, fourth order"),
        Tableau("radau_iia_5", 5,
                (((88 - 7 * _R6) / 360, (296 - 169 * _R6) / 1800, (-2 + 3 * _R6) / 225),
                 ((296 + 169 * _R6) / 1800, (88 + 7 * _R6) / 360, (-2 - 3 * _R6) / 225),
                 ((16 - _R6) / 36, (16 + _R6) / 36, 1 / 9)),
                ((16 - _R6) / 36, (16 + _R6) / 36, 1 / 9), ((4 - _R6) / 10, (4 + _R6) / 10, 1.0),
                "Radau IIA, 3 stages; L-stable, stiffly accurate, fifth order"),
        Tableau("gauss_legendre_6", 6,
                ((5 / 36, 2 / 9 - _R15 / 15, 5 / 36 - _R15 / 30),
                 (5 / 36 + _R15 / 24, 2 / 9, 5 / 36 - _R15 / 24),
                 (5 / 36 + _R15 / 30, 2 / 9 + _R15 / 15, 5 / 36)),
                (5 / 18, 4 / 9, 5 / 18), (0.5 - _R15 / 10, 0.5, 0.5 + _R15 / 10),
                "Gauss-Legendre, 3 stages; symplectic, sixth order"),
    )
}
"""The Runge-Kutta schemes by name (``odeint``'s ``method``)."""


def _times(tau: Tensor) -> tuple[Tensor, Tensor]:
    """(t0, h) from the step's (t0, t1) pairs (m, 2)."""
    return tau[:, 0], tau[:, 1] - tau[:, 0]


class RungeKutta:
    """An implicit Runge-Kutta scheme on a vector field, with its stage equations."""

    def __init__(self, tab: Tableau, field: VectorField, dtype: torch.dtype,
                 device: torch.device):
        A = torch.tensor(tab.A, dtype=torch.float64)
        explicit = [i for i in range(len(tab.b)) if not bool(A[i].any())]
        implicit = [i for i in range(len(tab.b)) if i not in explicit]
        A_II = A[implicit][:, implicit]
        A_IE = A[implicit][:, explicit]
        b = torch.tensor(tab.b, dtype=torch.float64)
        d = torch.linalg.solve(A_II.T, b[implicit])  # d = b_I A_II^{-1}
        assert torch.allclose(b[explicit], d @ A_IE, atol=1e-14), tab.name  # y1 linear in Z
        kw = dict(dtype=dtype, device=device)
        self.name, self.order, self.field = tab.name, tab.order, field
        self.s, self.D = len(implicit), field.D
        self.S = self.s * self.D
        self.A_II, self.A_IE, self.d = A_II.to(**kw), A_IE.to(**kw), d.to(**kw)
        c = torch.tensor(tab.c, dtype=torch.float64)
        self.c_I, self.c_E = c[implicit].to(**kw), c[explicit].to(**kw)
        self.n_explicit = len(explicit)

    # -- the pieces every scheme has ---------------------------------------------------------

    def initial(self, y0: Tensor) -> Tensor:
        """The default first guess: every stage at y0. (m, B, D) -> (m, B, S)."""
        return y0.repeat(1, 1, self.s)

    def prepare(self, y0: Tensor, tau: Tensor, need_dy0: bool) -> tuple[Tensor, Tensor] | None:
        """What depends on y0 only, computed once per call: f (and df/dy when the step's
        Jacobian is wanted) at the explicit stages: (m, E, B, D) and (m, E, B, D, D)."""
        if not self.n_explicit:
            return None
        m, B, D = y0.shape
        t0, h = _times(tau)
        tE = (t0[:, None] + self.c_E * h[:, None]).reshape(-1)  # (m E,)
        yE = y0.unsqueeze(1).expand(m, self.n_explicit, B, D).reshape(-1, B, D)  # (m E, B, D)
        if need_dy0:
            fE, (JE,) = self.field.with_jacobians(tE, yE)
            return fE.reshape(m, -1, B, D), JE.reshape(m, -1, B, D, D)
        return self.field(tE, yE).reshape(m, -1, B, D), None

    def _stage_field(self, Z: Tensor, tau: Tensor, jac: bool):
        m, B, _ = Z.shape
        t0, h = _times(tau)
        tI = (t0[:, None] + self.c_I * h[:, None]).reshape(-1)  # (m s,)
        Y = Z.reshape(m, B, self.s, self.D).transpose(1, 2).reshape(m * self.s, B, self.D)
        if jac:
            F, (J,) = self.field.with_jacobians(tI, Y)
            J = J.reshape(m, self.s, B, self.D, self.D).transpose(1, 2)  # (m, B, s, D, D)
        else:
            F, J = self.field(tI, Y), None
        return F.reshape(m, self.s, B, self.D).transpose(1, 2), J  # (m, B, s, D)

    def linearise(self, Z: Tensor, y0: Tensor, tau: Tensor, ctx, need_dy0: bool
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
        """R (m, B, S), dR/dZ (m, B, S, S) and, if asked, dR/dy0 (m, B, S, D)."""
        m, B, _ = Z.shape
        s, D = self.s, self.D
        _, h = _times(tau)
        F, J = self._stage_field(Z, tau, jac=True)  # (m, B, s, D), (m, B, s, D, D)
        hh = h.reshape(m, 1, 1, 1)
        R = Z.reshape(m, B, s, D) - y0.unsqueeze(2) - hh * torch.einsum("ij,mbjd->mbid",
                                                                      self.A_II, F)
        if ctx is not None:
            R = R - hh * torch.einsum("ie,mebd->mbid", self.A_IE, ctx[0])
        # M[m, b, i, p, j, q] = delta_ij delta_pq - h a_ij J_j[p, q]
        hJ = h.reshape(m, 1, 1, 1, 1, 1) * torch.einsum("ij,mbjpq->mbipjq", self.A_II, J)
        M = torch.eye(self.S, dtype=Z.dtype, device=Z.device) - hJ.reshape(m, B, self.S, self.S)
        dR = None
        if need_dy0:
            dR = -torch.eye(D, dtype=Z.dtype, device=Z.device).expand(m, B, s, D, D)
            if ctx is not None:
                dR = dR - h.reshape(m, 1, 1, 1, 1) * torch.einsum("ie,mebpq->mbipq",
                                                                  self.A_IE, ctx[1])
            dR = dR.reshape(m, B, self.S, D)
        return R.reshape(m, B, self.S), M, dR

    def residual(self, Z: Tensor, y0: Tensor, tau: Tensor) -> Tensor:
        """R(Z; y0, t0, t1) (m, B, S), differentiable in y0, tau and func's parameters."""
        m, B, _ = Z.shape
        _, h = _times(tau)
        F, _ = self._stage_field(Z, tau, jac=False)
        hh = h.reshape(m, 1, 1, 1)
        R = Z.reshape(m, B, self.s, self.D) - y0.unsqueeze(2) \
            - hh * torch.einsum("ij,mbjd->mbid", self.A_II, F)
        ctx = self.prepare(y0, tau, need_dy0=False)
        if ctx is not None:
            R = R - hh * torch.einsum("ie,mebd->mbid", self.A_IE, ctx[0])
        return R.reshape(m, B, self.S)

    def output(self, Z: Tensor, y0: Tensor) -> Tensor:
        """y1 = y0 + sum_i d_i (Z_i - y0): (m, B, S), (m, B, D) -> (m, B, D)."""
        m, B, D = y0.shape
        return y0 + torch.einsum("i,mbid->mbd", self.d, Z.reshape(m, B, self.s, D) - y0[:, :, None])

    def output_jacobian(self, dZdy0: Tensor) -> Tensor:
        """dy1/dy0 from dZ/dy0 (m, B, S, D): (1 - sum d) I + sum_i d_i dZ_i/dy0."""
        m, B, _, D = dZdy0.shape
        eye = torch.eye(D, dtype=dZdy0.dtype, device=dZdy0.device)
        return (1 - self.d.sum()) * eye + torch.einsum(
            "i,mbipq->mbpq", self.d, dZdy0.reshape(m, B, self.s, D, D))


class BackwardEulerDAE:
    """F(t1, y1, (y1 - y0) / h) = 0 for y1: DEER's implicit form with backward Euler."""

    name, order, s = "backward_euler", 1, 1

    def __init__(self, field: VectorField):
        self.field = field
        self.D = self.S = field.D

    def initial(self, y0: Tensor) -> Tensor:
        return y0.clone()

    def prepare(self, y0: Tensor, tau: Tensor, need_dy0: bool) -> None:
        return None

    def linearise(self, Z: Tensor, y0: Tensor, tau: Tensor, ctx, need_dy0: bool
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
        _, h = _times(tau)
        hh = h.reshape(-1, 1, 1)
        F, (Jy, Jdy) = self.field.with_jacobians(tau[:, 1], Z, (Z - y0) / hh)
        M = Jy + Jdy / hh.unsqueeze(-1)  # (m, B, D, D)
        dR = -Jdy / hh.unsqueeze(-1) if need_dy0 else None
        return F, M, dR

    def residual(self, Z: Tensor, y0: Tensor, tau: Tensor) -> Tensor:
        _, h = _times(tau)
        return self.field(tau[:, 1], Z, (Z - y0) / h.reshape(-1, 1, 1))

    def output(self, Z: Tensor, y0: Tensor) -> Tensor:
        return Z

    def output_jacobian(self, dZdy0: Tensor) -> Tensor:
        return dZdy0
