"""The batched products of the rows kernels (``rows``): ``_mv``, a small matrix product in
register tiles, which numba inlines into the kernels (``compiled._build``: a call per step
cost the rows kernel at small sizes)."""

from __future__ import annotations

from .simd import _sload, _vload, _vstore

_INLINE = ("_mv",)
"""Helpers that ``compiled._build`` has numba inline into the kernels."""


def _mv(dst, d0, dbs, ini, i0, ibs, src, s0, sbs, w, R, nq, nk, sq, si, nb, nv, vw):
    """The recurrent products of nb batch rows at once: for rows b < nb and o < nv W,
    dst[d0 + b dbs + o] = ini[i0 + b ibs + o] + the sum over q < nq, i < nk of
    w[(q nk + i) R + o] src[s0 + b sbs + q sq + i si] (ini may be dst itself). Tiles of four
    rows by four vectors (sixteen accumulators held in registers across the sum), so that each
    vector of w loaded serves four rows: a row at a time streamed all of w through the caches
    per row and step. Every row sums in the same order whatever tile it falls in (a row's
    result does not depend on the rows around it)."""
    W = len(vw)
    b = 0
    while b + 4 <= nb:
        p0 = d0 + b * dbs
        p1 = p0 + dbs
        p2 = p1 + dbs
        p3 = p2 + dbs
        e0 = i0 + b * ibs
        e1 = e0 + ibs
        e2 = e1 + ibs
        e3 = e2 + ibs
        r0 = s0 + b * sbs
        r1 = r0 + sbs
        r2 = r1 + sbs
        r3 = r2 + sbs
        v = 0
        while v + 4 <= nv:
            o = v * W
            a00 = _vload(ini, e0 + o, vw)
            a01 = _vload(ini, e0 + o + W, vw)
            a02 = _vload(ini, e0 + o + 2 * W, vw)
            a03 = _vload(ini, e0 + o + 3 * W, vw)
            a10 = _vload(ini, e1 + o, vw)
            a11 = _vload(ini, e1 + o + W, vw)
            a12 = _vload(ini, e1 + o + 2 * W, vw)
            a13 = _vload(ini, e1 + o + 3 * W, vw)
            a20 = _vload(ini, e2 + o, vw)
            a21 = _vload(ini, e2 + o + W, vw)
            a22 = _vload(ini, e2 + o + 2 * W, vw)
            a23 = _vload(ini, e2 + o + 3 * W, vw)
            a30 = _vload(ini, e3 + o, vw)
            a31 = _vload(ini, e3 + o + W, vw)
            a32 = _vload(ini, e3 + o + 2 * W, vw)
            a33 = _vload(ini, e3 + o + 3 * W, vw)
            for q in range(nq):
                for i in range(nk):
                    k = (q * nk + i) * R + o
                    s = q * sq + i * si
                    w0 = _vload(w, k, vw)
                    w1 = _vload(w, k + W, vw)
                    w2 = _vload(w, k + 2 * W, vw)
                    w3 = _vload(w, k + 3 * W, vw)
                    x = _sload(src, r0 + s)
                    a00 = a00 + w0 * x
                    a01 = a01 + w1 * x
                    a02 = a02 + w2 * x
                    a03 = a03 + w3 * x
                    x = _sload(src, r1 + s)
                    a10 = a10 + w0 * x
                    a11 = a11 + w1 * x
                    a12 = a12 + w2 * x
                    a13 = a13 + w3 * x
                    x = _sload(src, r2 + s)
                    a20 = a20 + w0 * x
                    a21 = a21 + w1 * x
                    a22 = a22 + w2 * x
                    a23 = a23 + w3 * x
                    x = _sload(src, r3 + s)
                    a30 = a30 + w0 * x
                    a31 = a31 + w1 * x
                    a32 = a32 + w2 * x
                    a33 = a33 + w3 * x
            _vstore(dst, p0 + o, a00)
            _vstore(dst, p0 + o + W, a01)
            _vstore(dst, p0 + o + 2 * W, a02)
            _vstore(dst, p0 + o + 3 * W, a03)
            _vstore(dst, p1 + o, a10)
            _vstore(dst, p1 + o + W, a11)
            _vstore(dst, p1 + o + 2 * W, a12)
            _vstore(dst, p1 + o + 3 * W, a13)
            _vstore(dst, p2 + o, a20)
            _vstore(dst, p2 + o + W, a21)
            _vstore(dst, p2 + o + 2 * W, a22)
            _vstore(dst, p2 + o + 3 * W, a23)
            _vstore(dst, p3 + o, a30)
            _vstore(dst, p3 + o + W, a31)
            _vstore(dst, p3 + o + 2 * W, a32)
            _vstore(dst, p3 + o + 3 * W, a33)
            v += 4
        while v < nv:
            o = v * W
            a0 = _vload(ini, e0 + o, vw)
            a1 = _vload(ini, e1 + o, vw)
            a2 = _vload(ini, e2 + o, vw)
            a3 = _vload(ini, e3 + o, vw)
            for q in range(nq):
                for i in range(nk):
                    w0 = _vload(w, (q * nk + i) * R + o, vw)
                    s = q * sq + i * si
                    a0 = a0 + w0 * _sload(src, r0 + s)
                    a1 = a1 + w0 * _sload(src, r1 + s)
                    a2 = a2 + w0 * _sload(src, r2 + s)
                    a3 = a3 + w0 * _sload(src, r3 + s)
            _vstore(dst, p0 + o, a0)
            _vstore(dst, p1 + o, a1)
            _vstore(dst, p2 + o, a2)
            _vstore(dst, p3 + o, a3)
            v += 1
        b += 4
    while b < nb:
        p0 = d0 + b * dbs
        e0 = i0 + b * ibs
        r0 = s0 + b * sbs
        v = 0
        while v + 4 <= nv:
            o = v * W
            a0 = _vload(ini, e0 + o, vw)
            a1 = _vload(ini, e0 + o + W, vw)
            a2 = _vload(ini, e0 + o + 2 * W, vw)
            a3 = _vload(ini, e0 + o + 3 * W, vw)
            for q in range(nq):
                for i in range(nk):
                    k = (q * nk + i) * R + o
                    x = _sload(src, r0 + q * sq + i * si)
                    a0 = a0 + _vload(w, k, vw) * x
                    a1 = a1 + _vload(w, k + W, vw) * x
                    a2 = a2 + _vload(w, k + 2 * W, vw) * x
                    a3 = a3 + _vload(w, k + 3 * W, vw) * x
            _vstore(dst, p0 + o, a0)
            _vstore(dst, p0 + o + W, a1)
            _vstore(dst, p0 + o + 2 * W, a2)
            _vstore(dst, p0 + o + 3 * W, a3)
            v += 4
        while v < nv:
            o = v * W
            a0 = _vload(ini, e0 + o, vw)
            for q in range(nq):
                for i in range(nk):
                    x = _sload(src, r0 + q * sq + i * si)
                    a0 = a0 + _vload(w, (q * nk + i) * R + o, vw) * x
            _vstore(dst, p0 + o, a0)
            v += 1
        b += 1
