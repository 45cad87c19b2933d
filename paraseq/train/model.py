"""The classifiers ``python -m paraseq train`` fits: one recurrent layer (or an S4 block, or a
causal linear-attention Transformer block) read at each series' last valid step, then a linear
head. Series of different lengths are padded at the end: the recurrent layers see them packed
(each stops at its own length); S4 and linear attention are causal, so a step never sees the
padding after it and reading each series at its own last step ignores the padding exactly
(up to the rounding of the longer sequence's chunking).

Shape letters: B batch, T time (padded), C channels, H hidden size, K classes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

__all__ = ["CAUSAL", "MODELS", "TRAIN_METHODS", "Classifier", "recurrent_cell"]

MODELS = ("gru", "lstm", "diaggru", "diaglstm", "s4", "linear-attention")
CAUSAL = ("s4", "linear-attention")
"""Models with no nonlinear recurrence to solve (the method does not apply), read at the
last valid step of their causal output."""
TRAIN_METHODS = ("auto", "newton", "quasi_newton", "sequential", "torch")
"""``torch``: torch.nn.GRU / LSTM themselves (gru and lstm only), from the same initial
weights as paraseq's modules; the others: paraseq.nn's ``method=``."""


class Classifier(nn.Module):
    def __init__(self, model: str, channels: int, hidden: int, classes: int, method: str,
                 max_length: int):
        super().__init__()
        from .. import nn as pnn

        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; valid: " + ", ".join(MODELS))
        if method not in TRAIN_METHODS:
            raise ValueError(f"unknown method {method!r}; valid: " + ", ".join(TRAIN_METHODS))
        if method == "torch" and model not in ("gru", "lstm"):
            raise ValueError(f"method='torch' (torch.nn's own module) exists for gru and lstm "
                             f"only; got model {model!r}")
        self.model, self.method = model, method
        if model == "s4":  # a linear SSM: no nonlinear solve, the method does not apply
            self.proj = nn.Linear(channels, hidden)
            self.body = pnn.S4Block(hidden, d_state=32, l_max=max_length)
        elif model == "linear-attention":  # linear too: the method does not apply
            self.proj = nn.Linear(channels, hidden)
            # gate="decay": each head forgets at its own fixed rate (RetNet's 1 - 2^(-5-h)).
            # Without it the last step's output is a weighted average over all steps whatever
            # their order: the read-out would be blind to time order.
            self.body = pnn.LinearTransformerBlock(hidden, math.gcd(hidden, 4), gate="decay")
        else:
            cls = {"gru": pnn.GRU, "lstm": pnn.LSTM, "diaggru": pnn.DiagGRU,
                   "diaglstm": pnn.DiagLSTM}[model]
            rnn = cls(channels, hidden, batch_first=True,
                      method="sequential" if method == "torch" else method)
            if method == "torch":  # torch's module with paraseq's initial weights
                with torch.random.fork_rng():  # its own init must not shift the head's draws
                    twin = (nn.GRU if model == "gru" else nn.LSTM)(channels, hidden,
                                                                    batch_first=True)
                twin.load_state_dict(rnn.state_dict())
                rnn = twin
            self.body = rnn
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """x (B, T, C) padded at the end, lengths (B,) -> logits (B, K)."""
        if self.model in CAUSAL:
            y = self.body(self.proj(x))  # (B, T, H); causal, so padding after a step is unseen
            last = y[torch.arange(x.shape[0]), lengths - 1]  # (B, H)
            return self.head(last)
        if bool((lengths == x.shape[1]).all()):
            _, h = self.body(x)
        else:  # variable length: packed, so h_n is each series' state at its own last step
            _, h = self.body(pack_padded_sequence(x, lengths, batch_first=True,
                                                  enforce_sorted=False))
        h = h[0] if isinstance(h, tuple) else h  # (layers, B, H)
        return self.head(h[-1])

    def solve_stats(self) -> tuple[int, int]:
        """(Newton iterations, fallbacks) of the last forward (0, 0 on a sequential path)."""
        infos = getattr(self.body, "last_solve_info", None) or []
        return (sum(i.iterations for i in infos), sum(1 for i in infos if i.fell_back))


def recurrent_cell(model: Classifier):
    """paraseq.cells' cell with the first layer's weights (for the Lyapunov exponent), or
    None for S4 and linear attention (linear recurrences: the exponent is that of the state's
    decay, fixed, not tracked here)."""
    from .. import cells

    if model.model in CAUSAL:
        return None
    kind = {"gru": cells.GRUCell, "lstm": cells.LSTMCell, "diaggru": cells.DiagGRUCell,
            "diaglstm": cells.DiagLSTMCell}[model.model]
    body = model.body
    cell = kind(body.input_size, body.hidden_size)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(body, f"{name}_l0"))
    return cell
