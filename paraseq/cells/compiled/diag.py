"""The Newton sweep of the diagonal-recurrence cells (DiagGRU, DiagLSTM; see
``paraseq.cells.newton``): one compiled pass per iteration, elementwise. Compiled in
``compiled._build``.

With a (K,) recurrent weight w every unit is a scalar recurrence of its own (the LSTM: the pair
(h_i, c_i)), so the recurrent pre-activations are y = w h_{t-1} + b elementwise and Newton's
linear recurrence is elementwise too: per unit and step, the cell at the current iterate, its
derivative times the change of the state (``cellmath._gru_newton`` / ``_lstm_newton`` with
u - y = w (h' - h): the exact Newton step, the LSTM's 2 x 2 block included), the linear scan's
step with the carried new state h'_{t-1}, and the new iterate's residual. No buffer of
pre-activations is kept (the dense sweep's g): y and u cost one FMA each.

A vector holds W independent units, either W batch rows of one unit (``vb``: the batch
contiguous, memory (K, T, B), the layout ``input_projection`` gives at small H) or W units of
one batch row (torch's (T, B, K)). A group is one such vector; groups advance in lockstep, one
step at a time, so the dependency chain of a step (a few transcendentals) overlaps across
groups. Group g (of NG = ceil(B / W) H with vb, else B ceil(H / W)) is unit g // ceil(B / W)
over rows from (g mod ceil(B / W)) W, or row g // ceil(H / W) over units from
(g mod ceil(H / W)) W.

All arrays are 1-D; gi and the iterates are flat views of strided layouts read with their
strides (sb, st, sj): element (b, t, j) at b sb + t st + j sj.
"""

from __future__ import annotations

import numpy as np

from .cellmath import _LSTM, _NEWTON_CLIP, _gru_newton, _lstm_newton, _lstm_quasi, _res
from .simd import _clip, _ld, _st, _vfull, _vload, _vmax, _vnan_to, _vstep, _vstore


