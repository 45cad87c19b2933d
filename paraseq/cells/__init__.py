"""Recurrent cells with analytic Jacobians: torch's Elman (RNNCell), GRU and LSTM cells, and
GRU and LSTM variants with diagonal recurrence, as plain functions (``functional``) and as
torch.nn modules that ``paraseq.solve_recurrence`` linearises in closed form."""

from .functional import (
    NONLINEARITIES,
    diag_gru,
    diag_gru_jacobian,
    diag_gru_jacobian_diagonal,
    diag_lstm,
    diag_lstm_jacobian,
    diag_lstm_jacobian_blocks,
    diag_lstm_jacobian_diagonal,
    elman,
    elman_jacobian,
    elman_jacobian_diagonal,
    gru,
    gru_jacobian,
    gru_jacobian_diagonal,
    lstm,
    lstm_jacobian,
    lstm_jacobian_diagonal,
)
from .modules import DiagGRUCell, DiagLSTMCell, ElmanCell, GRUCell, LSTMCell

__all__ = [
    "NONLINEARITIES",
    "DiagGRUCell",
    "DiagLSTMCell",
    "ElmanCell",
    "GRUCell",
    "LSTMCell",
    "diag_gru",
    "diag_gru_jacobian",
    "diag_gru_jacobian_diagonal",
    "diag_lstm",
    "diag_lstm_jacobian",
    "diag_lstm_jacobian_blocks",
    "diag_lstm_jacobian_diagonal",
    "elman",
    "elman_jacobian",
    "elman_jacobian_diagonal",
    "gru",
    "gru_jacobian",
    "gru_jacobian_diagonal",
    "lstm",
    "lstm_jacobian",
    "lstm_jacobian_diagonal",
]
