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
from .tiles import _mv


def _rows_fwd(cell, gi, gs, h0, c0, wT, wd, bh, diag, whrT, oh, ohs, oc, ocs, ghb, T, H, P, lo,
              hi, vw):
    """Rows [lo, hi) advance together, one step at a time: the recurrent products of all of
    them in one pass over the weights (``_mv``), then each row's units, vectors over W units.
    Padded (zeros beyond H or P): wT (P, NQ Hp), wd and bh (NQ Hp), whrT (H, Pp). ghb, unless
    empty: W_hh h_{t-1} + b_hh of every row and step is kept there, (T, B, NQ Hp), for the
    reverse sweep (which otherwise recomputes it)."""
    W = len(vw)
    NQ = _NGATES_T[cell]
    Hp = (H + W - 1) // W * W
    Pp = (P + W - 1) // W * W
    Mp = max(Pp, Hp)
    R = NQ * Hp
    nb = hi - lo
    lstm = cell == _LSTM
    proj = lstm and whrT.shape[0] > 0
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    hS = np.zeros(nb * Mp, dtype=dt)  # (nb, Mp): the rows' states, zero beyond P
    cS = np.zeros(nb * Hp if lstm else 1, dtype=dt)  # (nb, Hp)
    mS = np.zeros(Hp, dtype=dt)
    save = ghb.shape[0] > 0
    gh = ghb if save else np.empty(nb * R, dtype=dt)  # (nb, NQ Hp) per step: W_hh h + b_hh
    Bt = ghb.shape[0] // (T * R) if save else 0  # the whole batch
    sb, st, sj = gs
    ob, ot, oi = ohs
    cb, ct, ci = ocs
    for r in range(nb):
        for k in range(P):
            hS[r * Mp + k] = h0[(lo + r) * P + k]
        if lstm:
            for i in range(H):
                cS[r * Hp + i] = c0[(lo + r) * H + i]
    for t in range(T):
        ga = (t * Bt + lo) * R if save else 0  # this step's rows of gh
        if diag:
            for r in range(nb):
                for q in range(NQ):
                    for ib in range(Hp // W):
                        o = q * Hp + ib * W
                        _vstore(gh, ga + r * R + o, _vload(wd, o, vw)
                                * _vload(hS, r * Mp + ib * W, vw) + _vload(bh, o, vw))
        else:  # gh = b_hh + W_hh h of every row
            _mv(gh, ga, R, bh, 0, 0, hS, 0, Mp, wT, R, 1, P, 0, 1, nb, R // W, vw)
        for r in range(nb):
            b = lo + r
            x0 = b * sb + t * st
            o0 = b * ob + t * ot
            g0 = ga + r * R
            s0 = r * Mp
            for ib in range(Hp // W):
                i0 = ib * W
                n = min(W, H - i0)
                if cell == _GRU:
                    h = _gru_f(_ld(gi, x0 + i0 * sj, sj, n, vw),
                               _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                               _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                               _vload(gh, g0 + i0, vw), _vload(gh, g0 + Hp + i0, vw),
                               _vload(gh, g0 + 2 * Hp + i0, vw), _vload(hS, s0 + i0, vw))
                    _vstore(hS, s0 + i0, h)
                    _st(oh, o0 + i0 * oi, oi, n, h, vw)
                elif cell == _LSTM:
                    s = _lstm_f(_ld(gi, x0 + i0 * sj, sj, n, vw),
                                _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (3 * H + i0) * sj, sj, n, vw),
                                _vload(gh, g0 + i0, vw), _vload(gh, g0 + Hp + i0, vw),
                                _vload(gh, g0 + 2 * Hp + i0, vw),
                                _vload(gh, g0 + 3 * Hp + i0, vw), _vload(cS, r * Hp + i0, vw))
                    m = s[3] * s[5]
                    _vstore(cS, r * Hp + i0, s[4])
                    _st(oc, b * cb + t * ct + i0 * ci, ci, n, s[4], vw)
                    if proj:
                        _vstore(mS, i0, m)
                    else:
                        _vstore(hS, s0 + i0, m)
                        _st(oh, o0 + i0 * oi, oi, n, m, vw)
                else:
                    h = _elman_f(relu, _ld(gi, x0 + i0 * sj, sj, n, vw),
                                 _vload(gh, g0 + i0, vw))
                    _vstore(hS, s0 + i0, h)
                    _st(oh, o0 + i0 * oi, oi, n, h, vw)
            if proj:
                for pb in range(Pp // W):
                    _vstore(hS, s0 + pb * W, _vfull(0.0, hS, vw))
                for i in range(H):
                    mi = mS[i]
                    for pb in range(Pp // W):
                        o = s0 + pb * W
                        _vstore(hS, o, _vload(hS, o, vw) + _vload(whrT, i * Pp + pb * W, vw) * mi)
                for pb in range(Pp // W):
                    p0 = pb * W
                    _st(oh, o0 + p0 * oi, oi, min(W, P - p0), _vload(hS, s0 + p0, vw), vw)


def _rows_bwd(cell, gi, gs, h0, c0, wT, wd, bh, diag, whrT, oh, ohs, oc, ocs, gh_, ghs, gc_,
              gcs, dgi, dgs, dh0, dc0, wR, whr, dw, dwd, dbh, dwhr, ghb, T, H, P, lo, hi, vw):
    """The adjoint of _rows_fwd over rows [lo, hi), which go back in time together: the
    recurrent products (recomputing W_hh h_{t-1}, and W_hh^T dy) of all of them in one pass
    over the weights per step (``_mv``). A dense W_hh's gradient, the sum over rows and steps
    of dy h_{t-1}^T, is taken over blocks of TB steps (dy and h_{t-1} of the block's steps
    kept, then one product, ``_mv`` again): accumulated step by step it loaded and stored all of
    dw per step for a few multiply-adds each (at H = 128, B = 8 half the sweep). Also padded:
    wR (K, Pp) = W_hh's rows, whr (P, Hp); the gradients accumulate (summed over rows):
    dw (K, Pp), dwd and dbh (NQ Hp), dwhr (P, Hp). ghb: empty, or the forward's W_hh h_{t-1}
    + b_hh (``_rows_fwd``), then not recomputed."""
    W = len(vw)
    NQ = _NGATES_T[cell]
    Hp = (H + W - 1) // W * W
    Pp = (P + W - 1) // W * W
    Mp = max(Pp, Hp)
    R = NQ * Hp
    nb = hi - lo
    lstm = cell == _LSTM
    proj = lstm and whrT.shape[0] > 0
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    TB = 1 if diag else max(1, 64 // nb)
    hpb = np.zeros(TB * nb * Mp, dtype=dt)  # (TB, nb, Mp): h_{t-1} of each row, TB steps
    cp = np.zeros(nb * Hp, dtype=dt)
    saved = ghb.shape[0] > 0
    gh = ghb if saved else np.empty(nb * R, dtype=dt)  # (nb, NQ Hp) per step
    Bt = ghb.shape[0] // (T * R) if saved else 0
    dyb = np.zeros(TB * nb * R, dtype=dt)  # (TB, nb, NQ Hp): d(W_hh h + b_hh), TB steps
    dh = np.zeros(nb * Mp, dtype=dt)
    dhn = np.zeros(nb * Mp, dtype=dt)
    dc = np.zeros(nb * Hp, dtype=dt)
    sv = np.zeros(6 * Hp if lstm else 1, dtype=dt)
    dm = np.zeros(Hp, dtype=dt)
    sb, st, sj = gs
    ob, ot, oi = ohs
    cb, ct, ci = ocs
    gb, gt, gk = ghs
    qb, qt, qi = gcs
    db_, dt_, dj = dgs
    zero = _vfull(0.0, dh, vw)
    fill = 0  # steps in the block
    for t in range(T - 1, -1, -1):
        ho = fill * nb * Mp  # this step's rows of hpb, dyb
        yo = fill * nb * R
        ga = (t * Bt + lo) * R if saved else 0  # this step's rows of gh
        for r in range(nb):
            b = lo + r
            for kb in range(Pp // W):
                k0 = kb * W
                nk = min(W, P - k0)
                if t == 0:
                    v = _vload_s(h0, b * P + k0, 1, nk, vw)
                else:
                    v = _ld(oh, b * ob + (t - 1) * ot + k0 * oi, oi, nk, vw)
                _vstore(hpb, ho + r * Mp + k0, v)
                _vstore(dh, r * Mp + k0, _vload(dh, r * Mp + k0, vw)
                        + _ld(gh_, b * gb + t * gt + k0 * gk, gk, nk, vw))
                _vstore(dhn, r * Mp + k0, zero)
            if lstm:
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    if t == 0:
                        v = _vload_s(c0, b * H + i0, 1, n, vw)
                    else:
                        v = _ld(oc, b * cb + (t - 1) * ct + i0 * ci, ci, n, vw)
                    _vstore(cp, r * Hp + i0, v)
            if diag:
                for q in range(NQ):
                    for ib in range(Hp // W):
                        o = q * Hp + ib * W
                        _vstore(gh, ga + r * R + o, _vload(wd, o, vw)
                                * _vload(hpb, ho + r * Mp + ib * W, vw) + _vload(bh, o, vw))
        if not diag and not saved:  # gh = b_hh + W_hh h_{t-1} of every row
            _mv(gh, ga, R, bh, 0, 0, hpb, ho, Mp, wT, R, 1, P, 0, 1, nb, R // W, vw)
        for r in range(nb):
            b = lo + r
            x0 = b * sb + t * st
            d0 = b * db_ + t * dt_
            g0 = ga + r * R
            y0 = yo + r * R
            s0 = r * Mp
            if lstm:
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    s = _lstm_f(_ld(gi, x0 + i0 * sj, sj, n, vw),
                                _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (3 * H + i0) * sj, sj, n, vw),
                                _vload(gh, g0 + i0, vw), _vload(gh, g0 + Hp + i0, vw),
                                _vload(gh, g0 + 2 * Hp + i0, vw),
                                _vload(gh, g0 + 3 * Hp + i0, vw), _vload(cp, r * Hp + i0, vw))
                    for q in range(4):
                        _vstore(sv, q * Hp + i0, s[q])
                    _vstore(sv, 4 * Hp + i0, s[5])
                    _vstore(sv, 5 * Hp + i0, s[3] * s[5])
                    _vstore(dc, r * Hp + i0, _vload(dc, r * Hp + i0, vw)
                            + _ld(gc_, b * qb + t * qt + i0 * qi, qi, n, vw))
                if proj:
                    for ib in range(Hp // W):
                        _vstore(dm, ib * W, zero)
                    for p in range(P):
                        dp = dh[s0 + p]
                        for ib in range(Hp // W):
                            o = ib * W
                            _vstore(dm, o, _vload(dm, o, vw) + _vload(whr, p * Hp + o, vw) * dp)
                            _vstore(dwhr, p * Hp + o, _vload(dwhr, p * Hp + o, vw)
                                    + _vload(sv, 5 * Hp + o, vw) * dp)
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    r5 = _lstm_b(_vload(sv, i0, vw), _vload(sv, Hp + i0, vw),
                                 _vload(sv, 2 * Hp + i0, vw), _vload(sv, 3 * Hp + i0, vw),
                                 _vload(sv, 4 * Hp + i0, vw), _vload(cp, r * Hp + i0, vw),
                                 _vload(dm, i0, vw) if proj else _vload(dh, s0 + i0, vw),
                                 _vload(dc, r * Hp + i0, vw))
                    for q in range(4):
                        _st(dgi, d0 + (q * H + i0) * dj, dj, n, r5[q], vw)
                        _vstore(dyb, y0 + q * Hp + i0, r5[q])
                    _vstore(dc, r * Hp + i0, r5[4])
            else:
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    if cell == _GRU:
                        r5 = _gru_b(_ld(gi, x0 + i0 * sj, sj, n, vw),
                                    _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                                    _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                                    _vload(gh, g0 + i0, vw), _vload(gh, g0 + Hp + i0, vw),
                                    _vload(gh, g0 + 2 * Hp + i0, vw), _vload(hpb, ho + s0 + i0, vw),
                                    _vload(dh, s0 + i0, vw))
                        _st(dgi, d0 + i0 * dj, dj, n, r5[0], vw)
                        _st(dgi, d0 + (H + i0) * dj, dj, n, r5[1], vw)
                        _st(dgi, d0 + (2 * H + i0) * dj, dj, n, r5[2], vw)
                        _vstore(dyb, y0 + i0, r5[0])
                        _vstore(dyb, y0 + Hp + i0, r5[1])
                        _vstore(dyb, y0 + 2 * Hp + i0, r5[3])
                        _vstore(dhn, s0 + i0, r5[4])
                    else:
                        r1 = _elman_b(relu, _ld(gi, x0 + i0 * sj, sj, n, vw),
                                      _vload(gh, g0 + i0, vw), _vload(dh, s0 + i0, vw))
                        _st(dgi, d0 + i0 * dj, dj, n, r1, vw)
                        _vstore(dyb, y0 + i0, r1)
            # the padded lanes of dy hold finite values that only meet zero weights below
            for jb in range(R // W):
                o = jb * W
                _vstore(dbh, o, _vload(dbh, o, vw) + _vload(dyb, y0 + o, vw))
            if diag:
                for q in range(NQ):
                    for ib in range(Hp // W):
                        o = q * Hp + ib * W
                        dyq = _vload(dyb, y0 + o, vw)
                        _vstore(dwd, o, _vload(dwd, o, vw)
                                + dyq * _vload(hpb, ho + s0 + ib * W, vw))
                        _vstore(dhn, s0 + ib * W, _vload(dhn, s0 + ib * W, vw)
                                + _vload(wd, o, vw) * dyq)
        if not diag:
            _mv(dhn, 0, Mp, dhn, 0, Mp, dyb, yo, R, wR, Pp, NQ, H, Hp, 1, nb, Pp // W, vw)
            fill += 1
            if fill == TB or t == 0:  # dw[q H + i, :] += sum over the block's (step, row) m
                for q in range(NQ):  # of dyb[m, q Hp + i] hpb[m, :]
                    _mv(dw, q * H * Pp, Pp, dw, q * H * Pp, Pp, dyb, q * Hp, 1, hpb, Mp, 1,
                        fill * nb, 0, R, H, Pp // W, vw)
                fill = 0
        for r in range(nb):
            for kb in range(Pp // W):
                _vstore(dh, r * Mp + kb * W, _vload(dhn, r * Mp + kb * W, vw))
    for r in range(nb):
        for k in range(P):
            dh0[(lo + r) * P + k] = dh[r * Mp + k]
        if lstm:
            for i in range(H):
                dc0[(lo + r) * H + i] = dc[r * Hp + i]


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
