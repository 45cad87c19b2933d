"""Recurrent cells as torch.nn modules that carry their analytic Jacobians.

Shape letters: N rows (batch, or batch x time flattened), n input size, H hidden size, K the
number of gates (Elman 1, GRU 3, LSTM 4).

``ElmanCell``, ``GRUCell`` and ``LSTMCell`` have exactly the constructor, parameter names,
shapes and initialisation of torch.nn.RNNCell, GRUCell and LSTMCell (weight_ih (K H, n),
weight_hh (K H, H), bias_ih and bias_hh (K H,), all uniform(-1/sqrt(H), 1/sqrt(H)), drawn in
torch's order, so the same seed gives the same parameters), so ``load_state_dict`` works both
ways, and their ``forward`` computes what torch's does. ``DiagGRUCell`` and ``DiagLSTMCell``
replace the recurrent matrix by a (K H,) vector used elementwise (see
``paraseq.cells.functional``); their parameters are initialised by the same rule, the vector
weight_hh included: uniform(-1/sqrt(H), 1/sqrt(H)).

Every cell implements paraseq's Jacobian protocol (``paraseq.solve.cell``):
``forward_with_jacobian(x, h) -> (h_new, J)`` with J (N, D, D), J[m, i, j] = d h_new_i / d h_j,
and ``forward_with_jacobian_diagonal(x, h) -> (h_new, d)`` with d (N, D) its diagonal; D = H,
or 2 H for the LSTMs, whose state (h, c) counts as the concatenation [h, c]. So
``paraseq.solve_recurrence(cell, ...)`` uses closed-form Jacobians instead of autograd.

``forward`` takes a batch x (N, n), h (N, H) (or (h, c)), or, as torch's cells do, one
unbatched sample x (n,), h (H,); h = None means zeros. The Jacobian methods take 2-D batches
only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as CF

__all__ = ["DiagGRUCell", "DiagLSTMCell", "ElmanCell", "GRUCell", "LSTMCell"]


class _Cell(nn.Module):
    """Parameters, initialisation and input handling shared by the cells."""

    _gates = 1
    _diagonal = False
    _tuple_state = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        name = type(self).__name__
        for arg, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: {arg} must be an int; got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name}: {arg} must be >= 1; got {v}")
        if not isinstance(bias, bool):
            raise TypeError(f"{name}: bias must be a bool; got {type(bias).__name__}")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        K, H = self._gates, hidden_size
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((K * H, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((K * H,) if self._diagonal else (K * H, H),
                                                  **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(K * H, **factory))
            self.bias_hh = nn.Parameter(torch.empty(K * H, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter uniform(-1/sqrt(H), 1/sqrt(H)), in registration order (torch's)."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -stdv, stdv)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        return s

    def _params(self) -> tuple:
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def _state(self, x: Tensor, h, what: str, batched_only: bool):
        """Checks x's rank and makes h (zeros if None); returns x, h, is_batched."""
        name = f"{type(self).__name__}.{what}"
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: x must be a torch.Tensor; got {type(x).__name__}")
        ranks = (2,) if batched_only else (1, 2)
        if x.dim() not in ranks:
            want = "(N, n)" if batched_only else "(N, n) or unbatched (n,)"
            raise ValueError(f"{name}: x must have shape {want}; got {tuple(x.shape)}")
        batched = x.dim() == 2
        if h is None:
            zeros = x.new_zeros(x.shape[0] if batched else 1, self.hidden_size)  # (N, H)
            h = (zeros, zeros) if self._tuple_state else zeros
        elif self._tuple_state:
            if not (isinstance(h, (tuple, list)) and len(h) == 2
                    and all(isinstance(t, Tensor) for t in h)):
                raise TypeError(f"{name}: h must be a tuple (h, c) of two tensors or None; got "
                                f"{type(h).__name__}")
            h = tuple(h) if batched else (h[0].unsqueeze(0), h[1].unsqueeze(0))
        else:
            if not isinstance(h, Tensor):
                raise TypeError(f"{name}: h must be a torch.Tensor or None; got "
                                f"{type(h).__name__}")
            h = h if batched else h.unsqueeze(0)
        return (x if batched else x.unsqueeze(0)), h, batched


