"""The numba kernels behind the ``"numba"`` backend (imported on first use, never by
``import paraseq``: importing this module imports numba, and each kernel compiles, or loads
from numba's on-disk cache, on its first call with a new dtype).

Shape letters: N the flattened broadcast batch, T time steps, D state size; Na, Nb, Nx the
flattened batches of a, b and x0 before broadcasting. Every array is C-contiguous:
a (Na, T, D) diagonal or (Na, T, D, D) dense, b (Nb, T, D), x0 (Nx, D), out (N, T, D); the
int64 index arrays ia, ib, ix (N,) say which row of a, b and x0 batch element n reads, which is
how broadcasting costs nothing. ``reverse`` walks t from T - 1 down to 0 with the same a_t:
x_t = a_t x_{t+1} + b_t. Loops run in processing order s (t = s, or T - 1 - s in reverse).

The kernels are serial (``nogil``): each takes a range [lo, hi) of work units as its last two
arguments, and ``paraseq.scan.compiled`` hands out the ranges to its threads. (numba's own
``parallel=True`` cost three to five times the compile time here, and its threading layers are
either not fork-safe (GNU OpenMP) or abort on concurrent calls (workqueue).)

- ``wide``: diagonal a, rows wide enough to vectorise (D >= 16). A unit is a range of W
  contiguous channels of one batch element and one time chunk, u = (n, part, chunk); its loop
  over t reads and writes W contiguous values per step, which the compiler turns into SIMD.
  With one chunk per series (K = 1) it is a single pass. With K > 1 (fewer series than
  threads) it is a two-phase scan with uneven chunks (bounds[k] <= s < bounds[k + 1]):
  phase A fills chunk 0 from x0 (its carry is known, it needs no summary) while chunks
  1..K-2 compute their summaries; phase B fills chunks 1..K-1 from their carries. Chunk 0 is
  shorter, so that filling it (12 bytes per float32 step) takes as long as a summary (8): the
  data read is 12 + 8 (K - 2) / (K - 1 + 2/3) bytes a step instead of 20.
- ``narrow_summary`` / ``narrow_fill``: diagonal a with narrow rows (D < 16, down to one
  channel), where a row loop would be one long dependency chain. A chain is one (batch
  element, chunk) pair, chunks of equal length C = T // K (the last one also takes the
  T % K leftover steps); a unit is a group of four chains run in lockstep, so that four
  independent multiply-adds are in flight, one channel at a time over blocks of R rows that
  stay in L1. K = 1 chunk per series is a single pass (``narrow_fill`` from x0), K > 1 a
  two-pass scan: every chain's summary, the carries, every chain's fill.
- ``series``: diagonal a with one real channel (D = 1): ``wide``'s units and phases, each
  chunk scanned W steps at a time inside a vector register (a log-step scan of the W affine
  maps, then one multiply-add with the carry), since a one-channel loop is one long
  dependency chain that neither the compiler nor ``narrow``'s four scalar chains vectorise.
- ``carries``: the short sequential loop between the passes.
- ``dense``: x_t = A_t x_{t-1} + b_t with A (D, D) per step; a unit is one batch element.
  Each row of A_t is a contiguous dot product (vectorised: ``reassoc`` lets the compiler split
  the sum). No split over time: a chunk's summary would need the D x D products of its
  coefficients, D times the work of the scan itself.

A summary of a chunk (s from s0 to s1 - 1) is its state from a zero start, S, and its
coefficient product P = a_{s1-1} ... a_{s0}; the carry into the next chunk is P c + S, where
c is the carry into this one. The last chunk's summary is never needed.

fastmath is limited to ``contract`` (fused multiply-add) for the diagonal kernels, plus
``reassoc`` for the dense dot products: no flag that assumes finite values, so nan and inf
propagate as in the sequential loop.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

_DIAG_FLAGS = {"contract"}
_DENSE_FLAGS = {"contract", "reassoc"}
_OPTS = {"nogil": True, "cache": True}


# --- synchronisation with the thread pool of paraseq.scan.compiled ---------------------------
# Every range kernel takes (flags, task) before (lo, hi): a nonzero task is stored in flags[0]
# as the kernel starts, which is how the calling thread hands a task to the pool's polling
# workers while it does not hold the GIL (a worker then takes the GIL at once instead of
# sleeping until the caller lets go of it).


@intrinsic
def _load_acquire(typingctx, arr, i):  # pragma: no cover - compiled
    """flags[i] as an atomic load: re-read on every call, never hoisted out of a loop."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]],
                                       wraparound=False)
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(arr, types.intp), codegen


