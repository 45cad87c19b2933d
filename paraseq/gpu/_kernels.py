"""Triton kernels of the fused Newton iteration and its adjoint for the diagonal GRU and LSTM
(see ``paraseq.gpu.newton``; their pure-torch twin is ``paraseq.gpu.twin``).

Imported only on first use: importing this module imports triton, which reads
``TRITON_INTERPRET`` then (``TRITON_INTERPRET=1`` runs the kernels on the CPU through triton's
interpreter: how the tests check them without a GPU).

Layout. gi (the input pre-activations) is addressed as gi + b s_gb + t s_gt + k H + d, so the
(B, T, K H) transpose of a time-major (T, B, K H) projection is read where it lies; the states
h, c (B, T, H) are contiguous in the working dtype (float32 or float64), and so are h0, c0
(B, H), g and dgi. weight_hh, bias_hh are (K H,) vectors in the working dtype.

One program owns one batch row and a block of BLOCK_D channels (grid (B, cdiv(H, BLOCK_D))),
and walks time in tiles of BLOCK_T steps, as ``paraseq.scan``'s Triton scan does: per tile

1. load gi_t and the current iterate's h_{t-1} (the previous tile's last row is in memory: the
   kernel writes h' to a second buffer), evaluate the cell: f_t and J_t;
2. scan the pairs (J_t, f_t - J_t h_{t-1}) in log depth (``tl.associative_scan``; the LSTM's
   2 x 2 blocks as six arrays), and add the carried state: h'_t = B_t + A_t carry;
3. clip (nan -> 0, +-1e8) and store h'; shift h' down one step inside the tile
   (``tl.gather``, row 0 takes the carry), evaluate the cell there, and take the residual
   |h'_t - f(h'_{t-1})| / (1 + |f|); keep its max and the first step above ``tol``.

Rows past T load the identity (a = 1, b = 0), so a tile's last row is the next carry. Each
program writes one residual max and one first failing step. The adjoint walks the tiles from
the end: lambda_t = g_t + J_{t+1}^T lambda_{t+1} (J_{t+1} evaluated from gi_{t+1} and the
solution's h_t, both in memory), then the gate derivatives at t give dgi_t, and the
per-(row, channel) sums of dweight_hh, dbias_hh (summed over rows by the caller) and dh0.
"""

from __future__ import annotations

import triton
import triton.language as tl

CLIP = tl.constexpr(1e8)  # a constexpr: triton's GPU compiler reads no other global


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _combine(a_i, b_i, a_j, b_j):
    return a_j * a_i, a_j * b_i + b_j


@triton.jit
def _combine2(a00, a01, a10, a11, b0, b1, c00, c01, c10, c11, e0, e1):
    # (A_i, b_i) = (a, b) then (A_j, b_j) = (c, e): (C A, C b + e), 2 x 2 blocks
    return (c00 * a00 + c01 * a10, c00 * a01 + c01 * a11,
            c10 * a00 + c11 * a10, c10 * a01 + c11 * a11,
            c00 * b0 + c01 * b1 + e0, c10 * b0 + c11 * b1 + e1)


@triton.jit
def _last_row(v, rows, last):
    return tl.sum(tl.where((rows == last)[:, None], v, 0.0), axis=0)


@triton.jit
def _sanitize(x):
    x = tl.where(x != x, 0.0, x)
    return tl.minimum(tl.maximum(x, -CLIP), CLIP)


@triton.jit
def _down(x, carry, rows, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # x shifted down one row inside the tile, row 0 the carry: x_{t-1} at row t
    idx = tl.maximum(rows - 1, 0)[:, None] + tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.int32)
    return tl.where((rows == 0)[:, None], carry[None, :], tl.gather(x, idx, 0))


@triton.jit
def _residual(new, f):
    r = tl.abs(new - f) / (1.0 + tl.abs(f))
    return tl.where(r == r, r, float("inf"))


@triton.jit
def _gru(xr, xz, xn, hp, wr, wz, wn, br, bz, bn):
    r = _sigmoid(xr + wr * hp + br)
    z = _sigmoid(xz + wz * hp + bz)
    hn = wn * hp + bn
    n = _tanh(xn + r * hn)
    f = (hp - n) * z + n
    dn = (1.0 - z) * (1.0 - n * n)
    pr = dn * hn * r * (1.0 - r)
    pz = (hp - n) * z * (1.0 - z)
    J = z + pr * wr + pz * wz + dn * r * wn
    return f, J, pr, pz, dn, r