class _HiddenCell(_Cell):
    """A cell whose state is one tensor h (N, H); subclasses name their three functions."""

    def _kwargs(self) -> dict:
        return {}

    def forward(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        """h_new (N, H) from x (N, n) and h (N, H) (or unbatched (n,), (H,) -> (H,))."""
        batched = True  # the common case, a step of a loop, skips _state
        if h is None or not isinstance(h, Tensor) or not isinstance(x, Tensor) or x.dim() != 2:
            x, h, batched = self._state(x, h, "forward", False)
        out = self._fn(x, h, *self._params(), **self._kwargs())  # (N, H)
        return out if batched else out.squeeze(0)

    def forward_with_jacobian(self, x: Tensor, h: Tensor | None = None
                              ) -> tuple[Tensor, Tensor]:
        """h_new (N, H) and J = d h_new / d h (N, H, H)."""
        x, h, _ = self._state(x, h, "forward_with_jacobian", True)
        return self._fn_jacobian(x, h, *self._params(), **self._kwargs())

    def forward_with_jacobian_diagonal(self, x: Tensor, h: Tensor | None = None
                                       ) -> tuple[Tensor, Tensor]:
        """h_new (N, H) and the diagonal of d h_new / d h (N, H)."""
        x, h, _ = self._state(x, h, "forward_with_jacobian_diagonal", True)
        return self._fn_diagonal(x, h, *self._params(), **self._kwargs())


class _TupleCell(_Cell):
    """A cell whose state is (h, c), each (N, H); D = 2 H over [h, c]."""

    _gates = 4
    _tuple_state = True

    @property
    def state_sizes(self) -> tuple[int, int]:
        """The sizes of the state's tensors (h, c): (H, H)."""
        return (self.hidden_size, self.hidden_size)

    def forward(self, x: Tensor, h: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor]:
        """(h_new, c_new), each (N, H), from x (N, n) and h = (h, c) (or unbatched)."""
        hc, batched = h, True  # the common case, a step of a loop, skips _state
        if h is None or not isinstance(h, tuple) or not isinstance(x, Tensor) or x.dim() != 2:
            x, hc, batched = self._state(x, h, "forward", False)
        h_new, c_new = self._fn(x, hc, *self._params())  # (N, H) each
        return (h_new, c_new) if batched else (h_new.squeeze(0), c_new.squeeze(0))

    def forward_with_jacobian(self, x: Tensor, h: tuple[Tensor, Tensor] | None = None
                              ) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """(h_new, c_new) and J over [h, c] (N, 2 H, 2 H)."""
        x, hc, _ = self._state(x, h, "forward_with_jacobian", True)
        return self._fn_jacobian(x, hc, *self._params())

    def forward_with_jacobian_diagonal(self, x: Tensor, h: tuple[Tensor, Tensor] | None = None
                                       ) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """(h_new, c_new) and the diagonal of J over [h, c] (N, 2 H)."""
        x, hc, _ = self._state(x, h, "forward_with_jacobian_diagonal", True)
        return self._fn_diagonal(x, hc, *self._params())


class ElmanCell(_HiddenCell):
    """torch.nn.RNNCell with analytic Jacobians: h_new = act(W_ih x + b_ih + W_hh h + b_hh),
    act ``nonlinearity``, "tanh" or "relu". Parameters weight_ih (H, n), weight_hh (H, H),
    bias_ih, bias_hh (H,)."""

    _gates = 1
    _fn = staticmethod(CF.elman)
    _fn_jacobian = staticmethod(CF.elman_jacobian)
    _fn_diagonal = staticmethod(CF.elman_jacobian_diagonal)

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None) -> None:
        if nonlinearity not in CF.NONLINEARITIES:
            raise ValueError(f"ElmanCell: nonlinearity must be one of "
                             f"{', '.join(repr(v) for v in CF.NONLINEARITIES)}; got "
                             f"{nonlinearity!r}")
        super().__init__(input_size, hidden_size, bias, device, dtype)
        self.nonlinearity = nonlinearity

    def _kwargs(self) -> dict:
        return {"nonlinearity": self.nonlinearity}

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity}"