@intrinsic
def _store_release(typingctx, arr, i, value):  # pragma: no cover - compiled
    """flags[i] = value as an atomic store: the writes before it are seen first."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]],
                                       wraparound=False)
        builder.store_atomic(context.cast(builder, args[2], sig.args[2], types.int64), ptr,
                             "release", 8)
        return context.get_dummy_value()

    return types.none(arr, types.intp, types.int64), codegen


@njit(**_OPTS)
def spin_while(flags, i, value, polls, done, done_value):  # pragma: no cover - compiled
    """flags[done] = done_value (if done > 0), then poll flags[i] up to ``polls`` times without
    the GIL: True as soon as it differs from value, False if it never did. (The store comes
    first, in here, so that whoever waits for it finds the GIL free.)"""
    if done > 0:
        _store_release(flags, done, done_value)
    for _ in range(polls):
        if _load_acquire(flags, i) != value:
            return True
    return False


@njit(**_OPTS)
def spin_until_all(flags, lo, hi, value, polls):  # pragma: no cover - compiled
    """Poll until flags[lo:hi] all equal value (True), or ``polls`` rounds (False)."""
    for _ in range(polls):
        done = True
        for i in range(lo, hi):
            if _load_acquire(flags, i) != value:
                done = False
                break
        if done:
            return True
    return False


@njit(**_OPTS, fastmath=_DIAG_FLAGS)
def carries(P, S, x0, ix, out, t_first, K, k0):  # pragma: no cover - compiled
    """The carry into chunks k0..K-1 of every series, written over S (N * K, D).

    Into chunk k0: x0 (k0 == 0), or the state x_{t_first} that the fill of chunk 0 ended
    with (k0 == 1). Into chunk k + 1: P_k c_k + S_k, from the summaries (P, S) of chunk k."""
    for n in range(ix.shape[0]):
        c = x0[ix[n]].copy() if k0 == 0 else out[n, t_first].copy()
        for k in range(k0, K):
            Sk = S[n * K + k]
            if k < K - 1:
                Pk = P[n * K + k]
                for d in range(c.shape[0]):
                    v = Pk[d] * c[d] + Sk[d]
                    Sk[d] = c[d]
                    c[d] = v
            else:
                Sk[:] = c


@njit(**_OPTS, fastmath=_DIAG_FLAGS)
def wide(a, b, out, ia, ib, S, P, bounds, W, reverse, k0, summaries, flags, task, lo,
         hi):  # pragma: no cover - compiled
    """Units u in [lo, hi) of one phase: u = (n, part, j), W channels per part, chunk
    k = k0 + j of the K = len(bounds) - 1 chunks (chunk k: s in [bounds[k], bounds[k+1])).

    Phase A (k0 = 0, ``summaries``): chunk 0 is filled from its carry S (x0: it needs no
    summary) while chunks 1..K-2 compute their summaries S, P from a zero start. Phase B
    (k0 = 1): chunks 1..K-1 are filled from their carries. K = 1: one phase, the fill."""
    if task != 0:
        _store_release(flags, 0, task)
    T, D = out.shape[1], out.shape[2]
    K = bounds.shape[0] - 1
    parts = (D + W - 1) // W
    nk = max(1, K - 1)  # chunks per phase
    for u in range(lo, hi):
        n = u // (parts * nk)
        k = k0 + u % nk
        d0 = (u // nk) % parts * W
        d1 = min(D, d0 + W)
        na, nb = ia[n], ib[n]
        if summaries and k > 0:
            st, pr = S[n * K + k, d0:d1], P[n * K + k, d0:d1]
            st[:] = 0
            pr[:] = 1
            for s in range(bounds[k], bounds[k + 1]):
                t = T - 1 - s if reverse else s
                ar, br = a[na, t, d0:d1], b[nb, t, d0:d1]
                for j in range(d1 - d0):
                    v = ar[j]
                    st[j] = v * st[j] + br[j]
                    pr[j] *= v
            continue
        st = S[n * K + k, d0:d1].copy()
        for s in range(bounds[k], bounds[k + 1]):
            t = T - 1 - s if reverse else s
            ar, br, xr = a[na, t, d0:d1], b[nb, t, d0:d1], out[n, t, d0:d1]
            for j in range(d1 - d0):
                v = ar[j] * st[j] + br[j]
                st[j] = v
                xr[j] = v


@njit(**_OPTS, inline="always")
def _chain_views(c, K, C, T, D, a, b, out, ia, ib, reverse):  # pragma: no cover - compiled
    """Flat views of a, b and out over the C lockstep rows of chain c = (series n, chunk k).

    The views start at the chain's lowest t, so element i * D + d is row i of the view: the
    chain's first step forward, its last in reverse.
    """
    n = c // K
    s0 = (c - n * K) * C
    lo = T - s0 - C if reverse else s0
    return (a[(ia[n] * T + lo) * D:(ia[n] * T + lo + C) * D],
            b[(ib[n] * T + lo) * D:(ib[n] * T + lo + C) * D],
            out[(n * T + lo) * D:(n * T + lo + C) * D])


@njit(**_OPTS, fastmath=_DIAG_FLAGS)
def narrow_summary(a3, b3, out3, ia, ib, S, P, K, R, reverse, flags, task, lo,
                   hi):  # pragma: no cover - compiled
    """Pass 1 for lockstep groups g in [lo, hi): each chain's state from zero (S) and
    coefficient product (P) over its C lockstep rows. Chains 4g..4g+3 (a short last group
    repeats its last chain)."""
    if task != 0:
        _store_release(flags, 0, task)
    N, T, D = out3.shape
    a, b = a3.reshape(-1), b3.reshape(-1)  # flat views
    C = T // K
    NC = N * K
    # unsigned offsets: no negative-index wraparound code in the inner loop; in reverse the
    # step is -D modulo 2**64
    inc = np.uint64(0) - np.uint64(D) if reverse else np.uint64(D)
    for g in range(lo, hi):
        c0 = 4 * g
        c1, c2, c3 = min(c0 + 1, NC - 1), min(c0 + 2, NC - 1), min(c0 + 3, NC - 1)
        av0, bv0, _ = _chain_views(c0, K, C, T, D, a, b, a, ia, ib, reverse)
        av1, bv1, _ = _chain_views(c1, K, C, T, D, a, b, a, ia, ib, reverse)
        av2, bv2, _ = _chain_views(c2, K, C, T, D, a, b, a, ia, ib, reverse)
        av3, bv3, _ = _chain_views(c3, K, C, T, D, a, b, a, ia, ib, reverse)
        for d in range(D):
            S[c0, d] = S[c1, d] = S[c2, d] = S[c3, d] = 0
            P[c0, d] = P[c1, d] = P[c2, d] = P[c3, d] = 1
        for i0 in range(0, C, R):
            i1 = min(C, i0 + R)
            for d in range(D):
                s0, s1, s2, s3 = S[c0, d], S[c1, d], S[c2, d], S[c3, d]
                p0, p1, p2, p3 = P[c0, d], P[c1, d], P[c2, d], P[c3, d]
                o = np.uint64((C - 1 - i0 if reverse else i0) * D + d)
                for _ in range(i0, i1):
                    v0, v1, v2, v3 = av0[o], av1[o], av2[o], av3[o]
                    s0 = v0 * s0 + bv0[o]
                    s1 = v1 * s1 + bv1[o]
                    s2 = v2 * s2 + bv2[o]
                    s3 = v3 * s3 + bv3[o]
                    p0 *= v0
                    p1 *= v1
                    p2 *= v2
                    p3 *= v3
                    o += inc
                S[c0, d], S[c1, d], S[c2, d], S[c3, d] = s0, s1, s2, s3
                P[c0, d], P[c1, d], P[c2, d], P[c3, d] = p0, p1, p2, p3


@njit(**_OPTS, fastmath=_DIAG_FLAGS)
def narrow_fill(a3, b3, out3, ia, ib, S, K, R, reverse, flags, task, lo,
                hi):  # pragma: no cover - compiled
    """Pass 2 for lockstep groups g in [lo, hi): the recurrence from each chain's carry S,
    writing out; then the T % K leftover steps of the last chunk of each series."""
    if task != 0:
        _store_release(flags, 0, task)
    N, T, D = out3.shape
    a, b, out = a3.reshape(-1), b3.reshape(-1), out3.reshape(-1)  # flat views
    C = T // K
    NC = N * K
    inc = np.uint64(0) - np.uint64(D) if reverse else np.uint64(D)
    for g in range(lo, hi):
        c0 = 4 * g
        c1, c2, c3 = min(c0 + 1, NC - 1), min(c0 + 2, NC - 1), min(c0 + 3, NC - 1)
        av0, bv0, xv0 = _chain_views(c0, K, C, T, D, a, b, out, ia, ib, reverse)
        av1, bv1, xv1 = _chain_views(c1, K, C, T, D, a, b, out, ia, ib, reverse)
        av2, bv2, xv2 = _chain_views(c2, K, C, T, D, a, b, out, ia, ib, reverse)
        av3, bv3, xv3 = _chain_views(c3, K, C, T, D, a, b, out, ia, ib, reverse)
        for i0 in range(0, C, R):
            i1 = min(C, i0 + R)
            for d in range(D):
                s0, s1, s2, s3 = S[c0, d], S[c1, d], S[c2, d], S[c3, d]
                o = np.uint64((C - 1 - i0 if reverse else i0) * D + d)
                for _ in range(i0, i1):
                    s0 = av0[o] * s0 + bv0[o]
                    s1 = av1[o] * s1 + bv1[o]
                    s2 = av2[o] * s2 + bv2[o]
                    s3 = av3[o] * s3 + bv3[o]
                    xv0[o] = s0
                    xv1[o] = s1
                    xv2[o] = s2
                    xv3[o] = s3
                    o += inc
                S[c0, d], S[c1, d], S[c2, d], S[c3, d] = s0, s1, s2, s3
        last = -1
        for c in (c0, c1, c2, c3):
            if c != last and c % K == K - 1 and K * C < T:  # each chain once
                last = c
                n = c // K
                for d in range(D):
                    st = S[c, d]
                    for s in range(K * C, T):
                        t = T - 1 - s if reverse else s
                        st = a[(ia[n] * T + t) * D + d] * st + b[(ib[n] * T + t) * D + d]
                        out[(n * T + t) * D + d] = st


@njit(**_OPTS, fastmath=_DENSE_FLAGS)
def dense(a, b, x0, ia, ib, ix, out, reverse, flags, task, lo, hi):  # pragma: no cover
    """Dense scan x_t = A_t x_{t-1} + b_t (A_t x_{t+1} in reverse) for batch elements
    n in [lo, hi)."""
    if task != 0:
        _store_release(flags, 0, task)
    T, D = out.shape[1], out.shape[2]
    for n in range(lo, hi):
        na, nb = ia[n], ib[n]
        prev = x0[ix[n]]
        for s in range(T):
            t = T - 1 - s if reverse else s
            At, bt, xt = a[na, t], b[nb, t], out[n, t]
            for i in range(D):
                row = At[i]
                acc = bt[i]
                for j in range(D):
                    acc += row[j] * prev[j]
                xt[i] = acc
            prev = xt


@njit(**_OPTS, fastmath=_DENSE_FLAGS)
def dense_t(at, b, x0, ia, ib, ix, out, reverse, flags, task, lo, hi):  # pragma: no cover
    """``dense`` with each A_t given transposed (``at[., t] = A_t^T``, e.g. a Jacobian stored
    column by column): x_t = b_t + sum_j A_t[:, j] x_{t-1}[j], a contiguous axpy per j."""
    if task != 0:
        _store_release(flags, 0, task)
    T, D = out.shape[1], out.shape[2]
    for n in range(lo, hi):
        na, nb = ia[n], ib[n]
        prev = x0[ix[n]]
        for s in range(T):
            t = T - 1 - s if reverse else s
            At, bt, xt = at[na, t], b[nb, t], out[n, t]
            for i in range(D):
                xt[i] = bt[i]
            for j in range(D):
                col = At[j]
                pj = prev[j]
                for i in range(D):
                    xt[i] += col[i] * pj
            prev = xt


@njit(**_OPTS)
def add(a, b, out, flags, task, lo, hi):  # pragma: no cover - compiled
    """out = a + b on flat arrays over [lo, hi): the memory-copy reference of the benchmarks
    (reads and writes the bytes a diagonal scan must)."""
    if task != 0:
        _store_release(flags, 0, task)
    av, bv, ov = a[lo:hi], b[lo:hi], out[lo:hi]  # indices from 0: no wraparound checks
    for i in range(hi - lo):
        ov[i] = av[i] + bv[i]


# --- explicit SIMD for one long series (D = 1) ------------------------------------------------
# A vector is an LLVM <W x float/double> value (W = the length of the tuple ``vw`` a kernel is
# given: 16 float32 or 8 float64, a 64-byte register). LLVM does not vectorise a recurrence
# over one series by itself; these intrinsics let ``series`` scan W steps at a time inside a
# register (a log-step scan of the affine maps, Hillis and Steele within the vector).


class _SVec(types.Type):
    def __init__(self, dtype, width):
        self.dtype, self.width = dtype, width
        super().__init__(name=f"paraseq.scan.SVec({dtype}x{width})")


@register_model(_SVec)
class _SVecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        be = ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.width)
        super().__init__(dmm, fe_type, be)


_I32 = ir.IntType(32)


def _splat(context, builder, val, fromty, vt):
    s = context.cast(builder, val, fromty, vt.dtype)
    v = builder.insert_element(ir.Constant(context.get_value_type(vt), ir.Undefined), s,
                               ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vt.width),
                                                    [0] * vt.width))


@intrinsic
def _vld(typingctx, arr, off, vw):  # pragma: no cover - compiled
    """arr[off:off + W] (1-D contiguous)."""
    vt = _SVec(arr.dtype, vw.count)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]),
                              ir.PointerType(context.get_value_type(vt)))
        return builder.load(ptr, align=sig.args[0].dtype.bitwidth // 8)
    return vt(arr, off, vw), codegen


@intrinsic
def _vst(typingctx, arr, off, v):  # pragma: no cover - compiled
    """arr[off:off + W] = v."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.PointerType(args[2].type))
        builder.store(args[2], ptr, align=sig.args[0].dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.none(arr, off, v), codegen


@intrinsic
def _vshift(typingctx, v, k, fill, up):  # pragma: no cover - compiled
    """Lane i of the result is lane i - k of v (up) or i + k (not up), ``fill`` where that
    lane does not exist. k and up are compile-time constants."""
    if not isinstance(k, types.IntegerLiteral) or not isinstance(up, types.BooleanLiteral):
        return None
    K, UP = k.literal_value, up.literal_value

    def codegen(context, builder, sig, args):
        vt = sig.args[0]
        W = vt.width
        f = _splat(context, builder, args[2], sig.args[2], vt)
        # shufflevector(v, f): indices < W pick from v, >= W from f
        if UP:
            mask = [W + i if i < K else i - K for i in range(W)]
        else:
            mask = [i + K if i + K < W else W + i for i in range(W)]
        return builder.shuffle_vector(args[0], f, ir.Constant(ir.VectorType(_I32, W), mask))
    return v(v, k, fill, up), codegen


@intrinsic
def _vbcast(typingctx, v, last):  # pragma: no cover - compiled
    """Every lane = the last lane of v (last) or the first (not last); last a constant."""
    if not isinstance(last, types.BooleanLiteral):
        return None
    LAST = last.literal_value

    def codegen(context, builder, sig, args):
        W = sig.args[0].width
        lane = W - 1 if LAST else 0
        return builder.shuffle_vector(args[0], args[0],
                                      ir.Constant(ir.VectorType(_I32, W), [lane] * W))
    return v(v, last), codegen


@intrinsic
def _vfull(typingctx, x, arr, vw):  # pragma: no cover - compiled
    """A vector of arr's dtype with every lane x."""
    vt = _SVec(arr.dtype, vw.count)

    def codegen(context, builder, sig, args):
        return _splat(context, builder, args[0], sig.args[0], vt)
    return vt(x, arr, vw), codegen


@intrinsic
def _vlane(typingctx, v, i):  # pragma: no cover - compiled
    """Lane i of v."""
    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], builder.trunc(args[1], _I32))
    return v.dtype(v, i), codegen