@triton.jit
def _lstm(xi, xf, xg, xo, hp, cp, wi, wf, wg, wo, bi, bf, bg, bo):
    i = _sigmoid(xi + wi * hp + bi)
    f = _sigmoid(xf + wf * hp + bf)
    g = _tanh(xg + wg * hp + bg)
    o = _sigmoid(xo + wo * hp + bo)
    c = f * cp + i * g
    tc = _tanh(c)
    h = o * tc
    s = o * (1.0 - tc * tc)
    ci = g * i * (1.0 - i)
    cf = cp * f * (1.0 - f)
    cg = i * (1.0 - g * g)
    co = tc * o * (1.0 - o)
    ch = ci * wi + cf * wf + cg * wg
    return h, c, s * ch + co * wo, s * f, ch, f, s, ci, cf, cg, co


@triton.jit
def _vec(ptr, off, d, dm, dtype):
    return tl.load(ptr + off + d, mask=dm, other=0.0).to(dtype)


# ----------------------------------------------------------------------------- GRU


@triton.jit
def gru_newton_kernel(gi_ptr, s_gb, s_gt, w_ptr, b_ptr, h0_ptr, hin_ptr, hout_ptr, res_ptr,
                      first_ptr, T, H, tol,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    pd = tl.program_id(1)
    dt = hout_ptr.dtype.element_ty
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    dm = d < H
    rows = tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    wr, wz, wn = _vec(w_ptr, 0, d, dm, dt), _vec(w_ptr, H, d, dm, dt), _vec(w_ptr, 2 * H, d, dm, dt)
    br, bz, bn = _vec(b_ptr, 0, d, dm, dt), _vec(b_ptr, H, d, dm, dt), _vec(b_ptr, 2 * H, d, dm, dt)
    h0 = tl.load(h0_ptr + n.to(tl.int64) * H + d, mask=dm, other=0.0)
    gbase = n.to(tl.int64) * s_gb
    sbase = n.to(tl.int64) * T * H
    carry = h0
    rmax = tl.zeros((BLOCK_D,), dtype=dt)
    first = tl.full((BLOCK_D,), T, tl.int32)
    for start in range(0, T, BLOCK_T):
        t = start + rows  # (BLOCK_T,)
        tm = t < T
        m = tm[:, None] & dm[None, :]  # (BLOCK_T, BLOCK_D)
        goff = gbase + t.to(tl.int64)[:, None] * s_gt + d[None, :]
        xr = tl.load(gi_ptr + goff, mask=m, other=0.0).to(dt)
        xz = tl.load(gi_ptr + goff + H, mask=m, other=0.0).to(dt)
        xn = tl.load(gi_ptr + goff + 2 * H, mask=m, other=0.0).to(dt)
        soff = sbase + t.to(tl.int64)[:, None] * H + d[None, :]
        hp = tl.load(hin_ptr + soff - H, mask=m & (t >= 1)[:, None], other=0.0)
        hp = tl.where((t == 0)[:, None], h0[None, :], hp)
        f, J, _pr, _pz, _dn, _r = _gru(xr, xz, xn, hp, wr, wz, wn, br, bz, bn)
        a = tl.where(m, J, 1.0)
        bb = tl.where(m, f - J * hp, 0.0)
        A, Bs = tl.associative_scan((a, bb), 0, _combine)
        x = _sanitize(Bs + A * carry[None, :])
        tl.store(hout_ptr + soff, x, mask=m)
        xp = _down(x, carry, rows, BLOCK_T, BLOCK_D)
        f2, _J, _pr2, _pz2, _dn2, _r2 = _gru(xr, xz, xn, xp, wr, wz, wn, br, bz, bn)
        res = tl.where(m, _residual(x, f2), 0.0)
        rmax = tl.maximum(rmax, tl.max(res, axis=0))
        first = tl.minimum(first, tl.min(tl.where(res > tol, t[:, None], T), axis=0))
        carry = _last_row(x, rows, BLOCK_T - 1)
    out = n * tl.num_programs(1) + pd
    tl.store(res_ptr + out, tl.max(rmax, axis=0))
    tl.store(first_ptr + out, tl.min(first, axis=0))


@triton.jit
def gru_adjoint_kernel(gi_ptr, s_gb, s_gt, w_ptr, b_ptr, h0_ptr, hs_ptr, g_ptr, dgi_ptr,
                       dh0_ptr, dw_ptr, db_ptr, T, H,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    pd = tl.program_id(1)
    dt = hs_ptr.dtype.element_ty
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < H
    rows = tl.arange(0, BLOCK_T)
    wr, wz, wn = _vec(w_ptr, 0, d, dm, dt), _vec(w_ptr, H, d, dm, dt), _vec(w_ptr, 2 * H, d, dm, dt)
    br, bz, bn = _vec(b_ptr, 0, d, dm, dt), _vec(b_ptr, H, d, dm, dt), _vec(b_ptr, 2 * H, d, dm, dt)
    h0 = tl.load(h0_ptr + n.to(tl.int64) * H + d, mask=dm, other=0.0)
    gbase = n.to(tl.int64) * s_gb
    sbase = n.to(tl.int64) * T * H
    obase = n.to(tl.int64) * T * 3 * H
    carry = tl.zeros((BLOCK_D,), dtype=dt)
    z0 = tl.zeros((BLOCK_D,), dtype=dt)
    dwr, dwz, dwn, dbr, dbz, dbn, dh0 = z0, z0, z0, z0, z0, z0, z0
    for start in range(0, T, BLOCK_T):
        step = start + rows
        t = T - 1 - step  # (BLOCK_T,) time, walked from the end
        m = (step < T)[:, None] & dm[None, :]
        # J_{t+1} at (gi_{t+1}, h_t), zero after the last step
        m1 = m & (t + 1 < T)[:, None]
        g1 = gbase + (t + 1).to(tl.int64)[:, None] * s_gt + d[None, :]
        x1r = tl.load(gi_ptr + g1, mask=m1, other=0.0).to(dt)
        x1z = tl.load(gi_ptr + g1 + H, mask=m1, other=0.0).to(dt)
        x1n = tl.load(gi_ptr + g1 + 2 * H, mask=m1, other=0.0).to(dt)
        soff = sbase + t.to(tl.int64)[:, None] * H + d[None, :]
        ht = tl.load(hs_ptr + soff, mask=m, other=0.0)
        _f1, J1, _a, _b, _c, _e = _gru(x1r, x1z, x1n, ht, wr, wz, wn, br, bz, bn)
        a = tl.where(m, tl.where(m1, J1, 0.0), 1.0)
        gg = tl.load(g_ptr + soff, mask=m, other=0.0).to(dt)
        A, Bs = tl.associative_scan((a, gg), 0, _combine)
        lam = tl.where(m, Bs + A * carry[None, :], 0.0)
        carry = _last_row(lam, rows, BLOCK_T - 1)
        # the gate derivatives at t: (gi_t, h_{t-1})
        goff = gbase + t.to(tl.int64)[:, None] * s_gt + d[None, :]
        xr = tl.load(gi_ptr + goff, mask=m, other=0.0).to(dt)
        xz = tl.load(gi_ptr + goff + H, mask=m, other=0.0).to(dt)
        xn = tl.load(gi_ptr + goff + 2 * H, mask=m, other=0.0).to(dt)
        hp = tl.load(hs_ptr + soff - H, mask=m & (t >= 1)[:, None], other=0.0)
        hp = tl.where((t == 0)[:, None], h0[None, :], hp)
        _f, J, pr, pz, dn, r = _gru(xr, xz, xn, hp, wr, wz, wn, br, bz, bn)
        gr, gz, gn = lam * pr, lam * pz, lam * dn
        ooff = obase + t.to(tl.int64)[:, None] * 3 * H + d[None, :]
        tl.store(dgi_ptr + ooff, gr, mask=m)
        tl.store(dgi_ptr + ooff + H, gz, mask=m)
        tl.store(dgi_ptr + ooff + 2 * H, gn, mask=m)
        dbr += tl.sum(gr, axis=0)
        dbz += tl.sum(gz, axis=0)
        dbn += tl.sum(gn * r, axis=0)
        dwr += tl.sum(gr * hp, axis=0)
        dwz += tl.sum(gz * hp, axis=0)
        dwn += tl.sum(gn * r * hp, axis=0)
        dh0 += tl.sum(tl.where((t == 0)[:, None], J * lam, 0.0), axis=0)
    p = n.to(tl.int64) * 3 * H + d
    tl.store(dw_ptr + p, dwr, mask=dm)
    tl.store(dw_ptr + p + H, dwz, mask=dm)
    tl.store(dw_ptr + p + 2 * H, dwn, mask=dm)
    tl.store(db_ptr + p, dbr, mask=dm)
    tl.store(db_ptr + p + H, dbz, mask=dm)
    tl.store(db_ptr + p + 2 * H, dbn, mask=dm)
    tl.store(dh0_ptr + n.to(tl.int64) * H + d, dh0, mask=dm)


# ----------------------------------------------------------------------------- LSTM


@triton.jit
def lstm_newton_kernel(gi_ptr, s_gb, s_gt, w_ptr, b_ptr, h0_ptr, c0_ptr, hin_ptr, cin_ptr,
                       hout_ptr, cout_ptr, res_ptr, first_ptr, T, H, tol,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    pd = tl.program_id(1)
    dt = hout_ptr.dtype.element_ty
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < H
    rows = tl.arange(0, BLOCK_T)
    wi, wf = _vec(w_ptr, 0, d, dm, dt), _vec(w_ptr, H, d, dm, dt)
    wg, wo = _vec(w_ptr, 2 * H, d, dm, dt), _vec(w_ptr, 3 * H, d, dm, dt)
    bi, bf = _vec(b_ptr, 0, d, dm, dt), _vec(b_ptr, H, d, dm, dt)
    bg, bo = _vec(b_ptr, 2 * H, d, dm, dt), _vec(b_ptr, 3 * H, d, dm, dt)
    h0 = tl.load(h0_ptr + n.to(tl.int64) * H + d, mask=dm, other=0.0)
    c0 = tl.load(c0_ptr + n.to(tl.int64) * H + d, mask=dm, other=0.0)
    gbase = n.to(tl.int64) * s_gb
    sbase = n.to(tl.int64) * T * H
    ch_, cc_ = h0, c0
    rmax = tl.zeros((BLOCK_D,), dtype=dt)
    first = tl.full((BLOCK_D,), T, tl.int32)
    for start in range(0, T, BLOCK_T):
        t = start + rows
        m = (t < T)[:, None] & dm[None, :]
        goff = gbase + t.to(tl.int64)[:, None] * s_gt + d[None, :]
        xi = tl.load(gi_ptr + goff, mask=m, other=0.0).to(dt)
        xf = tl.load(gi_ptr + goff + H, mask=m, other=0.0).to(dt)
        xg = tl.load(gi_ptr + goff + 2 * H, mask=m, other=0.0).to(dt)
        xo = tl.load(gi_ptr + goff + 3 * H, mask=m, other=0.0).to(dt)
        soff = sbase + t.to(tl.int64)[:, None] * H + d[None, :]
        first_row = (t == 0)[:, None]
        hp = tl.load(hin_ptr + soff - H, mask=m & (t >= 1)[:, None], other=0.0)
        cp = tl.load(cin_ptr + soff - H, mask=m & (t >= 1)[:, None], other=0.0)
        hp = tl.where(first_row, h0[None, :], hp)
        cp = tl.where(first_row, c0[None, :], cp)
        fh, fc, jhh, jhc, jch, jcc, _s, _ci, _cf, _cg, _co = _lstm(
            xi, xf, xg, xo, hp, cp, wi, wf, wg, wo, bi, bf, bg, bo)
        a00 = tl.where(m, jhh, 1.0)
        a01 = tl.where(m, jhc, 0.0)
        a10 = tl.where(m, jch, 0.0)
        a11 = tl.where(m, jcc, 1.0)
        b0 = tl.where(m, fh - jhh * hp - jhc * cp, 0.0)
        b1 = tl.where(m, fc - jch * hp - jcc * cp, 0.0)
        A00, A01, A10, A11, B0, B1 = tl.associative_scan((a00, a01, a10, a11, b0, b1), 0,
                                                         _combine2)
        xh = _sanitize(B0 + A00 * ch_[None, :] + A01 * cc_[None, :])
        xc = _sanitize(B1 + A10 * ch_[None, :] + A11 * cc_[None, :])
        tl.store(hout_ptr + soff, xh, mask=m)
        tl.store(cout_ptr + soff, xc, mask=m)
        ph = _down(xh, ch_, rows, BLOCK_T, BLOCK_D)
        pc = _down(xc, cc_, rows, BLOCK_T, BLOCK_D)
        gh, gc, _1, _2, _3, _4, _5, _6, _7, _8, _9 = _lstm(
            xi, xf, xg, xo, ph, pc, wi, wf, wg, wo, bi, bf, bg, bo)
        res = tl.maximum(tl.where(m, _residual(xh, gh), 0.0), tl.where(m, _residual(xc, gc), 0.0))
        rmax = tl.maximum(rmax, tl.max(res, axis=0))
        first = tl.minimum(first, tl.min(tl.where(res > tol, t[:, None], T), axis=0))
        ch_ = _last_row(xh, rows, BLOCK_T - 1)
        cc_ = _last_row(xc, rows, BLOCK_T - 1)
    out = n * tl.num_programs(1) + pd
    tl.store(res_ptr + out, tl.max(rmax, axis=0))
    tl.store(first_ptr + out, tl.min(first, axis=0))


@triton.jit
def lstm_adjoint_kernel(gi_ptr, s_gb, s_gt, w_ptr, b_ptr, h0_ptr, c0_ptr, hs_ptr, cs_ptr,
                        gh_ptr, gc_ptr, dgi_ptr, dh0_ptr, dc0_ptr, dw_ptr, db_ptr, T, H,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    pd = tl.program_id(1)
    dt = hs_ptr.dtype.element_ty
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < H
    rows = tl.arange(0, BLOCK_T)
    wi, wf = _vec(w_ptr, 0, d, dm, dt), _vec(w_ptr, H, d, dm, dt)
    wg, wo = _vec(w_ptr, 2 * H, d, dm, dt), _vec(w_ptr, 3 * H, d, dm, dt)
    bi, bf = _vec(b_ptr, 0, d, dm, dt), _vec(b_ptr, H, d, dm, dt)
    bg, bo = _vec(b_ptr, 2 * H, d, dm, dt), _vec(b_ptr, 3 * H, d, dm, dt)
    h0 = tl.load(h0_ptr + n.to(tl.int64) * H + d, mask=dm, other=0.0)
    c0 = tl.load(c0_ptr + n.to(tl.int64) * H + d, mask=dm, other=0.0)
    gbase = n.to(tl.int64) * s_gb
    sbase = n.to(tl.int64) * T * H
    obase = n.to(tl.int64) * T * 4 * H
    z0 = tl.zeros((BLOCK_D,), dtype=dt)
    lh_c, lc_c = z0, z0
    dwi, dwf, dwg, dwo, dbi, dbf, dbg, dbo, dh0, dc0 = z0, z0, z0, z0, z0, z0, z0, z0, z0, z0
    for start in range(0, T, BLOCK_T):
        step = start + rows
        t = T - 1 - step
        m = (step < T)[:, None] & dm[None, :]
        m1 = m & (t + 1 < T)[:, None]
        g1 = gbase + (t + 1).to(tl.int64)[:, None] * s_gt + d[None, :]
        x1i = tl.load(gi_ptr + g1, mask=m1, other=0.0).to(dt)
        x1f = tl.load(gi_ptr + g1 + H, mask=m1, other=0.0).to(dt)
        x1g = tl.load(gi_ptr + g1 + 2 * H, mask=m1, other=0.0).to(dt)
        x1o = tl.load(gi_ptr + g1 + 3 * H, mask=m1, other=0.0).to(dt)
        soff = sbase + t.to(tl.int64)[:, None] * H + d[None, :]
        ht = tl.load(hs_ptr + soff, mask=m, other=0.0)
        ct = tl.load(cs_ptr + soff, mask=m, other=0.0)
        _h1, _c1, jhh, jhc, jch, jcc, _s1, _a, _b, _c, _e = _lstm(
            x1i, x1f, x1g, x1o, ht, ct, wi, wf, wg, wo, bi, bf, bg, bo)
        # J_{t+1}^T, identity on rows past the end, zero after the last step
        a00 = tl.where(m, tl.where(m1, jhh, 0.0), 1.0)
        a01 = tl.where(m1, jch, 0.0)
        a10 = tl.where(m1, jhc, 0.0)
        a11 = tl.where(m, tl.where(m1, jcc, 0.0), 1.0)
        b0 = tl.load(gh_ptr + soff, mask=m, other=0.0).to(dt)
        b1 = tl.load(gc_ptr + soff, mask=m, other=0.0).to(dt)
        A00, A01, A10, A11, B0, B1 = tl.associative_scan((a00, a01, a10, a11, b0, b1), 0,
                                                         _combine2)
        lh = tl.where(m, B0 + A00 * lh_c[None, :] + A01 * lc_c[None, :], 0.0)
        lc = tl.where(m, B1 + A10 * lh_c[None, :] + A11 * lc_c[None, :], 0.0)
        lh_c = _last_row(lh, rows, BLOCK_T - 1)
        lc_c = _last_row(lc, rows, BLOCK_T - 1)
        goff = gbase + t.to(tl.int64)[:, None] * s_gt + d[None, :]
        xi = tl.load(gi_ptr + goff, mask=m, other=0.0).to(dt)
        xf = tl.load(gi_ptr + goff + H, mask=m, other=0.0).to(dt)
        xg = tl.load(gi_ptr + goff + 2 * H, mask=m, other=0.0).to(dt)
        xo = tl.load(gi_ptr + goff + 3 * H, mask=m, other=0.0).to(dt)
        first_row = (t == 0)[:, None]
        hp = tl.load(hs_ptr + soff - H, mask=m & (t >= 1)[:, None], other=0.0)
        cp = tl.load(cs_ptr + soff - H, mask=m & (t >= 1)[:, None], other=0.0)
        hp = tl.where(first_row, h0[None, :], hp)
        cp = tl.where(first_row, c0[None, :], cp)
        _h, _c2, qhh, qhc, qch, qcc, s, ci, cf, cg, co = _lstm(
            xi, xf, xg, xo, hp, cp, wi, wf, wg, wo, bi, bf, bg, bo)
        gcn = lc + lh * s
        ga_i, ga_f, ga_g, ga_o = gcn * ci, gcn * cf, gcn * cg, lh * co
        ooff = obase + t.to(tl.int64)[:, None] * 4 * H + d[None, :]
        tl.store(dgi_ptr + ooff, ga_i, mask=m)
        tl.store(dgi_ptr + ooff + H, ga_f, mask=m)
        tl.store(dgi_ptr + ooff + 2 * H, ga_g, mask=m)
        tl.store(dgi_ptr + ooff + 3 * H, ga_o, mask=m)
        dbi += tl.sum(ga_i, axis=0)
        dbf += tl.sum(ga_f, axis=0)
        dbg += tl.sum(ga_g, axis=0)
        dbo += tl.sum(ga_o, axis=0)
        dwi += tl.sum(ga_i * hp, axis=0)
        dwf += tl.sum(ga_f * hp, axis=0)
        dwg += tl.sum(ga_g * hp, axis=0)
        dwo += tl.sum(ga_o * hp, axis=0)
        dh0 += tl.sum(tl.where(first_row, qhh * lh + qch * lc, 0.0), axis=0)
        dc0 += tl.sum(tl.where(first_row, qhc * lh + qcc * lc, 0.0), axis=0)
    p = n.to(tl.int64) * 4 * H + d
    tl.store(dw_ptr + p, dwi, mask=dm)
    tl.store(dw_ptr + p + H, dwf, mask=dm)
    tl.store(dw_ptr + p + 2 * H, dwg, mask=dm)
    tl.store(dw_ptr + p + 3 * H, dwo, mask=dm)
    tl.store(db_ptr + p, dbi, mask=dm)
    tl.store(db_ptr + p + H, dbf, mask=dm)
    tl.store(db_ptr + p + 2 * H, dbg, mask=dm)
    tl.store(db_ptr + p + 3 * H, dbo, mask=dm)
    q = n.to(tl.int64) * H + d
    tl.store(dh0_ptr + q, dh0, mask=dm)
    tl.store(dc0_ptr + q, dc0, mask=dm)
