"""The recurrent form: one step at a time, O(K V) per token (decoding).

Shape letters as in ``naive``. ``recurrent_step`` is the update a decoder calls per token;
``recurrent_attention`` loops it over T (in the inputs' precision, differentiable by autograd,
which keeps every step's state: use it for decoding and short sequences, not for training).
"""

from __future__ import annotations

import torch
from torch import Tensor


def recurrent_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor,
                   log_g: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token: S = diag(g) S + k v^T, o = S^T q.

    Args:
        q: (B, H, K) the query.
        k: (B, H, K) the key.
        v: (B, H, V) the value.
        state: (B, H, K, V).
        log_g: None, (B, H, 1) or (B, H, K).

    Returns:
        o (B, H, V) and the new state (B, H, K, V).
    """
    if log_g is not None:
        state = log_g.exp()[..., None] * state  # (B, H, K, V)
    state = state + k[..., :, None] * v[..., None, :]  # (B, H, K, V)
    o = (q[..., None, :] @ state).squeeze(-2)  # (B, H, V)
    return o, state


def recurrent_attention(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None,
                        initial_state: Tensor | None = None, causal: bool = True
                        ) -> tuple[Tensor, Tensor]:
    """The loop over time in the inputs' precision; same arguments and results as
    ``naive.naive_attention``."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    if not causal:  # accumulate the whole state, then read it with every query
        for t in range(T):
            S = S + k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, K, V)
        return q @ S, S
    outs = []
    for t in range(T):
        o, S = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], S,
                              None if log_g is None else log_g[:, :, t])
        outs.append(o)
    if not outs:
        return q.new_zeros(B, H, 0, V), S
    return torch.stack(outs, dim=2), S
