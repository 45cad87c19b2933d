"""The lanes kernels (see ``paraseq.cells.compiled``): the forward loop, its adjoint (the
reverse sweep) and the Newton sweep of ``paraseq.cells.newton``, for every cell kind (the
first argument, a compile-time constant). Compiled in ``compiled._build``.

All arrays are 1-D and contiguous (matrices flattened row-major) except gi, the outputs and the
upstream gradients, which are flat views of any strided layout read with their strides
(sb, st, sj): element (b, t, j) at b sb + t st + j sj.
"""

from __future__ import annotations

import numpy as np

from .cellmath import (
    _ELMAN_RELU,
    _GRU,
    _LSTM,
    _NEWTON_CLIP,
    _elman_b,
    _elman_f,
    _elman_newton,
    _gru_b,
    _gru_f,
    _gru_newton,
    _lstm_b,
    _lstm_f,
    _lstm_newton,
    _res,
)
from .simd import (
    _clip,
    _ld,
    _st,
    _vfull,
    _vload,
    _vload_s,
    _vmax,
    _vnan_to,
    _vstep,
    _vstore,
    _vstore_s,
)


def _lanes_fwd(cell, gi, gs, h0, c0, w, wd, bh, diag, whr, oh, ohs, oc, ocs, T, H, P, lo, hi,
               vw):
    """Rows [lo, hi) of the batch, W at a time in lockstep. h0 (B, P), c0 (B, H) row-major;
    w (K, P) row-major or wd (K,) (diag); whr (P, H) (an LSTM with P < H: proj)."""
    W = len(vw)
    K = bh.shape[0]
    NG = (hi - lo + W - 1) // W
    proj = cell == _LSTM and whr.shape[0] > 0
    relu = cell == _ELMAN_RELU
    hS = np.zeros(NG * P * W, dtype=bh.dtype)  # per group: P vectors of W lanes
    cS = np.zeros(NG * H * W if cell == _LSTM else 1, dtype=bh.dtype)
    gh = np.empty(K * W, dtype=bh.dtype)
    mS = np.empty(H * W, dtype=bh.dtype)
    for grp in range(NG):
        b0 = lo + grp * W
        n = min(W, hi - b0)
        for k in range(P):
            _vstore(hS, (grp * P + k) * W, _vload_s(h0, b0 * P + k, P, n, vw))
        if cell == _LSTM:
            for i in range(H):
                _vstore(cS, (grp * H + i) * W, _vload_s(c0, b0 * H + i, H, n, vw))
    sb, st, sj = gs
    ob, ot, oi = ohs
    cb, ct, ci = ocs
    for t in range(T):
        for grp in range(NG):
            b0 = lo + grp * W
            n = min(W, hi - b0)
            hb = grp * P * W
            if diag:
                for j in range(K):
                    _vstore(gh, j * W, wd[j] * _vload(hS, hb + (j % H) * W, vw) + bh[j])
            else:
                # four rows of W_hh at a time: four independent FMA chains share each load of h
                j = 0
                while j + 4 <= K:
                    a0 = _vfull(bh[j], gh, vw)
                    a1 = _vfull(bh[j + 1], gh, vw)
                    a2 = _vfull(bh[j + 2], gh, vw)
                    a3 = _vfull(bh[j + 3], gh, vw)
                    for k in range(P):
                        hk = _vload(hS, hb + k * W, vw)
                        a0 = a0 + w[j * P + k] * hk
                        a1 = a1 + w[(j + 1) * P + k] * hk
                        a2 = a2 + w[(j + 2) * P + k] * hk
                        a3 = a3 + w[(j + 3) * P + k] * hk
                    _vstore(gh, j * W, a0)
                    _vstore(gh, (j + 1) * W, a1)
                    _vstore(gh, (j + 2) * W, a2)
                    _vstore(gh, (j + 3) * W, a3)
                    j += 4
                for jj in range(j, K):
                    acc = _vfull(bh[jj], gh, vw)
                    for k in range(P):
                        acc = acc + w[jj * P + k] * _vload(hS, hb + k * W, vw)
                    _vstore(gh, jj * W, acc)
            x0 = t * st + b0 * sb
            o0 = t * ot + b0 * ob
            if cell == _GRU:
                for i in range(H):
                    h = _gru_f(_ld(gi, x0 + i * sj, sb, n, vw),
                               _ld(gi, x0 + (H + i) * sj, sb, n, vw),
                               _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw),
                               _vload(gh, i * W, vw), _vload(gh, (H + i) * W, vw),
                               _vload(gh, (2 * H + i) * W, vw), _vload(hS, hb + i * W, vw))
                    _vstore(hS, hb + i * W, h)
                    _st(oh, o0 + i * oi, ob, n, h, vw)
            elif cell == _LSTM:
                c0_ = t * ct + b0 * cb
                for i in range(H):
                    cp = _vload(cS, (grp * H + i) * W, vw)
                    gates = _lstm_f(_ld(gi, x0 + i * sj, sb, n, vw),
                                    _ld(gi, x0 + (H + i) * sj, sb, n, vw),
                                    _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw),
                                    _ld(gi, x0 + (3 * H + i) * sj, sb, n, vw),
                                    _vload(gh, i * W, vw), _vload(gh, (H + i) * W, vw),
                                    _vload(gh, (2 * H + i) * W, vw),
                                    _vload(gh, (3 * H + i) * W, vw), cp)
                    c = gates[4]
                    m = gates[3] * gates[5]
                    _vstore(cS, (grp * H + i) * W, c)
                    _st(oc, c0_ + i * ci, cb, n, c, vw)
                    if proj:
                        _vstore(mS, i * W, m)
                    else:
                        _vstore(hS, hb + i * W, m)
                        _st(oh, o0 + i * oi, ob, n, m, vw)
                if proj:
                    for p in range(P):
                        acc = _vfull(0.0, gh, vw)
                        for i in range(H):
                            acc = acc + whr[p * H + i] * _vload(mS, i * W, vw)
                        _vstore(hS, hb + p * W, acc)
                        _st(oh, o0 + p * oi, ob, n, acc, vw)
            else:
                for i in range(H):
                    h = _elman_f(relu, _ld(gi, x0 + i * sj, sb, n, vw), _vload(gh, i * W, vw))
                    _vstore(hS, hb + i * W, h)
                    _st(oh, o0 + i * oi, ob, n, h, vw)


