"""From x'(t) = A x + B u to x_k = Ab x_{k-1} + Bb u_k with step dt.

Shape letters: N state size, ``...`` leading (batch) dims (e.g. H channels).

The rules (I identity, D = dt):

- ``"euler"`` (forward): Ab = I + D A, Bb = D B.
- ``"backward_euler"``: Ab = (I - D A)^-1, Bb = (I - D A)^-1 D B.
- ``"bilinear"`` (Tustin, trapezoid): Ab = (I - D/2 A)^-1 (I + D/2 A), Bb = (I - D/2 A)^-1 D B.
- ``"zoh"`` (zero-order hold, exact for piecewise-constant u): Ab = exp(D A),
  Bb = A^-1 (exp(D A) - I) B, computed as one exponential of the block matrix
  [[A, B], [0, 0]] D (no inverse of A, so a singular A is fine).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

METHODS = ("euler", "backward_euler", "bilinear", "zoh")
"""Discretisation rules by name."""


def _check_method(fn: str, method: object) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{fn}: unknown method {method!r}; valid: "
                         + ", ".join(repr(m) for m in METHODS))
    return method


def _check_dt(fn: str, dt: object) -> None:
    if isinstance(dt, Tensor):
        if dt.is_complex() or not dt.is_floating_point():
            raise TypeError(f"{fn}: dt must be a real floating tensor or a float; got dtype "
                            f"{dt.dtype}")
        bad = ~(dt > 0) | ~torch.isfinite(dt)
        if bool(bad.any()):
            raise ValueError(f"{fn}: dt must be positive and finite; got min "
                             f"{dt.detach().min().item():.3g}")
        return
    if isinstance(dt, bool) or not isinstance(dt, (int, float)):
        raise TypeError(f"{fn}: dt must be a positive float or a tensor of them; got "
                        f"{type(dt).__name__}")
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"{fn}: dt must be positive and finite; got dt={dt}")


def _dt_tensor(dt: float | Tensor, like: Tensor) -> Tensor:
    real = like.real.dtype if like.is_complex() else like.dtype
    return torch.as_tensor(dt, dtype=real, device=like.device)


def discretize(A: Tensor, B: Tensor, dt: float | Tensor,
               method: str = "bilinear") -> tuple[Tensor, Tensor]:
    """Discretise a dense state space model.

    Args:
        A: (..., N, N), real or complex.
        B: (..., N).
        dt: the step: a positive float, or a tensor broadcasting against the leading dims
            (e.g. (H,) for one step per channel).
        method: ``"euler"``, ``"backward_euler"``, ``"bilinear"`` or ``"zoh"`` (see the module
            docstring for the formulas).

    Returns:
        Ab (..., N, N) and Bb (..., N), the leading dims broadcast. Differentiable in A, B, dt.
    """
    method = _check_method("discretize", method)
    if not isinstance(A, Tensor) or A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"discretize: A must be a square matrix (..., N, N); got "
                         f"{tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__}")
    N = A.shape[-1]
    if not isinstance(B, Tensor) or B.dim() < 1 or B.shape[-1] != N:
        raise ValueError(f"discretize: B must have shape (..., N) = (..., {N}) to match A "
                         f"{tuple(A.shape)}; got "
                         f"{tuple(B.shape) if isinstance(B, Tensor) else type(B).__name__}")
    _check_dt("discretize", dt)
    D = _dt_tensor(dt, A)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-1], D.shape)
    dtype = torch.promote_types(A.dtype, B.dtype)
    A = A.to(dtype).expand(*batch, N, N)
    B = B.to(dtype).expand(*batch, N)
    D = D.expand(batch)[..., None, None]  # (..., 1, 1)
    eye = torch.eye(N, dtype=dtype, device=A.device)
    if method == "euler":
        return eye + D * A, D[..., 0] * B
    if method == "backward_euler":
        M = eye - D * A
        return torch.linalg.solve(M, eye.expand_as(M)), torch.linalg.solve(M, D[..., 0] * B)
    if method == "bilinear":
        M = eye - D / 2 * A
        return torch.linalg.solve(M, eye + D / 2 * A), torch.linalg.solve(M, D[..., 0] * B)
    # zoh: exp([[A, B], [0, 0]] D) = [[exp(DA), int_0^D exp(sA) ds B], [0, 1]]
    aug = torch.zeros(*batch, N + 1, N + 1, dtype=dtype, device=A.device)
    aug[..., :N, :N] = A * D
    aug[..., :N, N] = B * D[..., 0]
    E = torch.linalg.matrix_exp(aug)  # (..., N+1, N+1)
    return E[..., :N, :N], E[..., :N, N]


def discretize_diagonal(Lambda: Tensor, B: Tensor, dt: float | Tensor,
                        method: str = "zoh") -> tuple[Tensor, Tensor]:
    """Discretise a diagonal state space model x' = diag(Lambda) x + B u, elementwise.

    Args:
        Lambda: (..., N), usually complex.
        B: (..., N).
        dt: positive float or a tensor broadcasting against the leading dims (e.g. (H,)).
        method: as for ``discretize``; ZOH gives Bb = (exp(dt Lambda) - 1) / Lambda B (dt B
            where Lambda = 0).

    Returns:
        Ab (..., N) and Bb (..., N), the leading dims broadcast.
    """
    method = _check_method("discretize_diagonal", method)
    if not isinstance(Lambda, Tensor) or Lambda.dim() < 1:
        raise ValueError("discretize_diagonal: Lambda must be a tensor of shape (..., N)")
    if not isinstance(B, Tensor) or B.dim() < 1 or B.shape[-1] != Lambda.shape[-1]:
        raise ValueError(f"discretize_diagonal: B must have shape (..., N) = (..., "
                         f"{Lambda.shape[-1]}) to match Lambda {tuple(Lambda.shape)}")
    _check_dt("discretize_diagonal", dt)
    D = _dt_tensor(dt, Lambda)[..., None]  # (..., 1)
    dl = D * Lambda  # (..., N)
    if method == "euler":
        return 1 + dl, D * B
    if method == "backward_euler":
        inv = 1 / (1 - dl)
        return inv, inv * D * B
    if method == "bilinear":
        inv = 1 / (1 - dl / 2)
        return inv * (1 + dl / 2), inv * D * B
    Ab = torch.exp(dl)
    # (exp(dl) - 1) / dl, with its limit 1 at dl = 0; expm1 keeps small |dl| accurate
    small = dl.abs() < 1e-30
    safe = torch.where(small, torch.ones_like(dl), dl)
    phi = torch.where(small, torch.ones_like(dl), torch.expm1(safe) / safe)
    return Ab, phi * D * B
