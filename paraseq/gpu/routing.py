"""Where paraseq takes the fused Newton path, and the rule ``method="auto"`` follows on CUDA.

Shape letters: B batch, T time, D state size (H; LSTM 2 H).

Fused path. ``paraseq.nn.DiagGRU``/``DiagLSTM`` (``method`` "auto", "newton" or
"quasi_newton") and ``solve_recurrence`` on ``paraseq.cells.DiagGRUCell``/``DiagLSTMCell``
("auto", "newton", "quasi_newton"; ``grad="implicit"``, no ``init``, analytic or "auto"
Jacobians) run ``paraseq.gpu.diag_newton`` on tensors whose device type is in ``DEVICES``
(CUDA; the tests add "cpu" to run the same route through triton's interpreter). Both
"newton" and "quasi_newton" run exact Newton there: the DiagGRU's Jacobian is diagonal, and
the DiagLSTM's 2 x 2 blocks cost the fused kernel about what their diagonal would.
``last_path`` reads ``label(device)``: "fused newton (triton)", or "fused newton (torch twin)"
where triton cannot run (not installed). CPU behaviour is unchanged.

The dense modules and cells take ``paraseq.gpu.dense_newton`` on those devices in the same
way: ``paraseq.nn.GRU``, ``RNN`` (tanh, relu) and ``LSTM`` (without proj_size) with method
"newton" (forced, or chosen by "auto" through ``newton_beats_cudnn``; "quasi_newton" too where
the state has one feature, where it is Newton), and ``solve_recurrence`` on
``paraseq.cells.GRUCell``, ``ElmanCell`` and ``LSTMCell`` with "newton" (or "auto" choosing
it; implicit gradients, no ``init``, analytic Jacobians), while the state fits the dense
kernels: D <= ``paraseq.scan.gpu.DENSE_MAX_D`` (64: GRU and Elman hidden <= 64, LSTM
hidden <= 32). ``last_path`` reads the same labels. Wider states (and the projected LSTM) run
the general Newton of ``paraseq.solve``, and the modules' ``last_path`` says why:
"parallel (newton), general path: state D=128 > 64" (``dense_route``; ``DENSE_FUSED =
False`` sends every dense Newton there, for benchmarks).

The rule for the dense modules (GRU, RNN, LSTM) under ``method="auto"`` on CUDA chooses
between torch's kernel (cuDNN) and Newton (the dense fused path above where the state fits,
else ``solve_recurrence``'s pure-torch iteration on the device: the cell over all T steps at
once, the analytic dense Jacobians, the dense scan): ``newton_beats_cudnn``. Its numbers,
``CUDA_RULE``, are UNCALIBRATED: they are read off the DEER paper's published GRU figures
(V100, batch 16: hidden 1 516x at T = 1e6, hidden 8 25x at 1e5, hidden 32 4.2x at 3e4,
hidden 64 1.3x; 0.4x at hidden 32 on an A100), not measured here.
``benchmarks/gpu.py`` is to measure the crossover and set them (``CUDA_RULE.calibrated`` names
the run that did); until then "auto" on CUDA keeps cuDNN except at long sequences with a tiny
state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import dense, newton

DEVICES: tuple[str, ...] = ("cuda",)
"""Device types on which the modules and ``solve_recurrence`` take the fused Newton path."""


def serves(x: Tensor) -> bool:
    """Whether the fused path serves input x (device and dtype)."""
    return x.device.type in DEVICES and x.dtype in newton.SUPPORTED


def label(device: torch.device, dense_cell: bool = False) -> str:
    """What ``last_path`` reads for the fused path on ``device`` (``dense_cell``: the dense
    cells' kernel, ``paraseq.gpu.dense``, else the diagonal cells')."""
    backend = (dense.backend_for(device) if dense_cell else newton.backend_for(device))
    return "fused newton (triton)" if backend == "triton" else "fused newton (torch twin)"


DENSE_FUSED = True
"""False sends the dense modules' and cells' Newton to the general path of ``paraseq.solve``
on every device (what ``benchmarks/gpu.py`` times the fused kernel against)."""

MODE_CELLS = {"GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm"}
"""``paraseq.nn``'s dense modes and the cells of ``paraseq.gpu.dense_newton``."""


def dense_route(mode: str, H: int, method: str, proj_size: int = 0) -> tuple[str | None, str]:
    """Whether a dense module's (or cell's) solve with ``method`` on a served device takes the
    fused dense Newton: (the ``dense_newton`` cell name, "") where it does; (None, why not)
    where Newton runs the general path instead (why: "" where the method is no Newton)."""
    cell = MODE_CELLS.get(mode)
    D = 2 * H if mode == "LSTM" else H
    newton_like = method == "newton" or (method == "quasi_newton" and D == 1)
    if cell is None or not newton_like or not DENSE_FUSED:
        return None, ""
    if proj_size:
        return None, "general path: proj_size"
    if not dense.fits(cell, H):
        return None, f"general path: state D={D} > {dense.scan_gpu.DENSE_MAX_D}"
    return cell, ""


@dataclass
class CudaRule:
    """Newton beats cuDNN where T >= ``min_T`` and B D^2 <= ``max_work`` (divided by
    ``training_factor`` when a backward pass follows)."""

    min_T: int
    max_work: int
    training_factor: int
    calibrated: str | None = None
    """The benchmark run (device, command, date) these numbers came from; None: uncalibrated."""


CUDA_RULE = CudaRule(min_T=10_000, max_work=16 * 8 * 8, training_factor=2)
"""UNCALIBRATED (see the module docstring): Newton at T >= 1e4 for B D^2 <= 1024 (hidden 8 at
batch 16), halved when training."""


def newton_beats_cudnn(B: int, T: int, D: int, training: bool) -> bool:
    """``method="auto"``'s choice for a dense module on CUDA: Newton (True) or cuDNN."""
    work = CUDA_RULE.max_work // (CUDA_RULE.training_factor if training else 1)
    return T >= CUDA_RULE.min_T and B * D * D <= work
