"""paraseq on GPUs: fused parallel Newton for the diagonal-recurrence GRU and LSTM.

``diag_newton(cell, gi, h0, weight_hh, bias_hh, c0=None, *, tol, max_iter, iterations,
on_failure, backend)`` solves ``paraseq.nn.DiagGRU``'s / ``DiagLSTM``'s recurrence over the
input pre-activations gi = W_ih x + b_ih (B, T, K H) with one Triton kernel per Newton
iteration and one for the backward pass (``paraseq.gpu.newton``, ``paraseq.gpu._kernels``),
or their pure-torch twin (``paraseq.gpu.twin``) where triton cannot run. ``paraseq.nn``'s
DiagGRU and DiagLSTM and ``solve_recurrence`` on DiagGRUCell/DiagLSTMCell take it on CUDA
tensors (``routing``).
"""

from .newton import BACKENDS, CELLS, LOW_PRECISION_TOL, backend_for, diag_newton

__all__ = ["BACKENDS", "CELLS", "LOW_PRECISION_TOL", "backend_for", "diag_newton"]
