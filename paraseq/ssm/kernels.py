"""The SSM convolution kernel K_k = C Ab^k Bb (k < L) by three routes, and its two uses.

Shape letters: N state size, M modes of a diagonal basis, r rank of the low-rank part,
L kernel / sequence length, Z frequency nodes (L, or L//2 + 1 for real kernels), ``...``
leading (batch) dims such as H channels.

Routes (they agree to rounding; tests/test_ssm.py holds them together):

1. ``kernel_naive``: discretise A densely and take powers: the float64 reference.
2. ``kernel_dplr`` (S4; Gu, Goel, Re, ICLR 2022, Algorithm 1): A = V (Lambda - P P^*) V^*.
   The truncated generating function sum_{k<L} K_k z^k = C~ (I - z Ab)^-1 Bb with
   C~ = C (I - Ab^L) is evaluated at the L-th roots of unity and inverted by one FFT. For the
   rational rules (euler, backward_euler, bilinear) (I - z Ab)^-1 Bb = dt (alpha I - beta A)^-1 B
   with scalars alpha(z), beta(z), and diagonal-plus-low-rank makes that a Cauchy product plus
   a Woodbury correction: O((N + r^2) per node), no matrix powers and no eigenvectors of A.
3. ``kernel_diagonal`` (S4D; Gu, Gupta, Goel, Re, NeurIPS 2022): diagonal A, so
   K_k = sum_n C_n Bb_n Ab_n^k, a Vandermonde product; ``conj=True`` keeps one of each
   conjugate pair and returns 2 Re(.).

``causal_conv`` applies a kernel by FFT (zero-padded to 2L); ``ssm_scan`` runs the same model as
a recurrence with ``paraseq.linear_scan`` (the recurrent mode, one state per step).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .discretize import _check_dt, _check_method, _dt_tensor, discretize, discretize_diagonal

_RATIONAL = ("euler", "backward_euler", "bilinear")

_CHUNK_ELEMENTS = 1 << 22
"""Cauchy and Vandermonde products materialise at most about this many complex entries at a
time (per call, across the batch); longer problems run in chunks of nodes."""


def _check_L(fn: str, L: object) -> int:
    if isinstance(L, bool) or not isinstance(L, int):
        raise TypeError(f"{fn}: L must be an int >= 1 (the kernel length); got {L!r}")
    if L < 1:
        raise ValueError(f"{fn}: L must be >= 1 (the kernel length); got L={L}")
    return L


def _vec(fn: str, name: str, t: object, M: int | None = None) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() < 1:
        raise ValueError(f"{fn}: {name} must be a tensor of shape (..., N); got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if M is not None and t.shape[-1] != M:
        raise ValueError(f"{fn}: {name} must have shape (..., {M}) to match the state size; "
                         f"got {tuple(t.shape)}")
    return t


def _modes(fn: str, name: str, t: object) -> Tensor:
    """A (..., M) vector of poles or modes with M >= 1: a state of size 0 is no system."""
    t = _vec(fn, name, t)
    if t.shape[-1] < 1:
        raise ValueError(f"{fn}: {name} must hold at least one mode (..., M) with M >= 1; got "
                         f"shape {tuple(t.shape)} (a state of size 0 has no kernel)")
    return t


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(dtype, dtype)


# --------------------------------------------------------------------------------- route 1: naive

def kernel_naive(A: Tensor, B: Tensor, C: Tensor, dt: float | Tensor, L: int,
                 method: str = "bilinear") -> Tensor:
    """K_k = C Ab^k Bb for k < L by discretising densely and taking powers: the reference.

    Computed in float64 (complex128 for complex input) whatever the input dtype, by doubling:
    [Bb, Ab Bb, ..., Ab^(m-1) Bb] -> append Ab^m times itself, Ab^m -> Ab^(2m); log2(L)
    matrix products. Stable only as far as powers of Ab are, and O(N^3 log L + N^2 L).

    Args:
        A: (..., N, N); B: (..., N); C: (..., N).
        dt: positive float or a tensor broadcasting against the leading dims.
        L: kernel length >= 1.
        method: one of ``paraseq.ssm.METHODS``.

    Returns:
        K (..., L): float64 for real A, B, C, else complex128.
    """
    fn = "kernel_naive"
    L = _check_L(fn, L)
    method = _check_method(fn, method)
    _check_dt(fn, dt)
    if not isinstance(A, Tensor) or A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{fn}: A must be a square matrix (..., N, N); got "
                         f"{tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__}")
    N = A.shape[-1]
    if N < 1:
        raise ValueError(f"{fn}: A must be (..., N, N) with N >= 1; got {tuple(A.shape)} (a "
                         f"state of size 0 has no kernel)")
    B, C = _vec(fn, "B", B, N), _vec(fn, "C", C, N)
    cplx = A.is_complex() or B.is_complex() or C.is_complex()
    wide = torch.complex128 if cplx else torch.float64
    dt64 = dt.to(torch.float64) if isinstance(dt, Tensor) else float(dt)
    Ab, Bb = discretize(A.to(wide), B.to(wide), dt64, method)  # (..., N, N), (..., N)
    X = Bb[..., :, None]  # (..., N, m): columns Ab^j Bb, j < m
    power = Ab
    while X.shape[-1] < L:
        X = torch.cat([X, power @ X], dim=-1)
        if X.shape[-1] < L:
            power = power @ power
    K = (C.to(wide)[..., None, :] @ X[..., :L])[..., 0, :]  # (..., L)
    return K


# ------------------------------------------------------------------------------ Cauchy, Vandermonde

def cauchy(v: Tensor, alpha: Tensor, beta: Tensor, lam: Tensor) -> Tensor:
    """Generalised Cauchy products: out[..., z, j] = sum_n v[..., j, n] / (alpha_z - beta_z lam_n).

    With alpha = nodes and beta = 1 this is the Cauchy matrix-vector product of S4. Pure torch:
    the (..., Z, M) matrix of reciprocals is built a chunk of nodes at a time (at most about
    2^22 entries), so memory stays O(M Z) per problem and bounded overall.

    Args:
        v: (..., J, M) numerators (J vectors at once).
        alpha: (..., Z) node coefficients.
        beta: (..., Z) node coefficients.
        lam: (..., M) poles.

    Returns:
        (..., Z, J), complex.
    """
    fn = "cauchy"
    for name, t, layout in (("v", v, "(..., J, M)"), ("alpha", alpha, "(..., Z)"),
                            ("beta", beta, "(..., Z)"), ("lam", lam, "(..., M)")):
        if not isinstance(t, Tensor) or t.dim() < layout.count(","):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a tensor of shape {layout}; got {shape}")
    if alpha.shape[-1] != beta.shape[-1]:
        raise ValueError(f"{fn}: alpha and beta must have the same number of nodes Z (last "
                         f"dim); got alpha {tuple(alpha.shape)} and beta {tuple(beta.shape)}")
    if v.shape[-1] != lam.shape[-1]:
        raise ValueError(f"{fn}: v (..., J, M) and lam (..., M) must have the same number of "
                         f"poles M (last dim); got v {tuple(v.shape)} and lam "
                         f"{tuple(lam.shape)}")
    if lam.shape[-1] < 1 or alpha.shape[-1] < 1:
        raise ValueError(f"{fn}: need at least one pole and one node; got lam "
                         f"{tuple(lam.shape)} and alpha {tuple(alpha.shape)}")
    Z = alpha.shape[-1]
    batch = torch.broadcast_shapes(v.shape[:-2], alpha.shape[:-1], beta.shape[:-1],
                                   lam.shape[:-1])
    per_node = max(1, math.prod(batch) * lam.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // per_node)
    vt = v.transpose(-1, -2)  # (..., M, J)
    out = []
    for s in range(0, Z, step):
        a = alpha[..., s:s + step, None]  # (..., z, 1)
        b = beta[..., s:s + step, None]  # (..., z, 1)
        w = torch.reciprocal(a - b * lam[..., None, :])  # (..., z, M)
        out.append(w @ vt)  # (..., z, J)
    return out[0] if len(out) == 1 else torch.cat(out, dim=-2)


def vandermonde(v: Tensor, log_x: Tensor, L: int) -> Tensor:
    """out[..., k] = sum_n v[..., n] x_n^k for k < L, with x_n = exp(log_x_n).

    The powers are exp(k log x) (no repeated products, so no error growing with k beyond
    the rounding of k log x). Pure torch, a chunk of k at a time: memory O(M L) at most.

    Args:
        v: (..., M); log_x: (..., M); L >= 1.

    Returns:
        (..., L), complex.
    """
    fn = "vandermonde"
    L = _check_L(fn, L)
    for name, t in (("v", v), ("log_x", log_x)):
        if not isinstance(t, Tensor) or t.dim() < 1:
            raise ValueError(f"{fn}: {name} must be a tensor of shape (..., M); got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if v.shape[-1] != log_x.shape[-1] or v.shape[-1] < 1:
        raise ValueError(f"{fn}: v and log_x must both be (..., M) with the same M >= 1; got "
                         f"v {tuple(v.shape)} and log_x {tuple(log_x.shape)}")
    batch = torch.broadcast_shapes(v.shape[:-1], log_x.shape[:-1])
    per_k = max(1, math.prod(batch) * log_x.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // per_k)
    real = log_x.real.dtype if log_x.is_complex() else log_x.dtype
    out = []
    for s in range(0, L, step):
        k = torch.arange(s, min(L, s + step), dtype=real, device=log_x.device)
        powers = torch.exp(log_x[..., :, None] * k)  # (..., M, l)
        out.append((v[..., None, :] @ powers)[..., 0, :])  # (..., l)
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


# ------------------------------------------------------------------------------ route 2: DPLR (S4)

def _node_coefficients(method: str, z: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """alpha, beta with (I - z Ab)^-1 Bb = dt (alpha I - beta A)^-1 B for a rational rule.

    euler: I - z(I + dt A) = (1 - z) I - z dt A.
    backward_euler: I - z (I - dt A)^-1 = (I - dt A)^-1 ((1 - z) I - dt A), and Bb carries the
        same (I - dt A)^-1, which cancels.
    bilinear: I - z Ab = (I - dt/2 A)^-1 ((1 - z) I - dt/2 (1 + z) A), likewise.
    No division by 1 + z: the node z = -1 (even L) needs no special case.
    """
    alpha = (1 - z).expand(*dt.shape, z.shape[-1])  # (..., Z)
    d = dt[..., None]  # (..., 1)
    if method == "euler":
        beta = d * z
    elif method == "backward_euler":
        beta = d.expand_as(alpha)
    else:
        beta = d / 2 * (1 + z)
    return alpha, beta


def kernel_dplr(Lambda: Tensor, P: Tensor, B: Tensor, C: Tensor, dt: float | Tensor, L: int,
                method: str = "bilinear", *, conj: bool = False, tilde: bool = False) -> Tensor:
    """The S4 kernel of A = diag(Lambda) - P P^*, by the generating function at roots of unity.

    K_k = C Ab^k Bb, k < L. The generating function with the truncation C~ = C (I - Ab^L)
    is G(z) = C~ (I - z Ab)^-1 Bb at z_l = exp(-2 pi i l / L), and K = ifft(G). For the
    rational rules (I - z Ab)^-1 Bb = dt (alpha I - beta A)^-1 B (see ``_node_coefficients``),
    and with D = diag(alpha - beta Lambda) Woodbury gives

        G = dt [ C~ D^-1 B - beta (C~ D^-1 P) (I_r + beta P^* D^-1 P)^-1 (P^* D^-1 B) ],

    four Cauchy sums (``cauchy``) per node: O((N + r^2) L) work, O(N L) memory.

    With ``tilde=False`` C is the model's C and C~ is formed here once, from Ab^L by repeated
    squaring of the dense M x M matrix (O(M^3 log L), in complex128 whatever the input dtype,
    as S4 does when converting C); then the nodes may move inside the unit circle,
    z_l = rho exp(-2 pi i l / L) with C~ = C (I - rho^L Ab^L) and K_k = ifft(G)_k / rho^k.
    That is exact too, and it keeps every D away from 0 when a mode of the normal part
    barely decays (LegT, LagT and Fourier have Re Lambda = 0; a zero eigenvalue makes D
    singular at z = 1 although A is not; fast LegS modes sit next to the unit circle under the
    bilinear map): rho = 1 when every discrete pole of the normal part has
    |Ab_n| <= exp(-1/L), else rho = exp(-1/L), which keeps each node a relative 1/L away from
    each pole and grows rounding by e at most.
    With ``tilde=True`` C is C~ itself (S4 learns C~; no powers at all) and rho = 1, so the
    nodes stay on the unit circle: a mode of the normal part whose discrete pole is an L-th
    root of unity (1 - z_l Ab_n = 0, e.g. Lambda_n = 0, which the raw Fourier DPLR has, its A
    being singular) makes a Cauchy denominator exactly 0, and C~ alone does not determine the
    kernel there. That raises a ValueError; give every Lambda a negative real part (``nn.S4``
    floors it at -``real_floor``) or pass the model's C with ``tilde=False``. A pole merely
    close to a node costs accuracy (about eps / |1 - z_l Ab_n|), not finiteness.

    Why there is no ZOH here. The route rests on one identity: for a rational rule,
    I - z Ab = (scalar I - scalar A) times a matrix that cancels against Bb, so every node
    needs one resolvent (alpha I - beta A)^-1 of A itself, and the resolvent of a diagonal-
    plus-low-rank matrix is a Cauchy product plus a Woodbury correction. Under ZOH,
    Ab = exp(dt A) is not a rational function of A: (I - z exp(dt A))^-1 is no resolvent of
    A, and exp(dt (Lambda - P P^*)) is a dense matrix with no diagonal-plus-low-rank form
    (it is not exp(dt Lambda) minus a rank-r term), so neither the Cauchy sum nor Woodbury
    applies. ``method="zoh"`` raises; use a rational rule, ``kernel_naive`` (dense, any
    rule), or a diagonal A with ``kernel_diagonal`` (S4D), where exp acts elementwise.

    Args:
        Lambda: (..., M) complex poles; P: (..., M, r) (r >= 0); B, C: (..., M).
        dt: positive float or a tensor broadcasting against the leading dims (e.g. (H,)).
        L: kernel length >= 1.
        method: ``"bilinear"`` (S4's), ``"euler"`` or ``"backward_euler"``.
        conj: the inputs hold one of each conjugate pair of a real system ([Lambda,
            conj(Lambda)] etc. is the full one); then K is real and only L//2 + 1 nodes are
            evaluated (``irfft``).
        tilde: C is already C~ = C (I - Ab^L).

    Returns:
        K (..., L): real if ``conj`` else complex (its imaginary part is ~0 when the full
        system is real). Differentiable in every tensor argument.
    """
    fn = "kernel_dplr"
    L = _check_L(fn, L)
    method = _check_method(fn, method)
    if method not in _RATIONAL:
        raise ValueError(f"{fn}: method {method!r} has no Cauchy/Woodbury form (exp(dt A) is "
                         f"not rational in A); use one of {_RATIONAL}, or kernel_naive, or a "
                         f"diagonal A with kernel_diagonal")
    _check_dt(fn, dt)
    Lambda = _modes(fn, "Lambda", Lambda)
    M = Lambda.shape[-1]
    B, C = _vec(fn, "B", B, M), _vec(fn, "C", C, M)
    if not isinstance(P, Tensor) or P.dim() < 2 or P.shape[-2] != M:
        raise ValueError(f"{fn}: P must have shape (..., M, r) = (..., {M}, r) to match Lambda "
                         f"{tuple(Lambda.shape)}; got "
                         f"{tuple(P.shape) if isinstance(P, Tensor) else type(P).__name__}")
    cdtype = _complex_of(torch.promote_types(torch.promote_types(Lambda.dtype, P.dtype),
                                             torch.promote_types(B.dtype, C.dtype)))
    Lambda, P, B, C = (t.to(cdtype) for t in (Lambda, P, B, C))
    if conj:
        Lambda, B, C = (torch.cat([t, t.conj()], dim=-1) for t in (Lambda, B, C))
        P = torch.cat([P, P.conj()], dim=-2)
        M = 2 * M
    dt = _dt_tensor(dt, Lambda)
    r = P.shape[-1]
    rho = 1.0
    if not tilde:
        # a mode whose discrete pole lies within a factor e^(1/L) of the unit circle would
        # put a node next to a pole of D^-1; move the nodes in by that factor instead
        ab, _ = discretize_diagonal(Lambda.detach(), torch.ones_like(Lambda.detach()),
                                    dt.detach(), method)  # (..., M)
        if bool((ab.abs() > math.exp(-1.0 / L)).any()):
            rho = math.exp(-1.0 / L)
        # in complex128 whatever the input dtype: log2(L) squarings would otherwise cost
        # float32 several digits (it is a one-off O(M^3 log L))
        wide = [t.to(torch.complex128) for t in (Lambda, P, B, C)]
        A = torch.diag_embed(wide[0]) - wide[1] @ wide[1].conj().transpose(-1, -2)  # (..., M, M)
        Ab, _ = discretize(A, wide[2], dt.to(torch.float64), method)  # (..., M, M)
        AbL = torch.linalg.matrix_power(Ab, L)  # (..., M, M)
        C = (wide[3] - rho ** L * (wide[3][..., None, :] @ AbL)[..., 0, :]).to(cdtype)  # C~
    n_nodes = L // 2 + 1 if conj else L
    ang = torch.arange(n_nodes, dtype=dt.dtype, device=dt.device) * (-2 * math.pi / L)
    z = rho * torch.polar(torch.ones_like(ang), ang)  # (Z,)
    batch = torch.broadcast_shapes(Lambda.shape[:-1], P.shape[:-2], B.shape[:-1], C.shape[:-1],
                                   dt.shape)
    alpha, beta = _node_coefficients(method, z, dt.expand(batch))  # (..., Z)
    Ph = P.conj().transpose(-1, -2)  # (..., r, M)
    left = torch.cat([C[..., None, :].expand(*batch, 1, M), Ph.expand(*batch, r, M)], dim=-2)
    right = torch.cat([B[..., None, :].expand(*batch, 1, M),
                       P.transpose(-1, -2).expand(*batch, r, M)], dim=-2)  # (..., 1+r, M)
    v = (left[..., :, None, :] * right[..., None, :, :]).flatten(-3, -2)  # (..., (1+r)^2, M)
    S = cauchy(v, alpha, beta, Lambda).unflatten(-1, (1 + r, 1 + r))  # (..., Z, 1+r, 1+r)
    G = S[..., 0, 0]  # (..., Z): C~ D^-1 B
    if r:
        k_cp = S[..., 0, 1:]  # (..., Z, r): C~ D^-1 P
        k_pb = S[..., 1:, 0]  # (..., Z, r): P^* D^-1 B
        k_pp = S[..., 1:, 1:]  # (..., Z, r, r): P^* D^-1 P
        if r == 1:
            corr = k_cp[..., 0] * k_pb[..., 0] / (1 + beta * k_pp[..., 0, 0])
        else:
            eye = torch.eye(r, dtype=cdtype, device=Lambda.device)
            sol = torch.linalg.solve(eye + beta[..., None, None] * k_pp, k_pb[..., None])
            corr = (k_cp[..., None, :] @ sol)[..., 0, 0]
        G = G - beta * corr
    if tilde and not bool(torch.isfinite(G).all()):
        _pole_on_node(Lambda, P, B, C, dt, L, method)
    G = G * dt[..., None]
    K = torch.fft.irfft(G, n=L) if conj else torch.fft.ifft(G, n=L)  # (..., L)
    if rho != 1.0:
        k = torch.arange(L, dtype=dt.dtype, device=dt.device)
        K = K * torch.exp(k / L)  # 1 / rho^k
    return K


def _pole_on_node(Lambda: Tensor, P: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int,
                  method: str) -> None:
    """Explain a non-finite generating function under ``tilde=True`` (always raises)."""
    fn = "kernel_dplr"
    for name, t in (("Lambda", Lambda), ("P", P), ("B", B), ("C", C), ("dt", dt)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{fn}: {name} holds non-finite values (inf or nan)")
    with torch.no_grad():
        ab, _ = discretize_diagonal(Lambda, torch.ones_like(Lambda), dt, method)  # (..., M)
        miss = (ab ** L - 1).abs()  # 0 where the discrete pole is an L-th root of unity
        i = int(miss.flatten().argmin())
        lam = Lambda.expand_as(ab).flatten()[i].item()
    raise ValueError(
        f"{fn}: tilde=True and a pole of the normal part lies on a frequency node: Lambda = "
        f"{lam:.4g} under {method!r} gives a discrete pole Ab_n with Ab_n^L = 1 (L = {L}), so "
        f"a Cauchy denominator 1 - z Ab_n is 0 on the unit circle (the raw Fourier DPLR has "
        f"Lambda = 0; its A is singular). C~ alone does not define the kernel there. Fix: give "
        f"every Lambda a negative real part (nn.S4 floors Re Lambda at -real_floor), or pass "
        f"the model's C with tilde=False, which moves the nodes inside the unit circle")


# ---------------------------------------------------------------------------- route 3: S4D

def kernel_diagonal(Lambda: Tensor, B: Tensor, C: Tensor, dt: float | Tensor, L: int,
                    method: str = "zoh", *, conj: bool = True) -> Tensor:
    """The kernel of a diagonal SSM (S4D): K_k = sum_n C_n Bb_n Ab_n^k by a Vandermonde product.

    Args:
        Lambda: (..., M) complex poles; B, C: (..., M).
        dt: positive float or a tensor broadcasting against the leading dims (e.g. (H,)).
        L: kernel length >= 1.
        method: any of ``paraseq.ssm.METHODS`` (S4D uses ``"zoh"``).
        conj: Lambda, B, C hold one of each conjugate pair of a real system; returns
            2 Re(sum) (real). With ``conj=False`` the full complex sum is returned.

    Returns:
        K (..., L), real if ``conj`` else complex.
    """
    fn = "kernel_diagonal"
    L = _check_L(fn, L)
    method = _check_method(fn, method)
    _check_dt(fn, dt)
    Lambda = _modes(fn, "Lambda", Lambda)
    M = Lambda.shape[-1]
    B, C = _vec(fn, "B", B, M), _vec(fn, "C", C, M)
    cdtype = _complex_of(torch.promote_types(Lambda.dtype, torch.promote_types(B.dtype, C.dtype)))
    Lambda, B, C = Lambda.to(cdtype), B.to(cdtype), C.to(cdtype)
    Ab, Bb = discretize_diagonal(Lambda, B, dt, method)  # (..., M)
    if method == "zoh":
        log_ab = _dt_tensor(dt, Lambda)[..., None] * Lambda  # exactly dt Lambda
    else:
        log_ab = torch.log(Ab)
    K = vandermonde(C * Bb, log_ab, L)  # (..., L)
    return 2 * K.real if conj else K


# ------------------------------------------------------------------------------ using a kernel

def causal_conv(u: Tensor, K: Tensor) -> Tensor:
    """y_t = sum_{k<=t} K_k u_{t-k} by FFT, zero-padded to 2L (no wrap-around).

    Args:
        u: (..., L) input; K: (..., L_K) kernel (L_K >= L is truncated, shorter is padded).
    Returns:
        y (..., L), u's dtype.
    """
    L = u.shape[-1]
    n = 2 * L
    K = K[..., :L]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)[..., :L]
    return y.to(u.dtype)


def ssm_scan(Ab: Tensor, Bb: Tensor, C: Tensor, u: Tensor, x0: Tensor | None = None,
             *, conj: bool = False) -> tuple[Tensor, Tensor]:
    """The recurrent mode: x_k = Ab x_{k-1} + Bb u_k, y_k = C x_k, by ``paraseq.linear_scan``.

    Args:
        Ab: (..., N, N) dense or (..., N) diagonal (complex for S4D); dense when it has one
            more dim than Bb.
        Bb: (..., N).
        C: (..., N).
        u: (..., L) real input, its leading dims broadcasting with the others'.
        x0: (..., N) initial state or None (zeros).
        conj: the (diagonal, complex) state holds one of each conjugate pair; y = 2 Re(C x).

    Returns:
        y (..., L) (real for a real model or with ``conj``; complex for a complex state
        without ``conj``) and the states x (..., L, N).
        Memory: the scan sees Ab expanded over time, (..., L, N, N) for dense Ab.
    """
    from ..scan import linear_scan

    dense = Ab.dim() >= 2 and Ab.shape[-1] == Ab.shape[-2] == Bb.shape[-1] and \
        Ab.dim() == Bb.dim() + 1
    N = Bb.shape[-1]
    L = u.shape[-1]
    dtype = torch.promote_types(Ab.dtype, Bb.dtype)
    b = u[..., :, None].to(dtype) * Bb[..., None, :].to(dtype)  # (..., L, N)
    if dense:
        a = Ab[..., None, :, :].to(dtype).expand(*Ab.shape[:-2], L, N, N)  # (..., L, N, N)
    else:
        a = Ab[..., None, :].to(dtype).expand(*Ab.shape[:-1], L, N)  # (..., L, N)
    x = linear_scan(a, b, None if x0 is None else x0.to(dtype),
                    structure="dense" if dense else "diagonal")  # (..., L, N)
    y = (x @ C.to(dtype)[..., :, None])[..., 0]  # (..., L)
    if conj:
        y = 2 * y.real
    return y, x
