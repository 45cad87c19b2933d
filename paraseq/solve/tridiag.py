"""Log-depth solvers for Hermitian positive definite block-tridiagonal systems.

Shape letters: T blocks (time steps), D block size, ``...`` leading (batch) dims. Inside one
reduction level, n is the number of blocks and m = floor(n/2) of them have odd index.

With diagonal blocks A_t = M[t, t] and sub-diagonal blocks L_t = M[t+1, t] (so that
M[t, t+1] = L_t^H), row t of M x = b reads

    L_{t-1} x_{t-1} + A_t x_t + L_t^H x_{t+1} = b_t.

Block cyclic (odd-even) reduction. Every odd row gives its own unknown,

    x_t = A_t^{-1} (b_t - L_{t-1} x_{t-1} - L_t^H x_{t+1}),                    t odd,   (1)

and putting it into the even rows beside it leaves a system in the even unknowns alone, again
block tridiagonal (old row 2k becomes new row k):

    A'_k = A_{2k} - L_{2k}^H A_{2k+1}^{-1} L_{2k} - L_{2k-1} A_{2k-1}^{-1} L_{2k-1}^H
    b'_k = b_{2k} - L_{2k}^H A_{2k+1}^{-1} b_{2k+1} - L_{2k-1} A_{2k-1}^{-1} b_{2k-1}
    L'_k = -L_{2k+1} A_{2k+1}^{-1} L_{2k}

where a term is dropped if an index falls outside 0..n-1 (odd and even n both work). M' is
the Schur complement of the odd-odd part of M, so it is Hermitian positive definite too. The
solver recurses on it (n -> ceil(n/2), down to one block, which is solved directly), then gets
the odd unknowns from (1). That is ceil(log2 T) levels of a fixed handful of batched ops over all
of the level's blocks at once (no loop over t): O(T D^3) work, O(log T) depth.

Factorisation. Each odd pivot is factored A_t = R_t R_t^H (``torch.linalg.cholesky``, R_t lower
triangular) and one batched triangular solve gives

    G_t = R_t^{-1} [L_{t-1} | L_t^H | b_t]                      # (..., m, D, 2D+1)

whose Gram matrix G_t^H G_t (..., m, 2D+1, 2D+1) holds every product in A', b' and L'
(L_{t-1}^H A_t^{-1} L_{t-1}, L_t A_t^{-1} L_t^H, L_t A_t^{-1} L_{t-1}, L_{t-1}^H A_t^{-1} b_t,
L_t A_t^{-1} b_t). Back substitution (1) is x_t = R_t^{-H} G_t [-x_{t-1}; -x_{t+1}; 1].

This is exactly block Cholesky of M with its blocks reordered odd-even (nested dissection), so
it inherits Cholesky's backward stability for any Hermitian positive definite M with no pivoting:
A' is updated by subtracting Gram matrices, which keeps it exactly Hermitian, and the pivots stay
positive definite. Cholesky rather than ``torch.linalg.solve`` (LU with partial pivoting) because
it is the stable factorisation for this class, costs about half as much, and turns all of the
level's products into a single Gram matmul. A pivot that is not positive definite in working
precision (M not positive definite) raises ``torch.linalg.LinAlgError``.

``solve_tridiagonal_diag`` is the same reduction for D independent scalar tridiagonal systems
(every block diagonal), done elementwise: pivots are divided by, not factored.

Both are meant for use under ``torch.no_grad`` (Levenberg-Marquardt steps); they define no
backward of their own.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["solve_block_tridiagonal", "solve_tridiagonal_diag"]


def solve_block_tridiagonal(diag: Tensor, lower: Tensor, rhs: Tensor) -> Tensor:
    """Solve M x = rhs for Hermitian positive definite block-tridiagonal M.

    Args:
        diag: (..., T, D, D) diagonal blocks M[t, t].
        lower: (..., T-1, D, D) sub-diagonal blocks M[t+1, t]; the super-diagonal blocks are
            their conjugate transposes, M[t, t+1] = lower[t]^H.
        rhs: (..., T, D).

    Returns:
        x: (..., T, D), in the inputs' dtype. The leading dims of the three inputs broadcast.
    """
    if diag.dim() < 3 or diag.shape[-1] != diag.shape[-2]:
        raise ValueError(f"diag must be (..., T, D, D), got {tuple(diag.shape)}")
    T, D = diag.shape[-3], diag.shape[-1]
    batch = _check(diag, lower, rhs, T, D, block_dims=3)
    diag = diag.expand(*batch, T, D, D)
    lower = lower.expand(*batch, T - 1, D, D)
    rhs = rhs.expand(*batch, T, D)
    return _block_reduce(diag, lower, rhs)


def solve_tridiagonal_diag(diag: Tensor, lower: Tensor, rhs: Tensor) -> Tensor:
    """Solve D independent Hermitian positive definite scalar tridiagonal systems.

    Args:
        diag: (..., T, D) diagonal entries; channel d is the system M_d[t, t] = diag[t, d].
        lower: (..., T-1, D) off-diagonal entries M_d[t+1, t] = lower[t, d], and
            M_d[t, t+1] = conj(lower[t, d]) (the same number for real dtypes).
        rhs: (..., T, D).

    Returns:
        x: (..., T, D), in the inputs' dtype. The leading dims of the three inputs broadcast.
    """
    if diag.dim() < 2:
        raise ValueError(f"diag must be (..., T, D), got {tuple(diag.shape)}")
    T, D = diag.shape[-2], diag.shape[-1]
    batch = _check(diag, lower, rhs, T, D, block_dims=2)
    diag = diag.expand(*batch, T, D)
    lower = lower.expand(*batch, T - 1, D)
    rhs = rhs.expand(*batch, T, D)
    return _diag_reduce(diag, lower, rhs)


def _check(diag: Tensor, lower: Tensor, rhs: Tensor, T: int, D: int,
           block_dims: int) -> torch.Size:
    """Validate lower, rhs and the dtypes against diag (whose trailing block_dims dims are
    (T, D, D) or (T, D)); return the broadcast leading (batch) shape."""
    if T < 1:
        raise ValueError("need at least one block (T >= 1)")
    want = (T - 1, D, D)[:block_dims]
    if lower.dim() < block_dims or lower.shape[-block_dims:] != want:
        raise ValueError(f"lower must be (..., {', '.join(map(str, want))}), "
                         f"got {tuple(lower.shape)}")
    if rhs.dim() < 2 or rhs.shape[-2:] != (T, D):
        raise ValueError(f"rhs must be (..., {T}, {D}), got {tuple(rhs.shape)}")
    if not (diag.dtype == lower.dtype == rhs.dtype):
        raise TypeError(f"dtypes differ: diag {diag.dtype}, lower {lower.dtype}, rhs {rhs.dtype}")
    if not (diag.is_floating_point() or diag.is_complex()):
        raise TypeError(f"need a floating or complex dtype, got {diag.dtype}")
    return torch.broadcast_shapes(diag.shape[:-block_dims], lower.shape[:-block_dims],
                                  rhs.shape[:-2])


def _pad_time(t: Tensor, length: int, dim: int) -> Tensor:
    """Append zero blocks along the time dim ``dim`` (negative) up to ``length``."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _block_reduce(A: Tensor, L: Tensor, b: Tensor) -> Tensor:
    """One level of block cyclic reduction, then recurse. A (..., n, D, D), L (..., n-1, D, D),
    b (..., n, D); returns x (..., n, D)."""
    n, D = A.shape[-3], A.shape[-1]
    if n == 1:
        R = torch.linalg.cholesky(A)  # (..., 1, D, D)
        return torch.cholesky_solve(b.unsqueeze(-1), R).squeeze(-1)
    m = n // 2  # odd rows t = 2k+1, k < m; the n - m even rows become the next level
    R = torch.linalg.cholesky(A[..., 1::2, :, :])  # (..., m, D, D), A_t = R_t R_t^H
    L_prev = L[..., 0::2, :, :]  # L_{t-1}: (..., m, D, D)
    L_next = _pad_time(L[..., 1::2, :, :], m, dim=-3)  # L_t, zero for t = n-1: (..., m, D, D)
    cols = torch.cat([L_prev, L_next.mH, b[..., 1::2, :].unsqueeze(-1)], dim=-1)
    G = torch.linalg.solve_triangular(R, cols, upper=False)  # (..., m, D, 2D+1)
    S = G.mH @ G  # (..., m, 2D+1, 2D+1)
    p, q, r = slice(0, D), slice(D, 2 * D), 2 * D  # the L_{t-1}, L_t^H and b_t columns
    k = n - m - 1  # new sub-diagonal blocks; odd rows t = 2k+1 with an even row after them
    A_new = A[..., 0::2, :, :].clone()  # (..., n-m, D, D)
    A_new[..., :m, :, :] -= S[..., p, p]  # L_{2k}^H A_{2k+1}^{-1} L_{2k}
    A_new[..., 1:, :, :] -= S[..., :k, q, q]  # L_{2k-1} A_{2k-1}^{-1} L_{2k-1}^H
    b_new = b[..., 0::2, :].clone()  # (..., n-m, D)
    b_new[..., :m, :] -= S[..., p, r]
    b_new[..., 1:, :] -= S[..., :k, q, r]
    L_new = -S[..., :k, q, p]  # -L_{2k+1} A_{2k+1}^{-1} L_{2k}: (..., n-m-1, D, D)

    x_even = _block_reduce(A_new, L_new, b_new)  # (..., n-m, D)
    x_prev = x_even[..., :m, :]  # x_{t-1}: (..., m, D)
    x_next = _pad_time(x_even[..., 1:, :], m, dim=-2)  # x_{t+1} (0 past the end): (..., m, D)
    ones = b.new_ones((*b.shape[:-2], m, 1))
    coef = torch.cat([-x_prev, -x_next, ones], dim=-1).unsqueeze(-1)  # (..., m, 2D+1, 1)
    x_odd = torch.linalg.solve_triangular(R.mH, G @ coef, upper=True).squeeze(-1)  # (..., m, D)
    x = torch.empty_like(b)  # (..., n, D)
    x[..., 0::2, :] = x_even
    x[..., 1::2, :] = x_odd
    return x


