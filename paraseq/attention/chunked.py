"""The chunked form: quadratic inside chunks of C steps, a linear scan of the states across them.

Shape letters as in ``naive``; N = T // C whole chunks (the T mod C steps left over make one
short chunk, computed from the state the whole ones leave). Per chunk n, with G the cumulative log
decay inside the chunk and S_(n-1) the state entering it:

    o_chunk = (mask * decay * q k^T) v            intra-chunk: a (C, C) product per chunk
            + (q * exp(G)) S_(n-1)                inter-chunk: read the carried state
    S_n = exp(G_last) * S_(n-1) + (k * exp(G_last - G))^T v     the scan across chunks

Everything is a batched matmul over (B, H, N): O(T C (K + V) + T K V) time, BLAS speed on a
CPU. Autograd keeps the chunk states (N K V = T K V / C numbers), never one state per step
(T K V): the memory of the backward grows as T (K + V + C + K V / C), linearly in T.

A gate over K (GLA) cannot fold exp(G_i - G_j) into one matmul without risking overflow
(exp(-G) grows without bound along a chunk). The chunk is cut into sub-chunks of c steps:
between sub-chunks, the factors are referred to the end of the key's sub-chunk, so both
exponents are <= 0; inside a sub-chunk the (c, c, K) products are formed exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..scan import linear_scan
from .parallel import decay_matrix, parallel_attention

SUB_CHUNK = 16  # c: sub-chunk of the gated (GLA) intra-chunk product


def _gated_intra(q: Tensor, k: Tensor, G: Tensor) -> Tensor:
    """A_ij = sum_k q_ik k_jk exp(G_ik - G_jk) for j <= i inside each chunk, without one
    exponent > 0. q, k, G: (..., C, K); returns (..., C, C)."""
    C = q.shape[-2]
    c = SUB_CHUNK if C % SUB_CHUNK == 0 else C
    n = C // c
    qs, ks, Gs = (x.unflatten(-2, (n, c)) for x in (q, k, G))  # (..., n, c, K)
    # inside a sub-chunk: the (c, c, K) products, exactly
    diff = Gs[..., :, :, None, :] - Gs[..., :, None, :, :]  # (..., n, c, c, K)
    upper = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)[..., None]
    w = diff.masked_fill(upper, float("-inf")).exp()
    Ad = (qs[..., :, :, None, :] * ks[..., :, None, :, :] * w).sum(-1)  # (..., n, c, c)
    eye = torch.eye(n, dtype=q.dtype, device=q.device)
    A = (Ad[..., :, :, None, :] * eye[:, None, :, None]).flatten(-4, -3).flatten(-2)
    if n == 1:
        return A  # (..., C, C)
    # between sub-chunks: key sub-chunk J referred to its last step R_J (exponents <= 0)
    R = Gs[..., -1, :]  # (..., n, K)
    kt = ks * (R[..., None, :] - Gs).exp()  # (..., n, c, K)
    qt = q[..., None, :, :] * (G[..., None, :, :] - R[..., :, None, :]).clamp(max=0).exp()
    Ao = (qt @ kt.transpose(-1, -2)).movedim(-3, -2).flatten(-2)  # (..., C, C)
    blk = torch.arange(C, device=q.device) // c
    later = blk[:, None] > blk[None, :]  # (C, C): query's sub-chunk after the key's
    return A + Ao.masked_fill(~later, 0)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None,
                      initial_state: Tensor | None = None, causal: bool = True,
                      chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Same arguments and results as ``naive.naive_attention``, plus ``chunk_size`` (C)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    if not causal:  # the whole sequence is one state: (q k^T) v read as q (k^T v)
        S = k.transpose(-1, -2) @ v  # (B, H, K, V)
        if initial_state is not None:
            S = S + initial_state
        return q @ S, S
    C = max(1, min(chunk_size, T))
    N, tail = divmod(T, C)
    if tail:  # whole chunks, then the last few steps as one short chunk from their state
        T0 = N * C
        # one copy each of the whole chunks: batched matmuls would copy a strided slice at
        # every use (two each)
        o0, S = chunked_attention(*(x[:, :, :T0].contiguous() for x in (q, k, v)),
                                  None if log_g is None else log_g[:, :, :T0], initial_state,
                                  True, C)
        o1, S = parallel_attention(q[:, :, T0:], k[:, :, T0:], v[:, :, T0:],
                                   None if log_g is None else log_g[:, :, T0:], S, True)
        return torch.cat([o0, o1], dim=2), S
    qc = q.reshape(B, H, N, C, K)
    kc = k.reshape(B, H, N, C, K)
    vc = v.reshape(B, H, N, C, V)
    if log_g is None:
        A = (qc @ kc.transpose(-1, -2)).tril_()  # (B, H, N, C, C)
        U = kc.transpose(-1, -2) @ vc  # (B, H, N, K, V)
        S_incl = U.cumsum(2)  # (B, H, N, K, V): the scan across chunks, a = 1
        if initial_state is not None:
            S_incl = S_incl + initial_state.to(q.dtype)[:, :, None]
        S_prev = S_incl - U  # (B, H, N, K, V): the state entering each chunk
        qg = qc
    else:
        S0 = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
        Kg = log_g.shape[-1]
        G = log_g.reshape(B, H, N, C, Kg).cumsum(-2)  # (B, H, N, C, 1 or K)
        G_last = G[..., -1:, :]  # (B, H, N, 1, 1 or K)
        if Kg == 1:
            A = (qc @ kc.transpose(-1, -2)) * decay_matrix(G[..., 0])  # (B, H, N, C, C)
        else:
            # recomputed in the backward: its (c, c, K) products would otherwise be kept,
            # c K numbers per step (fla recomputes them too)
            if torch.is_grad_enabled() and any(x.requires_grad for x in (qc, kc, G)):
                A = checkpoint(_gated_intra, qc, kc, G, use_reentrant=False)
            else:
                A = _gated_intra(qc, kc, G)  # (B, H, N, C, C)
        U = (kc * (G_last - G).exp()).transpose(-1, -2) @ vc  # (B, H, N, K, V)
        a = G_last.exp().transpose(-1, -2).expand(B, H, N, K, V)  # (B, H, N, K, V)
        S_incl = linear_scan(a.reshape(B, H, N, K * V), U.reshape(B, H, N, K * V),
                             S0.reshape(B, H, K * V), structure="diagonal"
                             ).reshape(B, H, N, K, V)
        S_prev = torch.cat([S0[:, :, None], S_incl[:, :, :-1]], dim=2)  # (B, H, N, K, V)
        qg = qc * G.exp()  # (B, H, N, C, K)
    # o = A v + qg S_prev, the second product accumulated into the first by one gemm each
    o = torch.baddbmm((qg @ S_prev).reshape(-1, C, V), A.reshape(-1, C, C),
                      vc.reshape(-1, C, V))  # (B H N, C, V)
    return o.reshape(B, H, T, V), S_incl[:, :, -1]
