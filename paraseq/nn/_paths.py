"""Which path a ``paraseq.nn`` recurrent module's forward runs: the whole rule, as one table.

Shape letters: T time, B batch, H hidden size, D state size (H; LSTM: Hout + H).

The rows, first that applies wins (``method="auto"``; an explicit method runs as given, except
that ``"sequential"`` still takes the compiled loop where row 1 applies). ``last_path`` reads
the path's label. ``PATHS`` holds the same rows as data, and ``choose`` walks them in order.

=================  ========================================================  ======================
path               when                                                      measured by
=================  ========================================================  ======================
compiled loop      CPU, float32/float64, numba installed, and a diagonal     benchmarks/compiled.py
                   module (DiagGRU, DiagLSTM), or a dense one where the      --bound (T = 1e3)
                   loop beats torch's kernel: ``COMPILED_BEATS_TORCH``
torch kernel       T <= 64 (a few dozen steps cost less than a few Newton    benchmarks/solve.py
(dense) / loop     iterations)
(diagonal)
torch kernel       dense module on a CPU with B D^2 > 2048, x2 when a        benchmarks/nn.py
                   backward pass follows (the fused kernel's backward costs  (--part gru)
                   about 2x its forward)
loop               diagonal module on a CPU with B D > 4096, x8 when a       benchmarks/nn.py
                   backward pass follows                                     --part diag
parallel           dense module otherwise ("quasi_newton" when D = 1);       benchmarks/nn.py
(newton)           DiagLSTM (exact Newton on its 2 x 2 blocks)
parallel           DiagGRU (its Jacobian is diagonal: exact Newton at        benchmarks/nn.py
(quasi_newton)     O(B T D) per iteration)                                   --part diag
=================  ========================================================  ======================

On CUDA (``paraseq.gpu.routing``, uncalibrated until ``benchmarks/gpu.py`` runs on a GPU):

=================  ========================================================  ======================
fused newton       DiagGRU/DiagLSTM, method "auto", "newton" or               benchmarks/gpu.py
(triton)           "quasi_newton": ``paraseq.gpu.diag_newton`` (one kernel
                   per iteration); GRU/RNN/LSTM with Newton (forced or by
                   "auto") and D <= 64: ``paraseq.gpu.dense_newton`` (a
                   GEMM, a kernel and the dense scan per iteration);
                   "(torch twin)" where triton is missing
torch kernel /     dense module, "auto": Newton where                         benchmarks/gpu.py
parallel (newton)  ``routing.newton_beats_cudnn`` (T >= 1e4, B D^2 <= 1024,
                   halved when training), else cuDNN; Newton with D > 64
                   or proj_size: the general path, ", general path: ..."
=================  ========================================================  ======================

These are the numbers of ``paraseq.solve.choose_method`` (``_CPU_PARALLEL_WORK``) with the
modules' training factors; ``tests/test_nn_dropin.py`` holds the table and ``choose_method``
to the same answers over a grid. A parallel "newton" on GRU, RNN and LSTM without proj_size,
and "newton" or "quasi_newton" on DiagGRU and DiagLSTM (CPU, numba), runs as the compiled
Newton sweeps of ``paraseq.cells.newton`` (its label stays "parallel (<method>)";
``SolveInfo.jacobian`` says "analytic (compiled sweep)").
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..cells import compiled
from ..gpu import routing as gpu_routing
from ..solve.api import _CPU_PARALLEL_WORK, _CPU_TRAINING_FACTOR

__all__ = ["COMPILED_BEATS_TORCH", "PATHS", "Path", "choose", "compiled_beats_torch", "label"]


@dataclass(frozen=True)
class Path:
    """One row: the label ``last_path`` reads, the condition in words, and the benchmark
    command whose numbers set it."""

    label: str
    when: str
    measured_by: str


PATHS = (
    Path("compiled loop", "CPU, float32/float64, numba; diagonal module, or dense where "
         "COMPILED_BEATS_TORCH", "python benchmarks/compiled.py --bound"),
    Path("torch kernel / loop", "T <= 64", "python benchmarks/solve.py"),
    Path("torch kernel", "dense, CPU, B D^2 > 2048 (x2 training)",
         "python benchmarks/nn.py --part gru"),
    Path("loop", "diagonal, CPU, B D > 4096 (x8 training)", "python benchmarks/nn.py --part diag"),
    Path("parallel (newton)", "dense (D > 1) or DiagLSTM otherwise",
         "python benchmarks/nn.py"),
    Path("parallel (quasi_newton)", "DiagGRU, or dense with D = 1, otherwise",
         "python benchmarks/nn.py --part diag"),
    Path("fused newton (triton)", "CUDA: DiagGRU/DiagLSTM with auto/newton/quasi_newton; "
         "GRU/RNN/LSTM with newton and D <= 64 (paraseq.gpu.routing)",
         "python benchmarks/gpu.py"),
    Path("fused newton (torch twin)", "as above where triton is not installed",
         "python benchmarks/gpu.py"),
)

SHORT_T = 64
"""T at or below which the sequential path runs (row 2)."""

DENSE_TRAINING_FACTOR = 2
"""How much further the parallel path pays when a backward pass follows, against torch's fused
kernels (measured on the 2-core CPU, GRU, T = 1e3: newton against torch.nn.GRU goes from
1.35x to 2.8x at hidden 8, batch 16, and from 0.17x to 0.37x at hidden 32, batch 16)."""

DIAGONAL_TRAINING_FACTOR = _CPU_TRAINING_FACTOR
"""The diagonal modules' sequential path is a loop whose backward is autograd's (8x)."""

COMPILED_LOOPS = {"GRU": "gru_sequence", "RNN_TANH": "elman_sequence",
                  "RNN_RELU": "elman_sequence", "LSTM": "lstm_sequence"}
"""The compiled sequential loops of ``paraseq.cells.compiled`` by mode (a (K H,) weight_hh is
the diagonal recurrence of DiagGRU/DiagLSTM). A name missing from that module is not used."""


def compiled_beats_torch(mode: str, B: int, H: int, training: bool) -> bool:
    """Where the compiled loop beats torch's fused kernel on a CPU (``benchmarks/compiled.py
    --bound``: T = 1e3, float32, one layer, 2-core Xeon, ratios taken in one run). GRU: up to
    B H = 8192 (about 1.0x at B = 256, H >= 64); training also H <= 128 (B = 16, H = 256:
    0.79x, the per-lane weight-gradient accumulators leave the caches). Elman: B H <= 8192
    (B = 256, H = 64: 0.89x); training B H <= 4096 (B = 64, H = 128: 0.94x). LSTM, whose
    torch kernel is oneDNN's and far faster than its GRU: H <= 8 (1.3x to 2.7x up to
    B = 256) or B = 1 and H <= 128 (1.23x); training H <= 8 and B <= 16, or B = 1 and
    H <= 32 (B = 64, H = 8: 0.87x; B >= 16 with H >= 32: 0.48x to 0.76x)."""
    if mode == "GRU":
        return B * H <= 8192 and (not training or H <= 128)
    if mode in ("RNN_TANH", "RNN_RELU"):
        return B * H <= (4096 if training else 8192)
    if training:
        return (H <= 8 and B <= 16) or (B == 1 and H <= 32)
    return (H <= 8 and B <= 256) or (B == 1 and H <= 128)


COMPILED_BEATS_TORCH = compiled_beats_torch
"""Row 1's condition for the dense modules (the name the table uses)."""


