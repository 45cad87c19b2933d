"""Triton kernels behind the ``"triton"`` backend (see ``paraseq.scan.gpu``).

Imported only on first use: importing this module imports triton and decorates the kernels,
and triton reads ``TRITON_INTERPRET`` at decoration time (``TRITON_INTERPRET=1`` runs the
kernels on the CPU through triton's interpreter, which is how the test suite checks them
without a GPU).

Layout: a, b and x are (N, T, D) contiguous (row n, time t, channel d at n*T*D + t*D + d); x0
is (N, D). Complex tensors arrive as their real views, (N, T, D, 2). One program owns one row
n and a block of BLOCK_D channels, and walks time in tiles of BLOCK_T steps: each tile is
scanned in log depth by ``tl.associative_scan`` over the pairs (a, b) with the combine
(a_i, b_i) then (a_j, b_j) = (a_j a_i, a_j b_i + b_j), then the carry (the state after the
previous tile) enters as x = B + A * carry, where (A, B) is the tile's inclusive scan. Loads
and stores are coalesced along the channels. Steps past T (the last tile's padding) load the
identity (a = 1, b = 0), so the tile's last row is the state after the last real step: the next
carry. ``reverse`` walks the same tiles from the end, reading step T - 1 - t.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine(a_i, b_i, a_j, b_j):
    return a_j * a_i, a_j * b_i + b_j


@triton.jit
def _combine_complex(ar_i, ai_i, br_i, bi_i, ar_j, ai_j, br_j, bi_j):
    # (a_j a_i, a_j b_i + b_j) in complex arithmetic, as (real, imag) pairs
    return (ar_j * ar_i - ai_j * ai_i, ar_j * ai_i + ai_j * ar_i,
            ar_j * br_i - ai_j * bi_i + br_j, ar_j * bi_i + ai_j * br_i + bi_j)


@triton.jit
def _last_row(v, rows, last):
    # v (BLOCK_T, BLOCK_D) -> its row ``last`` (BLOCK_D,)
    return tl.sum(tl.where((rows == last)[:, None], v, 0.0), axis=0)


@triton.jit
def diag_scan_kernel(a_ptr, b_ptr, x0_ptr, x_ptr, T, D,
                     HAS_X0: tl.constexpr, REVERSE: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    dmask = d < D
    rows = tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    base = n.to(tl.int64) * T * D
    if HAS_X0:
        carry = tl.load(x0_ptr + n.to(tl.int64) * D + d, mask=dmask, other=0.0)
    else:
        carry = tl.zeros((BLOCK_D,), dtype=x_ptr.dtype.element_ty)
    for start in range(0, T, BLOCK_T):
        step = start + rows  # (BLOCK_T,) the scan's own order
        tmask = step < T
        t = (T - 1 - step) if REVERSE else step
        offs = base + t.to(tl.int64)[:, None] * D + d[None, :]  # (BLOCK_T, BLOCK_D)
        m = tmask[:, None] & dmask[None, :]
        a = tl.load(a_ptr + offs, mask=m, other=1.0)
        b = tl.load(b_ptr + offs, mask=m, other=0.0)
        A, B = tl.associative_scan((a, b), 0, _combine)
        x = B + A * carry[None, :]
        tl.store(x_ptr + offs, x, mask=m)
        carry = _last_row(x, rows, BLOCK_T - 1)


@triton.jit
def diag_scan_complex_kernel(a_ptr, b_ptr, x0_ptr, x_ptr, T, D,
                             HAS_X0: tl.constexpr, REVERSE: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # the same walk on interleaved (real, imag) pairs: element (n, t, d) at 2 (n T D + t D + d)
    n = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    rows = tl.arange(0, BLOCK_T)
    base = n.to(tl.int64) * T * D
    if HAS_X0:
        o0 = 2 * (n.to(tl.int64) * D + d)
        cr = tl.load(x0_ptr + o0, mask=dmask, other=0.0)
        ci = tl.load(x0_ptr + o0 + 1, mask=dmask, other=0.0)
    else:
        cr = tl.zeros((BLOCK_D,), dtype=x_ptr.dtype.element_ty)
        ci = tl.zeros((BLOCK_D,), dtype=x_ptr.dtype.element_ty)
    for start in range(0, T, BLOCK_T):
        step = start + rows
        tmask = step < T
        t = (T - 1 - step) if REVERSE else step
        offs = 2 * (base + t.to(tl.int64)[:, None] * D + d[None, :])
        m = tmask[:, None] & dmask[None, :]
        ar = tl.load(a_ptr + offs, mask=m, other=1.0)
        ai = tl.load(a_ptr + offs + 1, mask=m, other=0.0)
        br = tl.load(b_ptr + offs, mask=m, other=0.0)
        bi = tl.load(b_ptr + offs + 1, mask=m, other=0.0)
        Ar, Ai, Br, Bi = tl.associative_scan((ar, ai, br, bi), 0, _combine_complex)
        xr = Br + Ar * cr[None, :] - Ai * ci[None, :]
        xi = Bi + Ar * ci[None, :] + Ai * cr[None, :]
        tl.store(x_ptr + offs, xr, mask=m)
        tl.store(x_ptr + offs + 1, xi, mask=m)
        cr = _last_row(xr, rows, BLOCK_T - 1)
        ci = _last_row(xi, rows, BLOCK_T - 1)


# Dense a: x_t = a_t @ x_{t-1} + b_t with a (N, T, D, D), b and x (N, T, D), for small D (the
# state fits one program: D <= 64). A two-level scan over chunks of CHUNK steps (see
# ``paraseq.scan.gpu.dense_triton_scan``): ``dense_chunk_reduce_kernel`` composes each chunk's
# steps into one affine map (A_k, B_k) = (a_last ... a_first, the chunk's state from zero), the
# chunks' maps are scanned (the same two kernels, one level up), and
# ``dense_chunk_apply_kernel`` re-runs each chunk from its carried-in state, writing x. Each
# program owns one (row, chunk) pair and walks its chunk step by step: parallel over rows and
# chunks, log_CHUNK(T) levels, 3 launches a level. Matrices and vectors are padded to BLOCK_D
# (a power of two) with zeros; padded entries stay zero. USE_DOT picks tl.dot (BLOCK_D >= 16,
# the smallest tile tl.dot takes; IEEE precision, not TF32) or a broadcast product (tiny D).


@triton.jit
def _matmul(p, q, USE_DOT: tl.constexpr):
    # p @ q for (BLOCK_D, BLOCK_D) tiles
    if USE_DOT:
        return tl.dot(p, q, input_precision="ieee")
    return tl.sum(p[:, :, None] * q[None, :, :], axis=1)


@triton.jit
def _matvec(p, v):
    # p @ v for a (BLOCK_D, BLOCK_D) tile and a (BLOCK_D,) vector
    return tl.sum(p * v[None, :], axis=1)


@triton.jit
def dense_chunk_reduce_kernel(a_ptr, b_ptr, A_ptr, B_ptr, T, D, K,
                              REVERSE: tl.constexpr, CHUNK: tl.constexpr,
                              BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr):
    # program (n, k): A[n, k] = a_{e-1} ... a_s (D, D), B[n, k] = the chunk's state from zero,
    # over the chunk's steps s..e-1 in scan order (step s reads time T - 1 - s when REVERSE)
    pid = tl.program_id(0)
    n = pid // K
    k = pid % K
    i = tl.arange(0, BLOCK_D)
    im = i < D
    mm = im[:, None] & im[None, :]
    mat = i[:, None] * D + i[None, :]  # (BLOCK_D, BLOCK_D) offsets inside one D x D matrix
    eye = tl.where((i[:, None] == i[None, :]) & mm, 1.0, 0.0)
    acc_a = eye.to(a_ptr.dtype.element_ty)
    acc_b = tl.zeros((BLOCK_D,), dtype=b_ptr.dtype.element_ty)
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, T)
    for s in range(start, end):
        t = (T - 1 - s) if REVERSE else s
        row = n.to(tl.int64) * T + t
        at = tl.load(a_ptr + row * D * D + mat, mask=mm, other=0.0)
        bt = tl.load(b_ptr + row * D + i, mask=im, other=0.0)
        acc_a = _matmul(at, acc_a, USE_DOT)
        acc_b = _matvec(at, acc_b) + bt
    out = n.to(tl.int64) * K + k
    tl.store(A_ptr + out * D * D + mat, acc_a, mask=mm)
    tl.store(B_ptr + out * D + i, acc_b, mask=im)


@triton.jit
def dense_chunk_apply_kernel(a_ptr, b_ptr, c_ptr, x_ptr, T, D, K,
                             REVERSE: tl.constexpr, CHUNK: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    # program (n, k): the chunk's steps from its carried-in state c[n, k] (N, K, D), writing x
    pid = tl.program_id(0)
    n = pid // K
    k = pid % K
    i = tl.arange(0, BLOCK_D)
    im = i < D
    mm = im[:, None] & im[None, :]
    mat = i[:, None] * D + i[None, :]
    x = tl.load(c_ptr + (n.to(tl.int64) * K + k) * D + i, mask=im, other=0.0)
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, T)
    for s in range(start, end):
        t = (T - 1 - s) if REVERSE else s
        row = n.to(tl.int64) * T + t
        at = tl.load(a_ptr + row * D * D + mat, mask=mm, other=0.0)
        bt = tl.load(b_ptr + row * D + i, mask=im, other=0.0)
        x = _matvec(at, x) + bt
        tl.store(x_ptr + row * D + i, x, mask=im)
