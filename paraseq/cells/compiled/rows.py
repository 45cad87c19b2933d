"""The rows kernels (see ``paraseq.cells.compiled``): the forward loop, its adjoint (the
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
    _NGATES_T,
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
    _vstore,
)


def _rows_fwd(cell, gi, gs, h0, c0, wT, wd, bh, diag, whrT, oh, ohs, oc, ocs, T, H, P, lo, hi,
              vw):
    """Rows [lo, hi) one after another, vectors over W units. Padded (zeros beyond H or P):
    wT (P, NQ Hp), wd and bh (NQ Hp), whrT (H, Pp)."""
    W = len(vw)
    NQ = _NGATES_T[cell]
    Hp = (H + W - 1) // W * W
    Pp = (P + W - 1) // W * W
    proj = cell == _LSTM and whrT.shape[0] > 0
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    hS = np.zeros(max(Pp, Hp), dtype=dt)
    cS = np.zeros(Hp, dtype=dt)
    mS = np.zeros(Hp, dtype=dt)
    gh = np.empty(NQ * Hp, dtype=dt)
    sb, st, sj = gs
    ob, ot, oi = ohs
    cb, ct, ci = ocs
    for b in range(lo, hi):
        hS[:] = 0.0
        for k in range(P):
            hS[k] = h0[b * P + k]
        if cell == _LSTM:
            cS[:] = 0.0
            for i in range(H):
                cS[i] = c0[b * H + i]
        for t in range(T):
            KB = NQ * Hp // W
            if diag:
                for q in range(NQ):
                    for ib in range(Hp // W):
                        o = q * Hp + ib * W
                        _vstore(gh, o, _vload(wd, o, vw) * _vload(hS, ib * W, vw)
                                + _vload(bh, o, vw))
            else:
                # four vectors of gate units at a time, held in registers across k
                R = NQ * Hp
                jb = 0
                while jb + 4 <= KB:
                    o = jb * W
                    a0 = _vload(bh, o, vw)
                    a1 = _vload(bh, o + W, vw)
                    a2 = _vload(bh, o + 2 * W, vw)
                    a3 = _vload(bh, o + 3 * W, vw)
                    for k in range(P):
                        hk = hS[k]
                        a0 = a0 + _vload(wT, k * R + o, vw) * hk
                        a1 = a1 + _vload(wT, k * R + o + W, vw) * hk
                        a2 = a2 + _vload(wT, k * R + o + 2 * W, vw) * hk
                        a3 = a3 + _vload(wT, k * R + o + 3 * W, vw) * hk
                    _vstore(gh, o, a0)
                    _vstore(gh, o + W, a1)
                    _vstore(gh, o + 2 * W, a2)
                    _vstore(gh, o + 3 * W, a3)
                    jb += 4
                for jj in range(jb, KB):
                    o = jj * W
                    acc = _vload(bh, o, vw)
                    for k in range(P):
                        acc = acc + _vload(wT, k * R + o, vw) * hS[k]
                    _vstore(gh, o, acc)
            x0 = b * sb + t * st
            o0 = b * ob + t * ot
            for ib in range(Hp // W):
                i0 = ib * W
                n = min(W, H - i0)
                if cell == _GRU:
                    h = _gru_f(_ld(gi, x0 + i0 * sj, sj, n, vw),
                               _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                               _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                               _vload(gh, i0, vw), _vload(gh, Hp + i0, vw),
                               _vload(gh, 2 * Hp + i0, vw), _vload(hS, i0, vw))
                    _vstore(hS, i0, h)
                    _st(oh, o0 + i0 * oi, oi, n, h, vw)
                elif cell == _LSTM:
                    s = _lstm_f(_ld(gi, x0 + i0 * sj, sj, n, vw),
                                _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (3 * H + i0) * sj, sj, n, vw),
                                _vload(gh, i0, vw), _vload(gh, Hp + i0, vw),
                                _vload(gh, 2 * Hp + i0, vw), _vload(gh, 3 * Hp + i0, vw),
                                _vload(cS, i0, vw))
                    m = s[3] * s[5]
                    _vstore(cS, i0, s[4])
                    _st(oc, b * cb + t * ct + i0 * ci, ci, n, s[4], vw)
                    if proj:
                        _vstore(mS, i0, m)
                    else:
                        _vstore(hS, i0, m)
                        _st(oh, o0 + i0 * oi, oi, n, m, vw)
                else:
                    h = _elman_f(relu, _ld(gi, x0 + i0 * sj, sj, n, vw), _vload(gh, i0, vw))
                    _vstore(hS, i0, h)
                    _st(oh, o0 + i0 * oi, oi, n, h, vw)
            if proj:
                for pb in range(Pp // W):
                    _vstore(hS, pb * W, _vfull(0.0, hS, vw))
                for i in range(H):
                    mi = mS[i]
                    for pb in range(Pp // W):
                        o = pb * W
                        _vstore(hS, o, _vload(hS, o, vw) + _vload(whrT, i * Pp + o, vw) * mi)
                for pb in range(Pp // W):
                    p0 = pb * W
                    _st(oh, o0 + p0 * oi, oi, min(W, P - p0), _vload(hS, p0, vw), vw)


def _rows_bwd(cell, gi, gs, h0, c0, wT, wd, bh, diag, whrT, oh, ohs, oc, ocs, gh_, ghs, gc_,
              gcs, dgi, dgs, dh0, dc0, wR, whr, dw, dwd, dbh, dwhr, T, H, P, lo, hi, vw):
    """The adjoint of _rows_fwd over rows [lo, hi). Also padded: wR (K, Pp) = W_hh's rows,
    whr (P, Hp); the gradients accumulate (summed over rows): dw (K, Pp), dwd and dbh (NQ Hp),
    dwhr (P, Hp)."""
    W = len(vw)
    NQ = _NGATES_T[cell]
    Hp = (H + W - 1) // W * W
    Pp = (P + W - 1) // W * W
    lstm = cell == _LSTM
    proj = lstm and whrT.shape[0] > 0
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    Mp = max(Pp, Hp)
    hp = np.zeros(Mp, dtype=dt)
    cp = np.zeros(Hp, dtype=dt)
    gh = np.empty(NQ * Hp, dtype=dt)
    dy = np.zeros(NQ * Hp, dtype=dt)
    dh = np.zeros(Mp, dtype=dt)
    dhn = np.zeros(Mp, dtype=dt)
    dc = np.zeros(Hp, dtype=dt)
    sv = np.zeros(6 * Hp if lstm else 1, dtype=dt)
    dm = np.zeros(Hp, dtype=dt)
    sb, st, sj = gs
    ob, ot, oi = ohs
    cb, ct, ci = ocs
    gb, gt, gk = ghs
    qb, qt, qi = gcs
    db_, dt_, dj = dgs
    zero = _vfull(0.0, dh, vw)
    for b in range(lo, hi):
        dh[:] = 0.0
        dc[:] = 0.0
        for t in range(T - 1, -1, -1):
            for kb in range(Pp // W):
                k0 = kb * W
                nk = min(W, P - k0)
                if t == 0:
                    v = _vload_s(h0, b * P + k0, 1, nk, vw)
                else:
                    v = _ld(oh, b * ob + (t - 1) * ot + k0 * oi, oi, nk, vw)
                _vstore(hp, k0, v)
                _vstore(dh, k0, _vload(dh, k0, vw)
                        + _ld(gh_, b * gb + t * gt + k0 * gk, gk, nk, vw))
                _vstore(dhn, k0, zero)
            if lstm:
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    if t == 0:
                        v = _vload_s(c0, b * H + i0, 1, n, vw)
                    else:
                        v = _ld(oc, b * cb + (t - 1) * ct + i0 * ci, ci, n, vw)
                    _vstore(cp, i0, v)
            KB = NQ * Hp // W
            if diag:
                for q in range(NQ):
                    for ib in range(Hp // W):
                        o = q * Hp + ib * W
                        _vstore(gh, o, _vload(wd, o, vw) * _vload(hp, ib * W, vw)
                                + _vload(bh, o, vw))
            else:
                # four vectors of gate units at a time, held in registers across k
                R = NQ * Hp
                jb = 0
                while jb + 4 <= KB:
                    o = jb * W
                    a0 = _vload(bh, o, vw)
                    a1 = _vload(bh, o + W, vw)
                    a2 = _vload(bh, o + 2 * W, vw)
                    a3 = _vload(bh, o + 3 * W, vw)
                    for k in range(P):
                        hk = hp[k]
                        a0 = a0 + _vload(wT, k * R + o, vw) * hk
                        a1 = a1 + _vload(wT, k * R + o + W, vw) * hk
                        a2 = a2 + _vload(wT, k * R + o + 2 * W, vw) * hk
                        a3 = a3 + _vload(wT, k * R + o + 3 * W, vw) * hk
                    _vstore(gh, o, a0)
                    _vstore(gh, o + W, a1)
                    _vstore(gh, o + 2 * W, a2)
                    _vstore(gh, o + 3 * W, a3)
                    jb += 4
                for jj in range(jb, KB):
                    o = jj * W
                    acc = _vload(bh, o, vw)
                    for k in range(P):
                        acc = acc + _vload(wT, k * R + o, vw) * hp[k]
                    _vstore(gh, o, acc)
            x0 = b * sb + t * st
            d0 = b * db_ + t * dt_
            if lstm:
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    s = _lstm_f(_ld(gi, x0 + i0 * sj, sj, n, vw),
                                _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (3 * H + i0) * sj, sj, n, vw),
                                _vload(gh, i0, vw), _vload(gh, Hp + i0, vw),
                                _vload(gh, 2 * Hp + i0, vw), _vload(gh, 3 * Hp + i0, vw),
                                _vload(cp, i0, vw))
                    for q in range(4):
                        _vstore(sv, q * Hp + i0, s[q])
                    _vstore(sv, 4 * Hp + i0, s[5])
                    _vstore(sv, 5 * Hp + i0, s[3] * s[5])
                    _vstore(dc, i0, _vload(dc, i0, vw)
                            + _ld(gc_, b * qb + t * qt + i0 * qi, qi, n, vw))
                if proj:
                    for ib in range(Hp // W):
                        _vstore(dm, ib * W, zero)
                    for p in range(P):
                        dp = dh[p]
                        for ib in range(Hp // W):
                            o = ib * W
                            _vstore(dm, o, _vload(dm, o, vw) + _vload(whr, p * Hp + o, vw) * dp)
                            _vstore(dwhr, p * Hp + o, _vload(dwhr, p * Hp + o, vw)
                                    + _vload(sv, 5 * Hp + o, vw) * dp)
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    r = _lstm_b(_vload(sv, i0, vw), _vload(sv, Hp + i0, vw),
                                _vload(sv, 2 * Hp + i0, vw), _vload(sv, 3 * Hp + i0, vw),
                                _vload(sv, 4 * Hp + i0, vw), _vload(cp, i0, vw),
                                _vload(dm if proj else dh, i0, vw), _vload(dc, i0, vw))
                    for q in range(4):
                        _st(dgi, d0 + (q * H + i0) * dj, dj, n, r[q], vw)
                        _vstore(dy, q * Hp + i0, r[q])
                    _vstore(dc, i0, r[4])
            else:
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    if cell == _GRU:
                        r = _gru_b(_ld(gi, x0 + i0 * sj, sj, n, vw),
                                   _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                                   _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                                   _vload(gh, i0, vw), _vload(gh, Hp + i0, vw),
                                   _vload(gh, 2 * Hp + i0, vw), _vload(hp, i0, vw),
                                   _vload(dh, i0, vw))
                        _st(dgi, d0 + i0 * dj, dj, n, r[0], vw)
                        _st(dgi, d0 + (H + i0) * dj, dj, n, r[1], vw)
                        _st(dgi, d0 + (2 * H + i0) * dj, dj, n, r[2], vw)
                        _vstore(dy, i0, r[0])
                        _vstore(dy, Hp + i0, r[1])
                        _vstore(dy, 2 * Hp + i0, r[3])
                        _vstore(dhn, i0, r[4])
                    else:
                        r1 = _elman_b(relu, _ld(gi, x0 + i0 * sj, sj, n, vw), _vload(gh, i0, vw),
                                      _vload(dh, i0, vw))
                        _st(dgi, d0 + i0 * dj, dj, n, r1, vw)
                        _vstore(dy, i0, r1)
            # the padded lanes of dy hold finite values that only meet zero weights below
            for jb in range(NQ * Hp // W):
                o = jb * W
                _vstore(dbh, o, _vload(dbh, o, vw) + _vload(dy, o, vw))
            if diag:
                for q in range(NQ):
                    for ib in range(Hp // W):
                        o = q * Hp + ib * W
                        dyq = _vload(dy, o, vw)
                        _vstore(dwd, o, _vload(dwd, o, vw) + dyq * _vload(hp, ib * W, vw))
                        _vstore(dhn, ib * W, _vload(dhn, ib * W, vw) + _vload(wd, o, vw) * dyq)
            else:
                for q in range(NQ):
                    for i in range(H):
                        j = q * H + i
                        dyj = dy[q * Hp + i]
                        for kb in range(Pp // W):
                            o = kb * W
                            _vstore(dw, j * Pp + o, _vload(dw, j * Pp + o, vw)
                                    + _vload(hp, o, vw) * dyj)
                            _vstore(dhn, o, _vload(dhn, o, vw) + _vload(wR, j * Pp + o, vw) * dyj)
            for kb in range(Pp // W):
                _vstore(dh, kb * W, _vload(dhn, kb * W, vw))
        for k in range(P):
            dh0[b * P + k] = dh[k]
        if lstm:
            for i in range(H):
                dc0[b * H + i] = dc[i]


# ----------------------------------------------------------------------------- Newton sweeps


def _rows_newton(cell, gi, gs, h0, c0, wT, bh, hb, hs, cb, cs, gb, gss, start, first, pmax,
                 smax, omax, tol, T, H, lo, hi, vw):  # pragma: no cover - compiled
    """``_lanes_newton`` for batch rows [lo, hi) one after another, vectors over W units (the
    better layout for a few rows): wT (H, NQ Hp) and bh (NQ Hp) padded with zeros to Hp, a
    multiple of W, per gate; start/first/... are per batch row. hb and gb are this module's
    buffers, padded likewise: memory (T, B, Hp) and (T, B, NQ, Hp), zero in the padding, so
    every access to them is a whole vector; hs, gss give their (b, t) strides. The LSTM's cb
    is laid out as hb (strides cs)."""
    W = len(vw)
    NQ = _NGATES_T[cell]
    Hp = (H + W - 1) // W * W
    R = NQ * Hp
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    hop = np.zeros(Hp, dtype=dt)
    hnp = np.zeros(Hp, dtype=dt)
    gn = np.zeros(R, dtype=dt)
    lstm = cell == _LSTM
    cop = np.zeros(Hp, dtype=dt)
    cnp = np.zeros(Hp, dtype=dt)
    scratch = np.zeros(2 * W, dtype=dt)
    sb, st, sj = gs
    hb_, ht = hs
    gb_, gt = gss
    cb_, ct = cs
    zero = _vfull(0.0, gn, vw)
    for b in range(lo, hi):
        s = start[b]
        if s >= T:
            first[b] = T
            pmax[b] = 0.0
            smax[b] = 0.0
            omax[b] = 0.0
            continue
        for ib in range(Hp // W):
            i0 = ib * W
            n = min(W, H - i0)
            if s == 0:
                v = _ld(h0, b * H + i0, 1, n, vw)
            else:
                v = _vload(hb, (s - 1) * ht + b * hb_ + i0, vw)
            _vstore(hop, i0, v)
            _vstore(hnp, i0, v)
            if lstm:
                if s == 0:
                    v = _ld(c0, b * H + i0, 1, n, vw)
                else:
                    v = _vload(cb, (s - 1) * ct + b * cb_ + i0, vw)
                _vstore(cop, i0, v)
                _vstore(cnp, i0, v)
            for q in range(NQ):
                _vstore(gn, q * Hp + i0, _vload(gb, s * gt + b * gb_ + q * Hp + i0, vw))
        seen = False
        fb = T
        pm = 0.0
        sm = 0.0
        om = 0.0
        for t in range(s, T):
            x0 = b * sb + t * st
            q0 = b * gb_ + t * gt
            h_0 = b * hb_ + t * ht
            c_0 = b * cb_ + t * ct
            rm = zero
            orm = zero
            for ib in range(Hp // W):
                i0 = ib * W
                n = min(W, H - i0)
                hp = _vload(hop, i0, vw)
                hq = _vload(hnp, i0, vw)
                old = _vload(hb, h_0 + i0, vw)
                if lstm:
                    cp = _vload(cop, i0, vw)
                    cq = _vload(cnp, i0, vw)
                    oldc = _vload(cb, c_0 + i0, vw)
                    xi = _ld(gi, x0 + i0 * sj, sj, n, vw)
                    xf = _ld(gi, x0 + (H + i0) * sj, sj, n, vw)
                    xg = _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw)
                    xo = _ld(gi, x0 + (3 * H + i0) * sj, sj, n, vw)
                    yi = _vload(gb, q0 + i0, vw)
                    yf = _vload(gb, q0 + Hp + i0, vw)
                    yg = _vload(gb, q0 + 2 * Hp + i0, vw)
                    yo = _vload(gb, q0 + 3 * Hp + i0, vw)
                    ui = _vload(gn, i0, vw)
                    uf = _vload(gn, Hp + i0, vw)
                    ug = _vload(gn, 2 * Hp + i0, vw)
                    uo = _vload(gn, 3 * Hp + i0, vw)
                    fh, fc, hr, cr, f2h, f2c = _lstm_newton(xi, xf, xg, xo, yi, yf, yg, yo, ui,
                                                            uf, ug, uo, cp, cq)
                    h = _clip(_vnan_to(hr, 0.0), _NEWTON_CLIP)
                    c = _clip(_vnan_to(cr, 0.0), _NEWTON_CLIP)
                    rm = _vmax(rm, _vmax(_res(h, f2h), _res(c, f2c)))
                    orm = _vmax(orm, _vmax(_res(old, fh), _res(oldc, fc)))
                    _vstore(hop, i0, old)
                    _vstore(hnp, i0, h)
                    _vstore(cop, i0, oldc)
                    _vstore(cnp, i0, c)
                    _vstore(hb, h_0 + i0, h)
                    _vstore(cb, c_0 + i0, c)
                    for q in range(NQ):  # the new iterate's g_t
                        _vstore(gb, q0 + q * Hp + i0, _vload(gn, q * Hp + i0, vw))
                    continue
                if cell == _GRU:
                    xr = _ld(gi, x0 + i0 * sj, sj, n, vw)
                    xz = _ld(gi, x0 + (H + i0) * sj, sj, n, vw)
                    xn = _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw)
                    yr = _vload(gb, q0 + i0, vw)
                    yz = _vload(gb, q0 + Hp + i0, vw)
                    yn = _vload(gb, q0 + 2 * Hp + i0, vw)
                    ur = _vload(gn, i0, vw)
                    uz = _vload(gn, Hp + i0, vw)
                    un = _vload(gn, 2 * Hp + i0, vw)
                    f, hr, f2 = _gru_newton(xr, xz, xn, yr, yz, yn, ur, uz, un, hp, hq)
                else:
                    f, hr, f2 = _elman_newton(relu, _ld(gi, x0 + i0 * sj, sj, n, vw),
                                              _vload(gb, q0 + i0, vw), _vload(gn, i0, vw))
                h = _clip(_vnan_to(hr, 0.0), _NEWTON_CLIP)
                rm = _vmax(rm, _res(h, f2))
                orm = _vmax(orm, _res(old, f))
                _vstore(hop, i0, old)
                _vstore(hnp, i0, h)
                _vstore(hb, h_0 + i0, h)
                for q in range(NQ):  # the new iterate's g_t
                    _vstore(gb, q0 + q * Hp + i0, _vload(gn, q * Hp + i0, vw))
            # g'_{t+1} = W_hh h'_t + b_hh, vectors over gate units
            KB = R // W
            jb = 0
            while jb + 4 <= KB:
                o = jb * W
                a0 = _vload(bh, o, vw)
                a1 = _vload(bh, o + W, vw)
                a2 = _vload(bh, o + 2 * W, vw)
                a3 = _vload(bh, o + 3 * W, vw)
                for k in range(H):
                    hk = hnp[k]
                    a0 = a0 + _vload(wT, k * R + o, vw) * hk
                    a1 = a1 + _vload(wT, k * R + o + W, vw) * hk
                    a2 = a2 + _vload(wT, k * R + o + 2 * W, vw) * hk
                    a3 = a3 + _vload(wT, k * R + o + 3 * W, vw) * hk
                _vstore(gn, o, a0)
                _vstore(gn, o + W, a1)
                _vstore(gn, o + 2 * W, a2)
                _vstore(gn, o + 3 * W, a3)
                jb += 4
            for jj in range(jb, KB):
                o = jj * W
                acc = _vload(bh, o, vw)
                for k in range(H):
                    acc = acc + _vload(wT, k * R + o, vw) * hnp[k]
                _vstore(gn, o, acc)
            _vstore(scratch, 0, rm)
            _vstore(scratch, W, orm)
            m = scratch[0]
            o_ = scratch[W]
            for lane in range(1, W):
                m = max(m, scratch[lane])
                o_ = max(o_, scratch[W + lane])
            sm = max(sm, m)
            om = max(om, o_)
            if not seen:
                if m <= tol:
                    pm = max(pm, m)
                else:
                    seen = True
                    fb = t
        first[b] = fb
        pmax[b] = pm
        smax[b] = sm
        omax[b] = om
