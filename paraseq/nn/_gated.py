"""One direction of one layer as a paraseq cell over precomputed input pre-activations.

Shape letters: N rows (batch x time flattened), H hidden size, P proj_size (LSTM), K gates.

A layer computes gi = W_ih x + b_ih for all time steps in one matmul, and then solves
h_t = cell(gi_t, h_{t-1}) with ``solve_recurrence``: these cells are torch's cell equations
(``paraseq.cells.functional``) with the input product already done, so a Newton iteration
evaluates only the recurrent half. Each carries the Jacobian protocol of ``paraseq.solve.cell``
and lists its tensors in ``parameters()`` (so "auto" sees that a backward pass will follow).
The weights are the module's own Parameters, closed over: the implicit gradient reaches them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cells import functional as CF


class _Gated:
    def __init__(self, weight_hh: Tensor, bias_hh: Tensor | None):
        self.weight_hh, self.bias_hh = weight_hh, bias_hh

    def parameters(self) -> tuple[Tensor, ...]:
        return tuple(p for p in vars(self).values() if isinstance(p, Tensor))


class ElmanGated(_Gated):
    def __init__(self, weight_hh, bias_hh, nonlinearity: str):
        super().__init__(weight_hh, bias_hh)
        self.hidden_size = weight_hh.shape[0]
        self.nonlinearity = nonlinearity

    def _parts(self, gi: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        pre = gi + F.linear(h, self.weight_hh, self.bias_hh)  # (N, H)
        if self.nonlinearity == "tanh":
            h_new = torch.tanh(pre)
            return h_new, 1 - h_new * h_new
        return torch.relu(pre), (pre > 0).to(pre.dtype)

    def __call__(self, gi: Tensor, h: Tensor) -> Tensor:
        pre = gi + F.linear(h, self.weight_hh, self.bias_hh)  # (N, H)
        return torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)

    def forward_with_jacobian(self, gi, h):
        h_new, slope = self._parts(gi, h)
        return h_new, slope.unsqueeze(-1) * self.weight_hh  # (N, H), (N, H, H)

    def forward_with_jacobian_diagonal(self, gi, h):
        h_new, slope = self._parts(gi, h)
        return h_new, slope * torch.diagonal(self.weight_hh)  # (N, H), (N, H)


class GRUGated(_Gated):
    """torch's GRU, or the diagonal-recurrence GRU when weight_hh is a (3 H,) vector."""

    def __init__(self, weight_hh, bias_hh):
        super().__init__(weight_hh, bias_hh)
        self.diagonal = weight_hh.dim() == 1
        self.jacobian_is_diagonal = self.diagonal
        self.hidden_size = weight_hh.shape[0] // 3

    def __call__(self, gi, h):
        return CF._gru_gated(gi, h, self.weight_hh, self.bias_hh)[0]

    def forward_with_jacobian(self, gi, h):
        h_new, z, C = CF._gru_gated_parts(gi, h, self.weight_hh, self.bias_hh)
        if self.diagonal:
            return h_new, torch.diag_embed(z + (C * self.weight_hh.view(3, -1)).sum(1))
        J = CF._rows_times(C, self.weight_hh, (0, 1, 2), self.hidden_size)  # (N, H, H)
        return h_new, CF._add_diagonal(J, z)

    def forward_with_jacobian_diagonal(self, gi, h):
        h_new, z, C = CF._gru_gated_parts(gi, h, self.weight_hh, self.bias_hh)
        w = CF._recurrent_diagonal(self.weight_hh, 3, self.hidden_size)  # (3, H)
        return h_new, z + (C * w).sum(1)  # (N, H), (N, H)


