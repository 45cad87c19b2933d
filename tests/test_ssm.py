"""paraseq.ssm and paraseq.nn.S4/S4D against independent float64 references.

Shape letters: N state size, M modes, r rank, L length, H channels, B batch.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from paraseq import ssm
from paraseq.nn import S4, S4D, S4Block
from paraseq.ssm import kernels as kernels_mod
from paraseq.ssm import s4d_init

NS = [4, 16, 64]
LS = [1, 8, 17, 1024]
RATIONAL = ["euler", "backward_euler", "bilinear"]
C128 = torch.complex128


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (both promoted to ref's dtype)."""
    x = x.to(ref.dtype)
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def dt_for(method: str, N: int) -> float:
    """A step for which the discrete system is stable: forward Euler needs dt |lambda| small."""
    return 0.5 / N**2 if method == "euler" else 0.1


# ------------------------------------------------------------------ independent references

def hippo_np(measure: str, N: int) -> tuple[np.ndarray, np.ndarray]:
    """The HiPPO matrices entry by entry from the formulas (HiPPO paper, s4's hippo.py)."""
    A = np.zeros((N, N))
    B = np.zeros(N)
    for n in range(N):
        for k in range(N):
            if measure == "legs":
                A[n, k] = (-math.sqrt((2 * n + 1) * (2 * k + 1)) if n > k
                           else -(n + 1) if n == k else 0.0)
            elif measure == "legt":
                s = 1.0 if n >= k else (-1.0) ** (n - k)
                A[n, k] = -0.5 * math.sqrt((2 * n + 1) * (2 * k + 1)) * s
            elif measure == "lagt":
                A[n, k] = -1.0 if n > k else -0.5 if n == k else 0.0
        B[n] = {"legs": math.sqrt(2 * n + 1), "legt": math.sqrt(2 * n + 1) / 2,
                "lagt": 1.0}.get(measure, 0.0)
    if measure == "fourier":
        B[0::2] = math.sqrt(2)
        B[0] = 1
        for f in range(N // 2):
            if 2 * f + 1 < N:
                A[2 * f, 2 * f + 1] = -math.pi * f
                A[2 * f + 1, 2 * f] = math.pi * f
        A -= np.outer(B, B)
    return A, B


def discretize_np(A, B, dt, method):
    N = A.shape[0]
    eye = np.eye(N)
    if method == "euler":
        return eye + dt * A, dt * B
    if method == "backward_euler":
        inv = np.linalg.inv(eye - dt * A)
        return inv, inv @ (dt * B)
    if method == "bilinear":
        inv = np.linalg.inv(eye - dt / 2 * A)
        return inv @ (eye + dt / 2 * A), inv @ (dt * B)
    Ab = sla.expm(dt * A)
    return Ab, np.linalg.solve(A, (Ab - eye) @ B)


def kernel_loop_np(A, B, C, dt, L, method):
    Ab, Bb = discretize_np(np.asarray(A), np.asarray(B), dt, method)
    x, out = Bb, []
    for _ in range(L):
        out.append(np.asarray(C) @ x)
        x = Ab @ x
    return np.array(out)


def full_from_half(Lam, P, B, C):
    """The full (conjugate-closed) system from one of each pair, as a dense complex A."""
    Lf = torch.cat([Lam, Lam.conj()], -1)
    Pf = torch.cat([P, P.conj()], -2)
    A = torch.diag_embed(Lf) - Pf @ Pf.conj().transpose(-1, -2)
    return A, torch.cat([B, B.conj()], -1), torch.cat([C, C.conj()], -1)


# ------------------------------------------------------------------------------------ hippo

@pytest.mark.parametrize("measure", ssm.MEASURES)
@pytest.mark.parametrize("N", [1, 2, 4, 5, 16])
def test_hippo_matches_formulas(measure, N):
    if measure == "fourier" and N % 2:
        with pytest.raises(ValueError, match="even N"):
            ssm.hippo(measure, N)
        return
    A, B = ssm.hippo(measure, N)
    A_ref, B_ref = hippo_np(measure, N)
    assert A.shape == (N, N) and B.shape == (N,) and A.dtype == torch.float64
    np.testing.assert_allclose(A.numpy(), A_ref, atol=1e-13)
    np.testing.assert_allclose(B.numpy(), B_ref, atol=1e-13)


def test_legs_reference_values_and_eigenvalues():
    A, B = ssm.hippo("legs", 4)
    A_ref = [[-1, 0, 0, 0], [-1.7321, -2, 0, 0], [-2.2361, -3.8730, -3, 0],
             [-2.6458, -4.5826, -5.9161, -4]]
    np.testing.assert_allclose(A.numpy(), A_ref, atol=1e-4)
    np.testing.assert_allclose(B.numpy(), [1, 1.7321, 2.2361, 2.6458], atol=1e-4)
    for N in (4, 16, 64):
        A, _ = ssm.hippo("legs", N)
        ev = torch.linalg.eigvals(A)
        np.testing.assert_allclose(np.sort(ev.real.numpy()), -np.arange(N, 0, -1.0), atol=1e-9)
        assert ev.imag.abs().max() < 1e-9


@pytest.mark.parametrize("measure", ssm.MEASURES)
@pytest.mark.parametrize("N", [2, 4, 16, 64])
def test_rank_correction_makes_normal(measure, N):
    A, _ = ssm.hippo(measure, N)
    P = ssm.rank_correction(measure, N)
    assert P.shape == (N, {"legt": 2}.get(measure, 1))
    S = A + P @ P.T
    assert (S @ S.T - S.T @ S).abs().max() < 1e-9 * max(1.0, S.abs().max().item() ** 2)
    sym = (S + S.T) / 2
    c = {"legs": -0.5}.get(measure, 0.0)
    assert (sym - c * torch.eye(N, dtype=sym.dtype)).abs().max() < 1e-12 * N


@pytest.mark.parametrize("measure", ssm.MEASURES)
@pytest.mark.parametrize("N", [4, 16, 64])
def test_dplr_reconstructs_A(measure, N):
    A, B = ssm.hippo(measure, N)
    d = ssm.dplr(measure, N)
    eye = torch.eye(N, dtype=C128)
    assert (d.V.conj().T @ d.V - eye).abs().max() < 1e-12
    A_rec = d.V @ (torch.diag_embed(d.Lambda) - d.P @ d.P.conj().T) @ d.V.conj().T
    assert (A_rec - A).abs().max() < 1e-11 * max(1.0, A.abs().max().item())
    assert (d.V @ d.B - B).abs().max() < 1e-12 * N
    # one of each conjugate pair: [V, conj V] is the full unitary basis
    h = ssm.dplr(measure, N, half=True)
    assert h.Lambda.shape == (N // 2,) and h.V.shape == (N, N // 2)
    Vf = torch.cat([h.V, h.V.conj()], 1)
    assert (Vf.conj().T @ Vf - eye).abs().max() < 1e-12
    Af, Bf, _ = full_from_half(h.Lambda, h.P, h.B, h.B)
    assert (Vf @ Af @ Vf.conj().T - A).abs().max() < 1e-11 * max(1.0, A.abs().max().item())
    assert (Vf @ Bf - B).abs().max() < 1e-12 * N


def test_dplr_half_needs_even_N():
    with pytest.raises(ValueError, match="even N"):
        ssm.dplr("legs", 5, half=True)


@pytest.mark.parametrize("measure", ["legs", "legt", "fourier"])
def test_online_reconstruction(measure):
    # a smooth signal on [0, 4]; the state reconstructs the remembered window
    T = 2000
    h = 4.0 / T
    t = torch.arange(1, T + 1, dtype=torch.float64) * h

    def u_fn(s):
        return torch.sin(2.0 * s) + 0.5 * torch.cos(3.0 * s + 1.0)

    window = 500
    x = ssm.hippo_states(u_fn(t), 32 if measure != "fourier" else 64, measure,
                         dt=2.0 / window)  # (T, N)
    assert x.shape[0] == T
    y = torch.linspace(0.05, 0.95, 200, dtype=torch.float64)
    rec = ssm.hippo_reconstruct(measure, x[-1], y)  # (S,)
    start = 0.0 if measure == "legs" else t[-1].item() - window * h
    true = u_fn(start + (t[-1].item() - start) * y)
    tol = {"legs": 5e-3, "legt": 5e-3, "fourier": 0.1}[measure]  # Fourier: Gibbs at the ends
    assert (rec - true).abs().max() < tol


# ------------------------------------------------------------------------------- discretize

@pytest.mark.parametrize("method", ssm.METHODS)
@pytest.mark.parametrize("measure", ssm.MEASURES)
def test_discretize_matches_reference(method, measure):
    A, B = ssm.hippo(measure, 8)
    Ab, Bb = ssm.discretize(A, B, 0.05, method)
    Ab_ref, Bb_ref = discretize_np(A.numpy(), B.numpy(), 0.05, method) if not (
        method == "zoh" and measure == "fourier") else (None, None)
    if Ab_ref is None:  # singular A (Fourier's idle state): check against the block exponential
        M = np.zeros((9, 9))
        M[:8, :8], M[:8, 8] = 0.05 * A.numpy(), 0.05 * B.numpy()
        E = sla.expm(M)
        Ab_ref, Bb_ref = E[:8, :8], E[:8, 8]
    np.testing.assert_allclose(Ab.numpy(), Ab_ref, atol=1e-12)
    np.testing.assert_allclose(Bb.numpy(), Bb_ref, atol=1e-12)


@pytest.mark.parametrize("method", ssm.METHODS)
def test_discretize_diagonal_and_broadcast(method):
    g = torch.Generator().manual_seed(0)
    lam = torch.complex(-torch.rand(3, 5, generator=g, dtype=torch.float64),
                        torch.randn(3, 5, generator=g, dtype=torch.float64))  # (H, N)
    B = torch.randn(3, 5, generator=g, dtype=torch.float64).to(C128)
    dt = torch.tensor([0.01, 0.1, 0.5], dtype=torch.float64)  # (H,)
    ab, bb = ssm.discretize_diagonal(lam, B, dt, method)
    Ab, Bb = ssm.discretize(torch.diag_embed(lam), B, dt, method)  # per-channel dt
    assert (torch.diag_embed(ab) - Ab).abs().max() < 1e-13
    assert (bb - Bb).abs().max() < 1e-13
    # zero pole under ZOH: Bb = dt B
    _, b0 = ssm.discretize_diagonal(torch.zeros(1, dtype=C128), torch.ones(1, dtype=C128), 0.3)
    assert abs(b0.item() - 0.3) < 1e-15


# ---------------------------------------------------------------------------------- kernels

def test_reference_kernel_values():
    A, B = ssm.hippo("legs", 4)
    C = torch.ones(4, dtype=torch.float64)
    ref = {"bilinear": [0.5471, 0.2234, 0.0640, -0.0046, -0.0256, -0.0239, -0.0133, -0.0007],
           "zoh": [0.5299, 0.2212, 0.0677, 0.0006, -0.0209, -0.0204, -0.0109, 0.0006]}
    for method, values in ref.items():
        K = ssm.kernel_naive(A, B, C, 0.1, 8, method)
        np.testing.assert_allclose(K.numpy(), values, atol=6e-5)
    d = ssm.dplr("legs", 4, half=True)
    K = ssm.kernel_dplr(d.Lambda, d.P, d.B, C.to(C128) @ d.V, 0.1, 8, conj=True)
    np.testing.assert_allclose(K.numpy(), ref["bilinear"], atol=6e-5)


@pytest.mark.parametrize("method", ssm.METHODS)
@pytest.mark.parametrize("L", [1, 5, 17, 100])
def test_naive_kernel_against_loop(method, L):
    A, B = ssm.hippo("legt", 6)
    C = torch.linspace(-1, 1, 6, dtype=torch.float64)
    K = ssm.kernel_naive(A, B, C, 0.1, L, method)
    np.testing.assert_allclose(K.numpy(), kernel_loop_np(A.numpy(), B.numpy(), C.numpy(),
                                                         0.1, L, method), rtol=0, atol=1e-12)


@pytest.mark.parametrize("measure", ssm.MEASURES)
@pytest.mark.parametrize("method", RATIONAL)
@pytest.mark.parametrize("N", NS)
def test_dplr_route_agrees_with_naive(measure, method, N):
    A, B = ssm.hippo(measure, N)
    C = torch.randn(N, generator=torch.Generator().manual_seed(N), dtype=torch.float64)
    d, h = ssm.dplr(measure, N), ssm.dplr(measure, N, half=True)
    dt = dt_for(method, N)
    for L in LS:
        ref = ssm.kernel_naive(A, B, C, dt, L, method)  # (L,)
        full = ssm.kernel_dplr(d.Lambda, d.P, d.B, C.to(C128) @ d.V, dt, L, method)
        assert full.shape == (L,) and full.dtype == C128
        assert rel(full.real, ref) < 1e-10 and full.imag.abs().max() / ref.abs().max() < 1e-10
        half = ssm.kernel_dplr(h.Lambda, h.P, h.B, C.to(C128) @ h.V, dt, L, method, conj=True)
        assert half.dtype == torch.float64 and rel(half, ref) < 1e-10


@pytest.mark.parametrize("method", RATIONAL)
def test_dplr_with_c_tilde(method):
    # tilde=True takes C~ = C (I - Ab^L) as given: no matrix powers inside
    N, L = 16, 64
    h = ssm.dplr("legs", N, half=True)
    A, B = ssm.hippo("legs", N)
    C = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dt = dt_for(method, N)
    Ab, _ = ssm.discretize(A, B, dt, method)
    Ct = C @ (torch.eye(N, dtype=torch.float64) - torch.linalg.matrix_power(Ab, L))
    K = ssm.kernel_dplr(h.Lambda, h.P, h.B, Ct.to(C128) @ h.V, dt, L, method, conj=True,
                        tilde=True)
    assert rel(K, ssm.kernel_naive(A, B, C, dt, L, method)) < 1e-10


@pytest.mark.parametrize("measure", ssm.MEASURES)
@pytest.mark.parametrize("method", ssm.METHODS)
@pytest.mark.parametrize("N", NS)
def test_diagonal_route_on_the_normal_part(measure, method, N):
    # S4D's Vandermonde route on A + P P^T = V Lambda V^* against powers of the dense matrix
    A, B = ssm.hippo(measure, N)
    P = ssm.rank_correction(measure, N)
    An = A + P @ P.T
    d = ssm.dplr(measure, N)
    C = torch.randn(N, generator=torch.Generator().manual_seed(N), dtype=torch.float64)
    dt = dt_for(method, N)
    for L in LS:
        ref = ssm.kernel_naive(An, B, C, dt, L, method)
        K = ssm.kernel_diagonal(d.Lambda, d.B, C.to(C128) @ d.V, dt, L, method, conj=False)
        assert rel(K.real, ref) < 1e-10


@pytest.mark.parametrize("kind", ["lin", "inv", "legs"])
@pytest.mark.parametrize("method", ssm.METHODS)
@pytest.mark.parametrize("N", NS)
def test_s4d_route_agrees_with_naive(kind, method, N):
    lam, B = s4d_init(N, kind)  # (M,) each
    C = torch.randn(N // 2, generator=torch.Generator().manual_seed(2), dtype=C128)
    Af, Bf, Cf = full_from_half(lam, torch.zeros(N // 2, 0, dtype=C128), B, C)
    dt = 1e-3 if method == "euler" else 0.05
    for L in LS:
        ref = ssm.kernel_naive(Af, Bf, Cf, dt, L, method)  # complex, real up to rounding
        assert ref.imag.abs().max() < 1e-12 * ref.abs().max()
        K = ssm.kernel_diagonal(lam, B, C, dt, L, method)
        assert K.dtype == torch.float64 and rel(K, ref.real) < 1e-10
        # and the DPLR route with rank 0 (the rational rules)
        if method != "zoh":
            K2 = ssm.kernel_dplr(lam, torch.zeros(N // 2, 0, dtype=C128), B, C, dt, L, method,
                                 conj=True)
            assert rel(K2, ref.real) < 1e-10
    # float32 inputs against the float64 kernel of the same rounded system (forward Euler
    # only where it is stable, |1 + dt lambda| < 1: float32 overflows where it is not)
    if method == "euler":
        dt = min(dt, 0.9 * (-2 * lam.real / lam.abs() ** 2).min().item())
    c64 = [t.to(torch.complex64) for t in (lam, B, C)]
    Af, Bf, Cf = full_from_half(c64[0].to(C128), torch.zeros(N // 2, 0, dtype=C128),
                                c64[1].to(C128), c64[2].to(C128))
    for L in LS:
        ref = ssm.kernel_naive(Af, Bf, Cf, dt, L, method).real
        K = ssm.kernel_diagonal(*c64, dt, L, method)
        assert K.dtype == torch.float32 and rel(K, ref) < 1e-4
        if method != "zoh":
            K2 = ssm.kernel_dplr(c64[0], torch.zeros(N // 2, 0, dtype=torch.complex64), c64[1],
                                 c64[2], dt, L, method, conj=True)
            assert rel(K2, ref) < 1e-4


@pytest.mark.parametrize("measure", ssm.MEASURES)
@pytest.mark.parametrize("method", RATIONAL)
@pytest.mark.parametrize("N", NS)
def test_float32_routes(measure, method, N):
    # float32 inputs against the float64 kernel of the same (rounded) system
    h = ssm.dplr(measure, N, half=True)
    C = torch.randn(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c64 = [t.to(torch.complex64) for t in (h.Lambda, h.P, h.B, C.to(C128) @ h.V)]
    Af, Bf, Cf = full_from_half(*[t.to(C128) for t in c64])
    dt = dt_for(method, N)
    for L in LS:
        ref = ssm.kernel_naive(Af, Bf, Cf, dt, L, method).real
        K = ssm.kernel_dplr(*c64, dt, L, method, conj=True)
        assert K.dtype == torch.float32 and rel(K, ref) < 1e-4
    if measure == "legs":  # the damped normal part: S4D's route in float32 too
        for L in LS:
            Ad, Bd, Cd = full_from_half(c64[0].to(C128), torch.zeros(N // 2, 0, dtype=C128),
                                        c64[2].to(C128), c64[3].to(C128))
            for m in (method, "zoh"):
                ref = ssm.kernel_naive(Ad, Bd, Cd, dt, L, m).real
                K = ssm.kernel_diagonal(c64[0], c64[2], c64[3], dt, L, m)
                assert K.dtype == torch.float32 and rel(K, ref) < 1e-4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 8), r=st.integers(0, 3), L=st.integers(1, 300),
       method=st.sampled_from(RATIONAL), tilde=st.booleans(), conj=st.booleans(),
       log_dt=st.floats(-4, 0), seed=st.integers(0, 2**16))
def test_random_dplr_systems(M, r, L, method, tilde, conj, log_dt, seed):
    g = torch.Generator().manual_seed(seed)
    lam = torch.complex(-0.05 - torch.rand(M, generator=g, dtype=torch.float64),
                        3 * torch.randn(M, generator=g, dtype=torch.float64))
    P, B, C = (torch.randn(*s, generator=g, dtype=C128) for s in ((M, r), (M,), (M,)))
    dt = 10.0**log_dt
    if method == "euler":
        dt = min(dt, 0.05)
    Af, Bf, Cf = (full_from_half(lam, P, B, C) if conj else
                  (torch.diag_embed(lam) - P @ P.conj().T, B, C))
    if tilde:  # hand over C~ = C (I - Ab^L)
        Ab, _ = ssm.discretize(Af, Bf, dt, method)
        Ct = Cf @ (torch.eye(Af.shape[0], dtype=C128) - torch.linalg.matrix_power(Ab, L))
        C_in = Ct[:M]
    else:
        C_in = C
    ref = ssm.kernel_naive(Af, Bf, Cf, dt, L, method)
    K = ssm.kernel_dplr(lam, P, B, C_in, dt, L, method, conj=conj, tilde=tilde)
    assert rel(K, ref.real if conj else ref) < 1e-9


def test_batched_kernels_per_channel_dt():
    H, N, L = 3, 8, 50
    h = ssm.dplr("legs", N, half=True)
    A, B = ssm.hippo("legs", N)
    C = torch.randn(H, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dt = torch.tensor([1e-3, 1e-2, 1e-1], dtype=torch.float64)
    K = ssm.kernel_dplr(h.Lambda, h.P, h.B, C.to(C128) @ h.V, dt, L, conj=True)  # (H, L)
    ref = ssm.kernel_naive(A, B, C, dt, L)
    assert K.shape == (H, L) and rel(K, ref) < 1e-10
    Kd = ssm.kernel_diagonal(h.Lambda, h.B, C.to(C128) @ h.V, dt, L, "bilinear")
    assert Kd.shape == (H, L)


def test_cauchy_and_vandermonde_against_loops(monkeypatch):
    g = torch.Generator().manual_seed(0)
    M, Z, J, L = 7, 13, 3, 29
    v = torch.randn(2, J, M, generator=g, dtype=C128)
    lam = torch.randn(2, M, generator=g, dtype=C128)
    alpha, beta = (torch.randn(2, Z, generator=g, dtype=C128) for _ in range(2))
    ref = np.einsum("bjn,bzn->bzj", v.numpy(),
                    1 / (alpha.numpy()[:, :, None] - beta.numpy()[:, :, None]
                         * lam.numpy()[:, None, :]))
    out = ssm.cauchy(v, alpha, beta, lam)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12)
    x = torch.randn(2, M, generator=g, dtype=C128) * 0.3
    vv = v[:, 0]
    ref_v = np.stack([(vv.numpy() * x.numpy() ** k).sum(-1) for k in range(L)], -1)
    out_v = ssm.vandermonde(vv, torch.log(x), L)
    np.testing.assert_allclose(out_v.numpy(), ref_v, rtol=1e-10, atol=1e-14)
    # chunked (memory-bounded) evaluation gives the same numbers
    monkeypatch.setattr(kernels_mod, "_CHUNK_ELEMENTS", 5)
    np.testing.assert_allclose(ssm.cauchy(v, alpha, beta, lam).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(ssm.vandermonde(vv, torch.log(x), L).numpy(), ref_v,
                               rtol=1e-10, atol=1e-14)


def test_causal_conv_and_scan_against_loop():
    g = torch.Generator().manual_seed(0)
    L, N = 37, 6
    u = torch.randn(2, L, generator=g, dtype=torch.float64)
    A, B = ssm.hippo("legs", N)
    C = torch.randn(N, generator=g, dtype=torch.float64)
    K = ssm.kernel_naive(A, B, C, 0.1, L)
    y = ssm.causal_conv(u, K)
    ref = np.stack([[sum(K[k].item() * u[b, t - k].item() for k in range(t + 1))
                     for t in range(L)] for b in range(2)])
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-12)
    Ab, Bb = ssm.discretize(A, B, 0.1)
    y2, x = ssm.ssm_scan(Ab, Bb, C, u)
    assert x.shape == (2, L, N)
    np.testing.assert_allclose(y2.numpy(), ref, atol=1e-12)


# ----------------------------------------------------------------------------------- errors

def test_bad_input_errors():
    A, B = ssm.hippo("legs", 4)
    C = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"unknown measure 'legz'.*'legs'"):
        ssm.hippo("legz", 4)
    with pytest.raises(ValueError, match="N must be >= 1"):
        ssm.hippo("legs", 0)
    with pytest.raises(TypeError, match="N must be an int"):
        ssm.rank_correction("legs", 2.5)
    with pytest.raises(ValueError, match="L must be >= 1"):
        ssm.kernel_naive(A, B, C, 0.1, 0)
    with pytest.raises(ValueError, match="dt must be positive"):
        ssm.kernel_naive(A, B, C, -0.1, 8)
    with pytest.raises(ValueError, match="dt must be positive"):
        ssm.discretize(A, B, torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError, match="unknown method 'tustin'"):
        ssm.discretize(A, B, 0.1, "tustin")
    with pytest.raises(ValueError, match="A must be a square matrix"):
        ssm.discretize(B, B, 0.1)
    with pytest.raises(ValueError, match=r"B must have shape \(\.\.\., 4\)"):
        ssm.kernel_naive(A, torch.ones(3, dtype=torch.float64), C, 0.1, 8)
    d = ssm.dplr("legs", 4)
    with pytest.raises(ValueError, match="no Cauchy/Woodbury form"):
        ssm.kernel_dplr(d.Lambda, d.P, d.B, d.B, 0.1, 8, "zoh")
    with pytest.raises(ValueError, match=r"P must have shape \(\.\.\., M, r\)"):
        ssm.kernel_dplr(d.Lambda, d.B, d.B, d.B, 0.1, 8)
    with pytest.raises(ValueError, match="L must be >= 1"):
        ssm.kernel_diagonal(d.Lambda, d.B, d.B, 0.1, 0)
    with pytest.raises(ValueError, match="dt must be positive"):
        ssm.kernel_diagonal(d.Lambda, d.B, d.B, 0.0, 4)
    layer = S4(4, 8, l_max=16)
    with pytest.raises(ValueError, match=r"3 dims \(B, L, H\)"):
        layer(torch.randn(16, 4))
    with pytest.raises(ValueError, match="transposed=True"):
        layer(torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="exceeds l_max=16"):
        layer(torch.randn(2, 17, 4))
    with pytest.raises(ValueError, match="unknown measure"):
        S4(4, 8, measure="chebyshev")
    with pytest.raises(ValueError, match="d_state must be even"):
        S4D(4, 7)
    with pytest.raises(ValueError, match="d_model must be an int >= 1"):
        S4D(0, 8)
    with pytest.raises(ValueError, match="ZOH"):
        S4(4, 8, method="zoh")
    with pytest.raises(RuntimeError, match="setup_step"):
        S4D(4, 8).step(torch.randn(2, 4), None)
    with pytest.raises(ValueError, match="bidirectional"):
        S4D(4, 8, bidirectional=True).setup_step()
    with pytest.raises(ValueError, match="mode must be"):
        S4D(4, 8)(torch.randn(1, 5, 4), mode="fft")


# ----------------------------------------------------------------------------------- layers

def run_steps(layer, u):
    """Feed u (B, L, H) through layer.step one time step at a time."""
    layer.setup_step()
    state = layer.default_state(u.shape[0])
    ys = []
    for t in range(u.shape[1]):
        y, state = layer.step(u[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1)  # (B, L, H)


@pytest.mark.parametrize("cls", [S4, S4D])
def test_recurrent_equals_convolution_float32(cls):
    torch.manual_seed(0)
    L = 1000
    layer = cls(8, 16, **({"l_max": L} if cls is S4 else {}))
    u = torch.randn(2, L, 8)  # (B, L, H)
    with torch.no_grad():
        y = layer(u)
        scale = y.abs().max().item()
        assert (run_steps(layer, u) - y).abs().max().item() <= 1e-5 * scale
        assert (layer(u, mode="recurrent") - y).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("cls,kw", [(S4, {"measure": m}) for m in ssm.MEASURES]
                         + [(S4, {"method": "backward_euler"})]
                         + [(S4D, {"init": k}) for k in ("lin", "inv", "legs")]
                         + [(S4D, {"method": m}) for m in ("euler", "bilinear")])
def test_recurrent_equals_convolution_float64(cls, kw):
    torch.manual_seed(1)
    L = 300
    if cls is S4:
        kw = {"l_max": 512, **kw}
    layer = cls(4, 8, dtype=torch.float64, **kw)
    u = torch.randn(3, L, 4, dtype=torch.float64)
    with torch.no_grad():
        y = layer(u)
        scale = y.abs().max().item()
        assert (run_steps(layer, u) - y).abs().max().item() <= 1e-10 * scale
        assert (layer(u, mode="recurrent") - y).abs().max().item() <= 1e-10 * scale


@pytest.mark.parametrize("cls", [S4, S4D])
def test_layout_and_bidirectional(cls):
    torch.manual_seed(2)
    kw = {"l_max": 32} if cls is S4 else {}
    layer = cls(3, 8, bidirectional=True, dtype=torch.float64, **kw)
    u = torch.randn(2, 20, 3, dtype=torch.float64)
    y = layer(u)
    K = layer.kernel(20)  # (2, H, L)
    # y_t = sum_{k<=t} K0_k u_{t-k} + sum_{s>=1} K1_{s-1} u_{t+s} + D u_t
    ref = torch.zeros_like(u)
    for t in range(20):
        for s in range(20):
            k = K[0, :, t - s] if s <= t else K[1, :, s - t - 1]
            ref[:, t] += k * u[:, s]
    ref += layer.D * u
    assert (y - ref).abs().max() < 1e-12
    tr = copy.deepcopy(layer)
    tr.transposed = True
    assert (tr(u.transpose(1, 2)).transpose(1, 2) - y).abs().max() < 1e-14


@pytest.mark.parametrize("cls,kw", [(S4, {"l_max": 8}),
                                    (S4, {"l_max": 8, "measure": "legt",
                                          "bidirectional": True}),
                                    (S4D, {}), (S4D, {"bidirectional": True,
                                                      "method": "bilinear"})])
def test_gradcheck_every_parameter(cls, kw):
    torch.manual_seed(3)
    layer = cls(2, 4, dtype=torch.float64, **kw)
    u = torch.randn(2, 7, 2, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    assert {"log_dt", "D", "log_neg_re", "im", "B", "C"} <= set(names)
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def f(*ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (u,))

    assert torch.autograd.gradcheck(f, params)
    if not kw.get("bidirectional"):
        def g(*ps):
            return functional_call(layer, dict(zip(names, ps, strict=True)), (u,),
                                   {"mode": "recurrent"})

        assert torch.autograd.gradcheck(g, params)


@pytest.mark.parametrize("layer", ["s4", "s4d"])
def test_block_forward_step_and_grads(layer):
    torch.manual_seed(4)
    kw = {"l_max": 64} if layer == "s4" else {}
    block = S4Block(6, layer=layer, d_state=8, dropout=0.1, **kw)
    u = torch.randn(2, 50, 6)
    y = block(u)
    assert y.shape == u.shape
    y.square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    block.eval()
    with torch.no_grad():
        y = block(u)
        assert (run_steps(block, u) - y).abs().max() < 1e-5 * y.abs().max()


# -------------------------------------------------------------------------------------- CLI

def test_cli_s4_quick(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from paraseq.cli import main

    assert main(["s4", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    png = tmp_path / "s4_sign_recall.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out
    assert "GRU" in out and "held-out acc" in out


def test_cli_hippo(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from paraseq.cli import main

    assert main(["hippo", "--samples", "600", "--window", "150", "--N", "16",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    png = tmp_path / "hippo_reconstruction.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "legt" in out
    assert main(["hippo", "--N", "0", "--no-plot"]) == 2
    assert main(["s4", "--length", "0", "--no-plot"]) == 2
