"""Recurrent cells as plain functions, each with its Jacobian with respect to the state.

Shape letters: N rows (batch, or batch x time flattened), n input size, H hidden size, K the
number of gates (Elman 1, GRU 3, LSTM 4).

``elman``, ``gru`` and ``lstm`` compute exactly what torch.nn.RNNCell, GRUCell and LSTMCell
compute, with torch's parameters and layout (weight_ih (K H, n), weight_hh (K H, H), biases
(K H,); GRU gates in the order r, z, n with the reset gate applied to W_hn h + b_hn; LSTM
gates in the order i, f, g, o): they call the kernels torch's cells call (torch.rnn_tanh_cell,
rnn_relu_cell, gru_cell, lstm_cell), which run a step faster than the same equations written
in Python. The Jacobian functions need the gates, so they evaluate the equations themselves
(``_gru_forward``, ``_lstm_forward``), in the order of operations of torch's CPU kernels: their
h_new equals torch's to an ulp or two (the vectorised and scalar tanh/sigmoid can differ).

``diag_gru`` and ``diag_lstm`` are the same equations with the recurrent matrices replaced by
vectors used elementwise (weight_hh (K H,)), so that each hidden unit reads only its own past:
their Jacobians are diagonal (GRU) or made of diagonal H x H blocks (LSTM), and exact Newton
costs O(T H) (ParaRNN's construction).

For every cell ``<cell>_jacobian(...) -> (h_new, J)`` gives J (N, D, D) with
J[m, i, j] = d h_new_i / d h_j at row m, and ``<cell>_jacobian_diagonal(...) -> (h_new, d)``
gives its diagonal d (N, D). D = H, except for the LSTMs, whose state is (h, c): D = 2 H, the
indices running over the concatenation [h, c]. Both are closed forms from the gates (no
autograd inside), differentiable by autograd themselves. The diagonals cost O(N H) beyond the
forward (the dense ones read only diag(W_hh)); the full Jacobians O(N H^2).

The functions take 2-D batches only: x (N, n), h (N, H); bias_ih and bias_hh may be None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NONLINEARITIES = ("tanh", "relu")

__all__ = [
    "NONLINEARITIES",
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


# ----------------------------------------------------------------------------- checks


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check(fn: str, x: Tensor, hs: tuple[Tensor, ...], weight_ih: Tensor, weight_hh: Tensor,
           bias_ih: Tensor | None, bias_hh: Tensor | None, K: int, diagonal: bool) -> None:
    """Argument checks shared by every cell function: types, ranks and the K-gate shapes.

    The cells run once per time step in a loop, so the common case (all well-formed) is one
    cheap comparison of shapes; the messages are built only on failure."""
    try:
        N, n = x.shape
        H = hs[0].shape[1]
        KH = K * H
        ok = (all(t.dim() == 2 and t.shape[0] == N and t.shape[1] == H for t in hs)
              and weight_ih.shape == (KH, n)
              and weight_hh.shape == ((KH,) if diagonal else (KH, H))
              and (bias_ih is None or bias_ih.shape == (KH,))
              and (bias_hh is None or bias_hh.shape == (KH,)))
    except (AttributeError, TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        _diagnose(fn, x, hs, weight_ih, weight_hh, bias_ih, bias_hh, K, diagonal)


def _diagnose(fn: str, x: Tensor, hs: tuple[Tensor, ...], weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor | None, bias_hh: Tensor | None, K: int, diagonal: bool) -> None:
    """Raises the error that names the first bad argument."""
    names = ("h",) if len(hs) == 1 else ("h", "c")
    for name, t in (("x", x), *zip(names, hs, strict=True), ("weight_ih", weight_ih),
                    ("weight_hh", weight_hh), ("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if not isinstance(t, Tensor) and not (t is None and name.startswith("bias")):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must have shape (N, n) (a 2-D batch); got {_shape(x)}")
    N, n = x.shape
    H = hs[0].shape[-1] if hs[0].dim() == 2 else -1
    for name, t in zip(names, hs, strict=True):
        if t.dim() != 2 or t.shape[0] != N or t.shape[1] != H:
            raise ValueError(f"{fn}: {name} must have shape (N, H) = ({N}, H) with N the rows "
                             f"of x (and {names} alike); got {_shape(t)}")
    KH = K * H
    want_hh = (KH,) if diagonal else (KH, H)
    if tuple(weight_ih.shape) != (KH, n):
        raise ValueError(f"{fn}: weight_ih must have shape ({K} H, n) = ({KH}, {n}) for H = {H}, "
                         f"n = {n}; got {_shape(weight_ih)}")
    if tuple(weight_hh.shape) != want_hh:
        what = f"({K} H,) = ({KH},)" if diagonal else f"({K} H, H) = ({KH}, {H})"
        raise ValueError(f"{fn}: weight_hh must have shape {what} for H = {H}; got "
                         f"{_shape(weight_hh)}")
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None and tuple(b.shape) != (KH,):
            raise ValueError(f"{fn}: {name} must have shape ({K} H,) = ({KH},) or be None; got "
                             f"{_shape(b)}")
    shapes = ", ".join(f"{name} {_shape(t)}" for name, t in (("x", x), *zip(names, hs,
                       strict=True), ("weight_ih", weight_ih), ("weight_hh", weight_hh),
                       ("bias_ih", bias_ih), ("bias_hh", bias_hh)))
    raise ValueError(f"{fn}: the arguments do not fit together: {shapes}")


def _check_nonlinearity(fn: str, nonlinearity: object) -> None:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"{fn}: nonlinearity must be one of "
                         f"{', '.join(repr(v) for v in NONLINEARITIES)}; got {nonlinearity!r}")


def _split_state(fn: str, state: object) -> tuple[Tensor, Tensor]:
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise TypeError(f"{fn}: state must be a tuple (h, c) of two (N, H) tensors; got "
                        f"{type(state).__name__}")
    return state[0], state[1]


# ----------------------------------------------------------------------------- building blocks


def _recurrent(h: Tensor, weight_hh: Tensor, bias_hh: Tensor | None, K: int) -> Tensor:
    """The recurrent pre-activations of all K gates: W_hh h + b_hh (dense), or
    w_hh * [h, ..., h] + b_hh (diagonal, a (K H,) vector)."""
    if weight_hh.dim() == 2:
        return F.linear(h, weight_hh, bias_hh)  # (N, K H), as torch's cells compute it
    N, H = h.shape
    w = weight_hh.view(K, H)  # (K, H)
    if bias_hh is None:
        return (h.unsqueeze(1) * w).view(N, K * H)  # (N, K H)
    return torch.addcmul(bias_hh.view(K, H), h.unsqueeze(1), w).view(N, K * H)  # (N, K H)


def _recurrent_diagonal(weight_hh: Tensor, K: int, H: int) -> Tensor:
    """diag(W_hk) of every gate k: (K, H)."""
    if weight_hh.dim() == 2:
        return weight_hh.view(K, H, H).diagonal(dim1=-2, dim2=-1)  # (K, H)
    return weight_hh.view(K, H)  # (K, H)


def _rows_times(C: Tensor, weight_hh: Tensor, gates: tuple[int, ...], H: int) -> Tensor:
    """sum_k diag(C_k) W_hk over the listed gates k of a dense weight_hh (K H, H): the full
    (N, H, H) Jacobian term, with C (N, K, H) the row scalings."""
    W = weight_hh.view(-1, H, H)  # (K, H, H)
    J = C[:, gates[0], :, None] * W[gates[0]]  # (N, H, H)
    for k in gates[1:]:
        J = J.addcmul_(C[:, k, :, None], W[k])  # (N, H, H), in place: no (N, H, H) temporaries
    return J


def _add_diagonal(J: Tensor, d: Tensor) -> Tensor:
    """J + diag(d) for J (N, H, H), d (N, H), in place."""
    J.diagonal(dim1=-2, dim2=-1).add_(d)
    return J


# ----------------------------------------------------------------------------- Elman


def _elman_parts(fn, x, h, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity):
    """h_new and act'(pre) (N, H)."""
    _check_nonlinearity(fn, nonlinearity)
    _check(fn, x, (h,), weight_ih, weight_hh, bias_ih, bias_hh, 1, False)
    pre = F.linear(x, weight_ih, bias_ih) + F.linear(h, weight_hh, bias_hh)  # (N, H)
    if nonlinearity == "tanh":
        h_new = torch.tanh(pre)  # (N, H)
        slope = 1 - h_new * h_new  # (N, H)
    else:
        h_new = torch.relu(pre)  # (N, H)
        slope = (pre > 0).to(pre.dtype)  # (N, H), 0 at pre == 0 as autograd's relu
    return h_new, slope