@intrinsic
def _vfma(typingctx, a, b, c):  # pragma: no cover - compiled
    """a * b + c, lane by lane (one fused multiply-add: ``contract``)."""
    def codegen(context, builder, sig, args):
        return builder.fadd(builder.fmul(args[0], args[1], flags=("contract",)), args[2],
                            flags=("contract",))
    return a(a, b, c), codegen


@intrinsic
def _vmul(typingctx, a, b):  # pragma: no cover - compiled
    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])
    return a(a, b), codegen


@njit(**_OPTS, inline="always")
def _block_up(av, bv):  # pragma: no cover - compiled
    """The inclusive scan of W affine maps x -> a x + b inside a vector: lane i becomes the
    composition of lanes 0..i. log2(W) steps of a shift and a multiply-add; a shift past W
    is the identity map (1, 0), so with 8 lanes the last step changes nothing."""
    bv = _vfma(av, _vshift(bv, 1, 0.0, True), bv)
    av = _vmul(av, _vshift(av, 1, 1.0, True))
    bv = _vfma(av, _vshift(bv, 2, 0.0, True), bv)
    av = _vmul(av, _vshift(av, 2, 1.0, True))
    bv = _vfma(av, _vshift(bv, 4, 0.0, True), bv)
    av = _vmul(av, _vshift(av, 4, 1.0, True))
    bv = _vfma(av, _vshift(bv, 8, 0.0, True), bv)
    av = _vmul(av, _vshift(av, 8, 1.0, True))
    return av, bv


