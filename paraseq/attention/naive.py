"""The reference: linear attention as the loop over time it is, in float64.

Shape letters (every module of paraseq.attention): B batch, H heads, T time steps, K the
feature size of queries and keys (after the feature map), V the value size, N chunks, C the
chunk size.

Every form of paraseq.attention (parallel, recurrent, chunked) takes the same arguments as
``naive_attention`` and returns the same pair; the tests hold each of them to this loop.

The recurrence (causal): with g_t the per-step decay of the state (1 for plain linear
attention, a scalar per head for RetNet, a vector over K for GLA),

    S_t = diag(g_t) S_(t-1) + k_t v_t^T,    o_t = S_t^T q_t,    S_0 = initial_state.

Non-causal: S = S_0 + sum_t k_t v_t^T and o_t = S^T q_t for every t (no decay).
"""

from __future__ import annotations

import torch
from torch import Tensor


def naive_attention(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None,
                    initial_state: Tensor | None = None, causal: bool = True
                    ) -> tuple[Tensor, Tensor]:
    """The loop, in float64 whatever the inputs' dtype; returns (o, final state) in q's dtype.

    Args:
        q: (B, H, T, K) queries, the feature map already applied.
        k: (B, H, T, K) keys, the feature map already applied.
        v: (B, H, T, V) values.
        log_g: None (no decay), or the log of the per-step decay, (B, H, T, 1) (a scalar per
            head and step) or (B, H, T, K) (a gate per key feature). Causal only.
        initial_state: (B, H, K, V) or None (zeros).
        causal: False: every query sees every key (and the initial state).

    Returns:
        o (B, H, T, V) and the final state S_T (B, H, K, V).
    """
    dtype = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.double().clone()
    if not causal:
        for t in range(T):
            S = S + k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, K, V)
        o = torch.stack([(q[:, :, t, :, None] * S).sum(-2) for t in range(T)], dim=2)
        return o.to(dtype), S.to(dtype)
    g = None if log_g is None else log_g.double().exp()  # (B, H, T, 1 or K)
    outs = []
    for t in range(T):
        if g is not None:
            S = g[:, :, t, :, None] * S  # (B, H, K, V)
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, K, V)
        outs.append((q[:, :, t, :, None] * S).sum(-2))  # (B, H, V)
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, V)
    return o.to(dtype), S.to(dtype)


def naive_linformer(q: Tensor, k: Tensor, v: Tensor, proj_k: Tensor, proj_v: Tensor,
                    scale: float) -> Tensor:
    """Linformer by the loop: o_i = softmax_j(q_i . k'_j * scale) v'_j, with k' = E k and
    v' = F v projected along the sequence (E, F: (R, T)). float64; returns q's dtype."""
    dtype = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    kp = torch.einsum("rt,bhtk->bhrk", proj_k.double(), k)  # (B, H, R, K)
    vp = torch.einsum("rt,bhtv->bhrv", proj_v.double(), v)  # (B, H, R, V)
    outs = []
    for i in range(q.shape[2]):
        w = torch.softmax((q[:, :, i, None, :] * kp).sum(-1) * scale, dim=-1)  # (B, H, R)
        outs.append((w[..., None] * vp).sum(-2))  # (B, H, V)
    return torch.stack(outs, dim=2).to(dtype)