def elman(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor,
          bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
          nonlinearity: str = "tanh") -> Tensor:
    """torch.nn.RNNCell: h_new = act(W_ih x + b_ih + W_hh h + b_hh), act tanh or relu.

    x (N, n), h (N, H), weight_ih (H, n), weight_hh (H, H), biases (H,) or None -> (N, H).
    """
    _check_nonlinearity("elman", nonlinearity)
    _check("elman", x, (h,), weight_ih, weight_hh, bias_ih, bias_hh, 1, False)
    kernel = torch.rnn_tanh_cell if nonlinearity == "tanh" else torch.rnn_relu_cell
    return kernel(x, h, weight_ih, weight_hh, bias_ih, bias_hh)  # (N, H), torch's own


def elman_jacobian(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                   bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
                   nonlinearity: str = "tanh") -> tuple[Tensor, Tensor]:
    """``elman`` and its Jacobian J = diag(act'(pre)) W_hh: (N, H), (N, H, H)."""
    h_new, slope = _elman_parts("elman_jacobian", x, h, weight_ih, weight_hh, bias_ih, bias_hh,
                                nonlinearity)
    return h_new, slope.unsqueeze(-1) * weight_hh  # (N, H), (N, H, H)


def elman_jacobian_diagonal(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                            bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
                            nonlinearity: str = "tanh") -> tuple[Tensor, Tensor]:
    """``elman`` and the diagonal of its Jacobian, act'(pre) * diag(W_hh): (N, H), (N, H)."""
    h_new, slope = _elman_parts("elman_jacobian_diagonal", x, h, weight_ih, weight_hh, bias_ih,
                                bias_hh, nonlinearity)
    return h_new, slope * torch.diagonal(weight_hh)  # (N, H), (N, H)