def _diag_newton(cell, gi, gs, h0, c0, wd, bh, hb, hs, cb, cs, start, first, pmax, smax, omax,
                 quasi, tol, T, B, H, vb, lo, hi, vw):  # pragma: no cover - compiled
    """One Newton sweep over groups [lo, hi). h0, c0 (B, H) row-major; wd, bh (K,). The
    iterate hb (and the LSTM's cb) (B, T, H), strides hs (cs), updated in place. start[g]: the
    first step group g sweeps (T: none). Written per group, as ``lanes._lanes_newton`` does
    per group of rows: first[g] (the first step whose new residual is above tol, T if none),
    pmax[g] (the largest new residual before it), smax[g] (over the swept steps), omax[g]
    (the residual of the iterate it was given over the same steps). ``quasi`` (LSTM): keep
    only the Jacobian's diagonal (dh/dh and dc/dc = f), a quasi-Newton step."""
    W = len(vw)
    K = bh.shape[0]
    NQ = K // H
    NG = hi - lo
    lstm = cell == _LSTM
    dt = bh.dtype
    sb, st, sj = gs
    hb_, ht, hj = hs
    cb_, ct, cj = cs
    nb = (B + W - 1) // W
    ni = (H + W - 1) // W
    # per group: the base offsets of lane 0 and the stride between lanes, in gi, hb, cb, h0
    xo = np.empty(NG, dtype=np.int64)
    xl = np.empty(NG, dtype=np.int64)
    ho = np.empty(NG, dtype=np.int64)
    hl = np.empty(NG, dtype=np.int64)
    co = np.empty(NG, dtype=np.int64)
    cl = np.empty(NG, dtype=np.int64)
    zo = np.empty(NG, dtype=np.int64)
    zl = np.empty(NG, dtype=np.int64)
    nn = np.empty(NG, dtype=np.int64)
    wv = np.zeros(NG * 2 * NQ * W, dtype=dt)  # per group: w and b of each gate, as vectors
    for g in range(NG):
        gg = lo + g
        if vb:
            i = gg // nb
            b0 = (gg % nb) * W
            n = min(W, B - b0)
            xl[g] = sb
            hl[g] = hb_
            cl[g] = cb_
            zl[g] = H
        else:
            b0 = gg // ni
            i = (gg % ni) * W
            n = min(W, H - i)
            xl[g] = sj
            hl[g] = hj
            cl[g] = cj
            zl[g] = 1
        nn[g] = n
        xo[g] = b0 * sb + i * sj
        ho[g] = b0 * hb_ + i * hj
        co[g] = b0 * cb_ + i * cj
        zo[g] = b0 * H + i
        for q in range(NQ):
            for lane in range(n):
                u = q * H + (i if vb else i + lane)
                wv[(g * 2 * NQ + q) * W + lane] = wd[u]
                wv[(g * 2 * NQ + NQ + q) * W + lane] = bh[u]
    hop = np.zeros(NG * W, dtype=dt)  # h_{t-1} of the old iterate, per group
    hnp = np.zeros(NG * W, dtype=dt)  # h'_{t-1} of the new one
    cop = np.zeros(NG * W if lstm else 1, dtype=dt)
    cnp = np.zeros(NG * W if lstm else 1, dtype=dt)
    book = np.zeros(NG * 5 * W, dtype=dt)  # per group: seen, count, pm, sm, om
    t_lo = T
    for g in range(NG):
        t_lo = min(t_lo, start[lo + g])
    one = _vfull(1.0, hop, vw)
    for t in range(t_lo, T):
        for g in range(NG):
            s = start[lo + g]
            if t < s:
                continue
            n = nn[g]
            o = g * W
            if t == s:  # the state before the sweep's first step is the unchanged h_{s-1}
                if s == 0:
                    v = _ld(h0, zo[g], zl[g], n, vw)
                else:
                    v = _ld(hb, ho[g] + (s - 1) * ht, hl[g], n, vw)
                _vstore(hop, o, v)
                _vstore(hnp, o, v)
                if lstm:
                    if s == 0:
                        v = _ld(c0, zo[g], zl[g], n, vw)
                    else:
                        v = _ld(cb, co[g] + (s - 1) * ct, cl[g], n, vw)
                    _vstore(cop, o, v)
                    _vstore(cnp, o, v)
            hp = _vload(hop, o, vw)
            hq = _vload(hnp, o, vw)
            x0 = xo[g] + t * st
            xs = xl[g]
            h_0 = ho[g] + t * ht
            old = _ld(hb, h_0, hl[g], n, vw)
            wo = g * 2 * NQ * W
            if lstm:
                c_0 = co[g] + t * ct
                cp = _vload(cop, o, vw)
                cq = _vload(cnp, o, vw)
                oldc = _ld(cb, c_0, cl[g], n, vw)
                wi = _vload(wv, wo, vw)
                wf = _vload(wv, wo + W, vw)
                wg = _vload(wv, wo + 2 * W, vw)
                wo_ = _vload(wv, wo + 3 * W, vw)
                bi = _vload(wv, wo + 4 * W, vw)
                bf = _vload(wv, wo + 5 * W, vw)
                bg = _vload(wv, wo + 6 * W, vw)
                bo = _vload(wv, wo + 7 * W, vw)
                xi = _ld(gi, x0, xs, n, vw)
                xf = _ld(gi, x0 + H * sj, xs, n, vw)
                xg = _ld(gi, x0 + 2 * H * sj, xs, n, vw)
                xo_ = _ld(gi, x0 + 3 * H * sj, xs, n, vw)
                # quasi: the h part of the step enters through hp (u - y = 0 for the c
                # equation's gates), and dc/dc = f through cq - cp alone
                fh, fc, hr, cr, f2h, f2c = _lstm_newton(
                    xi, xf, xg, xo_, wi * hp + bi, wf * hp + bf, wg * hp + bg, wo_ * hp + bo,
                    wi * hq + bi, wf * hq + bf, wg * hq + bg, wo_ * hq + bo, cp, cq)
                if quasi:
                    hr, cr = _lstm_quasi(xi, xf, xg, xo_, wi, wf, wg, wo_, bi, bf, bg, bo, hp,
                                         hq, cp, cq, fh, fc)
                h = _clip(_vnan_to(hr, 0.0), _NEWTON_CLIP)
                c = _clip(_vnan_to(cr, 0.0), _NEWTON_CLIP)
                rm = _vmax(_res(h, f2h), _res(c, f2c))
                om = _vmax(_res(old, fh), _res(oldc, fc))
                _vstore(cop, o, oldc)
                _vstore(cnp, o, c)
                _st(cb, c_0, cl[g], n, c, vw)
            else:
                wr = _vload(wv, wo, vw)
                wz = _vload(wv, wo + W, vw)
                wn = _vload(wv, wo + 2 * W, vw)
                br = _vload(wv, wo + 3 * W, vw)
                bz = _vload(wv, wo + 4 * W, vw)
                bn = _vload(wv, wo + 5 * W, vw)
                f, hr, f2 = _gru_newton(_ld(gi, x0, xs, n, vw), _ld(gi, x0 + H * sj, xs, n, vw),
                                        _ld(gi, x0 + 2 * H * sj, xs, n, vw), wr * hp + br,
                                        wz * hp + bz, wn * hp + bn, wr * hq + br, wz * hq + bz,
                                        wn * hq + bn, hp, hq)
                h = _clip(_vnan_to(hr, 0.0), _NEWTON_CLIP)
                rm = _res(h, f2)
                om = _res(old, f)
            _vstore(hop, o, old)
            _vstore(hnp, o, h)
            _st(hb, h_0, hl[g], n, h, vw)
            # bookkeeping per lane, as lanes._lanes_newton's
            bo_ = g * 5 * W
            seen = _vmax(_vload(book, bo_, vw), _vstep(rm - tol))
            _vstore(book, bo_, seen)
            _vstore(book, bo_ + W, _vload(book, bo_ + W, vw) + (one - seen))
            _vstore(book, bo_ + 2 * W,
                    _vmax(_vload(book, bo_ + 2 * W, vw), _clip(rm, tol) * (one - seen)))
            _vstore(book, bo_ + 3 * W, _vmax(_vload(book, bo_ + 3 * W, vw), rm))
            _vstore(book, bo_ + 4 * W, _vmax(_vload(book, bo_ + 4 * W, vw), om))
    for g in range(NG):
        s = start[lo + g]
        bo_ = g * 5 * W
        if s >= T:
            first[lo + g] = T
            pmax[lo + g] = 0.0
            smax[lo + g] = 0.0
            omax[lo + g] = 0.0
            continue
        c_ = book[bo_ + W]
        p = book[bo_ + 2 * W]
        m = book[bo_ + 3 * W]
        o_ = book[bo_ + 4 * W]
        for lane in range(1, nn[g]):
            c_ = min(c_, book[bo_ + W + lane])
            p = max(p, book[bo_ + 2 * W + lane])
            m = max(m, book[bo_ + 3 * W + lane])
            o_ = max(o_, book[bo_ + 4 * W + lane])
        first[lo + g] = s + int(c_)
        pmax[lo + g] = p
        smax[lo + g] = m
        omax[lo + g] = o_