def _lanes_bwd(cell, gi, gs, h0, c0, w, wd, bh, diag, whr, oh, ohs, oc, ocs, gh_, ghs, gc_,
               gcs, dgi, dgs, dh0, dc0, dw, dwd, dbh, dwhr, T, H, P, lo, hi, vw):
    """The adjoint of _lanes_fwd over rows [lo, hi): gh_/gc_ the upstream gradients of the
    outputs (strides ghs/gcs), dgi written with strides dgs, dh0 (B, P), dc0 (B, H) row-major;
    the weight gradients accumulate per lane: dw (K, P, W), dwd (K, W), dbh (K, W),
    dwhr (P, H, W)."""
    W = len(vw)
    K = bh.shape[0]
    NG = (hi - lo + W - 1) // W
    lstm = cell == _LSTM
    proj = lstm and whr.shape[0] > 0
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    hp = np.empty(P * W, dtype=dt)
    cp = np.empty(H * W, dtype=dt)
    gh = np.empty(K * W, dtype=dt)
    dy = np.empty(K * W, dtype=dt)
    dh = np.empty(P * W, dtype=dt)
    dhn = np.empty(P * W, dtype=dt)
    dc = np.empty(H * W, dtype=dt)
    sv = np.empty(6 * H * W if lstm else 1, dtype=dt)  # i, f, g, o, tanh(c), m per unit
    dm = np.empty(H * W, dtype=dt)
    sb, st, sj = gs
    ob, ot, oi = ohs
    cb, ct, ci = ocs
    gb, gt, gk = ghs
    qb, qt, qi = gcs
    db_, dt_, dj = dgs
    zero = _vfull(0.0, dh, vw)
    for grp in range(NG):
        b0 = lo + grp * W
        n = min(W, hi - b0)
        for k in range(P):
            _vstore(dh, k * W, zero)
        for i in range(H):
            _vstore(dc, i * W, zero)
        for t in range(T - 1, -1, -1):
            # the state before step t
            for k in range(P):
                if t == 0:
                    v = _vload_s(h0, b0 * P + k, P, n, vw)
                else:
                    v = _ld(oh, (t - 1) * ot + b0 * ob + k * oi, ob, n, vw)
                _vstore(hp, k * W, v)
            if lstm:
                for i in range(H):
                    if t == 0:
                        v = _vload_s(c0, b0 * H + i, H, n, vw)
                    else:
                        v = _ld(oc, (t - 1) * ct + b0 * cb + i * ci, cb, n, vw)
                    _vstore(cp, i * W, v)
            if diag:
                for j in range(K):
                    _vstore(gh, j * W, wd[j] * _vload(hp, (j % H) * W, vw) + bh[j])
            else:
                # four rows of W_hh at a time: four independent FMA chains share each load of h
                j = 0
                while j + 4 <= K:
                    a0 = _vfull(bh[j], gh, vw)
                    a1 = _vfull(bh[j + 1], gh, vw)
                    a2 = _vfull(bh[j + 2], gh, vw)
                    a3 = _vfull(bh[j + 3], gh, vw)
                    for k in range(P):
                        hk = _vload(hp, k * W, vw)
                        a0 = a0 + w[j * P + k] * hk
                        a1 = a1 + w[(j + 1) * P + k] * hk
                        a2 = a2 + w[(j + 2) * P + k] * hk
                        a3 = a3 + w[(j + 3) * P + k] * hk
                    _vstore(gh, j * W, a0)
                    _vstore(gh, (j + 1) * W, a1)
                    _vstore(gh, (j + 2) * W, a2)
                    _vstore(gh, (j + 3) * W, a3)
                    j += 4
                for jj in range(j, K):
                    acc = _vfull(bh[jj], gh, vw)
                    for k in range(P):
                        acc = acc + w[jj * P + k] * _vload(hp, k * W, vw)
                    _vstore(gh, jj * W, acc)
            for k in range(P):  # dL/dh_t: from step t + 1 and from the output at t
                _vstore(dh, k * W, _vload(dh, k * W, vw)
                        + _ld(gh_, t * gt + b0 * gb + k * gk, gb, n, vw))
            x0 = t * st + b0 * sb
            d0 = t * dt_ + b0 * db_
            for k in range(P):
                _vstore(dhn, k * W, zero)
            if cell == _GRU:
                for i in range(H):
                    r = _gru_b(_ld(gi, x0 + i * sj, sb, n, vw),
                               _ld(gi, x0 + (H + i) * sj, sb, n, vw),
                               _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw),
                               _vload(gh, i * W, vw), _vload(gh, (H + i) * W, vw),
                               _vload(gh, (2 * H + i) * W, vw), _vload(hp, i * W, vw),
                               _vload(dh, i * W, vw))
                    _st(dgi, d0 + i * dj, db_, n, r[0], vw)
                    _st(dgi, d0 + (H + i) * dj, db_, n, r[1], vw)
                    _st(dgi, d0 + (2 * H + i) * dj, db_, n, r[2], vw)
                    _vstore(dy, i * W, r[0])
                    _vstore(dy, (H + i) * W, r[1])
                    _vstore(dy, (2 * H + i) * W, r[3])
                    _vstore(dhn, i * W, r[4])
            elif lstm:
                for i in range(H):
                    s = _lstm_f(_ld(gi, x0 + i * sj, sb, n, vw),
                                _ld(gi, x0 + (H + i) * sj, sb, n, vw),
                                _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw),
                                _ld(gi, x0 + (3 * H + i) * sj, sb, n, vw),
                                _vload(gh, i * W, vw), _vload(gh, (H + i) * W, vw),
                                _vload(gh, (2 * H + i) * W, vw), _vload(gh, (3 * H + i) * W, vw),
                                _vload(cp, i * W, vw))
                    for q in range(4):
                        _vstore(sv, (q * H + i) * W, s[q])
                    _vstore(sv, (4 * H + i) * W, s[5])
                    _vstore(sv, (5 * H + i) * W, s[3] * s[5])
                    # dL/dc_t: from step t + 1 and from the output at t
                    _vstore(dc, i * W, _vload(dc, i * W, vw)
                            + _ld(gc_, t * qt + b0 * qb + i * qi, qb, n, vw))
                if proj:
                    for i in range(H):
                        acc = _vfull(0.0, dm, vw)
                        for p in range(P):
                            acc = acc + whr[p * H + i] * _vload(dh, p * W, vw)
                        _vstore(dm, i * W, acc)
                    for p in range(P):
                        dp = _vload(dh, p * W, vw)
                        for i in range(H):
                            o = (p * H + i) * W
                            _vstore(dwhr, o, _vload(dwhr, o, vw)
                                    + dp * _vload(sv, (5 * H + i) * W, vw))
                for i in range(H):
                    r = _lstm_b(_vload(sv, i * W, vw), _vload(sv, (H + i) * W, vw),
                                _vload(sv, (2 * H + i) * W, vw), _vload(sv, (3 * H + i) * W, vw),
                                _vload(sv, (4 * H + i) * W, vw), _vload(cp, i * W, vw),
                                _vload(dm if proj else dh, i * W, vw), _vload(dc, i * W, vw))
                    for q in range(4):
                        _st(dgi, d0 + (q * H + i) * dj, db_, n, r[q], vw)
                        _vstore(dy, (q * H + i) * W, r[q])
                    _vstore(dc, i * W, r[4])
            else:
                for i in range(H):
                    r1 = _elman_b(relu, _ld(gi, x0 + i * sj, sb, n, vw), _vload(gh, i * W, vw),
                                  _vload(dh, i * W, vw))
                    _st(dgi, d0 + i * dj, db_, n, r1, vw)
                    _vstore(dy, i * W, r1)
            # through W_hh: the parameter gradients and dL/dh_{t-1}
            for j in range(K):
                _vstore(dbh, j * W, _vload(dbh, j * W, vw) + _vload(dy, j * W, vw))
            if diag:
                for j in range(K):
                    u = (j % H) * W
                    dyj = _vload(dy, j * W, vw)
                    _vstore(dwd, j * W, _vload(dwd, j * W, vw) + dyj * _vload(hp, u, vw))
                    _vstore(dhn, u, _vload(dhn, u, vw) + wd[j] * dyj)
            else:
                for j in range(K):
                    dyj = _vload(dy, j * W, vw)
                    for k in range(P):
                        o = (j * P + k) * W
                        _vstore(dw, o, _vload(dw, o, vw) + dyj * _vload(hp, k * W, vw))
                k = 0
                while k + 4 <= P:  # four columns of W_hh at a time
                    a0 = _vload(dhn, k * W, vw)
                    a1 = _vload(dhn, (k + 1) * W, vw)
                    a2 = _vload(dhn, (k + 2) * W, vw)
                    a3 = _vload(dhn, (k + 3) * W, vw)
                    for j in range(K):
                        dyj = _vload(dy, j * W, vw)
                        a0 = a0 + w[j * P + k] * dyj
                        a1 = a1 + w[j * P + k + 1] * dyj
                        a2 = a2 + w[j * P + k + 2] * dyj
                        a3 = a3 + w[j * P + k + 3] * dyj
                    _vstore(dhn, k * W, a0)
                    _vstore(dhn, (k + 1) * W, a1)
                    _vstore(dhn, (k + 2) * W, a2)
                    _vstore(dhn, (k + 3) * W, a3)
                    k += 4
                for kk in range(k, P):
                    acc = _vload(dhn, kk * W, vw)
                    for j in range(K):
                        acc = acc + w[j * P + kk] * _vload(dy, j * W, vw)
                    _vstore(dhn, kk * W, acc)
            for k in range(P):
                _vstore(dh, k * W, _vload(dhn, k * W, vw))
        for k in range(P):
            _vstore_s(dh0, b0 * P + k, P, n, _vload(dh, k * W, vw))
        if lstm:
            for i in range(H):
                _vstore_s(dc0, b0 * H + i, H, n, _vload(dc, i * W, vw))


