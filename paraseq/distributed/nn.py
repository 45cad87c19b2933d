"""``SequenceParallel``: a paraseq.nn.RNN / GRU / LSTM run with its time dim split across ranks.

Shape letters: T_r this rank's time steps, B batch, n input size, H hidden size, L layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..solve.api import DEFAULT_TOL
from ._comm import Comm
from .solve import DISTRIBUTED_METHODS, solve_recurrence

__all__ = ["SequenceParallel"]


class SequenceParallel(nn.Module):
    """Wrap a ``paraseq.nn.RNN``, ``GRU``, ``LSTM``, ``DiagGRU`` or ``DiagLSTM`` so that each
    layer is one ``paraseq.distributed.solve_recurrence`` over the ranks of ``group``.

    ``forward(input, hx=None) -> (output, h_n)`` as the wrapped module's, where ``input`` is
    this rank's consecutive slice of the time dim (T_r, B, n) ((B, T_r, n) with
    ``batch_first``) and ``output`` this rank's slice of the outputs; ``h_n`` (and LSTM's
    ``c_n``) is the state after the WHOLE sequence, the same on every rank; ``hx`` is read on
    rank 0. The parameters are the wrapped module's (``wrapper.module``); every rank must hold
    the same values (as DDP keeps them).

    Gradients: each rank's backward yields its chunk's share of the parameter gradients;
    ``all_reduce_grads()`` sums them over the group, which gives the single-process gradient
    of the sum of the ranks' losses. (Under DDP over the same ranks, which averages, scale
    each rank's loss by the group size instead.)

    Supported: one direction (``bidirectional=False``), unpacked input. The method is the
    module's when it is distributed (newton, quasi_newton, picard, jacobi, sequential), else
    "auto" (newton; quasi_newton for the diagonal modules); tol, max_iter and on_failure are
    the module's (tol=None: ``paraseq.solve``'s default by dtype).
    """

    def __init__(self, module: nn.Module, group=None):
        super().__init__()
        mode = getattr(module, "mode", None)
        if mode not in ("RNN_TANH", "RNN_RELU", "GRU", "LSTM") or not hasattr(module, "_cell"):
            raise TypeError(f"SequenceParallel: module must be a paraseq.nn.RNN, GRU, LSTM, "
                            f"DiagGRU or DiagLSTM; got {type(module).__name__}")
        if module.bidirectional:
            raise ValueError("SequenceParallel: bidirectional modules are not supported (the "
                             "reverse direction would run the ranks backwards); got "
                             "bidirectional=True")
        self.module = module
        self.group = group

    def forward(self, input: Tensor, hx=None):
        m = self.module
        if not isinstance(input, Tensor) or input.dim() != 3:
            raise ValueError(f"SequenceParallel: input must be a batched tensor (T_r, B, n) "
                             f"((B, T_r, n) with batch_first); got "
                             f"{getattr(input, 'shape', type(input).__name__)}")
        x = input.transpose(0, 1) if m.batch_first else input  # (T_r, B, n)
        B = x.shape[1]
        state = m._check_hx(hx, B, True, x)  # each (L, B, size)
        method = m.method if m.method in DISTRIBUTED_METHODS else "auto"
        tol = m.tol if m.tol is not None else DEFAULT_TOL.get(x.dtype, 1e-5)
        lstm = m.mode == "LSTM"
        layer_in = x
        lasts = []
        self.last_solve_info = []
        for layer in range(m.num_layers):
            p = m._layer_params(layer, 0)
            gi = F.linear(layer_in, p["weight_ih"], p.get("bias_ih")).transpose(0, 1)  # (B,T,KH)
            h0 = tuple(s[layer] for s in state)
            states, info = solve_recurrence(m._cell(layer, 0), gi, h0 if lstm else h0[0],
                                            group=self.group, method=method, tol=tol,
                                            max_iter=m.max_iter, on_failure=m.on_failure,
                                            return_info=True)
            self.last_solve_info.append(info)
            states = states if lstm else (states,)  # each (B, T_r, size)
            lasts.append(states)
            out = states[0].transpose(0, 1)  # (T_r, B, Hout)
            if m.dropout > 0 and m.training and layer < m.num_layers - 1:
                out = F.dropout(out, m.dropout, True)
            layer_in = out
        finals = self._finals(lasts, state)
        out = layer_in.transpose(0, 1) if m.batch_first else layer_in
        return out, (finals if lstm else finals[0])

    def _finals(self, lasts: list[tuple[Tensor, ...]], state: tuple[Tensor, ...]):
        """The state after the whole sequence, per layer: the last state of the last rank
        with a non-empty chunk (or hx if every chunk is empty), on every rank. Differentiable
        on the rank that holds it (the others get its value)."""
        comm = Comm(self.group, "SequenceParallel", state[0].device)
        sizes = [h.shape[-1] for h in state]
        nonempty = lasts[0][0].shape[1] > 0
        mine = torch.stack([torch.cat([s[:, -1] if nonempty else torch.zeros_like(h[0])
                                       for s, h in zip(layer, state, strict=True)], dim=-1)
                            for layer in lasts])  # (L, B, sum of sizes)
        flat = torch.cat([mine.new_tensor([1.0 if nonempty else 0.0]), mine.detach().reshape(-1)])
        rows = comm.gather(flat, flat.numel(), mine.dtype, None, "the final states")
        owners = [r for r in range(comm.size) if rows[r, 0] != 0]
        if not owners:
            return tuple(state)
        owner = owners[-1]
        value = mine if comm.rank == owner else rows[owner, 1:].reshape(mine.shape).to(mine.device)
        return tuple(torch.split(value, sizes, dim=-1))  # each (L, B, size)

    def all_reduce_grads(self) -> None:
        """Sum every parameter's gradient over the group (call after backward, before the
        optimizer step)."""
        for p in self.module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.group)
