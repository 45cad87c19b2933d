"""torch.nn modules that run in parallel over time."""

from __future__ import annotations

from ._checks import RNNInputError
from .attention import LinearAttention, LinearTransformerBlock
from .rnn import GRU, LSTM, RNN, DiagGRU, DiagLSTM
from .s4 import S4, S4D, S4Block

__all__ = ["GRU", "LSTM", "RNN", "S4", "S4D", "DiagGRU", "DiagLSTM", "LinearAttention",
           "LinearTransformerBlock", "RNNInputError", "S4Block"]
