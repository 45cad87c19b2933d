"""The worked examples of ``python -m paraseq ode``: vector fields as nn.Modules, their setups,
and an independent reference by scipy.integrate.solve_ivp.

Shape letters: ``...`` batch dims (independent systems: initial conditions, parameters), D the
state size, T grid points.

- ``Competition``: two species competing for resources (Lotka-Volterra competition),
  x1' = r1 x1 (1 - x1/N1) - a1 x1 x2,  x2' = r2 x2 (1 - x2/N2) - a2 x1 x2.
- ``Mathieu``: x'' + (a - 2q cos 2t) x = 0, as (x, x'); a and q broadcast over the batch.
- ``Pendulum``: the inverted pendulum on a vibrating pivot (Kapitza),
  l theta'' + (h0 w^2 cos(w t) - g) sin theta = 0, theta from the upright; w broadcasts.
- ``VanDerPol``: x'' - mu (1 - x^2) x' + x = 0, as (x, x'); stiff for large mu.
- ``Lorenz``: the chaotic Lorenz system (sigma 10, rho 28, beta 8/3).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn


def _param(value) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


class Competition(nn.Module):
    """Lotka-Volterra competition of two species; y = (x1, x2), (..., 2)."""

    def __init__(self, r1: float, r2: float, N1: float, N2: float, a1: float, a2: float):
        super().__init__()
        self.r1, self.r2, self.N1, self.N2, self.a1, self.a2 = r1, r2, N1, N2, a1, a2

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        x1, x2 = y[..., 0], y[..., 1]
        return torch.stack([self.r1 * x1 * (1 - x1 / self.N1) - self.a1 * x1 * x2,
                            self.r2 * x2 * (1 - x2 / self.N2) - self.a2 * x1 * x2], dim=-1)

    def numpy_rhs(self, t: float, y: np.ndarray) -> np.ndarray:
        """The same field in NumPy on (..., 2): an independent reference for scipy."""
        x1, x2 = y[..., 0], y[..., 1]
        return np.stack([self.r1 * x1 * (1 - x1 / self.N1) - self.a1 * x1 * x2,
                         self.r2 * x2 * (1 - x2 / self.N2) - self.a2 * x1 * x2], axis=-1)

    def equilibria(self) -> list[tuple[float, float, bool]]:
        """(x1, x2, stable) for every equilibrium in the closed positive quadrant."""
        pts = [(0.0, 0.0), (self.N1, 0.0), (0.0, self.N2)]
        # coexistence: x1 = N1 (1 - a1 x2 / r1), x2 = N2 (1 - a2 x1 / r2)
        A = np.array([[1.0, self.N1 * self.a1 / self.r1], [self.N2 * self.a2 / self.r2, 1.0]])
        if abs(np.linalg.det(A)) > 1e-12:
            x1, x2 = np.linalg.solve(A, [self.N1, self.N2])
            if x1 > 0 and x2 > 0:
                pts.append((float(x1), float(x2)))
        out = []
        for x1, x2 in pts:
            y = torch.tensor([x1, x2], dtype=torch.float64)
            J = torch.autograd.functional.jacobian(lambda v: self(torch.zeros(()), v), y)
            out.append((x1, x2, bool(torch.linalg.eigvals(J).real.max() < 0)))
        return out


COMPETITION = {
    "coexistence": dict(r1=1.0, r2=0.8, N1=1.0, N2=1.0, a1=0.5, a2=0.4),
    "exclusion": dict(r1=1.0, r2=0.8, N1=1.0, N2=1.0, a1=1.5, a2=1.2),
}
"""Coexistence: each species limits itself more than the other (a1 N2 < r1, a2 N1 < r2), and
the interior equilibrium attracts everything. Exclusion: the opposite; the interior
equilibrium is a saddle and the initial condition decides which species survives."""


class Mathieu(nn.Module):
    """x'' + (a - 2q cos 2t) x = 0 as y = (x, x'), (..., 2); a and q broadcast against
    y[..., 0]."""

    def __init__(self, a, q):
        super().__init__()
        self.register_buffer("a", _param(a))
        self.register_buffer("q", _param(q))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, -(self.a - 2 * self.q * torch.cos(2 * t)) * x], dim=-1)

    def numpy_rhs(self, t: float, y: np.ndarray) -> np.ndarray:
        a, q = self.a.numpy(), self.q.numpy()
        return np.stack([y[..., 1], -(a - 2 * q * np.cos(2 * t)) * y[..., 0]], axis=-1)


def mathieu_chart(a: Tensor, q: Tensor, points: int = 101, method: str = "gauss_legendre_4",
                  solver: str = "newton"):
    """Floquet multipliers over the grid a (A,) x q (Q,): the fundamental matrix over one
    period pi, solved for the 2 A Q systems at once (batch dims (A, Q, 2)). Returns
    (|trace| / 2 of the monodromy matrix (A, Q), odeint's info); |trace| < 2 is stable."""
    from .api import odeint

    field = Mathieu(a.reshape(-1, 1, 1), q.reshape(1, -1, 1))
    eye = torch.eye(2, dtype=torch.float64)  # the two columns of the identity, as states
    y0 = eye.expand(a.numel(), q.numel(), 2, 2).contiguous()  # (A, Q, column, 2)
    t = torch.linspace(0, math.pi, points, dtype=torch.float64)
    y, info = odeint(field, y0, t, method=method, solver=solver, return_info=True)
    monodromy_trace = y[-1, :, :, 0, 0] + y[-1, :, :, 1, 1]  # x1(pi) + x2'(pi), (A, Q)
    return monodromy_trace.abs() / 2, info


class Pendulum(nn.Module):
    """l theta'' + (h0 w^2 cos(w t) - g) sin theta = 0, theta from the upright, y = (theta,
    theta'), (..., 2); w broadcasts against y[..., 0]. Upright is stable when
    (h0 w)^2 > 2 g l (Kapitza)."""

    def __init__(self, w, l: float = 0.2, h0: float = 0.02, g: float = 9.81):
        super().__init__()
        self.register_buffer("w", _param(w))
        self.l, self.h0, self.g = l, h0, g

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        th, om = y[..., 0], y[..., 1]
        acc = -(self.h0 * self.w ** 2 * torch.cos(self.w * t) - self.g) * torch.sin(th) / self.l
        return torch.stack([om, acc], dim=-1)

    def numpy_rhs(self, t: float, y: np.ndarray) -> np.ndarray:
        w = self.w.numpy()
        acc = -(self.h0 * w ** 2 * np.cos(w * t) - self.g) * np.sin(y[..., 0]) / self.l
        return np.stack([y[..., 1], acc], axis=-1)

    def kapitza_w(self) -> float:
        """The pivot frequency above which the upright position is stable."""
        return math.sqrt(2 * self.g * self.l) / self.h0


class VanDerPol(nn.Module):
    """x'' - mu (1 - x^2) x' + x = 0 as y = (x, x'), (..., 2)."""

    def __init__(self, mu):
        super().__init__()
        self.register_buffer("mu", _param(mu))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], dim=-1)

    def numpy_rhs(self, t: float, y: np.ndarray) -> np.ndarray:
        x, v, mu = y[..., 0], y[..., 1], self.mu.numpy()
        return np.stack([v, mu * (1 - x * x) * v - x], axis=-1)

    def numpy_jacobian(self, t: float, y: np.ndarray) -> np.ndarray:
        """d rhs / dy for one system, (2,) -> (2, 2)."""
        x, v, mu = y[0], y[1], float(self.mu)
        return np.array([[0.0, 1.0], [-2 * mu * x * v - 1, mu * (1 - x * x)]])


