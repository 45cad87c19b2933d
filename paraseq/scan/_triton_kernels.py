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
