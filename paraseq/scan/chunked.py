"""The two-level (chunked) scan: sequential inside chunks, vectorised across them.

Split the T steps into n chunks of C steps (a remainder of fewer than C steps at the end is
handled as a short last chunk) and run three phases:

1. Summaries: for every chunk at once, the product of its coefficients P_k and the state L_k it
   reaches from a zero start. A loop over the C positions inside a chunk, each step one
   whole-tensor op over all n chunks.
2. Carries: the chunk-boundary states c_k = P_k c_{k-1} + L_k, c_{-1} = x0, a scan of length n,
   done by the log-depth odd-even reduction of ``parallel``.
3. Fill: the loop of phase 1 again, now started from the carries and writing every state.

So a call costs about 2C + 8 log2(T / C) tensor ops instead of T, and reads the data about
twice. Short chunks mean fewer Python steps and a longer carry scan; ``default_chunk`` picks C
from measurements on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._ops import a_time, apply_add, batch_shape_of, compose, flip_time
from .parallel import _odd_even
from .sequential import sequential_scan


def default_chunk(width: int, dense: bool) -> int:
    """Chunk length C, from CPU measurements (benchmarks/scan.py and the table in its README).

    ``width`` is the number of scalars per time step (batch size times D). Narrow problems are
    bound by the per-op overhead and by strided access into the chunks, so short chunks win
    (8); wide diagonal problems are bound by memory traffic and want fewer, longer loop steps
    (32). Dense problems do a small matmul per step and prefer short chunks (8).
    """
    return 32 if (not dense and width >= 256) else 8


def chunked_scan(
    a: Tensor,
    b: Tensor,
    x0: Tensor | None,
    *,
    dense: bool,
    reverse: bool = False,
    chunk: int | None = None,
) -> Tensor:
    if x0 is None:  # a zero start, not none: the loop's 0 * a_1 keeps a nan or inf of a_1
        x0 = b.new_zeros(b.shape[-1])  # (D,), broadcast
    if reverse:
        return chunked_scan(flip_time(a, dense), b.flip(-2), x0, dense=dense,
                            chunk=chunk).flip(-2)
    T, D = b.shape[-2], b.shape[-1]
    batch = batch_shape_of(a, b, x0, dense)
    C = default_chunk(batch.numel() * D, dense) if chunk is None else int(chunk)
    n = T // C
    if n < 2:
        return sequential_scan(a, b, x0, dense=dense)
    main = n * C
    tdim = -3 if dense else -2
    a_m = a_time(a, slice(0, main), dense).unflatten(tdim, (n, C))  # (..., n, C, D[, D])
    b_m = b[..., :main, :].unflatten(-2, (n, C))  # (..., n, C, D)

    def a_at(c: int) -> Tensor:  # coefficient at position c of every chunk: (..., n, D[, D])
        return a_m[..., c, :, :] if dense else a_m[..., c, :]

    # 1. chunk summaries from a zero start
    P, L = a_at(0), b_m[..., 0, :]  # (..., n, D[, D]), (..., n, D)
    for c in range(1, C):
        L = apply_add(a_at(c), L, b_m[..., c, :], dense)
        P = compose(a_at(c), P, dense)
    # 2. the state at the end of every chunk
    carry = _odd_even(P, L, x0, dense)  # (..., n, D)
    start = x0.expand(*carry.shape[:-2], D).unsqueeze(-2)
    prev = torch.cat([start, carry[..., :-1, :]], dim=-2)  # (..., n, D): state before each chunk
    # 3. fill in every state
    out = torch.empty((*batch, T, D), dtype=b.dtype, device=b.device)  # (..., T, D)
    out_m = out[..., :main, :].unflatten(-2, (n, C))  # a view: writes land in out
    x = prev
    for c in range(C):
        x = apply_add(a_at(c), x, b_m[..., c, :], dense)
        out_m[..., c, :] = x
    if main < T:
        out[..., main:, :] = sequential_scan(a_time(a, slice(main, None), dense),
                                             b[..., main:, :], carry[..., -1, :], dense=dense)
    return out
