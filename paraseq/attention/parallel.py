"""The parallel form: the masked quadratic product (attention as a T x T matrix).

Shape letters as in ``naive``. O(T^2 K) time and O(T^2) memory (O(T^2 K) with a gate over K):
the fastest form for short sequences, where one large matmul beats everything else.
"""

from __future__ import annotations

import torch
from torch import Tensor


def decay_matrix(G: Tensor) -> Tensor:
    """exp(G_i - G_j) below and on the diagonal, 0 above, from cumulative log decays G
    (..., T) (decreasing): every exponent taken is <= 0, so nothing overflows."""
    T = G.shape[-1]
    diff = G[..., :, None] - G[..., None, :]  # (..., T, T)
    upper = torch.ones(T, T, dtype=torch.bool, device=G.device).triu(1)
    return diff.masked_fill(upper, float("-inf")).exp()


def gated_scores(q: Tensor, k: Tensor, G: Tensor) -> Tensor:
    """A_ij = sum_k q_ik k_jk exp(G_ik - G_jk) for j <= i (0 above), G (..., T, K) the
    cumulative log gate: the (T, T, K) product, exact and stable (exponents <= 0)."""
    T = q.shape[-2]
    diff = G[..., :, None, :] - G[..., None, :, :]  # (..., T, T, K)
    upper = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)[..., None]
    w = diff.masked_fill(upper, float("-inf")).exp()  # (..., T, T, K)
    return (q[..., :, None, :] * k[..., None, :, :] * w).sum(-1)  # (..., T, T)


def parallel_attention(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None,
                       initial_state: Tensor | None = None, causal: bool = True
                       ) -> tuple[Tensor, Tensor]:
    """o = (mask * decay * q k^T) v + the initial state read by every query; the final state
    from the same weights. Same arguments and results as ``naive.naive_attention``."""
    T = q.shape[-2]
    if not causal:
        o = (q @ k.transpose(-1, -2)) @ v  # (B, H, T, V)
        S = k.transpose(-1, -2) @ v  # (B, H, K, V)
        if initial_state is not None:
            o = o + q @ initial_state
            S = S + initial_state
        return o, S
    if log_g is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        A = (q @ k.transpose(-1, -2)).masked_fill(~mask, 0)  # (B, H, T, T)
        qs, ks = q, k
        decay_T = None
    else:
        G = log_g.cumsum(-2)  # (B, H, T, 1 or K)
        if G.shape[-1] == 1:
            A = (q @ k.transpose(-1, -2)) * decay_matrix(G[..., 0])  # (B, H, T, T)
        else:
            A = gated_scores(q, k, G)  # (B, H, T, T)
        G_T = G[..., -1:, :] if T else G.new_zeros(*G.shape[:-2], 1, G.shape[-1])
        qs = q * G.exp()  # (B, H, T, K): what the initial state is read with
        ks = k * (G_T - G).exp()  # (B, H, T, K): what each step leaves in the final state
        decay_T = G_T.exp().transpose(-1, -2)  # (B, H, 1 or K, 1)
    o = A @ v  # (B, H, T, V)
    S = ks.transpose(-1, -2) @ v  # (B, H, K, V)
    if initial_state is not None:
        o = o + qs @ initial_state
        S = S + (initial_state if decay_T is None else decay_T * initial_state)
    return o, S
