"""paraseq.solve.tridiag against dense float64 solves of the assembled matrix.

Shape letters: T blocks (time steps), D block size, ``...`` batch dims.

The systems are Levenberg-Marquardt normal matrices M = B^H B + mu I of a block lower bidiagonal
B (the Jacobian of residuals r_t = C_t x_t - F_{t-1} x_{t-1}): near-identity diagonal blocks
C_t and sub-diagonal blocks -F_t, so

    M[t, t]   = C_t^H C_t + F_t^H F_t + mu I     (the F term only for t < T-1)
    M[t+1, t] = -C_{t+1}^H F_t.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paraseq.solve.tridiag import solve_block_tridiagonal, solve_tridiagonal_diag

LENGTHS = [1, 2, 3, 17, 100, 257]
SIZES = [1, 2, 5]
BATCHES = [(), (3,), (2, 3)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
F64 = torch.float64


def lm_factors(batch, T, D, *, jac_norm=0.5, seed=0, dtype=F64):
    """Blocks of B: C (..., T, D, D) near the identity, F (..., T-1, D, D) of spectral norm
    jac_norm."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        r = torch.randn(*shape, generator=g, dtype=F64)
        if dtype.is_complex:
            r = torch.complex(r, torch.randn(*shape, generator=g, dtype=F64))
        return r

    C = torch.eye(D, dtype=dtype) + 0.1 * rnd(*batch, T, D, D) / D**0.5
    F = rnd(*batch, T - 1, D, D)
    F = jac_norm * F / torch.linalg.matrix_norm(F, ord=2).clamp_min(1e-12)[..., None, None]
    return C, F


def lm_blocks(C, F, mu):
    """diag (..., T, D, D) and lower (..., T-1, D, D) of M = B^H B + mu I."""
    D = C.shape[-1]
    diag = C.mH @ C + mu * torch.eye(D, dtype=C.dtype)
    diag[..., :-1, :, :] += F.mH @ F
    return diag, -C[..., 1:, :, :].mH @ F


def lm_system(batch, T, D, *, jac_norm=0.5, mu=0.1, seed=0, dtype=F64):
    C, F = lm_factors(batch, T, D, jac_norm=jac_norm, seed=seed, dtype=dtype)
    diag, lower = lm_blocks(C, F, mu)
    g = torch.Generator().manual_seed(seed + 1)
    rhs = torch.randn(*batch, T, D, generator=g, dtype=F64).to(dtype)
    return diag, lower, rhs


def assemble(diag, lower):
    """The dense (..., T*D, T*D) matrix with the given diagonal and sub-diagonal blocks."""
    T, D = diag.shape[-3], diag.shape[-1]
    M = diag.new_zeros((*diag.shape[:-3], T * D, T * D))
    for t in range(T):
        M[..., t * D : (t + 1) * D, t * D : (t + 1) * D] = diag[..., t, :, :]
    for t in range(T - 1):
        M[..., (t + 1) * D : (t + 2) * D, t * D : (t + 1) * D] = lower[..., t, :, :]
        M[..., t * D : (t + 1) * D, (t + 1) * D : (t + 2) * D] = lower[..., t, :, :].mH
    return M


def solve_each(M, b):
    """torch.linalg.solve(M, b) one matrix at a time: M (..., n, n), b (..., n).

    Batched CPU solves of n >~ 150 with more than one thread hit an MKL bug in torch (DLASWP
    "Parameter 6 was incorrect", then a RuntimeError or a hang: pytorch/pytorch#142815).
    """
    batch = M.shape[:-2]
    xs = [torch.linalg.solve(Mi, bi) for Mi, bi in zip(M.reshape(-1, *M.shape[-2:]),
                                                       b.reshape(-1, b.shape[-1]), strict=True)]
    return torch.stack(xs).reshape(*batch, M.shape[-1])


def dense_solve(diag, lower, rhs):
    """Reference: torch.linalg.solve on the assembled matrix; x (..., T, D)."""
    x = solve_each(assemble(diag, lower), rhs.flatten(-2))
    return x.unflatten(-1, rhs.shape[-2:])


