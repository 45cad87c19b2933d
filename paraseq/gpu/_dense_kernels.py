"""The Triton kernel of the dense fused Newton (``paraseq.gpu.dense``): the cell, its dense
Jacobian, the scan's right-hand side and the residual at an iterate in one pass; and the same
kernel's adjoint modes. Its pure-torch twin is ``paraseq.gpu.dense_twin``.

Imported only on first use (importing it imports triton, which reads ``TRITON_INTERPRET``
then: ``TRITON_INTERPRET=1`` runs the kernel on the CPU through triton's interpreter, how the
tests check it without a GPU).

Shape letters: B batch, T time, H hidden size, K gates, D state size (H; LSTM 2 H over
[h, c]), BD = D rounded up to a power of two (the tile), S steps per program.

Layout. gi (B, T, K H) is addressed as gi + b s_gb + t s_gt + k H + u (a time-major
projection's transpose is read where it lies); G (B, T, K H) = h W_hh^T of the iterate and
G0 (B, K H) = h0 W_hh^T (cuBLAS GEMMs, without the bias, which is added here); the iterate x
(B, T, D) and x0 (B, D) contiguous in the working dtype; weight_hh (K H, H) contiguous;
outputs contiguous.

One program owns S consecutive steps of one batch row (grid (cdiv(T, S), rows): time on the
first axis, which has no practical limit, batch on the second, which stops at 65535, so a
larger batch is launched in slices of rows from n0); it loads the
K gate blocks W_k (BD x BD tiles: row i reads unit u(i) = i, or i - H on the LSTM's c rows)
once, then per step t: the gate pre-activations gi_t + G_{t-1} + b_hh and the previous state
x_{t-1} (x0 at t = 0), the cell, and

MODE 0 (a Newton iteration): J_t = sum_k diag(R_k) W_k + the diagonal part (GRU diag(z); LSTM
  the dh'/dc and dc'/dc blocks diag(s f), diag(f)), stored (B, T, D, D); rhs_t = f_t - J_t
  x_{t-1}; and the residual of x, |x_t - f_t| / (1 + |f_t|): each program's max and first
  step above tol (the Newton driver reads their max / min).
MODE 1: the residual alone (no J: the last evaluation of a fixed-iteration solve).
MODE 2 (the adjoint's scan terms): J_t^T and J_t^T g_t.
MODE 3 (the gate gradients): lambda_t = g_t + mu_{t+1}, then dgi_t and dgh_t (the gradients
  of gi_t and of gh_t = G_{t-1} + b_hh), dgh stored one step back (row t - 1; row T - 1 zero;
  dgh_0 in its own (B, K H) buffer) so that dweight_hh is one GEMM over the B T rows.

Cells (CELL): 0 GRU (torch's gates r, z, n), 1 Elman tanh, 2 Elman relu, 3 LSTM (i, f, g, o).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._kernels import _sigmoid, _tanh


@triton.jit
def _vec(ptr, off, m, dt: tl.constexpr):
    return tl.load(ptr + off, mask=m, other=0.0).to(dt)


@triton.jit
def _gates(gi_ptr, goff, G_ptr, G0_ptr, b_ptr, n, t, T, H, KH, u, m, k: tl.constexpr,
           dt: tl.constexpr):
    # gate k's pre-activations at step t, by row: (gi_t, G_{t-1} + b_hh) (G0 at t = 0)
    x = _vec(gi_ptr, goff + k * H + u, m, dt)
    prev = (n.to(tl.int64) * T + t - 1) * KH + k * H + u
    g = _vec(G_ptr, prev, m & (t >= 1), dt) + _vec(G0_ptr, n.to(tl.int64) * KH + k * H + u,
                                                   m & (t == 0), dt)
    return x, g + _vec(b_ptr, k * H + u, m, dt)


@triton.jit
def _state(x_ptr, x0_ptr, n, t, T, D, idx, m, dt: tl.constexpr):
    # x_{t-1} at the features idx (x0 at t = 0)
    prev = (n.to(tl.int64) * T + t - 1) * D + idx
    return _vec(x_ptr, prev, m & (t >= 1), dt) + _vec(x0_ptr, n.to(tl.int64) * D + idx,
                                                      m & (t == 0), dt)


@triton.jit
def dense_cell_kernel(gi_ptr, s_gb, s_gt, G_ptr, G0_ptr, w_ptr, b_ptr, x_ptr, x0_ptr, g_ptr,
                      mu_ptr, a_ptr, v_ptr, res_ptr, first_ptr, dgi_ptr, dgh_ptr, dgh0_ptr,
                      n0, T, H, D, tol,
                      CELL: tl.constexpr, K: tl.constexpr, MODE: tl.constexpr,
                      STEPS: tl.constexpr, BLOCK_D: tl.constexpr):
    p = tl.program_id(0)  # the block of STEPS steps
    n = n0 + tl.program_id(1).to(tl.int64)  # the batch row
    dt = x_ptr.dtype.element_ty
    KH = K * H
    i = tl.arange(0, BLOCK_D)  # rows (and, as j, columns)
    im = i < D
    top = i < H  # the LSTM's h rows; every row of the others
    u = tl.where(top, i, i - H)  # the unit a row reads
    j = i
    wm = im[:, None] & (j < H)[None, :]
    woff = u[:, None] * H + j[None, :]
    W0 = tl.load(w_ptr + woff, mask=wm, other=0.0).to(dt)  # (BD, BD) gate block k, row u(i)
    if K > 1:
        W1 = tl.load(w_ptr + H * H + woff, mask=wm, other=0.0).to(dt)
        W2 = tl.load(w_ptr + 2 * H * H + woff, mask=wm, other=0.0).to(dt)
    if K > 3:
        W3 = tl.load(w_ptr + 3 * H * H + woff, mask=wm, other=0.0).to(dt)
    mat = i[:, None] * D + j[None, :]  # (BD, BD) offsets of [i, j] in a D x D matrix
    mm = im[:, None] & (j < D)[None, :]
    rmax = tl.zeros((BLOCK_D,), dtype=dt)
    first = tl.full((BLOCK_D,), T, tl.int32)
    gbase = n * s_gb
    for s in range(STEPS):
        t = p * STEPS + s
        tm = t < T
        m = im & tm
        row = n * T + t
        goff = gbase + t.to(tl.int64) * s_gt
        xp = _state(x_ptr, x0_ptr, n, t, T, D, i, m, dt)  # (BD,) x_{t-1} by row
        # --- the cell, by row (each unit twice on the LSTM: its h row and its c row)
        if CELL == 0:
            xr, hr = _gates(gi_ptr, goff, G_ptr, G0_ptr, b_ptr, n, t, T, H, KH, u, m, 0, dt)
            xz, hz = _gates(gi_ptr, goff, G_ptr, G0_ptr, b_ptr, n, t, T, H, KH, u, m, 1, dt)
            xn, hn = _gates(gi_ptr, goff, G_ptr, G0_ptr, b_ptr, n, t, T, H, KH, u, m, 2, dt)
            r = _sigmoid(xr + hr)
            z = _sigmoid(xz + hz)
            nn_ = _tanh(xn + r * hn)
            frow = (xp - nn_) * z + nn_
            dn = (1.0 - z) * (1.0 - nn_ * nn_)
            R0 = dn * hn * r * (1.0 - r)
            R1 = (xp - nn_) * z * (1.0 - z)
            R2 = dn * r
        elif CELL == 3:
            xi, hi = _gates(gi_ptr, goff, G_ptr, G0_ptr, b_ptr, n, t, T, H, KH, u, m, 0, dt)
            xf, hf = _gates(gi_ptr, goff, G_ptr, G0_ptr, b_ptr, n, t, T, H, KH, u, m, 1, dt)
            xg, hg = _gates(gi_ptr, goff, G_ptr, G0_ptr, b_ptr, n, t, T, H, KH, u, m, 2, dt)
            xo, ho = _gates(gi_ptr, goff, G_ptr, G0_ptr, b_ptr, n, t, T, H, KH, u, m, 3, dt)
            cp = _state(x_ptr, x0_ptr, n, t, T, D, u + H, m, dt)
            ig = _sigmoid(xi + hi)
            fg = _sigmoid(xf + hf)
            gg = _tanh(xg + hg)
            og = _sigmoid(xo + ho)
            c = fg * cp + ig * gg
            tc = _tanh(c)
            s_ = og * (1.0 - tc * tc)
            frow = tl.where(top, og * tc, c)
            Ci = gg * ig * (1.0 - ig)
            Cf = cp * fg * (1.0 - fg)
            Cg = ig * (1.0 - gg * gg)
            Co = tc * og * (1.0 - og)
            rs = tl.where(top, s_, 1.0)
            R0 = rs * Ci
            R1 = rs * Cf
            R2 = rs * Cg
            R3 = tl.where(top, Co, 0.0)
        else:
            xe, he = _gates(gi_ptr, goff, G_ptr, G0_ptr, b_ptr, n, t, T, H, KH, u, m, 0, dt)
            pre = xe + he
            if CELL == 1:
                frow = _tanh(pre)
                R0 = 1.0 - frow * frow
            else:
                frow = tl.maximum(pre, 0.0)
                R0 = tl.where(pre > 0, 1.0, 0.0).to(dt)
        if MODE == 0 or MODE == 1:  # the residual of x at t
            xt = _vec(x_ptr, row * D + i, m, dt)
            res = tl.abs(xt - frow) / (1.0 + tl.abs(frow))
            res = tl.where(m, tl.where(res == res, res, float("inf")), 0.0)
            rmax = tl.maximum(rmax, res)
            first = tl.minimum(first, tl.where(res > tol, t, T))
        if MODE == 0 or MODE == 2:  # J_t (BD, BD)
            J = R0[:, None] * W0
            if CELL == 0:
                J += R1[:, None] * W1 + R2[:, None] * W2
                J += tl.where(i[:, None] == j[None, :], z[:, None], 0.0)
            if CELL == 3:
                J += R1[:, None] * W1 + R2[:, None] * W2 + R3[:, None] * W3
                dg = tl.where(top, s_ * fg, fg)
                J += tl.where(j[None, :] == (u + H)[:, None], dg[:, None], 0.0)
            if MODE == 0:
                tl.store(a_ptr + row * D * D + mat, J, mask=mm & tm)
                rhs = frow - tl.sum(J * xp[None, :], axis=1)
                tl.store(v_ptr + row * D + i, rhs, mask=m)
            else:  # J^T, and J^T g_t
                tl.store(a_ptr + row * D * D + j[None, :] * D + i[:, None], J, mask=mm & tm)
                gt = _vec(g_ptr, row * D + i, m, dt)
                tl.store(v_ptr + row * D + j, tl.sum(J * gt[:, None], axis=0),
                         mask=(j < D) & tm)
        if MODE == 3:  # lambda_t = g_t + mu_{t+1}, at the unit's h (and c) feature
            nxt = (t + 1) < T
            lh = _vec(g_ptr, row * D + u, m, dt) + _vec(mu_ptr, (row + 1) * D + u, m & nxt, dt)
            um = m & top  # each unit once
            kh = row * KH + u
            sh = (row - 1) * KH + u  # dgh one step back
            h0m = um & (t == 0)
            shm = um & (t >= 1)
            lastm = um & (t == T - 1)
            z0 = tl.zeros((BLOCK_D,), dtype=dt)
            if CELL == 0:
                gr = lh * R0
                gz = lh * R1
                tl.store(dgi_ptr + kh, gr, mask=um)
                tl.store(dgi_ptr + kh + H, gz, mask=um)
                tl.store(dgi_ptr + kh + 2 * H, lh * dn, mask=um)
                gn = lh * R2
                tl.store(dgh_ptr + sh, gr, mask=shm)
                tl.store(dgh_ptr + sh + H, gz, mask=shm)
                tl.store(dgh_ptr + sh + 2 * H, gn, mask=shm)
                o0 = n * KH + u  # dgh_0's row
                tl.store(dgh0_ptr + o0, gr, mask=h0m)
                tl.store(dgh0_ptr + o0 + H, gz, mask=h0m)
                tl.store(dgh0_ptr + o0 + 2 * H, gn, mask=h0m)
                tl.store(dgh_ptr + kh, z0, mask=lastm)
                tl.store(dgh_ptr + kh + H, z0, mask=lastm)
                tl.store(dgh_ptr + kh + 2 * H, z0, mask=lastm)
            elif CELL == 3:
                lc = _vec(g_ptr, row * D + u + H, m, dt) + _vec(mu_ptr, (row + 1) * D + u + H,
                                                                m & nxt, dt)
                gcn = lc + lh * s_
                d0 = gcn * Ci
                d1 = gcn * Cf
                d2 = gcn * Cg
                d3 = lh * Co
                tl.store(dgi_ptr + kh, d0, mask=um)
                tl.store(dgi_ptr + kh + H, d1, mask=um)
                tl.store(dgi_ptr + kh + 2 * H, d2, mask=um)
                tl.store(dgi_ptr + kh + 3 * H, d3, mask=um)
                tl.store(dgh_ptr + sh, d0, mask=shm)
                tl.store(dgh_ptr + sh + H, d1, mask=shm)
                tl.store(dgh_ptr + sh + 2 * H, d2, mask=shm)
                tl.store(dgh_ptr + sh + 3 * H, d3, mask=shm)
                o0 = n * KH + u  # dgh_0's row
                tl.store(dgh0_ptr + o0, d0, mask=h0m)
                tl.store(dgh0_ptr + o0 + H, d1, mask=h0m)
                tl.store(dgh0_ptr + o0 + 2 * H, d2, mask=h0m)
                tl.store(dgh0_ptr + o0 + 3 * H, d3, mask=h0m)
                tl.store(dgh_ptr + kh, z0, mask=lastm)
                tl.store(dgh_ptr + kh + H, z0, mask=lastm)
                tl.store(dgh_ptr + kh + 2 * H, z0, mask=lastm)
                tl.store(dgh_ptr + kh + 3 * H, z0, mask=lastm)
            else:
                d = lh * R0
                tl.store(dgi_ptr + kh, d, mask=um)
                tl.store(dgh_ptr + sh, d, mask=shm)
                tl.store(dgh0_ptr + n * KH + u, d, mask=h0m)
                tl.store(dgh_ptr + kh, z0, mask=lastm)
    if MODE == 0 or MODE == 1:
        out = n * tl.num_programs(0) + p
        tl.store(res_ptr + out, tl.max(rmax, axis=0))
        tl.store(first_ptr + out, tl.min(first, axis=0))
