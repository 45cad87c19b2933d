"""torch.nn modules that run in parallel over time."""

from __future__ import annotations

from .rnn import GRU, LSTM, RNN, DiagGRU, DiagLSTM

__all__ = ["GRU", "LSTM", "RNN", "DiagGRU", "DiagLSTM"]