def _diag_reduce(a: Tensor, l: Tensor, b: Tensor) -> Tensor:
    """The scalar (per channel) form of ``_block_reduce``. a (..., n, D), l (..., n-1, D),
    b (..., n, D); returns x (..., n, D)."""
    n = a.shape[-2]
    if n == 1:
        return b / a
    m = n // 2
    a_odd = a[..., 1::2, :]  # (..., m, D)
    l_prev = l[..., 0::2, :]  # l_{t-1}: (..., m, D)
    l_next = _pad_time(l[..., 1::2, :], m, dim=-2)  # l_t, zero for t = n-1: (..., m, D)
    u = l_prev / a_odd  # a_t^{-1} l_{t-1}
    v = l_next.conj() / a_odd  # a_t^{-1} conj(l_t)
    y = b[..., 1::2, :] / a_odd  # a_t^{-1} b_t
    k = n - m - 1
    a_new = a[..., 0::2, :].clone()  # (..., n-m, D)
    a_new[..., :m, :] -= l_prev.conj() * u
    a_new[..., 1:, :] -= (l_next * v)[..., :k, :]
    b_new = b[..., 0::2, :].clone()  # (..., n-m, D)
    b_new[..., :m, :] -= l_prev.conj() * y
    b_new[..., 1:, :] -= (l_next * y)[..., :k, :]
    l_new = -(l_next * u)[..., :k, :]  # (..., n-m-1, D)

    x_even = _diag_reduce(a_new, l_new, b_new)  # (..., n-m, D)
    x_next = _pad_time(x_even[..., 1:, :], m, dim=-2)  # (..., m, D)
    x = torch.empty_like(b)  # (..., n, D)
    x[..., 0::2, :] = x_even
    x[..., 1::2, :] = y - u * x_even[..., :m, :] - v * x_next
    return x