def rel_err(x, ref):
    """max over the batch of ||x - ref|| / ||ref|| (2-norms over all T*D entries)."""
    x = x.to(ref.dtype).flatten(-2)
    ref = ref.flatten(-2)
    return ((x - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def residual(diag, lower, rhs, x):
    """max over the batch of ||M x - rhs|| / ||rhs||, with the product taken blockwise."""
    Mx = (diag @ x.unsqueeze(-1)).squeeze(-1)
    Mx[..., 1:, :] += (lower @ x[..., :-1, :, None]).squeeze(-1)
    Mx[..., :-1, :] += (lower.mH @ x[..., 1:, :, None]).squeeze(-1)
    r = (Mx - rhs).flatten(-2).norm(dim=-1) / rhs.flatten(-2).norm(dim=-1)
    return r.max().item()


@functools.cache
def block_case(batch, T, D):
    """A well-conditioned float64 system (cond(M) < 100) and its dense solution."""
    diag, lower, rhs = lm_system(batch, T, D, seed=T * 10 + D)
    return diag, lower, rhs, dense_solve(diag, lower, rhs)


def diag_system(batch, T, D, *, mu=0.1, seed=0, dtype=F64):
    """D scalar LM systems (B bidiagonal per channel): diag, lower (..., T or T-1, D), rhs."""
    g = torch.Generator().manual_seed(seed)
    c = 1 + 0.1 * torch.randn(*batch, T, D, generator=g, dtype=F64)
    f = 0.5 * (2 * torch.rand(*batch, T - 1, D, generator=g, dtype=F64) - 1)
    diag = c * c + mu
    diag[..., :-1, :] += f * f
    lower = -c[..., 1:, :] * f
    rhs = torch.randn(*batch, T, D, generator=g, dtype=F64)
    return diag.to(dtype), lower.to(dtype), rhs.to(dtype)


@functools.cache
def diag_case(batch, T, D):
    """A well-conditioned float64 diagonal-block system and its dense solution, per channel."""
    diag, lower, rhs = diag_system(batch, T, D, seed=T * 10 + D)
    M = (torch.diag_embed(diag.mT) + torch.diag_embed(lower.mT, -1)
         + torch.diag_embed(lower.mT, 1))  # (..., D, T, T)
    ref = solve_each(M, rhs.mT).mT  # (..., T, D)
    return diag, lower, rhs, ref


# ---------------------------------------------------------------------------- the test systems


def test_blocks_are_the_normal_matrix():
    """lm_blocks assembles to B^H B + mu I for the dense bidiagonal B (checks the test helper)."""
    T, D, mu = 5, 3, 0.3
    for dtype in (F64, torch.complex128):
        C, F = lm_factors((2,), T, D, seed=1, dtype=dtype)
        B = assemble(C, torch.zeros_like(F))
        for t in range(T - 1):
            B[..., (t + 1) * D : (t + 2) * D, t * D : (t + 1) * D] = -F[..., t, :, :]
        M = B.mH @ B + mu * torch.eye(T * D, dtype=dtype)
        diag, lower = lm_blocks(C, F, mu)
        torch.testing.assert_close(assemble(diag, lower), M, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------- the block solver


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("D", SIZES)
@pytest.mark.parametrize("T", LENGTHS)
def test_block_matches_dense(T, D, batch, dtype):
    diag, lower, rhs, ref = block_case(batch, T, D)
    x = solve_block_tridiagonal(diag.to(dtype), lower.to(dtype), rhs.to(dtype))
    assert x.shape == rhs.shape and x.dtype == dtype
    assert rel_err(x, ref) <= TOL[dtype]


def test_block_ill_conditioned():
    """||F_t|| = 3 and mu = 1e-6: cond(M) ~ 1e7, residual still at the 1e-8 level or below."""
    T, D = 200, 4
    diag, lower, rhs = lm_system((2,), T, D, jac_norm=3.0, mu=1e-6, seed=5)
    cond = torch.linalg.cond(assemble(diag, lower)).min().item()
    assert cond > 1e5  # the case really is ill-conditioned
    x = solve_block_tridiagonal(diag, lower, rhs)
    assert residual(diag, lower, rhs, x) <= 1e-8
    assert rel_err(x, dense_solve(diag, lower, rhs)) <= 1e-16 * cond * 100


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 70),
    D=st.integers(1, 4),
    batch=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    jac_norm=st.floats(0.0, 2.0),
    log_mu=st.floats(-4.0, 0.0),
    seed=st.integers(0, 2**16),
)
def test_block_backward_stable(T, D, batch, jac_norm, log_mu, seed):
    """Normwise backward error ||M x - b|| / (||M|| ||x|| + ||b||) stays at a few ulps."""
    diag, lower, rhs = lm_system(batch, T, D, jac_norm=jac_norm, mu=10.0**log_mu, seed=seed)
    x = solve_block_tridiagonal(diag, lower, rhs)
    M = assemble(diag, lower)
    r = (M @ x.flatten(-2).unsqueeze(-1)).squeeze(-1) - rhs.flatten(-2)
    scale = (torch.linalg.matrix_norm(M, ord=2) * x.flatten(-2).norm(dim=-1)
             + rhs.flatten(-2).norm(dim=-1))
    assert (r.norm(dim=-1) / scale).max().item() <= 1e-14


def test_block_single_block():
    diag, lower, rhs = lm_system((3,), 1, 4)
    assert lower.shape == (3, 0, 4, 4)
    x = solve_block_tridiagonal(diag, lower, rhs)
    torch.testing.assert_close(x[..., 0, :], torch.linalg.solve(diag[..., 0, :, :],
                                                                 rhs[..., 0, :]))


def test_block_complex_hermitian():
    T, D = 37, 3
    diag, lower, rhs = lm_system((2,), T, D, dtype=torch.complex128, seed=3)
    x = solve_block_tridiagonal(diag, lower, rhs)
    assert rel_err(x, dense_solve(diag, lower, rhs)) <= 1e-10


def test_block_broadcasts_leading_dims():
    diag, lower, rhs = lm_system((), 20, 3)
    rhs4 = torch.stack([rhs, 2 * rhs, -rhs, rhs.flip(-1)])  # (4, T, D)
    x = solve_block_tridiagonal(diag, lower.expand(4, -1, -1, -1), rhs4)
    assert x.shape == (4, 20, 3)
    for i in range(4):
        torch.testing.assert_close(x[i], solve_block_tridiagonal(diag, lower, rhs4[i]))


def test_block_leaves_inputs_and_autograd_alone():
    """Used under no_grad; the inputs are not written to and no graph is built."""
    diag, lower, rhs = lm_system((2,), 9, 2)
    saved = [t.clone() for t in (diag, lower, rhs)]
    for t in (diag, lower, rhs):
        t.requires_grad_(True)
    with torch.no_grad():
        x = solve_block_tridiagonal(diag, lower, rhs)
    assert not x.requires_grad
    for t, s in zip((diag, lower, rhs), saved, strict=True):
        assert torch.equal(t.detach(), s)


def test_block_rejects_bad_input():
    diag, lower, rhs = lm_system((), 5, 2)
    with pytest.raises(ValueError):
        solve_block_tridiagonal(diag, lower[:-1], rhs)
    with pytest.raises(ValueError):
        solve_block_tridiagonal(diag, lower, rhs[:-1])
    with pytest.raises(ValueError):
        solve_block_tridiagonal(diag[..., :1], lower, rhs)
    with pytest.raises(ValueError):
        solve_block_tridiagonal(diag[:0], lower[:0], rhs[:0])
    with pytest.raises(TypeError):
        solve_block_tridiagonal(diag, lower, rhs.float())
    with pytest.raises(torch.linalg.LinAlgError):  # indefinite
        solve_block_tridiagonal(-diag, lower, rhs)


# ----------------------------------------------------------------------- the diagonal variant


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("D", SIZES)
@pytest.mark.parametrize("T", LENGTHS)
def test_diag_matches_dense(T, D, batch, dtype):
    diag, lower, rhs, ref = diag_case(batch, T, D)
    x = solve_tridiagonal_diag(diag.to(dtype), lower.to(dtype), rhs.to(dtype))
    assert x.shape == rhs.shape and x.dtype == dtype
    assert rel_err(x, ref) <= TOL[dtype]


@pytest.mark.parametrize("T", [1, 2, 3, 17, 100])
def test_diag_matches_block_solver(T):
    diag, lower, rhs = diag_system((2,), T, 3, seed=7)
    x = solve_tridiagonal_diag(diag, lower, rhs)
    xb = solve_block_tridiagonal(torch.diag_embed(diag), torch.diag_embed(lower), rhs)
    torch.testing.assert_close(x, xb, rtol=0, atol=1e-12)


def test_diag_ill_conditioned():
    """Per channel |f_t| = 3 and mu = 1e-6 (cond ~ 1e7): residual at the 1e-8 level or below."""
    T, D = 200, 4
    g = torch.Generator().manual_seed(11)
    f = 3.0 * torch.sign(torch.randn(T - 1, D, generator=g, dtype=F64))
    c = torch.ones(T, D, dtype=F64)
    diag = c * c + 1e-6
    diag[:-1] += f * f
    lower = -c[1:] * f
    rhs = torch.randn(T, D, generator=g, dtype=F64)
    x = solve_tridiagonal_diag(diag, lower, rhs)
    blocks = torch.diag_embed(diag), torch.diag_embed(lower)
    assert residual(*blocks, rhs, x) <= 1e-8
    assert torch.linalg.cond(assemble(*blocks)).item() > 1e5


def test_diag_complex_hermitian():
    T, D = 23, 2
    diag, lower, rhs = lm_system((2,), T, D, dtype=torch.complex128, seed=4)
    # entry d of every block: the principal submatrices of M for the D channels, so Hermitian
    # positive definite (the diagonal is real up to rounding; make it exactly so)
    d, l = diag.diagonal(dim1=-2, dim2=-1), lower.diagonal(dim1=-2, dim2=-1)
    d = d.real.to(d.dtype)
    x = solve_tridiagonal_diag(d, l, rhs)
    ref = dense_solve(torch.diag_embed(d), torch.diag_embed(l), rhs)
    assert rel_err(x, ref) <= 1e-10


def test_diag_rejects_bad_input():
    diag, lower, rhs = diag_system((), 5, 2)
    with pytest.raises(ValueError):
        solve_tridiagonal_diag(diag, lower[:-1], rhs)
    with pytest.raises(ValueError):
        solve_tridiagonal_diag(diag, lower, rhs[..., :1])
    with pytest.raises(TypeError):
        solve_tridiagonal_diag(diag, lower.float(), rhs)