# ----------------------------------------------------------------------------- GRU


def _gru_forward(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """torch's GRU cell, in torch's order of operations (aten's GRUCell), for dense or diagonal
    weight_hh; returns h_new and the gates the Jacobian needs."""
    return _gru_gated(F.linear(x, weight_ih, bias_ih), h, weight_hh, bias_hh)


def _gru_gated(gi, h, weight_hh, bias_hh):
    """``_gru_forward`` from the input pre-activations gi = W_ih x + b_ih (N, 3 H), which a
    layer computes for all time steps at once."""
    gh = _recurrent(h, weight_hh, bias_hh, 3)  # (N, 3 H)
    H = h.shape[1]
    r, z = torch.sigmoid(gh[:, :2 * H] + gi[:, :2 * H]).chunk(2, 1)  # (N, H) reset, update
    h_n = gh[:, 2 * H:]  # (N, H) W_hn h + b_hn
    n = torch.tanh(gi[:, 2 * H:] + h_n * r)  # (N, H) candidate; r scales W_hn h + b_hn
    h_new = (h - n) * z + n  # (N, H) = (1 - z) n + z h
    return h_new, r, z, n, h_n


def _gru_parts(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """h_new, z and the row scalings C (N, 3, H) with J = diag(z) + sum_k diag(C_k) W_hk:

        dr/dh = diag(r (1 - r)) W_hr,   dz/dh = diag(z (1 - z)) W_hz,
        dn/dh = diag(1 - n^2) (diag(W_hn h + b_hn) dr/dh + diag(r) W_hn),
        dh_new/dh = diag(z) + diag(1 - z) dn/dh + diag(h - n) dz/dh.
    """
    return _gru_gated_parts(F.linear(x, weight_ih, bias_ih), h, weight_hh, bias_hh)


def _gru_gated_parts(gi, h, weight_hh, bias_hh):
    """``_gru_parts`` from the input pre-activations gi (N, 3 H)."""
    h_new, r, z, n, h_n = _gru_gated(gi, h, weight_hh, bias_hh)
    dn = (1 - z) * (1 - n * n)  # (N, H) d h_new / d (pre-tanh of n)
    C = torch.stack([dn * h_n * r * (1 - r),  # on W_hr
                     (h - n) * z * (1 - z),  # on W_hz
                     dn * r], dim=1)  # (N, 3, H); on W_hn
    return h_new, z, C


def gru(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor,
        bias_ih: Tensor | None = None, bias_hh: Tensor | None = None) -> Tensor:
    """torch.nn.GRUCell, gates in torch's order (r, z, n):

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h_new = (1 - z) * n + z * h

    x (N, n), h (N, H), weight_ih (3 H, n), weight_hh (3 H, H), biases (3 H,) or None ->
    (N, H).
    """
    _check("gru", x, (h,), weight_ih, weight_hh, bias_ih, bias_hh, 3, False)
    return torch.gru_cell(x, h, weight_ih, weight_hh, bias_ih, bias_hh)  # (N, H), torch's own


def gru_jacobian(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                 bias_ih: Tensor | None = None, bias_hh: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
    """``gru`` and its Jacobian d h_new / d h: (N, H), (N, H, H)."""
    _check("gru_jacobian", x, (h,), weight_ih, weight_hh, bias_ih, bias_hh, 3, False)
    h_new, z, C = _gru_parts(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    H = h.shape[1]
    return h_new, _add_diagonal(_rows_times(C, weight_hh, (0, 1, 2), H), z)


def gru_jacobian_diagonal(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                          bias_ih: Tensor | None = None, bias_hh: Tensor | None = None
                          ) -> tuple[Tensor, Tensor]:
    """``gru`` and the diagonal of its Jacobian, from diag(W_hh) only: (N, H), (N, H)."""
    _check("gru_jacobian_diagonal", x, (h,), weight_ih, weight_hh, bias_ih, bias_hh, 3, False)
    h_new, z, C = _gru_parts(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    w = _recurrent_diagonal(weight_hh, 3, h.shape[1])  # (3, H)
    return h_new, z + (C * w).sum(1)  # (N, H), (N, H)


def diag_gru(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor,
             bias_ih: Tensor | None = None, bias_hh: Tensor | None = None) -> Tensor:
    """The GRU with diagonal recurrence: ``gru``'s equations with W_hk h replaced by
    w_hk * h, weight_hh = [w_hr, w_hz, w_hn] a (3 H,) vector:

        r = sigmoid(W_ir x + b_ir + w_hr * h + b_hr), z likewise,
        n = tanh(W_in x + b_in + r * (w_hn * h + b_hn)),  h_new = (1 - z) * n + z * h.

    Unit i of h_new depends on unit i of h only. x (N, n), h (N, H) -> (N, H).
    """
    _check("diag_gru", x, (h,), weight_ih, weight_hh, bias_ih, bias_hh, 3, True)
    return _gru_forward(x, h, weight_ih, weight_hh, bias_ih, bias_hh)[0]


def diag_gru_jacobian_diagonal(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                               bias_ih: Tensor | None = None, bias_hh: Tensor | None = None
                               ) -> tuple[Tensor, Tensor]:
    """``diag_gru`` and its Jacobian, which is diagonal: exactly (N, H), (N, H)."""
    _check("diag_gru_jacobian_diagonal", x, (h,), weight_ih, weight_hh, bias_ih, bias_hh, 3,
           True)
    h_new, z, C = _gru_parts(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    return h_new, z + (C * weight_hh.view(3, -1)).sum(1)  # (N, H), (N, H)


def diag_gru_jacobian(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                      bias_ih: Tensor | None = None, bias_hh: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
    """``diag_gru`` and its (diagonal) Jacobian as a dense matrix: (N, H), (N, H, H)."""
    _check("diag_gru_jacobian", x, (h,), weight_ih, weight_hh, bias_ih, bias_hh, 3, True)
    h_new, z, C = _gru_parts(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    return h_new, torch.diag_embed(z + (C * weight_hh.view(3, -1)).sum(1))


# ----------------------------------------------------------------------------- LSTM


def _lstm_forward(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    """torch's LSTM cell, in torch's order of operations (aten's LSTMCell), for dense or
    diagonal weight_hh; returns (h_new, c_new) and the gates the Jacobian needs."""
    return _lstm_gated(F.linear(x, weight_ih, bias_ih), h, c, weight_hh, bias_hh)


def _lstm_gated(gi, h, c, weight_hh, bias_hh):
    """``_lstm_forward`` from the input pre-activations gi = W_ih x + b_ih (N, 4 H)."""
    gates = _recurrent(h, weight_hh, bias_hh, 4) + gi  # (N, 4 H)
    i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # (N, H) each: input, forget, output gates
    H = c.shape[1]  # h may be narrower (a projected LSTM's h has proj_size units)
    g = torch.tanh(gates[:, 2 * H:3 * H])  # (N, H) cell candidate
    c_new = f * c + i * g  # (N, H)
    tc = torch.tanh(c_new)  # (N, H)
    h_new = o * tc  # (N, H)
    return h_new, c_new, i, f, g, o, tc


def _lstm_parts(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    """(h_new, c_new) and the pieces of J over [h, c]:

        dc_new/dh = sum_{k = i, f, g} diag(C_k) W_hk  with C_i = g i (1 - i), C_f = c f (1 - f),
                    C_g = i (1 - g^2);                 dc_new/dc = diag(f);
        dh_new/dh = diag(s) dc_new/dh + diag(tc o (1 - o)) W_ho,  s = o (1 - tanh(c_new)^2);
        dh_new/dc = diag(s f).

    Returns h_new, c_new, f, s, C (N, 4, H) for dc_new/dh (C_o = 0) and the W_ho scaling."""
    return _lstm_gated_parts(F.linear(x, weight_ih, bias_ih), h, c, weight_hh, bias_hh)


def _lstm_gated_parts(gi, h, c, weight_hh, bias_hh):
    """``_lstm_parts`` from the input pre-activations gi (N, 4 H)."""
    h_new, c_new, i, f, g, o, tc = _lstm_gated(gi, h, c, weight_hh, bias_hh)
    s = o * (1 - tc * tc)  # (N, H) d h_new / d c_new
    C = torch.stack([g * i * (1 - i), c * f * (1 - f), i * (1 - g * g), tc * o * (1 - o)],
                    dim=1)  # (N, 4, H); the last is dh_new/dh's scaling of W_ho
    return h_new, c_new, f, s, C


def _lstm_jacobian(fn, state, weight_ih, weight_hh, bias_ih, bias_hh, x, diagonal):
    h, c = _split_state(fn, state)
    _check(fn, x, (h, c), weight_ih, weight_hh, bias_ih, bias_hh, 4, diagonal)
    return _lstm_full_from_parts(_lstm_parts(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh),
                                 weight_hh)


def _lstm_full_from_parts(parts, weight_hh):
    """The (h_new, c_new) and dense J (N, 2 H, 2 H) of ``_lstm_jacobian`` from the parts."""
    h_new, c_new, f, s, C = parts
    N, H = h_new.shape
    if weight_hh.dim() == 1:  # four diagonal blocks; build from their diagonals
        w = weight_hh.view(4, H)  # (4, H)
        ch = (C[:, :3] * w[:3]).sum(1)  # (N, H) diag of dc_new/dh
        blocks = (s * ch + C[:, 3] * w[3], s * f, ch, f)  # hh, hc, ch, cc diagonals (N, H)
        J = h_new.new_zeros(N, 2 * H, 2 * H)  # (N, 2 H, 2 H)
        for (r0, c0), d in zip(((0, 0), (0, H), (H, 0), (H, H)), blocks, strict=True):
            J[:, r0:r0 + H, c0:c0 + H].diagonal(dim1=-2, dim2=-1).copy_(d)
        return (h_new, c_new), J
    # Accumulate straight into J's blocks: J is the one (N, 2 H, 2 H) buffer (at large N the
    # first touch of fresh memory is the main cost), and every addcmul_ saves only its small
    # factors, so autograd can differentiate through the in-place writes.
    W = weight_hh.view(4, H, H)  # (4, H, H)
    J = h_new.new_zeros(N, 2 * H, 2 * H)  # (N, 2 H, 2 H)
    for k in range(3):  # views taken afresh at each write, as autograd wants
        J[:, H:, :H].addcmul_(C[:, k, :, None], W[k])  # dc_new/dh
        J[:, :H, :H].addcmul_((s * C[:, k]).unsqueeze(-1), W[k])  # dh_new/dh
    J[:, :H, :H].addcmul_(C[:, 3, :, None], W[3])
    J[:, :H, H:].diagonal(dim1=-2, dim2=-1).copy_(s * f)
    J[:, H:, H:].diagonal(dim1=-2, dim2=-1).copy_(f)
    return (h_new, c_new), J


def _lstm_blocks_from_parts(parts, weight_hh):
    """A diagonal-recurrence LSTM's (h_new, c_new) and its Jacobian as H blocks of 2 x 2,
    Jb (N, H, 2, 2): block i is [[dh_i/dh_i, dh_i/dc_i], [dc_i/dh_i, dc_i/dc_i]]."""
    h_new, c_new, f, s, C = parts
    w = weight_hh.view(4, -1)  # (4, H)
    ch = (C[:, :3] * w[:3]).sum(1)  # (N, H) dc_new/dh
    top = torch.stack([s * ch + C[:, 3] * w[3], s * f], dim=-1)  # (N, H, 2)
    return (h_new, c_new), torch.stack([top, torch.stack([ch, f], dim=-1)], dim=-2)


def _lstm_diagonal(fn, state, weight_ih, weight_hh, bias_ih, bias_hh, x, diagonal):
    h, c = _split_state(fn, state)
    _check(fn, x, (h, c), weight_ih, weight_hh, bias_ih, bias_hh, 4, diagonal)
    return _lstm_diag_from_parts(_lstm_parts(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh),
                                 weight_hh)


def _lstm_diag_from_parts(parts, weight_hh):
    """The (h_new, c_new) and J's diagonal (N, 2 H) of ``_lstm_diagonal`` from the parts."""
    h_new, c_new, f, s, C = parts
    w = _recurrent_diagonal(weight_hh, 4, h_new.shape[1])  # (4, H)
    ch = (C[:, :3] * w[:3]).sum(1)  # (N, H) diag of dc_new/dh
    return (h_new, c_new), torch.cat([s * ch + C[:, 3] * w[3], f], dim=1)  # (N, 2 H)


def lstm(x: Tensor, state: tuple[Tensor, Tensor], weight_ih: Tensor, weight_hh: Tensor,
         bias_ih: Tensor | None = None, bias_hh: Tensor | None = None
         ) -> tuple[Tensor, Tensor]:
    """torch.nn.LSTMCell, gates in torch's order (i, f, g, o):

        i, f, o = sigmoid(W_i* x + b_i* + W_h* h + b_h*),  g = tanh(W_ig x + b_ig + W_hg h + b_hg)
        c_new = f * c + i * g,  h_new = o * tanh(c_new)

    x (N, n), state (h, c) each (N, H), weight_ih (4 H, n), weight_hh (4 H, H), biases (4 H,)
    or None -> (h_new, c_new), each (N, H).
    """
    h, c = _split_state("lstm", state)
    _check("lstm", x, (h, c), weight_ih, weight_hh, bias_ih, bias_hh, 4, False)
    return tuple(torch.lstm_cell(x, (h, c), weight_ih, weight_hh, bias_ih, bias_hh))


def lstm_jacobian(x: Tensor, state: tuple[Tensor, Tensor], weight_ih: Tensor,
                  weight_hh: Tensor, bias_ih: Tensor | None = None,
                  bias_hh: Tensor | None = None) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """``lstm`` and its Jacobian over the state [h, c]: (h_new, c_new), J (N, 2 H, 2 H) with
    blocks [[dh_new/dh, dh_new/dc], [dc_new/dh, dc_new/dc]] (the right two diagonal)."""
    return _lstm_jacobian("lstm_jacobian", state, weight_ih, weight_hh, bias_ih, bias_hh, x,
                          False)


def lstm_jacobian_diagonal(x: Tensor, state: tuple[Tensor, Tensor], weight_ih: Tensor,
                           weight_hh: Tensor, bias_ih: Tensor | None = None,
                           bias_hh: Tensor | None = None
                           ) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """``lstm`` and the diagonal of its [h, c] Jacobian, [diag(dh_new/dh), f]: (N, 2 H)."""
    return _lstm_diagonal("lstm_jacobian_diagonal", state, weight_ih, weight_hh, bias_ih,
                          bias_hh, x, False)


def diag_lstm(x: Tensor, state: tuple[Tensor, Tensor], weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor | None = None, bias_hh: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
    """The LSTM with diagonal recurrence: ``lstm``'s equations with W_hk h replaced by
    w_hk * h, weight_hh = [w_hi, w_hf, w_hg, w_ho] a (4 H,) vector. Unit i of (h_new, c_new)
    depends on unit i of h and c only. x (N, n), state (h, c) each (N, H) -> (h_new, c_new).
    """
    h, c = _split_state("diag_lstm", state)
    _check("diag_lstm", x, (h, c), weight_ih, weight_hh, bias_ih, bias_hh, 4, True)
    return _lstm_forward(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh)[:2]


def diag_lstm_jacobian(x: Tensor, state: tuple[Tensor, Tensor], weight_ih: Tensor,
                       weight_hh: Tensor, bias_ih: Tensor | None = None,
                       bias_hh: Tensor | None = None) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """``diag_lstm`` and its Jacobian over [h, c]: J (N, 2 H, 2 H) made of four diagonal H x H
    blocks (dh/dh, dh/dc, dc/dh, dc/dc)."""
    return _lstm_jacobian("diag_lstm_jacobian", state, weight_ih, weight_hh, bias_ih, bias_hh,
                          x, True)


def diag_lstm_jacobian_blocks(x: Tensor, state: tuple[Tensor, Tensor], weight_ih: Tensor,
                              weight_hh: Tensor, bias_ih: Tensor | None = None,
                              bias_hh: Tensor | None = None
                              ) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """``diag_lstm`` and its exact Jacobian as H blocks of 2 x 2, Jb (N, H, 2, 2): block i
    couples h_i and c_i (``paraseq.solve.cell``'s block protocol, k = 2, G = H)."""
    h, c = _split_state("diag_lstm_jacobian_blocks", state)
    _check("diag_lstm_jacobian_blocks", x, (h, c), weight_ih, weight_hh, bias_ih, bias_hh, 4,
           True)
    return _lstm_blocks_from_parts(_lstm_parts(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh),
                                   weight_hh)


def diag_lstm_jacobian_diagonal(x: Tensor, state: tuple[Tensor, Tensor], weight_ih: Tensor,
                                weight_hh: Tensor, bias_ih: Tensor | None = None,
                                bias_hh: Tensor | None = None
                                ) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """``diag_lstm`` and the diagonal of its [h, c] Jacobian (the diagonals of the dh/dh and
    dc/dc blocks): (N, 2 H). The off-diagonal blocks dh/dc and dc/dh are not in it, so this is
    a quasi-Newton linearisation for the LSTM, not the exact one."""
    return _lstm_diagonal("diag_lstm_jacobian_diagonal", state, weight_ih, weight_hh, bias_ih,
                          bias_hh, x, True)