def _lanes_newton(cell, gi, gs, h0, c0, w, bh, hb, hs, cb, cs, gb, gss, start, first, pmax,
                  smax, omax, tol, T, H, lo, hi, vw):  # pragma: no cover - compiled
    """One Newton sweep over batch rows [lo, hi) (lo a multiple of W), W rows in lockstep.

    gi (B, T, K) and the iterate hb (B, T, H) and gb (B, T, K), g_t = W_hh h_{t-1} + b_hh of it,
    are flat views with strides gs, hs, gss; hb and gb are updated in place to the new iterate.
    h0 (B, H) row-major; w (K, H) row-major; bh (K,). start[grp]: the first step group grp
    sweeps (T: none). Written per group: first[grp], the first step whose new residual is
    above tol (T if none); pmax[grp], the largest new residual before it; smax[grp], the
    largest over the swept steps; omax[grp], the largest residual of the iterate it was given
    over the same steps. The LSTM's state is (h, c): c0 (B, H) row-major, cb (B, T, H) with
    strides cs, its iterate of c, updated in place too; the residual is the larger of h's and
    c's."""
    W = len(vw)
    K = bh.shape[0]
    NG = (hi - lo + W - 1) // W
    g0 = lo // W
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    hop = np.zeros(NG * H * W, dtype=dt)  # h_{t-1} of the old iterate, per group
    hnp = np.zeros(NG * H * W, dtype=dt)  # h'_{t-1} of the new one
    gn = np.zeros(NG * K * W, dtype=dt)  # g'_t = W_hh h'_{t-1} + b_hh
    lstm = cell == _LSTM
    cop = np.zeros(NG * H * W if lstm else 1, dtype=dt)  # c_{t-1}, old and new (LSTM)
    cnp = np.zeros(NG * H * W if lstm else 1, dtype=dt)
    book = np.zeros(NG * 5 * W, dtype=dt)  # per group: seen, count, pm, sm, om
    sb, st, sj = gs
    hb_, ht, hj = hs
    gb_, gt, gj = gss
    cb_, ct, cj = cs
    t_lo = T
    for grp in range(NG):
        t_lo = min(t_lo, start[g0 + grp])
    one = _vfull(1.0, gn, vw)
    zero = _vfull(0.0, gn, vw)
    for t in range(t_lo, T):
        for grp in range(NG):
            s = start[g0 + grp]
            if t < s:
                continue
            b0 = lo + grp * W
            n = min(W, hi - b0)
            ho = grp * H * W
            go = grp * K * W
            if t == s:  # the state before the sweep's first step is the unchanged h_{s-1}
                for i in range(H):
                    if s == 0:
                        v = _ld(h0, b0 * H + i, H, n, vw)
                    else:
                        v = _ld(hb, (s - 1) * ht + b0 * hb_ + i * hj, hb_, n, vw)
                    _vstore(hop, ho + i * W, v)
                    _vstore(hnp, ho + i * W, v)
                    if lstm:
                        if s == 0:
                            v = _ld(c0, b0 * H + i, H, n, vw)
                        else:
                            v = _ld(cb, (s - 1) * ct + b0 * cb_ + i * cj, cb_, n, vw)
                        _vstore(cop, ho + i * W, v)
                        _vstore(cnp, ho + i * W, v)
                for j in range(K):
                    _vstore(gn, go + j * W, _ld(gb, s * gt + b0 * gb_ + j * gj, gb_, n, vw))
            x0 = t * st + b0 * sb
            q0 = t * gt + b0 * gb_
            h_0 = t * ht + b0 * hb_
            c_0 = t * ct + b0 * cb_
            rm = zero
            om = zero
            for i in range(H):
                hp = _vload(hop, ho + i * W, vw)
                hq = _vload(hnp, ho + i * W, vw)
                old = _ld(hb, h_0 + i * hj, hb_, n, vw)
                if lstm:
                    cp = _vload(cop, ho + i * W, vw)
                    cq = _vload(cnp, ho + i * W, vw)
                    oldc = _ld(cb, c_0 + i * cj, cb_, n, vw)
                    xi = _ld(gi, x0 + i * sj, sb, n, vw)
                    xf = _ld(gi, x0 + (H + i) * sj, sb, n, vw)
                    xg = _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw)
                    xo = _ld(gi, x0 + (3 * H + i) * sj, sb, n, vw)
                    yi = _ld(gb, q0 + i * gj, gb_, n, vw)
                    yf = _ld(gb, q0 + (H + i) * gj, gb_, n, vw)
                    yg = _ld(gb, q0 + (2 * H + i) * gj, gb_, n, vw)
                    yo = _ld(gb, q0 + (3 * H + i) * gj, gb_, n, vw)
                    ui = _vload(gn, go + i * W, vw)
                    uf = _vload(gn, go + (H + i) * W, vw)
                    ug = _vload(gn, go + (2 * H + i) * W, vw)
                    uo = _vload(gn, go + (3 * H + i) * W, vw)
                    fh, fc, hr, cr, f2h, f2c = _lstm_newton(xi, xf, xg, xo, yi, yf, yg, yo, ui,
                                                            uf, ug, uo, cp, cq)
                    h = _clip(_vnan_to(hr, 0.0), _NEWTON_CLIP)
                    c = _clip(_vnan_to(cr, 0.0), _NEWTON_CLIP)
                    rm = _vmax(rm, _vmax(_res(h, f2h), _res(c, f2c)))
                    om = _vmax(om, _vmax(_res(old, fh), _res(oldc, fc)))
                    _vstore(hop, ho + i * W, old)
                    _vstore(hnp, ho + i * W, h)
                    _vstore(cop, ho + i * W, oldc)
                    _vstore(cnp, ho + i * W, c)
                    _st(hb, h_0 + i * hj, hb_, n, h, vw)
                    _st(cb, c_0 + i * cj, cb_, n, c, vw)
                    continue
                if cell == _GRU:
                    xr = _ld(gi, x0 + i * sj, sb, n, vw)
                    xz = _ld(gi, x0 + (H + i) * sj, sb, n, vw)
                    xn = _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw)
                    yr = _ld(gb, q0 + i * gj, gb_, n, vw)
                    yz = _ld(gb, q0 + (H + i) * gj, gb_, n, vw)
                    yn = _ld(gb, q0 + (2 * H + i) * gj, gb_, n, vw)
                    ur = _vload(gn, go + i * W, vw)
                    uz = _vload(gn, go + (H + i) * W, vw)
                    un = _vload(gn, go + (2 * H + i) * W, vw)
                    f, hr, f2 = _gru_newton(xr, xz, xn, yr, yz, yn, ur, uz, un, hp, hq)
                else:
                    f, hr, f2 = _elman_newton(relu, _ld(gi, x0 + i * sj, sb, n, vw),
                                              _ld(gb, q0 + i * gj, gb_, n, vw),
                                              _vload(gn, go + i * W, vw))
                h = _clip(_vnan_to(hr, 0.0), _NEWTON_CLIP)
                rm = _vmax(rm, _res(h, f2))
                om = _vmax(om, _res(old, f))
                _vstore(hop, ho + i * W, old)
                _vstore(hnp, ho + i * W, h)
                _st(hb, h_0 + i * hj, hb_, n, h, vw)
            for j in range(K):  # the new iterate's g_t
                _st(gb, q0 + j * gj, gb_, n, _vload(gn, go + j * W, vw), vw)
            # g'_{t+1} = W_hh h'_t + b_hh: four rows of W_hh share each load of h'
            j = 0
            while j + 4 <= K:
                a0 = _vfull(bh[j], gn, vw)
                a1 = _vfull(bh[j + 1], gn, vw)
                a2 = _vfull(bh[j + 2], gn, vw)
                a3 = _vfull(bh[j + 3], gn, vw)
                for k in range(H):
                    hk = _vload(hnp, ho + k * W, vw)
                    a0 = a0 + w[j * H + k] * hk
                    a1 = a1 + w[(j + 1) * H + k] * hk
                    a2 = a2 + w[(j + 2) * H + k] * hk
                    a3 = a3 + w[(j + 3) * H + k] * hk
                _vstore(gn, go + j * W, a0)
                _vstore(gn, go + (j + 1) * W, a1)
                _vstore(gn, go + (j + 2) * W, a2)
                _vstore(gn, go + (j + 3) * W, a3)
                j += 4
            for jj in range(j, K):
                acc = _vfull(bh[jj], gn, vw)
                for k in range(H):
                    acc = acc + w[jj * H + k] * _vload(hnp, ho + k * W, vw)
                _vstore(gn, go + jj * W, acc)
            # bookkeeping per lane: seen (a step above tol so far), count of steps before it,
            # the largest residual before it, over all swept steps, and of the old iterate
            bo = grp * 5 * W
            seen = _vmax(_vload(book, bo, vw), _vstep(rm - tol))
            _vstore(book, bo, seen)
            _vstore(book, bo + W, _vload(book, bo + W, vw) + (one - seen))
            _vstore(book, bo + 2 * W,
                      _vmax(_vload(book, bo + 2 * W, vw), _clip(rm, tol) * (one - seen)))
            _vstore(book, bo + 3 * W, _vmax(_vload(book, bo + 3 * W, vw), rm))
            _vstore(book, bo + 4 * W, _vmax(_vload(book, bo + 4 * W, vw), om))
    for grp in range(NG):
        s = start[g0 + grp]
        b0 = lo + grp * W
        n = min(W, hi - b0)
        bo = grp * 5 * W
        if s >= T:
            first[g0 + grp] = T
            pmax[g0 + grp] = 0.0
            smax[g0 + grp] = 0.0
            omax[g0 + grp] = 0.0
            continue
        c = book[bo + W]
        p = book[bo + 2 * W]
        m = book[bo + 3 * W]
        o = book[bo + 4 * W]
        for lane in range(1, n):
            c = min(c, book[bo + W + lane])
            p = max(p, book[bo + 2 * W + lane])
            m = max(m, book[bo + 3 * W + lane])
            o = max(o, book[bo + 4 * W + lane])
        first[g0 + grp] = s + int(c)
        pmax[g0 + grp] = p
        smax[g0 + grp] = m
        omax[g0 + grp] = o


def _lanes_proj1(x, sx, w, bi, out, T, B, vw):
    """The lanes layout's input projection for an input of one feature, in one pass on the
    calling thread: gi (K, T, B) = w[j] x[b, t] + bi[j] (K = len(w); bi empty: no bias), x
    read with strides sx = (sb, st) (no copy of it), W rows at a time. (torch's broadcast
    addcmul ran on its thread pool after a copy of x, and each waited out a time slice
    whenever another process held the second core.)"""
    W = len(vw)
    K = w.shape[0]
    sb, st = sx
    hasb = bi.shape[0] > 0
    for t in range(T):
        for b0 in range(0, B, W):
            n = min(W, B - b0)
            xv = _ld(x, b0 * sb + t * st, sb, n, vw)
            for j in range(K):
                v = xv * w[j]
                if hasb:
                    v = v + bi[j]
                _st(out, (j * T + t) * B + b0, 1, n, v, vw)
