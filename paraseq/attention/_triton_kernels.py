"""Triton kernels behind ``form="triton"`` of ``linear_attention`` (see ``attention.triton``).

Imported only on first use: importing this module imports triton and decorates the kernels,
and triton reads ``TRITON_INTERPRET`` then (``TRITON_INTERPRET=1`` runs them on the CPU
through triton's interpreter: how the tests check them without a GPU).

Shape letters as in ``naive``; R = B H the (batch, head) rows, BK the feature block (K rounded
up to a power of two, the whole of K), BV a block of value columns, C the chunk (a power of
two >= 16, as ``tl.dot`` needs).

Layout: q, k (R, T, K), v and o (R, T, V), the log gate (R, T) (GATE = 1: one per step) or
(R, T, K) (GATE = 2: one per key feature, GLA), states (R, K, V); all contiguous. One program
owns one row r and one block of BV value columns, holds the (BK, BV) state in registers and
walks the chunks in order (the backward's ``_dkv_kernel`` in reverse), so nothing of size
T K V is ever written: per chunk of C steps, with G the cumulative log gate inside the chunk
(G_last its last row) and S the state entering it,

    o  = (tril(q k^T) * exp(G_i - G_j)) v + (q * exp(G)) S
    S <- exp(G_last) * S + (k * exp(G_last - G))^T v

Every exponent taken is <= 0 on the kept entries (the causal mask drops the others before
they are used), so nothing overflows. GATE = 2 forms the (C, C, BK) products
q_ik k_jk exp(G_ik - G_jk) exactly (no factoring of exp(G_i - G_j) into q and k, which could
overflow): the wrapper keeps C = 16 there. Steps past T in the last chunk load zeros (and a
log gate of 0), so they change nothing and G_last is the last real step's.

Backward (the wrapper sums the partial dq, dk over the value blocks):
- ``_dq_kernel`` walks forward, recomputing S: dq = (tril(dO v^T) * D) k + exp(G) * (dO S^T);
- ``_dkv_kernel`` walks backward carrying dS (the gradient of the state leaving the chunk,
  starting from that of the final state): dv = A^T dO + (k * exp(G_last - G)) dS,
  dk = (tril(dO v^T) * D)^T q + exp(G_last - G) * (v dS^T), then
  dS <- exp(G_last) * dS + (q * exp(G))^T dO; the last dS is the initial state's gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, r, t, rk, rv, T, K, V,
                GATE: tl.constexpr, ACC: tl.constexpr):
    # row r's steps t: q, k (C, BK), v (C, BV) and the chunk's cumulative log gate G, (C,)
    # (GATE 1) or (C, BK) (GATE 2)
    tmask = t < T
    rq = r * T * K
    mk = tmask[:, None] & (rk < K)[None, :]
    mv = tmask[:, None] & (rv < V)[None, :]
    offk = rq + t.to(tl.int64)[:, None] * K + rk[None, :]
    q = tl.load(q_ptr + offk, mask=mk, other=0.0).to(ACC)
    k = tl.load(k_ptr + offk, mask=mk, other=0.0).to(ACC)
    v = tl.load(v_ptr + r * T * V + t.to(tl.int64)[:, None] * V + rv[None, :], mask=mv,
                other=0.0).to(ACC)
    if GATE == 1:
        G = tl.cumsum(tl.load(g_ptr + r * T + t, mask=tmask, other=0.0).to(ACC), 0)
    elif GATE == 2:
        G = tl.cumsum(tl.load(g_ptr + offk, mask=mk, other=0.0).to(ACC), 0)
    else:
        G = tl.zeros((1,), dtype=ACC)
    return q, k, v, G


@triton.jit
def _decays(G, rc, GATE: tl.constexpr, C: tl.constexpr):
    # D (C, C) = exp(G_i - G_j) on and below the diagonal (GATE 1), or the (C, C, BK) weights
    # (GATE 2); exp(G) and exp(G_last - G) for the reads and writes of the state; exp(G_last)
    causal = rc[:, None] >= rc[None, :]
    if GATE == 1:
        last = tl.sum(tl.where(rc == C - 1, G, 0.0), 0)
        D = tl.where(causal, tl.exp(tl.where(causal, G[:, None] - G[None, :], 0.0)), 0.0)
        return D, tl.exp(G)[:, None], tl.exp(last - G)[:, None], tl.exp(last)
    else:
        last = tl.sum(tl.where((rc == C - 1)[:, None], G, 0.0), 0)  # (BK,)
        c3 = causal[:, :, None]
        D = tl.where(c3, tl.exp(tl.where(c3, G[:, None, :] - G[None, :, :], 0.0)), 0.0)
        return D, tl.exp(G), tl.exp(last[None, :] - G), tl.exp(last)[:, None]


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, s0_ptr, o_ptr, st_ptr, T, K, V,
                GATE: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = tl.program_id(1) * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    ACC = o_ptr.dtype.element_ty
    ms = (rk < K)[:, None] & (rv < V)[None, :]
    offs = r * K * V + rk[:, None] * V + rv[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + offs, mask=ms, other=0.0).to(ACC)
    else:
        S = tl.zeros((BK, BV), dtype=ACC)
    causal = rc[:, None] >= rc[None, :]
    for start in range(0, T, C):
        t = start + rc
        q, k, v, G = _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, r, t, rk, rv,
                                 T, K, V, GATE, ACC)
        if GATE == 0:
            A = tl.where(causal, tl.dot(q, tl.trans(k), input_precision=PREC), 0.0)
            o = tl.dot(A, v, input_precision=PREC) + tl.dot(q, S, input_precision=PREC)
            S += tl.dot(tl.trans(k), v, input_precision=PREC)
        else:
            D, eq, ek, elast = _decays(G, rc, GATE, C)
            if GATE == 1:
                A = tl.dot(q, tl.trans(k), input_precision=PREC) * D
            else:
                A = tl.sum(q[:, None, :] * k[None, :, :] * D, 2)
            o = tl.dot(A, v, input_precision=PREC) + tl.dot(q * eq, S, input_precision=PREC)
            S = S * elast + tl.dot(tl.trans(k * ek), v, input_precision=PREC)
        mo = (t < T)[:, None] & (rv < V)[None, :]
        tl.store(o_ptr + r * T * V + t.to(tl.int64)[:, None] * V + rv[None, :], o, mask=mo)
    tl.store(st_ptr + offs, S, mask=ms)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, g_ptr, s0_ptr, do_ptr, dq_ptr, T, K, V, R,
               GATE: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    ACC = dq_ptr.dtype.element_ty
    ms = (rk < K)[:, None] & (rv < V)[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + r * K * V + rk[:, None] * V + rv[None, :], mask=ms,
                    other=0.0).to(ACC)
    else:
        S = tl.zeros((BK, BV), dtype=ACC)
    causal = rc[:, None] >= rc[None, :]
    dq_base = (iv.to(tl.int64) * R + r) * T * K  # partial dq of this value block
    for start in range(0, T, C):
        t = start + rc
        tmask = t < T
        _, k, v, G = _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, r, t, rk, rv,
                                 T, K, V, GATE, ACC)
        do = tl.load(do_ptr + r * T * V + t.to(tl.int64)[:, None] * V + rv[None, :],
                     mask=tmask[:, None] & (rv < V)[None, :], other=0.0).to(ACC)
        P = tl.where(causal, tl.dot(do, tl.trans(v), input_precision=PREC), 0.0)  # (C, C)
        inter = tl.dot(do, tl.trans(S), input_precision=PREC)  # (C, BK)
        if GATE == 0:
            dq = tl.dot(P, k, input_precision=PREC) + inter
            S += tl.dot(tl.trans(k), v, input_precision=PREC)
        else:
            D, eq, ek, elast = _decays(G, rc, GATE, C)
            if GATE == 1:
                dq = tl.dot(P * D, k, input_precision=PREC) + eq * inter
            else:
                dq = tl.sum(P[:, :, None] * k[None, :, :] * D, 1) + eq * inter
            S = S * elast + tl.dot(tl.trans(k * ek), v, input_precision=PREC)
        tl.store(dq_ptr + dq_base + t.to(tl.int64)[:, None] * K + rk[None, :], dq,
                 mask=tmask[:, None] & (rk < K)[None, :])


@triton.jit
def _dkv_kernel(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dst_ptr, dk_ptr, dv_ptr, ds0_ptr,
                T, K, V, R,
                GATE: tl.constexpr, HAS_DST: tl.constexpr, PREC: tl.constexpr,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    ACC = dk_ptr.dtype.element_ty
    ms = (rk < K)[:, None] & (rv < V)[None, :]
    offs = r * K * V + rk[:, None] * V + rv[None, :]
    if HAS_DST:
        dS = tl.load(dst_ptr + offs, mask=ms, other=0.0).to(ACC)
    else:
        dS = tl.zeros((BK, BV), dtype=ACC)
    causal = rc[:, None] >= rc[None, :]
    dk_base = (iv.to(tl.int64) * R + r) * T * K
    n_chunks = tl.cdiv(T, C)
    for i in range(0, n_chunks):
        t = (n_chunks - 1 - i) * C + rc
        tmask = t < T
        q, k, v, G = _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, r, t, rk, rv,
                                 T, K, V, GATE, ACC)
        mv = tmask[:, None] & (rv < V)[None, :]
        ov = r * T * V + t.to(tl.int64)[:, None] * V + rv[None, :]
        do = tl.load(do_ptr + ov, mask=mv, other=0.0).to(ACC)
        P = tl.where(causal, tl.dot(do, tl.trans(v), input_precision=PREC), 0.0)  # (C, C)
        from_state = tl.dot(v, tl.trans(dS), input_precision=PREC)  # (C, BK)
        if GATE == 0:
            A = tl.where(causal, tl.dot(q, tl.trans(k), input_precision=PREC), 0.0)
            dv = tl.dot(tl.trans(A), do, input_precision=PREC) + tl.dot(k, dS,
                                                                       input_precision=PREC)
            dk = tl.dot(tl.trans(P), q, input_precision=PREC) + from_state
            dS += tl.dot(tl.trans(q), do, input_precision=PREC)
        else:
            D, eq, ek, elast = _decays(G, rc, GATE, C)
            if GATE == 1:
                A = tl.dot(q, tl.trans(k), input_precision=PREC) * D
                dk = tl.dot(tl.trans(P * D), q, input_precision=PREC) + ek * from_state
            else:
                A = tl.sum(q[:, None, :] * k[None, :, :] * D, 2)
                dk = tl.sum(P[:, :, None] * q[:, None, :] * D, 0) + ek * from_state
            dv = tl.dot(tl.trans(A), do, input_precision=PREC) + tl.dot(k * ek, dS,
                                                                       input_precision=PREC)
            dS = dS * elast + tl.dot(tl.trans(q * eq), do, input_precision=PREC)
        tl.store(dv_ptr + ov, dv, mask=mv)
        tl.store(dk_ptr + dk_base + t.to(tl.int64)[:, None] * K + rk[None, :], dk,
                 mask=tmask[:, None] & (rk < K)[None, :])
    tl.store(ds0_ptr + offs, dS, mask=ms)
