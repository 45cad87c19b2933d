"""HiPPO matrices, their normal-plus-low-rank (DPLR) form, and online function approximation.

Shape letters: N state size, M modes kept in a diagonal basis (N, or N/2 with one of each
conjugate pair), r rank of the low-rank correction, T time steps, S points in a window,
``...`` leading (batch) dims.

The matrices follow Gu et al., "HiPPO: Recurrent Memory with Optimal Polynomial Projections"
(NeurIPS 2020) and "Efficiently Modeling Long Sequences with Structured State Spaces" (S4,
ICLR 2022), in the normalisation of state-spaces/s4's ``src/models/hippo/hippo.py``
(``transition`` and ``rank_correction``); each formula is written out in ``hippo``'s docstring.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..scan import linear_scan
from .discretize import _check_dt, discretize

MEASURES = ("legs", "legt", "lagt", "fourier")
"""The measures ``hippo`` knows: scaled Legendre, translated Legendre, translated Laguerre and
translated Fourier."""

_WINDOW = {"legt": 2.0, "fourier": 2.0}
"""Length of the sliding window (in units of time) that the translated measures remember, in
the s4 normalisation (which halves LegT and uses pi rather than 2 pi for Fourier)."""


def _check_measure(fn: str, measure: object) -> str:
    if not isinstance(measure, str) or measure.lower() not in MEASURES:
        raise ValueError(f"{fn}: unknown measure {measure!r}; valid: "
                         + ", ".join(repr(m) for m in MEASURES))
    return measure.lower()


def _check_N(fn: str, N: object, measure: str) -> int:
    if isinstance(N, bool) or not isinstance(N, int):
        raise TypeError(f"{fn}: N must be an int >= 1 (the state size); got {N!r}")
    if N < 1:
        raise ValueError(f"{fn}: N must be >= 1 (the state size); got N={N}")
    if measure == "fourier" and N % 2:
        raise ValueError(f"{fn}: measure 'fourier' needs an even N (its state holds cosine/sine "
                         f"pairs); got N={N}")
    return N


def hippo(measure: str, N: int, *, dtype: torch.dtype = torch.float64,
          device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The HiPPO matrices (A, B) of ``x'(t) = A x(t) + B u(t)`` for a measure.

    With n, k = 0..N-1 (row, column):

    - ``"legs"`` (scaled Legendre; the time-varying ODE is x' = (A x + B u) / t):
      A_nk = -sqrt((2n+1)(2k+1)) for n > k, -(n+1) for n = k, 0 for n < k;
      B_n = sqrt(2n+1). Its eigenvalues are -1, ..., -N.
    - ``"legt"`` (translated Legendre, a sliding window of length 2):
      A_nk = -1/2 sqrt((2n+1)(2k+1)) for n >= k and -1/2 sqrt((2n+1)(2k+1)) (-1)^(n-k) for
      n < k; B_n = sqrt(2n+1) / 2. (The HiPPO paper's LegT with window 1, halved as in s4.)
    - ``"lagt"`` (translated Laguerre): A_nk = -1 for n > k, -1/2 for n = k, 0 for n < k;
      B_n = 1.
    - ``"fourier"`` (translated Fourier, s4's ``'fout'``; N even, window 2): the state holds
      the pairs (2f, 2f+1), f = 0..N/2-1 (state 1, the sine of frequency 0, stays zero);
      A = pi J - B B^T with J_{2f,2f+1} = -f, J_{2f+1,2f} = f (zero elsewhere);
      B_0 = 1, B_{2f} = sqrt(2) for f >= 1, odd entries 0.

    Returns:
        A (N, N) and B (N,), in ``dtype`` (float64 by default) on ``device``.

    See ``rank_correction`` for the P with A + P P^T normal, ``dplr`` for the diagonal-plus-
    low-rank form S4 computes with, and ``hippo_reconstruct`` for what the state means.
    """
    measure = _check_measure("hippo", measure)
    N = _check_N("hippo", N, measure)
    n = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)  # (N,)
    row, col = n[:, None], n[None, :]
    if measure == "legs":
        A = torch.where(row > col, -r[:, None] * r[None, :], torch.zeros(()))
        A = A - torch.diag(n + 1)
        B = r
    elif measure == "legt":
        sign = torch.where(row >= col, torch.ones(()), (-1.0) ** (row - col))
        A = -0.5 * r[:, None] * r[None, :] * sign
        B = 0.5 * r
    elif measure == "lagt":
        A = torch.eye(N, dtype=torch.float64) / 2 - torch.tril(torch.ones(N, N,
                                                                          dtype=torch.float64))
        B = torch.ones(N, dtype=torch.float64)
    else:  # fourier
        B = _fourier_b(N)
        J = torch.zeros(N, N, dtype=torch.float64)
        f = torch.arange(N // 2, dtype=torch.float64)
        J[0::2, 1::2] = torch.diag(-f)
        J[1::2, 0::2] = torch.diag(f)
        A = math.pi * J - B[:, None] * B[None, :]
    return A.to(dtype=dtype, device=device), B.to(dtype=dtype, device=device)


def _fourier_b(N: int) -> Tensor:
    B = torch.zeros(N, dtype=torch.float64)
    B[0::2] = math.sqrt(2.0)
    B[0] = 1.0
    return B


def rank_correction(measure: str, N: int, *, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> Tensor:
    """The low-rank P (N, r) with A + P P^T normal, for ``hippo(measure, N)``'s A.

    - ``"legs"``, r = 1: P_n = sqrt(n + 1/2); A + P P^T = -I/2 + (skew-symmetric).
    - ``"legt"``, r = 2: P_{n,0} = sqrt((2n+1)/2) for odd n, P_{n,1} = sqrt((2n+1)/2) for
      even n (zero elsewhere); A + P P^T is skew-symmetric.
    - ``"lagt"``, r = 1: P_n = sqrt(1/2); A + P P^T is skew-symmetric.
    - ``"fourier"``, r = 1: P = B; A + P P^T = pi J is skew-symmetric.

    In every case the symmetric part of A + P P^T is a multiple of the identity, which is what
    makes it normal, and (with A real) what lets ``dplr`` diagonalise it by a Hermitian
    eigensolver with a unitary eigenbasis.
    """
    measure = _check_measure("rank_correction", measure)
    N = _check_N("rank_correction", N, measure)
    n = torch.arange(N, dtype=torch.float64)
    if measure == "legs":
        P = torch.sqrt(n + 0.5)[:, None]
    elif measure == "legt":
        q = torch.sqrt((2 * n + 1) / 2)
        P = torch.zeros(N, 2, dtype=torch.float64)
        P[1::2, 0] = q[1::2]
        P[0::2, 1] = q[0::2]
    elif measure == "lagt":
        P = torch.full((N, 1), math.sqrt(0.5), dtype=torch.float64)
    else:
        P = _fourier_b(N)[:, None]
    return P.to(dtype=dtype, device=device)


class DPLR(NamedTuple):
    """A HiPPO matrix in diagonal-plus-low-rank form: A = V (diag(Lambda) - P P^*) V^*.

    Lambda (M,): eigenvalues of the normal part A + P_0 P_0^T; P (M, r) = V^* P_0; B (M,) =
    V^* B_0; V (N, M) with orthonormal columns (unitary when M = N). With ``half=True`` M =
    N/2 and each field holds one of each conjugate pair: the full basis is [V, conj(V)], the
    full Lambda is [Lambda, conj(Lambda)] and so on.
    """

    Lambda: Tensor
    P: Tensor
    B: Tensor
    V: Tensor


def dplr(measure: str, N: int, *, half: bool = False,
         dtype: torch.dtype = torch.complex128) -> DPLR:
    """Diagonalise the normal part of a HiPPO matrix, stably (S4, section 3.3).

    The normal part S = A + P P^T (``rank_correction``) equals c I + K with K real skew-
    symmetric, so Lambda = c + i mu with mu, V from the Hermitian eigenproblem of -i K (a
    unitary V, no ill-conditioned eigenvectors). The low-rank part and B move to that basis:
    A = V (diag(Lambda) - (V^* P)(V^* P)^*) V^*. This is what S4 computes with; diagonalising
    A itself is not an option (for LegS its eigenvectors have entries ~ 2^(-4N/3)).

    Args:
        measure: one of ``MEASURES``.
        N: state size.
        half: keep one eigenvalue of each conjugate pair (Im Lambda > 0, or a real pair built
            from the null space of K, as for Fourier's zero frequencies); needs even N and a
            null space of K of even dimension. Real systems need only that half.
        dtype: complex128 (default) or complex64; the eigensolve runs in float64 either way.

    Returns:
        ``DPLR(Lambda (M,), P (M, r), B (M,), V (N, M))``.
    """
    measure = _check_measure("dplr", measure)
    N = _check_N("dplr", N, measure)
    if dtype not in (torch.complex64, torch.complex128):
        raise TypeError(f"dplr: dtype must be torch.complex64 or torch.complex128; got {dtype}")
    A, B = hippo(measure, N)
    P0 = rank_correction(measure, N)  # (N, r)
    S = A + P0 @ P0.T  # (N, N)
    c = torch.diagonal(S).mean()
    K = (S - S.T) / 2  # (N, N)
    assert torch.allclose((S + S.T) / 2, c * torch.eye(N, dtype=S.dtype), atol=1e-10)
    mu, V = torch.linalg.eigh(-1j * K.to(torch.complex128))  # (N,) real, (N, N) unitary
    if half:
        if N % 2:
            raise ValueError(f"dplr: half=True needs an even N (conjugate pairs); got N={N}")
        V, mu = _half_basis(K, mu, V)
    Lambda = torch.complex(torch.full_like(mu, c.item()), mu)  # (M,)
    Vh = V.conj().T  # (M, N)
    P = Vh @ P0.to(V.dtype)  # (M, r)
    Bv = Vh @ B.to(V.dtype)  # (M,)
    return DPLR(Lambda.to(dtype), P.to(dtype), Bv.to(dtype), V.to(dtype))


def _half_basis(K: Tensor, mu: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """One eigenvector of each conjugate pair of the real skew-symmetric K.

    Positive mu pair with their conjugates (eigenvalue -mu). The null space is real: split
    it into real orthonormal (v1, v2) pairs and keep (v1 + i v2)/sqrt(2), whose conjugate is
    the other null vector of the pair.
    """
    N = K.shape[0]
    tol = 1e-9 * max(1.0, mu.abs().max().item())
    pos = mu > tol
    zero = mu.abs() <= tol
    n_zero = int(zero.sum())
    if n_zero % 2:
        raise ValueError("dplr: half=True needs the zero eigenvalues of the normal part to come "
                         f"in pairs; this matrix has {n_zero}")
    cols, vals = [V[:, pos]], [mu[pos]]
    if n_zero:
        # a real orthonormal basis of the null space of K
        U = torch.linalg.svd(K)[0]
        null = U[:, N - n_zero:].to(torch.complex128)  # (N, n_zero), real entries
        pairs = (null[:, 0::2] + 1j * null[:, 1::2]) / math.sqrt(2)  # (N, n_zero / 2)
        cols.append(pairs)
        vals.append(torch.zeros(n_zero // 2, dtype=mu.dtype))
    return torch.cat(cols, dim=1), torch.cat(vals)


def s4d_init(N: int, kind: str = "lin") -> tuple[Tensor, Tensor]:
    """S4D initial poles Lambda (M,) and B (M,) for state size N (M = N/2 modes), complex128.

    - ``"lin"``: Lambda_n = -1/2 + i pi n, B_n = 1 (S4D-Lin);
    - ``"inv"``: Lambda_n = -1/2 + i N/pi (N/(2n+1) - 1), B_n = 1 (S4D-Inv);
    - ``"legs"``: the normal part of HiPPO-LegS (``dplr("legs", N, half=True)``) with its B
      (S4D-LegS).
    """
    if isinstance(N, bool) or not isinstance(N, int) or N < 2 or N % 2:
        raise ValueError(f"s4d_init: N must be an even int >= 2 (N/2 conjugate pairs); got {N!r}")
    M = N // 2
    n = torch.arange(M, dtype=torch.float64)
    if kind == "lin":
        lam = torch.complex(torch.full_like(n, -0.5), math.pi * n)
    elif kind == "inv":
        lam = torch.complex(torch.full_like(n, -0.5), N / math.pi * (N / (2 * n + 1) - 1))
    elif kind == "legs":
        d = dplr("legs", N, half=True)
        return d.Lambda, d.B
    else:
        raise ValueError(f"s4d_init: kind must be 'lin', 'inv' or 'legs'; got {kind!r}")
    return lam, torch.ones(M, dtype=torch.complex128)


# ------------------------------------------------------------------ online function approximation

def _legendre(n_max: int, y: Tensor) -> Tensor:
    """P_0..P_{n_max-1} at y by the three-term recurrence: (..., S) -> (..., S, n_max)."""
    out = [torch.ones_like(y), y]
    for n in range(1, n_max - 1):
        out.append(((2 * n + 1) * y * out[n] - n * out[n - 1]) / (n + 1))
    return torch.stack(out[:n_max], dim=-1)


def hippo_basis(measure: str, N: int, y: Tensor) -> Tensor:
    """The functions the HiPPO state holds coefficients of, at relative positions y in [0, 1].

    y = 0 is the oldest point the state remembers, y = 1 the newest (time t). For ``"legs"``
    the window is the whole history [0, t], so s = t y; for ``"legt"`` and ``"fourier"`` it is
    the sliding window [t - 2, t], s = t - 2 + 2 y. The reconstruction is
    u(s) ~ sum_n x_n(t) g_n(y) (see ``hippo_reconstruct``), with

    - legs, legt: g_n(y) = sqrt(2n+1) P_n(2y - 1) (P_n the Legendre polynomials);
    - fourier: g_0 = 1, g_1 = 0, g_{2f} = sqrt(2) cos(2 pi f y), g_{2f+1} = -sqrt(2) sin(2 pi f y).

    Args:
        y: (S,) or any shape; returns (..., N) with y's shape in front.
    """
    measure = _check_measure("hippo_basis", measure)
    N = _check_N("hippo_basis", N, measure)
    if measure in ("legs", "legt"):
        n = torch.arange(N, dtype=y.dtype, device=y.device)
        return _legendre(N, 2 * y - 1) * torch.sqrt(2 * n + 1)  # (..., N)
    if measure == "fourier":
        f = torch.arange(N // 2, dtype=y.dtype, device=y.device)
        ang = 2 * math.pi * y[..., None] * f  # (..., N/2)
        cos = math.sqrt(2) * torch.cos(ang)
        cos[..., 0] = 1.0
        sin = -math.sqrt(2) * torch.sin(ang)
        return torch.stack([cos, sin], dim=-1).flatten(-2)  # (..., N)
    raise ValueError("hippo_basis: the reconstruction is implemented for 'legs', 'legt' and "
                     f"'fourier'; got {measure!r}")


def hippo_reconstruct(measure: str, x: Tensor, y: Tensor) -> Tensor:
    """The input history the HiPPO state x remembers, at relative positions y in [0, 1].

    Args:
        x: states (..., N) (e.g. one row of ``hippo_states``'s output).
        y: (S,) positions; 0 the oldest remembered point, 1 the newest (see ``hippo_basis``).

    Returns:
        (..., S): sum_n x_n g_n(y).
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("hippo_reconstruct: x must be a tensor of states (..., N)")
    if not isinstance(y, Tensor) or y.dim() != 1:
        raise ValueError("hippo_reconstruct: y must be a 1-D tensor of positions in [0, 1]")
    g = hippo_basis(measure, x.shape[-1], y.to(x.dtype))  # (S, N)
    return x @ g.T  # (..., S)


def hippo_states(u: Tensor, N: int, measure: str = "legs", *, dt: float = 1e-2) -> Tensor:
    """HiPPO's online function approximation: the state after each input, by one linear scan.

    u (..., T) is sampled every ``dt`` (u_k = u(k dt), k = 1..T).

    - ``"legs"``: x' = (A x + B u) / t, discretised by the bilinear rule with step dt / t_k =
      1 / k (the rule is scale-free: dt drops out). This is a time-varying linear recurrence,
      x_k = Ab_k x_{k-1} + Bb_k u_k, solved by ``paraseq.linear_scan`` with dense coefficients.
    - ``"legt"``, ``"fourier"``: x' = A x + B u, zero-order hold with step dt; the state
      remembers the window [t - 2, t] (so dt = 2 / 1000 remembers the last 1000 samples).

    Returns:
        x (..., T, N), float64 if u is float64 else u's dtype.
    """
    measure = _check_measure("hippo_states", measure)
    if measure == "lagt":
        raise ValueError("hippo_states: 'lagt' has no reconstruction here; use 'legs', 'legt' "
                         "or 'fourier'")
    if not isinstance(u, Tensor) or u.dim() < 1:
        raise ValueError("hippo_states: u must be a tensor of samples (..., T)")
    _check_dt("hippo_states", dt)
    A, B = hippo(measure, N, device=u.device)  # (N, N), (N,)
    T = u.shape[-1]
    if measure == "legs":
        k = torch.arange(1, T + 1, dtype=torch.float64, device=u.device)
        Ab, Bb = discretize(A, B, 1.0 / k, "bilinear")  # (T, N, N), (T, N)
    else:
        Ab, Bb = discretize(A, B, dt, "zoh")  # (N, N), (N,)
        Ab = Ab.expand(T, N, N)
        Bb = Bb.expand(T, N)
    dtype = u.dtype if u.dtype in (torch.float32, torch.float64) else torch.float32
    b = u.to(dtype)[..., None] * Bb.to(dtype)  # (..., T, N)
    return linear_scan(Ab.to(dtype), b, structure="dense")
