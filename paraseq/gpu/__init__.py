"""paraseq on GPUs: fused parallel Newton for the diagonal-recurrence GRU and LSTM, and for the
dense GRU, Elman RNN and LSTM.

``diag_newton(cell, gi, h0, weight_hh, bias_hh, c0=None, *, tol, max_iter, iterations,
on_failure, backend)`` solves ``paraseq.nn.DiagGRU``'s / ``DiagLSTM``'s recurrence over the
input pre-activations gi = W_ih x + b_ih (B, T, K H) with one Triton kernel per Newton
iteration and one for the backward pass (``paraseq.gpu.newton``, ``paraseq.gpu._kernels``),
or their pure-torch twin (``paraseq.gpu.twin``) where triton cannot run. ``paraseq.nn``'s
DiagGRU and DiagLSTM and ``solve_recurrence`` on DiagGRUCell/DiagLSTMCell take it on CUDA
tensors (``routing``).

``dense_newton(cell, gi, h0, weight_hh, bias_hh, c0=None, *, ...)`` does the same for
torch.nn's dense cells ("gru", "rnn_tanh", "rnn_relu", "lstm"; weight_hh (K H, H)) with the
dense Jacobian: per iteration the hidden projection of the whole iterate as one GEMM, one
Triton kernel (the cell, its Jacobian, the scan's right-hand side and the residual), and the
dense Triton scan (``paraseq.gpu.dense``, ``paraseq.gpu._dense_kernels``, twin
``paraseq.gpu.dense_twin``), for states D <= 64; ``paraseq.nn``'s GRU, RNN and LSTM and
``solve_recurrence`` on GRUCell/ElmanCell/LSTMCell take it on CUDA tensors with Newton.
"""

from .dense import dense_newton
from .newton import BACKENDS, CELLS, LOW_PRECISION_TOL, backend_for, diag_newton

__all__ = ["BACKENDS", "CELLS", "LOW_PRECISION_TOL", "backend_for", "dense_newton",
           "diag_newton"]