def compiled_loop(mode: str):
    """The compiled loop of ``paraseq.cells.compiled`` for this mode, or None."""
    name = COMPILED_LOOPS.get(mode)
    return None if name is None else getattr(compiled, name, None)


def compiled_pays(mode: str, diagonal: bool, x: Tensor, B: int, H: int, training: bool) -> bool:
    """Row 1: the sequential path is a compiled loop rather than torch's fused kernel (dense
    modules) or a Python loop (diagonal ones)."""
    if compiled_loop(mode) is None or not compiled.supported(x):
        return False
    return diagonal or compiled_beats_torch(mode, B, H, training)


def choose(method: str, mode: str, diagonal: bool, x: Tensor, T: int, B: int, H: int, D: int,
           training: bool) -> str:
    """The method a forward runs: "compiled" (row 1), "sequential" (torch's kernel for a dense
    module, a loop for a diagonal one) or a ``solve_recurrence`` method; ``method`` is the
    module's own (``"auto"`` walks the table)."""
    if method not in ("auto", "sequential"):
        return method
    if method == "auto" and diagonal and gpu_routing.serves(x):
        return "newton"  # the modules run it as the fused kernels (paraseq.gpu)
    if method == "auto" and not diagonal and x.device.type == "cuda":
        if T > SHORT_T and gpu_routing.newton_beats_cudnn(B, T, D, training):
            return "quasi_newton" if D == 1 else "newton"
        return "sequential"
    if compiled_pays(mode, diagonal, x, B, H, training):
        return "compiled"
    if method == "sequential" or T <= SHORT_T:
        return "sequential"
    cpu = x.device.type == "cpu"
    if diagonal:
        if cpu and B * D > _CPU_PARALLEL_WORK["diagonal"] * (
                DIAGONAL_TRAINING_FACTOR if training else 1):
            return "sequential"
        return "quasi_newton" if mode == "GRU" else "newton"
    if cpu and B * D * D > _CPU_PARALLEL_WORK["analytic"] * (
            DENSE_TRAINING_FACTOR if training else 1):
        return "sequential"
    return "quasi_newton" if D == 1 else "newton"


def label(method: str, diagonal: bool, device=None) -> str:
    """What ``last_path`` reads for a method ``choose`` returned ("fused": the fused Newton
    path of ``paraseq.gpu`` on ``device``)."""
    if method == "fused":
        return gpu_routing.label(device, dense_cell=not diagonal)
    if method == "sequential":
        return "loop" if diagonal else "torch kernel"
    if method == "compiled":
        return "compiled loop"
    return f"parallel ({method})"