class GRUCell(_HiddenCell):
    """torch.nn.GRUCell with analytic Jacobians (gates r, z, n; see
    ``paraseq.cells.functional.gru``). Parameters weight_ih (3 H, n), weight_hh (3 H, H),
    bias_ih, bias_hh (3 H,)."""

    _gates = 3
    _fn = staticmethod(CF.gru)
    _fn_jacobian = staticmethod(CF.gru_jacobian)
    _fn_diagonal = staticmethod(CF.gru_jacobian_diagonal)


class DiagGRUCell(_HiddenCell):
    """The GRU with diagonal recurrence (``paraseq.cells.functional.diag_gru``): weight_hh is a
    (3 H,) vector [w_hr, w_hz, w_hn] used elementwise, so the Jacobian is diagonal and
    ``forward_with_jacobian_diagonal`` is exact: quasi-Newton on this cell is Newton, at O(T H)
    per iteration. Parameters weight_ih (3 H, n), weight_hh (3 H,), bias_ih, bias_hh (3 H,),
    all uniform(-1/sqrt(H), 1/sqrt(H))."""

    _gates = 3
    _diagonal = True
    jacobian_is_diagonal = True  # paraseq.solve: the diagonal is the whole Jacobian
    _fn = staticmethod(CF.diag_gru)
    _fn_jacobian = staticmethod(CF.diag_gru_jacobian)
    _fn_diagonal = staticmethod(CF.diag_gru_jacobian_diagonal)


class LSTMCell(_TupleCell):
    """torch.nn.LSTMCell with analytic Jacobians over the state [h, c] (gates i, f, g, o; see
    ``paraseq.cells.functional.lstm``). Parameters weight_ih (4 H, n), weight_hh (4 H, H),
    bias_ih, bias_hh (4 H,). ``state_sizes`` is (H, H)."""

    _fn = staticmethod(CF.lstm)
    _fn_jacobian = staticmethod(CF.lstm_jacobian)
    _fn_diagonal = staticmethod(CF.lstm_jacobian_diagonal)


class DiagLSTMCell(_TupleCell):
    """The LSTM with diagonal recurrence (``paraseq.cells.functional.diag_lstm``): weight_hh is
    a (4 H,) vector used elementwise. Its Jacobian over [h, c] is four diagonal H x H blocks;
    ``forward_with_jacobian`` returns them as the dense (N, 2 H, 2 H) matrix,
    ``forward_with_jacobian_blocks`` as H blocks of 2 x 2 (what Newton uses), and
    ``forward_with_jacobian_diagonal`` the diagonal of that matrix (dh/dh and dc/dc), which
    leaves out the dh/dc and dc/dh couplings. Parameters weight_ih (4 H, n), weight_hh (4 H,),
    bias_ih, bias_hh (4 H,), all uniform(-1/sqrt(H), 1/sqrt(H)). ``state_sizes`` is (H, H)."""

    _diagonal = True
    _fn = staticmethod(CF.diag_lstm)
    _fn_jacobian = staticmethod(CF.diag_lstm_jacobian)
    _fn_diagonal = staticmethod(CF.diag_lstm_jacobian_diagonal)

    def forward_with_jacobian_blocks(self, x: Tensor, h: tuple[Tensor, Tensor] | None = None
                                     ) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """(h_new, c_new) and the exact Jacobian as H blocks of 2 x 2 (N, H, 2, 2), block i
        over (h_i, c_i): Newton on these costs O(T H) (``paraseq.solve.cell``)."""
        x, hc, _ = self._state(x, h, "forward_with_jacobian_blocks", True)
        return CF.diag_lstm_jacobian_blocks(x, hc, *self._params())