class Lorenz(nn.Module):
    """The Lorenz system, y = (x, y, z), (..., 3)."""

    def __init__(self, sigma: float = 10.0, rho: float = 28.0, beta: float = 8.0 / 3.0):
        super().__init__()
        self.sigma, self.rho, self.beta = sigma, rho, beta

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        a, b, c = y[..., 0], y[..., 1], y[..., 2]
        return torch.stack([self.sigma * (b - a), a * (self.rho - c) - b,
                            a * b - self.beta * c], dim=-1)

    def numpy_rhs(self, t: float, y: np.ndarray) -> np.ndarray:
        a, b, c = y[..., 0], y[..., 1], y[..., 2]
        return np.stack([self.sigma * (b - a), a * (self.rho - c) - b, a * b - self.beta * c],
                        axis=-1)


def scipy_reference(func, y0: Tensor, t: Tensor, method: str = "DOP853", rtol: float = 1e-10,
                    atol: float = 1e-12) -> np.ndarray:
    """solve_ivp on the whole batch as one system, at the grid points: (T, ..., D) as NumPy.

    The examples' own NumPy fields (``numpy_rhs``, ``numpy_jacobian``) are used when func has
    them (independent code, and fast); otherwise func itself in float64 torch. Implicit
    methods (``"Radau"``) get the Jacobian from ``numpy_jacobian`` (one system) or autograd."""
    from scipy.integrate import solve_ivp

    shape = tuple(y0.shape)
    dt = torch.float64
    if hasattr(func, "numpy_rhs"):
        def rhs(s, y):
            return func.numpy_rhs(s, y.reshape(shape)).reshape(-1)
    else:
        def rhs(s, y):
            with torch.no_grad():
                yy = torch.from_numpy(y).reshape(shape)
                return func(torch.tensor(s, dtype=dt), yy).reshape(-1).numpy()

    if hasattr(func, "numpy_jacobian") and len(shape) == 1:
        jac = func.numpy_jacobian
    else:
        def jac(s, y):
            f = lambda v: func(torch.tensor(s, dtype=dt), v.reshape(shape)).reshape(-1)  # noqa: E731
            return torch.autograd.functional.jacobian(f, torch.from_numpy(y)).numpy()

    tt = t.detach().double().numpy()
    kw = dict(jac=jac) if method in ("Radau", "BDF", "LSODA") else {}
    sol = solve_ivp(rhs, (tt[0], tt[-1]), y0.detach().double().reshape(-1).numpy(),
                    method=method, t_eval=tt, rtol=rtol, atol=atol, **kw)
    if not sol.success:
        raise RuntimeError(f"scipy_reference: solve_ivp({method}) failed: {sol.message}")
    return sol.y.T.reshape(len(tt), *shape)