@njit(**_OPTS, inline="always")
def _block_down(av, bv):  # pragma: no cover - compiled
    """``_block_up`` in the other direction: lane i becomes the composition of lanes
    W-1..i (a reverse scan)."""
    bv = _vfma(av, _vshift(bv, 1, 0.0, False), bv)
    av = _vmul(av, _vshift(av, 1, 1.0, False))
    bv = _vfma(av, _vshift(bv, 2, 0.0, False), bv)
    av = _vmul(av, _vshift(av, 2, 1.0, False))
    bv = _vfma(av, _vshift(bv, 4, 0.0, False), bv)
    av = _vmul(av, _vshift(av, 4, 1.0, False))
    bv = _vfma(av, _vshift(bv, 8, 0.0, False), bv)
    av = _vmul(av, _vshift(av, 8, 1.0, False))
    return av, bv


@njit(**_OPTS)
def series(a, b, out, ia, ib, S, P, bounds, reverse, k0, summaries, vw, flags, task, lo,
           hi):  # pragma: no cover - compiled
    """``wide`` for one channel (D = 1), vectorised along time: each block of W steps is
    scanned inside a register (``_block_up``, ``_block_down``) and joined to the carry by one
    multiply-add.
    Units u in [lo, hi) = (n, chunk k = k0 + u % (K - 1)) of one phase, as in ``wide``:
    phase A fills chunk 0 from its carry S while chunks 1..K-2 compute their summaries
    (S: the state from zero, P: the product of a), phase B fills chunks 1..K-1."""
    if task != 0:
        _store_release(flags, 0, task)
    W = len(vw)
    T = out.shape[1]
    af, bf, of = a.reshape(-1), b.reshape(-1), out.reshape(-1)
    K = bounds.shape[0] - 1
    nk = max(1, K - 1)
    for u in range(lo, hi):
        n = u // nk
        k = k0 + u % nk
        ao, bo, oo = ia[n] * T, ib[n] * T, n * T
        s0, s1 = bounds[k], bounds[k + 1]
        nb = (s1 - s0) // W  # whole blocks; the rest one step at a time
        if summaries and k > 0:
            sv = _vfull(0.0, af, vw)
            pv = _vfull(1.0, af, vw)
            for j in range(nb):
                s = s0 + j * W
                t = T - s - W if reverse else s
                if reverse:
                    A, B = _block_down(_vld(af, ao + t, vw), _vld(bf, bo + t, vw))
                    A, B = _vbcast(A, False), _vbcast(B, False)
                else:
                    A, B = _block_up(_vld(af, ao + t, vw), _vld(bf, bo + t, vw))
                    A, B = _vbcast(A, True), _vbcast(B, True)
                sv = _vfma(A, sv, B)
                pv = _vmul(A, pv)
            st, pr = _vlane(sv, 0), _vlane(pv, 0)
            for s in range(s0 + nb * W, s1):
                t = T - 1 - s if reverse else s
                v = af[ao + t]
                st = v * st + bf[bo + t]
                pr *= v
            S[n * K + k, 0] = st
            P[n * K + k, 0] = pr
            continue
        cv = _vfull(S[n * K + k, 0], af, vw)
        for j in range(nb):
            s = s0 + j * W
            t = T - s - W if reverse else s
            if reverse:
                A, B = _block_down(_vld(af, ao + t, vw), _vld(bf, bo + t, vw))
                x = _vfma(A, cv, B)
                cv = _vbcast(x, False)
            else:
                A, B = _block_up(_vld(af, ao + t, vw), _vld(bf, bo + t, vw))
                x = _vfma(A, cv, B)
                cv = _vbcast(x, True)
            _vst(of, oo + t, x)
        st = _vlane(cv, 0)
        for s in range(s0 + nb * W, s1):
            t = T - 1 - s if reverse else s
            st = af[ao + t] * st + bf[bo + t]
            of[oo + t] = st
