"""``paraseq.nn.RNN``, ``GRU``, ``LSTM``: torch.nn's recurrent layers, parallel over time.

Shape letters: T time, B batch, n input size, H hidden size, P proj_size (LSTM), L layers,
Dn directions (1 or 2), K gates (RNN 1, GRU 3, LSTM 4), Hout = P if P > 0 else H.

Each module has exactly torch.nn.RNN/GRU/LSTM's constructor, parameter names and shapes
(weight_ih_l0, weight_hh_l0_reverse, bias_ih_l1, weight_hr_l0, ...), registration order and
initialisation (every parameter uniform(-1/sqrt(H), 1/sqrt(H)) in torch's order, so one seed
gives the same weights), so ``load_state_dict`` works in both directions, and the forward
signature and results of torch's: ``forward(input, hx=None) -> (output, h_n)`` (LSTM:
``(output, (h_n, c_n))``), time-major or ``batch_first``, batched or unbatched,
PackedSequence in and out. Keyword-only extras choose how the recurrence is solved:

    method     "auto" (default), "sequential", or a parallel method of ``solve_recurrence``
               ("newton", "quasi_newton", "damped_newton", "picard", "jacobi")
    tol, max_iter, on_failure   passed to ``solve_recurrence`` (see there). With tol=None
               (the default) each solve is accepted at ``DEFAULT_TOL`` and then refined
               towards the rounding floor ``FLOOR_TOL`` (see "Accuracy" below); a tol given
               by the caller is solve_recurrence's residual rule exactly, with no refinement
    iterations a fixed iteration count K, for training with K fixed (ParaRNN's habit): the
               fused Newton paths (CUDA, paraseq.gpu) run exactly K iterations with no
               host synchronisation between them; every other parallel path runs at most K
               (stopping early once converged) and returns the iterate as reached, without
               fallback. The residual reached is in ``last_solve_info`` (``converged`` says
               whether it is under tol). Sequential paths solve exactly and ignore it.
               Exclusive with max_iter.

On CUDA, DiagGRU and DiagLSTM with "auto", "newton" or "quasi_newton" run the fused Newton of
``paraseq.gpu`` (one Triton kernel per iteration and one for the backward; ``last_path``
"fused newton (triton)", or "(torch twin)" without triton), and "auto" on the dense modules
follows ``paraseq.gpu.routing.newton_beats_cudnn`` (uncalibrated until benchmarks/gpu.py
runs on a GPU). GRU, RNN and LSTM (without proj_size) whose Newton runs there (forced or
chosen) take ``paraseq.gpu.dense_newton`` (per iteration a GEMM, one Triton kernel and the
dense Triton scan; the same labels) while the state fits its kernels (D <= 64: hidden <= 64,
LSTM hidden <= 32); beyond, the general Newton, ``last_path`` "parallel (newton), general
path: state D=<D> > 64". CPU behaviour is as described below.

How a forward runs. ``method="sequential"`` calls torch's own fused kernels (torch.gru,
torch.lstm, ...): exactly torch.nn's numbers at torch.nn's speed. A parallel method runs each
layer and direction as one ``solve_recurrence``: the input products W_ih x + b_ih of all T steps
in one matmul, then Newton (or the chosen method) over the recurrent half with the analytic
Jacobians of ``paraseq.nn._gated``; the backward pass is the implicit adjoint (one reverse
scan per layer and direction), exact whatever method the forward used. On a CPU (float32 or
float64, numba installed) ``method="newton"`` on GRU, RNN and LSTM (without proj_size), and
"newton" and "quasi_newton" on DiagGRU and DiagLSTM (an elementwise sweep), run as the
compiled sweeps of
``paraseq.cells.newton``: the same Newton iteration and stopping rule, matrix-free, one pass
over memory per iteration, with the compiled loop's reverse sweep as its adjoint
(``SolveInfo.jacobian`` reads "analytic (compiled sweep)"; ``NEWTON_SWEEPS = False`` sends it
through ``solve_recurrence`` instead). ``"auto"`` walks the table of ``paraseq.nn._paths``
(path, condition, the benchmark behind it; T, B, H, device, whether a backward pass will
follow): the compiled loop where it beats torch's kernel on a CPU, torch's fused kernels for
short sequences (T <= 64), decoding and wide batches, a parallel method otherwise.

Drop-in beyond the numbers. RNN, GRU and LSTM are instances of torch.nn.RNN/GRU/LSTM and
torch.nn.RNNBase (torch's flat-weight bookkeeping, pickling and ``.to()`` included), so code
that dispatches on torch's classes treats them as torch's; DiagGRU and DiagLSTM are not (their
(K H,) weight_hh is no torch layout). A mistake raises what torch.nn raises, torch's message
first and paraseq's hint after it (``paraseq.nn._checks``; where torch raises RuntimeError for
a bad input, ``RNNInputError`` is a RuntimeError and a ValueError). An empty batch returns
outputs that backpropagate (zero gradients), as torch's. Every path is twice differentiable
and takes batched gradients: torch's kernel by itself, the compiled loop, the Newton sweeps
and ``solve_recurrence`` through ``paraseq.nn._twice`` (a plain backward runs the path's own
adjoint; ``create_graph=True`` or batched grad_outputs replay the layer in torch ops).

``step(x_t, hx)`` advances the state by one time step (streaming inference); it runs the cells
directly. Results equal ``forward`` on the whole sequence step by step.

Padding and PackedSequence: packed input is supported. Each sequence is solved over the padded
length, and every direction runs inside each sequence's own length (the reverse direction
starts at each sequence's last valid step), so padding never changes a valid position's result;
h_n holds each sequence's state at its own last step, as torch's.

torch.compile: the modules work under torch.compile (fullgraph=False); the input
projections, concatenations and dropout are compiled, while the solver and torch's fused
kernels run eagerly behind ``torch.compiler.disable``. The reasons: a parallel solve tests
convergence on the host after each iteration (a data-dependent stop, which Dynamo would retrace
for every iteration count), and Inductor lowers torch.gru/lstm by unrolling time (T copies of
the cell in one graph). So ``fullgraph=True`` cannot work, and compiling buys little here: the
solver's work is already a few large batched ops per iteration. ``tests/test_nn.py`` checks
compiled against eager results and gradients.

Accuracy. A solve stops on its residual r = max_t |h_t - f(x_t, h_{t-1})| (scaled), but
what the modules promise is the error of the states, and an error e solves
e_t = J_t e_{t-1} + r_t: the residual is amplified by the recurrence itself (measured:
error / residual up to ~10 in float32 for small 2-layer LSTMs; torch's own rounding is
amplified alike). A residual just under tol = 1e-6 therefore left float32 outputs up to
1.1e-5 from torch.nn's (a 2-layer bidirectional LSTM with proj_size, quasi_newton), and up to
7e-6 for newton, quasi_newton and damped_newton alike over 150 random configurations. So with
tol=None a solve accepted at ``DEFAULT_TOL`` is refined, from its own result and by the same
method, towards ``FLOOR_TOL`` (about one float32 ulp, where the residual stops falling): at
most as many iterations as the contraction rate of its last iterations says reach it, plus
one (Newton, quadratic: usually one or none; quasi_newton two or three; jacobi more), and the
refined result is kept only if its residual is lower. Over the same configurations every
method is then within 1.2e-6 of torch.nn in float32 and 1.2e-13 in float64, for 10% (newton)
to 17% (quasi_newton) more iterations.

Every forward of a parallel path leaves the ``SolveInfo`` of each layer and direction in
``module.last_solve_info`` (a list, layer-major; empty after a sequential forward; its
iterations and residuals include the refinement), and names its path in
``module.last_path``: "torch kernel", "compiled loop", "loop" (the diagonal modules'
sequential path), "parallel (<method>)" (on CUDA with ", general path: <why>" where a dense
Newton could not take the fused kernel), or "fused newton (triton)" / "(torch twin)" (CUDA),
followed by ", fell back at t=<first step> (<k> of <n> solves)" when a solve fell back
(``on_failure="fallback"``: finished by a restart or the sequential loop from that step on).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .._compile import eager
from ..cells import compiled, newton
from ..gpu import routing as _gpu_routing
from ..result import SolveInfo
from ..solve import solve_recurrence
from ..solve.api import DEFAULT_MAX_ITER, ON_FAILURE
from ..solve.methods import METHODS
from . import _paths
from ._checks import (
    RNNInputError,
    check_constructor,
    check_hx,
    check_input,
    check_length,
    proj_size_error,
)
from ._gated import DiagLSTMGated, ElmanGated, GRUGated, LSTMGated, ProjLSTMGated
from ._twice import twice

__all__ = ["DEFAULT_TOL", "FLOOR_TOL", "GRU", "LSTM", "RNN", "DiagGRU", "DiagLSTM",
           "RNNInputError"]

DEFAULT_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2,
               torch.float16: 2e-3}
"""The modules' acceptance tolerance by dtype (``tol=None``): 10x (float32) and 100x (float64)
tighter than ``solve_recurrence``'s. A solve whose residual is not under it falls back, raises
or warns (``on_failure``); one that is gets refined towards ``FLOOR_TOL``."""

FLOOR_TOL = {torch.float64: 1e-14, torch.float32: 1e-7}
"""Where the refinement after an accepted solve aims (``tol=None``): about one ulp of a unit
state, the residual's rounding floor (measured 6e-8 to 1.2e-7 in float32 for hidden sizes
3 to 6). Reached or not (a floor above it only stops the refinement early), the refined
residual is what bounds the error. None for bfloat16/float16: their tol is their floor."""

_REFINE_MAX_ITER = 25
"""A cap on the refinement's iterations (linear convergence at the clamped rate 0.9 from
1e-6 to 1e-7 takes 22); a refinement that stops helping stops after solve_recurrence's
patience (8 iterations without halving the residual) anyway."""

NEWTON_SWEEPS = True
"""method="newton" on the GRU, RNN and LSTM modules runs as ``paraseq.cells.newton``'s compiled
sweeps where they serve (``_sweeps_newton``); False sends it through ``solve_recurrence``."""

_SWEEP_CELLS = {"GRU": compiled._GRU, "RNN_TANH": compiled._ELMAN_TANH,
                "RNN_RELU": compiled._ELMAN_RELU, "LSTM": compiled._LSTM}


_compiled_beats_torch = _paths.compiled_beats_torch  # the table's row 1 (paraseq.nn._paths)

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
_NATIVE = {"RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu, "GRU": torch.gru,
           "LSTM": torch.lstm}


def _check_int(owner: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}; got {value}")
    return int(value)


class _RNNBase(nn.Module):
    """The shared machinery; subclasses set ``mode`` and, for the diagonal-recurrence
    variants, ``_diagonal = True`` (weight_hh of shape (K H,) instead of (K H, H))."""

    _diagonal = False

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None, *,
                 method: str = "auto", tol: float | None = None, max_iter: int | None = None,
                 on_failure: str = "fallback", iterations: int | None = None) -> None:
        name = type(self).__name__
        input_size, hidden_size, num_layers, proj_size, dropout = check_constructor(
            name, mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
            proj_size)
        if method != "auto" and method not in METHODS:
            raise ValueError(f"{name}: unknown method {method!r}; valid: 'auto', "
                             + ", ".join(repr(m) for m in METHODS))
        if on_failure not in ON_FAILURE:
            raise ValueError(f"{name}: on_failure must be one of "
                             f"{', '.join(repr(o) for o in ON_FAILURE)}; got {on_failure!r}")
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real)
                                or not math.isfinite(tol) or tol <= 0):
            raise ValueError(f"{name}: tol must be a positive finite number or None; got "
                             f"{tol!r}")
        if max_iter is not None:
            _check_int(name, "max_iter", max_iter, 1)
        if iterations is not None:
            _check_int(name, "iterations", iterations, 1)
            if max_iter is not None:
                raise ValueError(f"{name}: give iterations (a fixed Newton count) or max_iter "
                                 f"(a cap), not both; got iterations={iterations}, "
                                 f"max_iter={max_iter}")
        # nn.Module's, not torch.nn.RNNBase's __init__ (next in the dense modules' MRO): the
        # parameters are registered below, torch's way, and its flat-weight lists after them
        nn.Module.__init__(self)
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = dropout
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.method = method
        self.tol = tol
        self.max_iter = max_iter
        self.on_failure = on_failure
        self.iterations = iterations
        self.last_solve_info: list = []
        self.last_path = ""
        factory = {"device": device, "dtype": dtype}
        K = _GATES[mode]
        dirs = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(dirs):
                layer_input = input_size if layer == 0 else real_hidden * dirs
                suffix = "_reverse" if direction == 1 else ""
                shapes = [("weight_ih", (K * hidden_size, layer_input)),
                          ("weight_hh", (K * hidden_size,) if self._diagonal
                           else (K * hidden_size, real_hidden))]
                if bias:
                    shapes += [("bias_ih", (K * hidden_size,)), ("bias_hh", (K * hidden_size,))]
                if proj_size > 0:
                    shapes.append(("weight_hr", (proj_size, hidden_size)))
                names = []
                for base, shape in shapes:
                    pname = f"{base}_l{layer}{suffix}"
                    setattr(self, pname, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(pname)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self._init_flat_weights()
        self.reset_parameters()

    # -- torch.nn.RNNBase's surface ----------------------------------------------------------

    def reset_parameters(self) -> None:
        """Every parameter uniform(-1/sqrt(H), 1/sqrt(H)), in registration order (torch's)."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """The parameters per layer and direction, as torch.nn.RNNBase.all_weights."""
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.method != "auto":
            s += ", method={method!r}"
        if self._fixed_iterations is not None:
            s += f", iterations={self._fixed_iterations}"
        return s.format(**self.__dict__)

    @property
    def _fixed_iterations(self) -> int | None:
        """``iterations`` (None on modules pickled before it existed)."""
        return getattr(self, "iterations", None)

    # -- shapes --------------------------------------------------------------------------------

    @property
    def _dirs(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _hout(self) -> int:
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _state_sizes(self) -> tuple[int, ...]:
        """Feature sizes of the state tensors: (Hout,) or, for LSTM, (Hout, H)."""
        return (self._hout, self.hidden_size) if self.mode == "LSTM" else (self._hout,)

    def _layer_params(self, layer: int, direction: int) -> dict[str, Tensor]:
        names = self._all_weights[layer * self._dirs + direction]
        return {n.rsplit("_l", 1)[0]: getattr(self, n) for n in names}

    def _cell(self, layer: int, direction: int):
        return self._make_cell(self._layer_params(layer, direction))

    def _make_cell(self, p: dict[str, Tensor | None]):
        """The cell of one layer and direction over its parameters ``p`` (weight_hh, ...)."""
        w_hh, b_hh = p["weight_hh"], p.get("bias_hh")
        if self.mode == "LSTM":
            if self.proj_size > 0:
                return ProjLSTMGated(w_hh, b_hh, p["weight_hr"])
            return DiagLSTMGated(w_hh, b_hh) if self._diagonal else LSTMGated(w_hh, b_hh)
        if self.mode == "GRU":
            return GRUGated(w_hh, b_hh)
        return ElmanGated(w_hh, b_hh, "tanh" if self.mode == "RNN_TANH" else "relu")

    def _check_hx(self, hx, batch: int, batched: bool, like: Tensor) -> tuple[Tensor, ...]:
        """hx as a tuple of (L Dn, B, size) tensors (zeros when None)."""
        LD = self.num_layers * self._dirs
        want = tuple((LD, batch, s) for s in self._state_sizes())
        if hx is None:
            return tuple(like.new_zeros(w) for w in want)
        return check_hx(type(self).__name__, self.mode == "LSTM", hx, want, batched, like)

    def _check_input(self, x: object, packed: bool = False) -> Tensor:
        return check_input(type(self).__name__, x, self.input_size, self.weight_ih_l0, packed)

    # -- forward -------------------------------------------------------------------------------

    def _choose(self, x: Tensor, T: int, B: int, training: bool) -> str:
        """The table of ``paraseq.nn._paths``: "compiled", "sequential" (torch's kernel, or the
        diagonal modules' loop) or a parallel method."""
        return _paths.choose(self.method, self.mode, self._diagonal, x, T, B, self.hidden_size,
                             sum(self._state_sizes()), training)

    def _wants_grad(self, x: Tensor, hx) -> bool:
        if not torch.is_grad_enabled():
            return False
        parts = () if hx is None else (hx if isinstance(hx, (tuple, list)) else (hx,))
        return (x.requires_grad or any(p.requires_grad for p in parts)
                or any(p.requires_grad for p in self.parameters()))

    def forward(self, input, hx=None):
        """(output, h_n), or (output, (h_n, c_n)) for LSTM, as torch.nn's module returns.

        input (T, B, n) ((B, T, n) with batch_first), (T, n) unbatched, or a PackedSequence;
        hx (L Dn, B, Hout) (LSTM: (h_0, c_0) with c_0 (L Dn, B, H)), or None for zeros.
        output (T, B, Dn Hout) (batch_first: (B, T, Dn Hout); a PackedSequence for packed
        input); h_n (L Dn, B, Hout).
        """
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            data, batch_sizes, sorted_idx, unsorted_idx = input
            self._check_input(data, packed=True)
            T, B = batch_sizes.numel(), int(batch_sizes[0])
            mask = (torch.arange(B).unsqueeze(0) < batch_sizes.unsqueeze(1))  # (T, B)
            x = data.new_zeros(T, B, data.shape[-1])  # (T, B, n), sorted batch order
            x[mask.to(data.device)] = data
            lengths = mask.sum(0)  # (B,) in sorted order, non-increasing
            batched = True
            if hx is not None and sorted_idx is not None:
                hx = _permute_hx(hx, sorted_idx)
        else:
            x = self._check_input(input)
            batched = x.dim() == 3
            if not batched:
                x = x.unsqueeze(1)  # (T, 1, n)
            elif self.batch_first:
                x = x.transpose(0, 1)  # (T, B, n)
            T, B = x.shape[:2]
        state = self._check_hx(hx, B, batched, x)  # each (L Dn, B, size)
        check_length(type(self).__name__, T)
        training = self._wants_grad(x, hx)
        method = self._choose(x, T, B, training)
        unfused = ""  # why a Newton on the fused path's device runs the general path
        if method in ("newton", "quasi_newton") and _gpu_routing.serves(x):
            if self._diagonal:
                method = "fused"  # paraseq.gpu's fused Newton (CUDA)
            else:
                cell, unfused = _gpu_routing.dense_route(self.mode, self.hidden_size, method,
                                                         self.proj_size)
                if cell is not None:
                    method = "fused"  # paraseq.gpu's dense fused Newton (CUDA)
        self.last_solve_info = []
        self.last_path = _paths.label(method, self._diagonal, x.device)
        if unfused:
            self.last_path += f", {unfused}"
        if B == 0:  # an empty batch: nothing to run, but a graph to backpropagate, as torch's
            link = sum((w.sum() * 0 for w in self._flat_weights), x.sum() * 0)
            out = x.new_zeros(T, 0, self._dirs * self._hout) + link
            state_n = tuple(s + link for s in state)
        elif method == "sequential" and not self._diagonal:
            out, state_n = self._native(x, state, batch_sizes if packed else None,
                                        data if packed else None)
            if packed:
                return self._pack_out(out, input, state_n, unsorted_idx, native=True)
        else:
            out, state_n = self._parallel(x, state, lengths, method, training)  # (T, B, Dn Hout)
            if method == "fused":  # the twin, where the kernels failed to compile just now
                self.last_path = _paths.label(method, self._diagonal, x.device)
            self.last_path += _fallback_note(self.last_solve_info)
            if packed:
                return self._pack_out(out[mask.to(out.device)], input, state_n, unsorted_idx)
        if not batched:
            out = out.squeeze(1)
            state_n = tuple(s.squeeze(1) for s in state_n)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, (state_n if self.mode == "LSTM" else state_n[0])

    def _pack_out(self, data: Tensor, input: PackedSequence, state_n, unsorted_idx,
                  native: bool = False):
        out = PackedSequence(data, input.batch_sizes, input.sorted_indices,
                             input.unsorted_indices)
        if unsorted_idx is not None:
            state_n = tuple(s.index_select(1, unsorted_idx) for s in state_n)
        return out, (state_n if self.mode == "LSTM" else state_n[0])

    @eager
    def _native(self, x: Tensor, state: tuple[Tensor, ...], batch_sizes, data):
        """torch's fused kernels over the whole stack: (T, B, Dn Hout) (or packed data)."""
        fn = _NATIVE[self.mode]
        hx = state if self.mode == "LSTM" else state[0]
        weights = [getattr(self, n) for n in self._flat_weights_names]
        args = (weights, self.bias, self.num_layers, self.dropout, self.training,
                self.bidirectional)
        if batch_sizes is not None:
            res = fn(data, batch_sizes, hx, *args)
        else:
            res = fn(x, hx, *args, False)
        out = res[0]
        return out, tuple(res[1:])

    def _parallel(self, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None,
                  method: str, training: bool):
        """Layer by layer, direction by direction: ``_direction`` (when a backward pass
        follows, wrapped by ``paraseq.nn._twice`` so that it is twice differentiable)."""
        T, B = x.shape[:2]
        finals: list[list[Tensor]] = [[] for _ in state]  # per state tensor, (B, size) each
        layer_in = x  # (T, B, n)
        rev_idx = None if lengths is None else _reverse_index(lengths.to(x.device), T)
        last = None if lengths is None else (lengths.to(x.device) - 1)  # (B,)
        for layer in range(self.num_layers):
            outs = []
            for d in range(self._dirs):
                k = layer * self._dirs + d
                h0 = tuple(s[k] for s in state)  # each (B, size)
                names = self._all_weights[k]
                params = tuple(getattr(self, n) for n in names)
                keys = tuple(n.rsplit("_l", 1)[0] for n in names)
                reverse = rev_idx if d == 1 else None
                states = self._direction(layer_in, params, h0, keys, method, d == 1, reverse,
                                         training)  # each (B, T, size)
                for acc, s in zip(finals, states, strict=True):
                    acc.append(s[:, -1] if last is None else
                               s[torch.arange(B, device=s.device), last])
                h_seq = states[0]  # (B, T, Hout)
                outs.append(h_seq if d == 0 else _flip(h_seq, rev_idx))
            if len(outs) == 1:  # no copy where the kernel's layout is already (T, B, H)
                out = outs[0].transpose(0, 1).contiguous()  # (T, B, Hout)
            else:
                out = torch.cat([o.transpose(0, 1) for o in outs], dim=-1)  # (T, B, Dn Hout)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                out = F.dropout(out, self.dropout, True)
            layer_in = out
        return layer_in, tuple(torch.stack(f) for f in finals)

    @eager
    def _direction(self, layer_in: Tensor, params: tuple[Tensor, ...], h0: tuple[Tensor, ...],
                   keys: tuple[str, ...], method: str, backward_dir: bool,
                   rev_idx: Tensor | None, training: bool) -> tuple[Tensor, ...]:
        """One layer and direction over layer_in (T, B, n) from h0: the states (B, T, size)
        as a tuple (LSTM: (h, c)), in the direction's own time order."""
        n = len(keys)

        def run(x, *rest):
            return self._run_direction(x, dict(zip(keys, rest[:n], strict=True)), rest[n:],
                                       method, backward_dir, rev_idx)

        if not training:
            return run(layer_in, *params, *h0)

        def replay(x, *rest):
            return self._replay_direction(x, dict(zip(keys, rest[:n], strict=True)), rest[n:],
                                          backward_dir, rev_idx)

        return twice(run, replay, layer_in, *params, *h0)

    def _run_direction(self, layer_in: Tensor, p: dict[str, Tensor], h0: tuple[Tensor, ...],
                       method: str, backward_dir: bool, rev_idx: Tensor | None):
        """The fast path: the compiled loop, the compiled Newton sweeps or
        ``solve_recurrence`` (appending its ``SolveInfo`` to ``last_solve_info``)."""
        if method == "fused":
            gi = F.linear(layer_in, p["weight_ih"], p.get("bias_ih")).transpose(0, 1)
            if backward_dir:
                gi = _flip(gi, rev_idx)
            states, info = self._fused_newton(gi, h0, p)  # gi (B, T, K H)
            self.last_solve_info.append(info)
            return tuple(states) if self.mode == "LSTM" else (states,)
        fused = method in ("newton", "quasi_newton") and self._sweeps_newton(layer_in, method)
        if method == "compiled" or fused:  # laid out for the kernel that will run
            gi = compiled.input_projection(layer_in, p["weight_ih"], p.get("bias_ih"),
                                           self.hidden_size)
        else:
            gi = F.linear(layer_in, p["weight_ih"], p.get("bias_ih")).transpose(0, 1)
        # gi: (B, T, K H)
        if backward_dir:
            gi = _flip(gi, rev_idx)
        if method == "compiled":
            states = self._compiled_sequence(gi, h0, p)
        elif fused:
            states, info = self._newton_sweeps(gi, h0, p, method)
            self.last_solve_info.append(info)
        else:
            states, info = self._solve(self._make_cell(p), gi,
                                       h0 if self.mode == "LSTM" else h0[0], method)
            self.last_solve_info.append(info)
        return tuple(states) if self.mode == "LSTM" else (states,)

    def _replay_direction(self, layer_in: Tensor, p: dict[str, Tensor],
                          h0: tuple[Tensor, ...], backward_dir: bool, rev_idx: Tensor | None):
        """The same function as ``_run_direction`` in differentiable torch ops (for double
        backward and batched gradients): torch's own kernel for the dense GRU and RNN (cuDNN
        off: its backward is once-differentiable), else a loop over the cell."""
        x = layer_in.transpose(0, 1)  # (B, T, n)
        if backward_dir:
            x = _flip(x, rev_idx)
        if self.mode != "LSTM" and not self._diagonal:
            weights = [p["weight_ih"], p["weight_hh"]]
            if self.bias:
                weights += [p["bias_ih"], p["bias_hh"]]
            with torch.backends.cudnn.flags(enabled=False):
                out, _ = _NATIVE[self.mode](x, h0[0].unsqueeze(0), weights, self.bias, 1, 0.0,
                                            False, False, True)
            return (out,)
        gi = F.linear(x, p["weight_ih"], p.get("bias_ih"))  # (B, T, K H)
        cell = self._make_cell(p)
        state = h0 if self.mode == "LSTM" else h0[0]
        seq = []
        for t in range(gi.shape[1]):
            state = cell(gi[:, t], state)
            seq.append(state if self.mode == "LSTM" else (state,))
        return tuple(torch.stack(parts, 1) for parts in zip(*seq, strict=True))

    def _compiled_sequence(self, gi: Tensor, h0: tuple[Tensor, ...], p: dict[str, Tensor]):
        """The compiled loop of this mode over gi (B, T, K H) from h0: (B, T, Hout), or for
        LSTM the tuple (h (B, T, Hout), c (B, T, H))."""
        fn = _compiled_loop(self.mode)
        w, b = p["weight_hh"], p.get("bias_hh")
        if self.mode == "LSTM":
            return fn(gi, h0[0], h0[1], w, b, p.get("weight_hr"))
        if self.mode in ("RNN_TANH", "RNN_RELU"):
            return fn(gi, h0[0], w, b, "tanh" if self.mode == "RNN_TANH" else "relu")
        return fn(gi, h0[0], w, b)

    def _sweeps_newton(self, x: Tensor, method: str = "newton") -> bool:
        """Whether ``method`` runs as the compiled Newton sweeps of ``paraseq.cells.newton``
        (CPU float32/float64, numba): "newton" on GRU, tanh/relu RNN and LSTM without
        proj_size, and "newton" and "quasi_newton" on DiagGRU and DiagLSTM (an elementwise
        sweep); the same iteration as ``solve_recurrence``'s, matrix-free and fused into one
        pass per iteration (``NEWTON_SWEEPS = False`` turns it off)."""
        if method == "quasi_newton" and not self._diagonal:
            return False
        return (NEWTON_SWEEPS and self.mode in _SWEEP_CELLS
                and not getattr(self, "proj_size", 0) and newton.supported(x.transpose(0, 1)))

    @eager
    def _newton_sweeps(self, gi: Tensor, h0: tuple[Tensor, ...], p: dict[str, Tensor],
                       method: str = "newton"):
        """One layer and direction by ``paraseq.cells.newton``: (states (B, T, H), or the LSTM's
        (h, c), info), with the modules' tolerances (tol=None: accepted at ``DEFAULT_TOL``,
        refined towards ``FLOOR_TOL``) and ``on_failure``."""
        T = gi.shape[1]
        if self.tol is None:
            accept, target = DEFAULT_TOL[gi.dtype], FLOOR_TOL[gi.dtype]
        else:
            accept = target = self.tol
        cap = self.max_iter if self.max_iter is not None else \
            min(DEFAULT_MAX_ITER[method], T) + _REFINE_MAX_ITER
        on_failure = self.on_failure
        if self._fixed_iterations is not None:  # at most K sweeps, the iterate as reached
            cap, on_failure = self._fixed_iterations, "warn"
        b = p.get("bias_hh")
        w = p["weight_hh"]
        lstm = self.mode == "LSTM"
        with warnings.catch_warnings():
            if self._fixed_iterations is not None:
                warnings.filterwarnings("ignore", message="solve_recurrence: method=",
                                        category=RuntimeWarning)
            return newton.newton_sequence(_SWEEP_CELLS[self.mode], gi, h0[0].to(gi.dtype), w,
                                          w.new_zeros(w.shape[0]) if b is None else b,
                                          target=target, accept=accept, max_iter=cap,
                                          on_failure=on_failure,
                                          c0=h0[1].to(gi.dtype) if lstm else None,
                                          method=method)

    @eager
    def _fused_newton(self, gi: Tensor, h0: tuple[Tensor, ...], p: dict[str, Tensor]):
        """One layer and direction of DiagGRU/DiagLSTM by ``paraseq.gpu.diag_newton``, or of
        GRU/RNN/LSTM by ``paraseq.gpu.dense_newton`` (the fused kernels): tol=None accepts at
        ``DEFAULT_TOL`` and aims at ``FLOOR_TOL`` (bfloat16/float16:
        ``paraseq.gpu.LOW_PRECISION_TOL``, solved in float32);
        ``iterations=K`` runs exactly K iterations and reports the residual reached."""
        from ..gpu import dense as gpu_dense
        from ..gpu import newton as gpu_newton

        if self.tol is not None:
            accept = target = self.tol
        elif gi.dtype in gpu_newton.LOW_PRECISION_TOL:
            accept = target = gpu_newton.LOW_PRECISION_TOL[gi.dtype]
        else:
            accept, target = DEFAULT_TOL[gi.dtype], FLOOR_TOL[gi.dtype]
        cap = None
        if self._fixed_iterations is None:
            T = gi.shape[1]
            cap = self.max_iter if self.max_iter is not None else \
                min(DEFAULT_MAX_ITER["newton"], T) + _REFINE_MAX_ITER
        lstm = self.mode == "LSTM"
        if not self._diagonal:  # GRU, RNN, LSTM: the dense kernel (paraseq.gpu.dense)
            return gpu_dense.dense_newton(
                _gpu_routing.MODE_CELLS[self.mode], gi, h0[0], p["weight_hh"],
                p.get("bias_hh"), h0[1] if lstm else None, tol=accept, target=target,
                max_iter=cap, iterations=self._fixed_iterations, on_failure=self.on_failure)
        return gpu_newton.diag_newton(
            "lstm" if lstm else "gru", gi, h0[0], p["weight_hh"], p.get("bias_hh"),
            h0[1] if lstm else None, tol=accept, target=target, max_iter=cap,
            iterations=self._fixed_iterations, on_failure=self.on_failure)

    @eager
    def _solve(self, cell, gi: Tensor, h0, method: str) -> tuple[object, SolveInfo]:
        """One layer and direction: ``solve_recurrence`` over gi (B, T, K H) from h0, then,
        with tol=None, the refinement towards ``FLOOR_TOL`` (module docstring, "Accuracy")."""
        kw = dict(method=method, return_info=True)
        if self._fixed_iterations is not None:  # at most K iterations, the iterate as reached
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="solve_recurrence: method=",
                                        category=RuntimeWarning)
                return solve_recurrence(cell, gi, h0, tol=self.tol or DEFAULT_TOL.get(
                    gi.dtype, 1e-6), max_iter=self._fixed_iterations, on_failure="warn", **kw)
        if self.tol is not None:
            return solve_recurrence(cell, gi, h0, tol=self.tol, max_iter=self.max_iter,
                                    on_failure=self.on_failure, **kw)
        tol = DEFAULT_TOL.get(gi.dtype, 1e-6)
        states, info = solve_recurrence(cell, gi, h0, tol=tol, max_iter=self.max_iter,
                                        on_failure=self.on_failure, **kw)
        floor = FLOOR_TOL.get(gi.dtype)
        if floor is None or not info.converged or info.residual <= floor:
            return states, info
        budget = _REFINE_MAX_ITER if self.max_iter is None else \
            min(_REFINE_MAX_ITER, self.max_iter - info.iterations)
        k = min(budget, _refine_iterations(info.residuals, floor))
        if k < 1:
            return states, info
        init = tuple(s.detach() for s in states) if isinstance(states, tuple) else \
            states.detach()
        with warnings.catch_warnings():  # a floor above FLOOR_TOL is no failure
            warnings.filterwarnings("ignore", message="solve_recurrence: method=",
                                    category=RuntimeWarning)
            refined, rinfo = solve_recurrence(cell, gi, h0, tol=floor, max_iter=k, init=init,
                                              on_failure="warn", **kw)
        if not rinfo.residual < info.residual:  # nan-safe: keep the accepted solve
            return states, info
        return refined, dataclasses.replace(
            info, iterations=info.iterations + rinfo.iterations, residual=rinfo.residual,
            residuals=info.residuals + rinfo.residuals)

    # -- streaming -----------------------------------------------------------------------------

    def step(self, input: Tensor, hx=None):
        """One time step: (output_t, h_new) from input (B, n) (or unbatched (n,)) and hx in
        forward's format (None: zeros). output_t is (B, Hout), the last layer's new h; h_new
        is (L, B, Hout) (LSTM: (h, c)). Unidirectional modules only: a reverse direction needs
        the future. ``forward`` over a sequence equals ``step`` applied along it."""
        name = type(self).__name__
        if self.bidirectional:
            raise ValueError(f"{name}.step: a bidirectional module cannot run step by step "
                             f"(its reverse direction reads the future); use forward")
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{name}.step: input must be (B, n) or unbatched (n,); got {shape}")
        x = self._check_input(input.unsqueeze(0))[0]
        batched = x.dim() == 2
        if not batched:
            x = x.unsqueeze(0)  # (1, n)
        state = self._check_hx(hx, x.shape[0], batched, x)
        news: list[list[Tensor]] = [[] for _ in state]
        inp = x  # (B, n)
        for layer in range(self.num_layers):
            p = self._layer_params(layer, 0)
            gi = F.linear(inp, p["weight_ih"], p.get("bias_ih"))  # (B, K H)
            h = tuple(s[layer] for s in state)
            new = self._cell(layer, 0)(gi, h if self.mode == "LSTM" else h[0])
            new = tuple(new) if self.mode == "LSTM" else (new,)
            for acc, s in zip(news, new, strict=True):
                acc.append(s)
            inp = new[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                inp = F.dropout(inp, self.dropout, True)
        state_n = tuple(torch.stack(a) for a in news)  # each (L, B, size)
        out = new[0]
        if not batched:
            out, state_n = out.squeeze(0), tuple(s.squeeze(1) for s in state_n)
        return out, (state_n if self.mode == "LSTM" else state_n[0])


_compiled_loop = _paths.compiled_loop


def _refine_iterations(residuals: list[float], floor: float) -> int:
    """How many more iterations take the residual from residuals[-1] to ``floor`` at the
    contraction rate the last residuals show, plus one. The rate is the slower of the last
    ratio and the geometric mean of the last four (jacobi's residuals oscillate on its way
    down), clamped to [1e-3, 0.9] (a quadratic convergence reads as a fast linear one)."""
    r = residuals[-1]
    tail = [v for v in residuals[-5:] if v > 0 and math.isfinite(v)]
    if len(tail) < 2 or tail[-1] != r:
        rate = 0.5
    else:
        rate = max(tail[-1] / tail[-2], (tail[-1] / tail[0]) ** (1 / (len(tail) - 1)))
        rate = min(max(rate, 1e-3), 0.9)
    return max(1, math.ceil(math.log(floor / r) / math.log(rate))) + 1


def _fallback_note(infos: list[SolveInfo]) -> str:
    """", fell back at t=<first step> (<k> of <n> solves)" when any solve fell back, else ""."""
    fell = [i for i in infos if i.fell_back]
    if not fell:
        return ""
    t = min(i.fallback_from for i in fell if i.fallback_from is not None)
    return f", fell back at t={t} ({len(fell)} of {len(infos)} solves)"


def _permute_hx(hx, index: Tensor):
    if isinstance(hx, (tuple, list)):
        return tuple(h.index_select(1, index) for h in hx)
    return hx.index_select(1, index)


def _reverse_index(lengths: Tensor, T: int) -> Tensor:
    """idx (B, T) with idx[b, t] = len_b - 1 - t for t < len_b, else t: reverses each
    sequence inside its own length and leaves the padding where it is (an involution)."""
    t = torch.arange(T, device=lengths.device).unsqueeze(0)  # (1, T)
    L = lengths.unsqueeze(1)  # (B, 1)
    return torch.where(t < L, L - 1 - t, t)  # (B, T)


def _flip(x: Tensor, idx: Tensor | None) -> Tensor:
    """x (B, T, F) reversed in time (within each sequence's length when idx is given)."""
    if idx is None:
        return x.flip(1)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class RNN(_RNNBase, nn.RNN):
    """torch.nn.RNN (Elman, tanh or relu), parallel over time: same constructor, parameters,
    state_dict and results, plus keyword-only ``method``, ``tol``, ``max_iter``,
    ``on_failure`` (see ``paraseq.nn.rnn``). An instance of torch.nn.RNN and RNNBase."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None,
                 **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError(proj_size_error("RNN"))
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or "
                             f"'relu'. (RNN: nonlinearity={nonlinearity!r})")
        mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype, **_solver_kwargs("RNN", kwargs))
        self.nonlinearity = nonlinearity

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity!r}"


class GRU(_RNNBase, nn.GRU):
    """torch.nn.GRU, parallel over time: same constructor, parameters, state_dict and results,
    plus keyword-only ``method``, ``tol``, ``max_iter``, ``on_failure``. An instance of
    torch.nn.GRU and RNNBase."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError(proj_size_error("GRU"))
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype, **_solver_kwargs("GRU", kwargs))


class LSTM(_RNNBase, nn.LSTM):
    """torch.nn.LSTM (with proj_size), parallel over time: same constructor, parameters,
    state_dict and results, plus keyword-only ``method``, ``tol``, ``max_iter``,
    ``on_failure``. An instance of torch.nn.LSTM and RNNBase."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None,
                 **kwargs) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, device, dtype,
                         **_solver_kwargs("LSTM", kwargs))


class _Diagonal(_RNNBase):
    """The diagonal-recurrence modules: torch.nn.RNNBase's surface without being one of its
    instances. Their weight_hh_l{k} is a (K H,) vector where torch's is (K H, H), so code that
    dispatches on torch.nn.GRU/LSTM (initialisation by nn.init.orthogonal_, quantize_dynamic,
    ONNX export, cuDNN weight flattening) would fail or compute another model on them."""

    _diagonal = True

    def _init_flat_weights(self) -> None:
        """Nothing to do: ``_flat_weights`` reads the parameters each time."""

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    def flatten_parameters(self) -> None:
        """A no-op kept for drop-in compatibility: paraseq needs no cuDNN weight buffer."""


class DiagGRU(_Diagonal):
    """A GRU whose recurrent weights are diagonal (``paraseq.cells.DiagGRUCell`` per layer):
    weight_hh_l{k} is a (3 H,) vector used elementwise, so unit i reads only its own past.
    The Jacobian is diagonal, and exact Newton ("quasi_newton", which "auto" picks) costs
    O(T H) per iteration. torch.nn.GRU's interface otherwise (layers, directions, dropout,
    batch_first, packed input, step). ``method="sequential"`` is a Python loop over the cell
    (no fused kernel exists for it)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError(proj_size_error("DiagGRU"))
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype,
                         **_solver_kwargs("DiagGRU", kwargs))


class DiagLSTM(_Diagonal):
    """An LSTM whose recurrent weights are diagonal (``paraseq.cells.DiagLSTMCell`` per layer):
    weight_hh_l{k} is a (4 H,) vector. Its Jacobian over [h, c] is H independent 2 x 2 blocks
    (unit i of h with unit i of c): "auto" and "newton" run exact Newton on those blocks at
    O(T H) per iteration (ParaRNN's construction); "quasi_newton" keeps only the diagonal (a
    true quasi-Newton here). torch.nn.LSTM's interface otherwise, without proj_size."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError(f"DiagLSTM: proj_size is not supported (its recurrence is "
                             f"diagonal); got proj_size={kwargs['proj_size']!r}")
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype,
                         **_solver_kwargs("DiagLSTM", kwargs))


def _solver_kwargs(owner: str, kwargs: dict) -> dict:
    allowed = ("method", "tol", "max_iter", "on_failure", "iterations")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{owner}.__init__() got an unexpected keyword argument "
                        f"{unknown[0]!r} (paraseq adds only {', '.join(map(repr, allowed))} "
                        f"to torch's arguments)")
    return kwargs