class LSTMGated(_Gated):
    """torch's LSTM over the state (h, c), or the diagonal-recurrence LSTM when weight_hh is a
    (4 H,) vector. Without projection D = 2 H over [h, c]."""

    def __init__(self, weight_hh, bias_hh):
        super().__init__(weight_hh, bias_hh)
        H = weight_hh.shape[0] // 4
        self.state_sizes = (H, H)

    def __call__(self, gi, state):
        h, c = state
        return CF._lstm_gated(gi, h, c, self.weight_hh, self.bias_hh)[:2]

    def forward_with_jacobian(self, gi, state):
        h, c = state
        return CF._lstm_full_from_parts(
            CF._lstm_gated_parts(gi, h, c, self.weight_hh, self.bias_hh), self.weight_hh)

    def forward_with_jacobian_diagonal(self, gi, state):
        h, c = state
        return CF._lstm_diag_from_parts(
            CF._lstm_gated_parts(gi, h, c, self.weight_hh, self.bias_hh), self.weight_hh)


class DiagLSTMGated(LSTMGated):
    """The diagonal-recurrence LSTM, with its exact Jacobian as H blocks of 2 x 2."""

    def forward_with_jacobian_blocks(self, gi, state):
        h, c = state
        return CF._lstm_blocks_from_parts(
            CF._lstm_gated_parts(gi, h, c, self.weight_hh, self.bias_hh), self.weight_hh)


class ProjLSTMGated(_Gated):
    """torch's LSTM with proj_size P: the state is (h (P), c (H)), h_new = W_hr (o tanh(c_new)),
    and weight_hh is (4 H, P). With m = o tanh(c_new) and W_k the (H, P) gate blocks:

        dc_new/dh = sum_{k = i, f, g} diag(C_k) W_k,    dc_new/dc = diag(f),
        dm/dh = diag(s) dc_new/dh + diag(C_o) W_o,      dm/dc = diag(s f),
        dh_new/dh = W_hr dm/dh,                         dh_new/dc = W_hr diag(s f),

    C and s as in ``paraseq.cells.functional._lstm_parts``. D = P + H over [h, c]."""

    def __init__(self, weight_hh, bias_hh, weight_hr):
        super().__init__(weight_hh, bias_hh)
        self.weight_hr = weight_hr  # (P, H)
        P, H = weight_hr.shape
        self.P, self.H = P, H
        self.state_sizes = (P, H)

    def __call__(self, gi, state):
        h, c = state
        m, c_new = CF._lstm_gated(gi, h, c, self.weight_hh, self.bias_hh)[:2]
        return F.linear(m, self.weight_hr), c_new  # (N, P), (N, H)

    def _parts(self, gi, state):
        h, c = state
        m, c_new, f, s, C = CF._lstm_gated_parts(gi, h, c, self.weight_hh, self.bias_hh)
        return F.linear(m, self.weight_hr), c_new, f, s, C

    def forward_with_jacobian(self, gi, state):
        h_new, c_new, f, s, C = self._parts(gi, state)
        N, P, H = h_new.shape[0], self.P, self.H
        W = self.weight_hh.view(4, H, P)  # (4, H, P)
        dc_dh = sum(C[:, k, :, None] * W[k] for k in range(3))  # (N, H, P)
        dm_dh = s.unsqueeze(-1) * dc_dh + C[:, 3, :, None] * W[3]  # (N, H, P)
        J = h_new.new_zeros(N, P + H, P + H)  # (N, P + H, P + H)
        J[:, :P, :P] = torch.matmul(self.weight_hr, dm_dh)  # (N, P, P)
        J[:, :P, P:] = self.weight_hr * (s * f).unsqueeze(1)  # (N, P, H)
        J[:, P:, :P] = dc_dh
        J[:, P:, P:] = torch.diag_embed(f)
        return (h_new, c_new), J

    def forward_with_jacobian_diagonal(self, gi, state):
        h_new, c_new, f, s, C = self._parts(gi, state)
        H, P = self.H, self.P
        W = self.weight_hh.view(4, H, P)  # (4, H, P)
        M = self.weight_hr.t().unsqueeze(0) * W  # (4, H, P): M_k[j, p] = W_hr[p, j] W_k[j, p]
        scale = torch.cat([s.unsqueeze(1) * C[:, :3], C[:, 3:]], dim=1)  # (N, 4, H)
        d_h = torch.einsum("nkj,kjp->np", scale, M)  # (N, P) diag of dh_new/dh
        return (h_new, c_new), torch.cat([d_h, f], dim=1)  # (N, P + H)
