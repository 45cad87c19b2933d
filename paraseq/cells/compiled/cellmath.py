"""The per-unit math of each cell family, on SIMD vectors (``paraseq.cells.compiled.simd``):
its step (``_<cell>_f``), its adjoint (``_<cell>_b``) and one unit of its Newton sweep
(``_<cell>_newton``). The kernels (``lanes``, ``rows``) call them for W batch rows or W units
at a time; ``compiled._build`` compiles them (inlined into the kernels).
"""

from __future__ import annotations

import numpy as np

from .simd import _vmax, _vnan_to, _vrelu, _vsigmoid, _vstep, _vtanh

# cell kinds, the kernels' first argument
_ELMAN_TANH, _ELMAN_RELU, _GRU, _LSTM = 0, 1, 2, 3
_NGATES = {_ELMAN_TANH: 1, _ELMAN_RELU: 1, _GRU: 3, _LSTM: 4}
_NGATES_T = (1, 1, 3, 4)  # _NGATES as a tuple the kernels index (a compile-time constant)

_NEWTON_CLIP = 1e8  # as paraseq.solve.iterate.CLIP


def _gru_f(xr, xz, xn, yr, yz, yn, hp):
    r = _vsigmoid(xr + yr)
    z = _vsigmoid(xz + yz)
    n = _vtanh(xn + r * yn)
    return n + z * (hp - n)


def _gru_b(xr, xz, xn, yr, yz, yn, hp, d):
    """d = dL/dh_t -> (dpre_r, dpre_z, dpre_n, d(W_hn h + b_hn), dL/dh_{t-1} directly)."""
    r = _vsigmoid(xr + yr)
    z = _vsigmoid(xz + yz)
    n = _vtanh(xn + r * yn)
    dn = d * (1.0 - z) * (1.0 - n * n)
    dz = d * (hp - n) * z * (1.0 - z)
    dr = dn * yn * r * (1.0 - r)
    return dr, dz, dn, dn * r, d * z


def _elman_f(relu, x, y):
    return _vrelu(x + y) if relu else _vtanh(x + y)


def _elman_b(relu, x, y, d):
    pre = x + y
    if relu:
        return d * _vstep(pre)
    h = _vtanh(pre)
    return d * (1.0 - h * h)


def _lstm_f(xi, xf, xg, xo, yi, yf, yg, yo, cp):
    """-> (i, f, g, o, c, tanh(c)); h = o tanh(c)."""
    i = _vsigmoid(xi + yi)
    f = _vsigmoid(xf + yf)
    g = _vtanh(xg + yg)
    o = _vsigmoid(xo + yo)
    c = f * cp + i * g
    return i, f, g, o, c, _vtanh(c)


def _lstm_b(i, f, g, o, tc, cp, dm, dc):
    """dm = dL/d(o tanh c), dc = dL/dc_t from later steps -> (dpre_i, dpre_f, dpre_g, dpre_o,
    dL/dc_{t-1})."""
    dct = dc + dm * o * (1.0 - tc * tc)
    return (dct * g * i * (1.0 - i), dct * cp * f * (1.0 - f), dct * i * (1.0 - g * g),
            dm * tc * o * (1.0 - o), dct * f)


def _res(v, f):
    """|v - f| / (1 + |f|), lane by lane, with nan read as inf (it never passes a tolerance)."""
    d = v - f
    return _vnan_to(_vmax(d, -d) / (1.0 + _vmax(f, -f)), np.inf)


def _gru_newton(xr, xz, xn, yr, yz, yn, ur, uz, un, hp, hq):
    """One unit of a GRU Newton sweep (``paraseq.cells.newton``): x the input pre-activations,
    y = W_hh h + b_hh at the current iterate h (hp = h_{t-1}), u the same at the new one
    (hq = h'_{t-1}). -> (f(h_{t-1}), f + J (hq - hp) (the new h_t, unsanitised),
    f(h'_{t-1}))."""
    r = _vsigmoid(xr + yr)
    z = _vsigmoid(xz + yz)
    nv = _vtanh(xn + r * yn)
    f = nv + z * (hp - nv)
    a = (1.0 - z) * (1.0 - nv * nv) * r
    jd = (z * (hq - hp) + a * ((un - yn) + yn * (1.0 - r) * (ur - yr))
          + (hp - nv) * z * (1.0 - z) * (uz - yz))
    return f, f + jd, _gru_f(xr, xz, xn, ur, uz, un, hq)


def _elman_newton(relu, x, y, u):
    """``_gru_newton`` for the Elman cell."""
    f = _elman_f(relu, x, y)
    if relu:
        jd = _vstep(x + y) * (u - y)
    else:
        jd = (1.0 - f * f) * (u - y)
    return f, f + jd, _elman_f(relu, x, u)


def _lstm_newton(xi, xf, xg, xo, yi, yf, yg, yo, ui, uf, ug, uo, cp, cq):
    """``_gru_newton`` for the LSTM, state (h, c) (the h parts enter through y and u). ->
    (f_h, f_c at the current iterate, the new h_t and c_t (unsanitised), f_h, f_c at the new
    one)."""
    ig, fg, gg, og, fc, tc = _lstm_f(xi, xf, xg, xo, yi, yf, yg, yo, cp)
    fh = og * tc
    dc = (fg * (cq - cp) + cp * fg * (1.0 - fg) * (uf - yf)
          + gg * ig * (1.0 - ig) * (ui - yi) + ig * (1.0 - gg * gg) * (ug - yg))
    dh = og * (1.0 - og) * (uo - yo) * tc + og * (1.0 - tc * tc) * dc
    n2 = _lstm_f(xi, xf, xg, xo, ui, uf, ug, uo, cq)
    return fh, fc, fh + dh, fc + dc, n2[3] * n2[5], n2[4]


def _lstm_quasi(xi, xf, xg, xo, wi, wf, wg, wo, bi, bf, bg, bo, hp, hq, cp, cq, fh, fc):
    """The quasi-Newton step of the diagonal LSTM: the new (h_t, c_t) (unsanitised) with the
    Jacobian over [h, c] cut to its diagonal, dh_t/dh_{t-1} and dc_t/dc_{t-1} = f (the solver's
    "quasi_newton" on ``DiagLSTMGated``: ``functional._lstm_diag_from_parts``)."""
    i = _vsigmoid(xi + wi * hp + bi)
    f = _vsigmoid(xf + wf * hp + bf)
    gg = _vtanh(xg + wg * hp + bg)
    o = _vsigmoid(xo + wo * hp + bo)
    tc = _vtanh(fc)
    dcdh = cp * f * (1.0 - f) * wf + gg * i * (1.0 - i) * wi + i * (1.0 - gg * gg) * wg
    jhh = o * (1.0 - o) * wo * tc + o * (1.0 - tc * tc) * dcdh
    return fh + jhh * (hq - hp), fc + f * (cq - cp)
