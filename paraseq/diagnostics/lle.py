"""The largest Lyapunov exponent (LLE) of a recurrence along a trajectory.

For h_t = f(x_t, h_{t-1}) with Jacobians J_t = df/dh at (x_t, h_{t-1}), the LLE is the growth
rate of the product J_T ... J_1: lambda = lim (1 / T) log |J_T ... J_1 v| for a generic v.
It is estimated by power iteration along the trajectory: v <- J_t v / |J_t v|, the log-norms
log |J_t v| averaged over t, from a few random starts v. Negative: perturbations die out, the
system is predictable, and parallel Newton converges in O(log T) iterations; positive: chaos,
and Newton's iteration count grows with T (Gonzalez et al., NeurIPS 2025, "Predictability
enables parallelization of nonlinear state space models").

The overshoot constant a >= 1 bounds the transients around that rate: along the power
iteration, |J_t ... J_{s+1} v_s| <= a exp(lambda (t - s)) for every window s < t (a lower
bound on the operator-norm constant of the same inequality, which the paper's bounds use).

Shape letters: ``...`` the caller's batch dims, B their product, S random starts, T time,
n input size, D state size (summed over the tensors of a tuple state).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..solve.cell import FlatCell, State, StateLayout
from ..solve.iterate import sequential, shift

__all__ = ["JACOBIANS", "LyapunovResult", "jvp_function", "lyapunov"]

JACOBIANS = ("auto", "analytic", "protocol", "autograd")
"""How ``lyapunov`` forms J_t v: ``"analytic"`` matrix-free from the gates of paraseq's own
cells (``paraseq.cells``), ``"protocol"`` J_t from the cell's ``forward_with_jacobian``
times v, ``"autograd"`` by autograd through the cell (any cell: reverse-mode Jacobians
over windows of steps for D <= 64, a ``torch.func.jvp`` per step above); ``"auto"`` the first
that the cell supports, in that order."""

_WINDOW_SCALARS = 1 << 22
"""Scalars (rows x coefficients per row) of the Jacobians formed in one batched call."""

_AUTOGRAD_DENSE_MAX = 64
"""Up to this state size, jacobian="autograd" forms each window's Jacobians by D batched
vector-Jacobian products (FlatCell.autograd_full) and the power iteration multiplies by them;
above it, one ``torch.func.jvp`` per step (no D x D matrices kept). Both are exact."""


@dataclass
class LyapunovResult:
    """What ``lyapunov`` estimated, in float64.

    exponent: (...,) the LLE per sequence, averaged over the random starts.
    per_start: (S, ...) the estimate of each start (their spread is the estimate's noise).
    overshoot: (...,) the overshoot constant a >= 1 (the largest over the starts).
    log_growth: (S, ..., T) log |J_t v_{t-1}|, the one-step growth along the power iteration.
    method: the Jacobian source used ("analytic", "protocol" or "autograd").
    """

    exponent: Tensor
    per_start: Tensor
    overshoot: Tensor
    log_growth: Tensor
    method: str

    @property
    def spread(self) -> Tensor:
        """(...,) the standard deviation of the estimate over the starts (0 for one start)."""
        if self.per_start.shape[0] < 2:
            return torch.zeros_like(self.exponent)
        return self.per_start.std(dim=0)


# ----------------------------------------------------------------------------- J v


def _paraseq_kind(cell) -> str | None:
    from ..cells import modules

    kinds = {modules.ElmanCell: "elman", modules.GRUCell: "gru", modules.LSTMCell: "lstm",
             modules.DiagGRUCell: "gru", modules.DiagLSTMCell: "lstm"}
    return kinds.get(type(cell))


def _coefficients(kind: str, cell, x: Tensor, h: Tensor) -> tuple[Tensor, ...]:
    """The per-row scalings of J's matrix-free form for rows x (N, n), h (N, D)."""
    from ..cells import functional as CF

    params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    if kind == "elman":
        _, slope = CF._elman_parts("lyapunov", x, h, *params, cell.nonlinearity)
        return (slope,)  # (N, H)
    if kind == "gru":  # J = diag(z) + sum_k diag(C_k) W_hk
        _, z, C = CF._gru_parts(x, h, *params)
        return z, C  # (N, H), (N, 3, H)
    H = cell.hidden_size  # LSTM over [h, c]
    _, _, f, s, C = CF._lstm_parts(x, h[:, :H], h[:, H:], *params)
    return f, s, C  # (N, H), (N, H), (N, 4, H)


def _apply_analytic(kind: str, weight_hh: Tensor, coef: tuple[Tensor, ...], v: Tensor) -> Tensor:
    """J v from the coefficients of one step (each (B, ...)) and v (S, B, D), broadcasting
    over the starts S."""
    if kind == "elman":
        return coef[0] * (v @ weight_hh.T)  # (S, B, H)
    if kind == "gru":
        z, C = coef
        H = v.shape[-1]
        Wv = (v.unsqueeze(-2) * weight_hh.view(3, H)) if weight_hh.dim() == 1 else \
            (v @ weight_hh.T).unflatten(-1, (3, H))  # (S, B, 3, H): W_hk v
        return z * v + (C * Wv).sum(-2)  # (S, B, H)
    f, s, C = coef
    H = f.shape[-1]
    vh, vc = v[..., :H], v[..., H:]
    Wv = (vh.unsqueeze(-2) * weight_hh.view(4, H)) if weight_hh.dim() == 1 else \
        (vh @ weight_hh.T).unflatten(-1, (4, H))  # (S, B, 4, H): W_hk v_h
    dc = (C[:, :3] * Wv[..., :3, :]).sum(-2) + f * vc  # (S, B, H)
    dh = s * dc + C[:, 3] * Wv[..., 3, :]  # (S, B, H)
    return torch.cat([dh, dc], dim=-1)  # (S, B, 2 H)


def jvp_function(cell, fc: FlatCell, X: Tensor, Hp: Tensor, source: str
                 ) -> Callable[[int, Tensor], Tensor]:
    """``jv(t, V) -> J_t V`` for V (S, B, D), the Jacobians taken at (X[:, t], Hp[:, t]) with
    X (B, T, n), Hp (B, T, D) (the state each step reads). Coefficients (analytic) or
    Jacobians (protocol) are formed for windows of steps at a time."""
    B, T, D = Hp.shape
    kind = _paraseq_kind(cell) if source == "analytic" else None
    per_row = 5 * D if kind is not None else D * D  # scalars kept per row of a window
    window = max(1, _WINDOW_SCALARS // max(B * per_row, 1))
    cache: dict[str, object] = {"start": -window - 1, "data": None}

    def rows(t0: int, t1: int) -> tuple[Tensor, Tensor]:
        return (X[:, t0:t1].reshape(B * (t1 - t0), -1),
                Hp[:, t0:t1].reshape(B * (t1 - t0), D))

    if source == "autograd" and D > _AUTOGRAD_DENSE_MAX:
        def f_of(x: Tensor):
            return lambda h: fc(x, h)

        def jv(t: int, V: Tensor) -> Tensor:
            S = V.shape[0]
            x = X[:, t].repeat(S, 1)  # (S B, n)
            h = Hp[:, t].repeat(S, 1)  # (S B, D)
            _, out = torch.func.jvp(f_of(x), (h,), (V.reshape(S * B, D),))
            return out.reshape(S, B, D)
        return jv

    def load(t: int):
        if not (cache["start"] <= t < cache["start"] + window):  # type: ignore[operator]
            t0 = (t // window) * window
            t1 = min(T, t0 + window)
            x, h = rows(t0, t1)
            if kind is not None:
                data = tuple(c.reshape(B, t1 - t0, *c.shape[1:])
                             for c in _coefficients(kind, cell, x, h))
            else:
                res = fc.autograd_full(x, h) if source == "autograd" else fc.analytic_full(x, h)
                if res is None:
                    raise TypeError(f"lyapunov: jacobian='protocol' needs a cell whose "
                                    f"forward_with_jacobian serves these inputs; "
                                    f"{type(cell).__name__}'s returned NotImplemented. Use "
                                    f"jacobian='autograd'")
                data = res[1].reshape(B, t1 - t0, D, D)  # (B, Tw, D, D)
            cache["start"], cache["data"] = t0, data
        return t - cache["start"], cache["data"]  # type: ignore[operator]

    if kind is not None:
        W = cell.weight_hh

        def jv(t: int, V: Tensor) -> Tensor:
            i, coef = load(t)
            return _apply_analytic(kind, W, tuple(c[:, i] for c in coef), V)  # (S, B, D)
        return jv

    def jv(t: int, V: Tensor) -> Tensor:
        i, J = load(t)
        return torch.matmul(J[:, i], V.unsqueeze(-1)).squeeze(-1)  # (S, B, D)
    return jv


# ----------------------------------------------------------------------------- the estimate


def _as_float64(cell):
    """A float64 copy of a module cell (its parameters and buffers); other callables as is."""
    if isinstance(cell, torch.nn.Module):
        return copy.deepcopy(cell).to(torch.float64)
    return cell


def _state_sizes(cell) -> tuple[int, ...] | None:
    sizes = getattr(cell, "state_sizes", None)
    if sizes is not None:
        return tuple(int(s) for s in sizes)
    if isinstance(cell, torch.nn.LSTMCell):
        return (cell.hidden_size, cell.hidden_size)
    size = getattr(cell, "hidden_size", None)
    return (size,) if isinstance(size, int) else None


def resolve_jacobian(cell, jacobian: str) -> str:
    """The source ``jacobian`` names for this cell ("auto" resolved), with checks."""
    if jacobian not in JACOBIANS:
        raise ValueError(f"lyapunov: unknown jacobian {jacobian!r}; valid: "
                         + ", ".join(repr(j) for j in JACOBIANS))
    has_analytic = _paraseq_kind(cell) is not None
    has_protocol = callable(getattr(cell, "forward_with_jacobian", None))
    if jacobian == "auto":
        return "analytic" if has_analytic else "protocol" if has_protocol else "autograd"
    if jacobian == "analytic" and not has_analytic:
        raise ValueError(f"lyapunov: jacobian='analytic' is the matrix-free J v of paraseq's own "
                         f"cells (paraseq.cells); {type(cell).__name__} is not one. Use "
                         f"jacobian='protocol' (cells with forward_with_jacobian) or 'autograd'")
    if jacobian == "protocol" and not has_protocol:
        raise ValueError(f"lyapunov: jacobian='protocol' needs a cell with "
                         f"forward_with_jacobian; {type(cell).__name__} has none. Use "
                         f"jacobian='autograd'")
    return jacobian


def power_iteration(jv: Callable[[int, Tensor], Tensor], V: Tensor, T: int) -> Tensor:
    """log |J_t v_{t-1}| for t = 1..T, v normalised after each step: (S, B, T). A step whose
    product vanishes (J_t v = 0) logs -inf and keeps the previous direction."""
    V = V / V.norm(dim=-1, keepdim=True)
    out = V.new_empty(*V.shape[:2], T)  # (S, B, T)
    for t in range(T):
        W = jv(t, V)  # (S, B, D)
        norm = W.norm(dim=-1)  # (S, B)
        out[..., t] = norm.log()
        V = torch.where((norm > 0).unsqueeze(-1), W / norm.clamp_min(1e-300).unsqueeze(-1), V)
    return out


def overshoot_constant(log_growth: Tensor, exponent: Tensor) -> Tensor:
    """a = max(1, max over windows s < t of exp(sum_{s < k <= t} log_growth_k - lambda (t -
    s))): the largest excess of the power iteration's growth over the rate lambda, along the
    last dim of log_growth (..., T), lambda (...,) broadcasting. Returns (...,)."""
    excess = log_growth - exponent.unsqueeze(-1)  # (..., T)
    S = torch.cat([torch.zeros_like(excess[..., :1]), excess.cumsum(-1)], dim=-1)  # (..., T+1)
    lowest = torch.cummin(S[..., :-1], dim=-1).values  # (..., T): min over s < t
    rise = (S[..., 1:] - lowest).amax(dim=-1).nan_to_num(nan=0.0, neginf=0.0)
    return rise.clamp_min(0.0).exp()


def _check(cell, inputs, starts, burn_in):
    if not callable(cell):
        raise TypeError(f"lyapunov: cell must be callable as cell(x_t, h_prev) -> h_t; got "
                        f"{type(cell).__name__}")
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        got = inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__
        raise TypeError(f"lyapunov: inputs must be a floating point torch.Tensor of shape "
                        f"(..., T, n); got {got}")
    if inputs.dim() < 2 or inputs.shape[-2] < 1:
        raise ValueError(f"lyapunov: inputs must have shape (..., T, n) with T >= 1; got "
                         f"{tuple(inputs.shape)}")
    if isinstance(starts, bool) or not isinstance(starts, int) or starts < 1:
        raise ValueError(f"lyapunov: starts must be an int >= 1; got {starts!r}")
    T = inputs.shape[-2]
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or not 0 <= burn_in < T:
        raise ValueError(f"lyapunov: burn_in must be an int in [0, T) = [0, {T}); got "
                         f"{burn_in!r}")


def _flat_state(state: State, layout: StateLayout, batch: torch.Size, what: str,
                time: int | None) -> Tensor:
    flat = layout.flatten(state).to(torch.float64)
    tail = flat.shape[-1:] if time is None else flat.shape[-2:]
    if time is not None and (flat.dim() < 2 or flat.shape[-2] != time):
        raise ValueError(f"lyapunov: {what} must have shape (..., T, D) with T = {time}; got "
                         f"{tuple(flat.shape)}")
    try:
        return flat.expand(*batch, *tail).reshape(math.prod(batch), *tail)
    except RuntimeError:
        raise ValueError(f"lyapunov: {what} has shape {tuple(flat.shape)}, whose batch dims do "
                         f"not broadcast to the inputs' {tuple(batch)}") from None


@contextlib.contextmanager
def one_thread(small: bool):
    """torch on one intra-op thread while ``small``: a step's tensors (a few thousand
    scalars) are too small to split, and on a loaded machine a second thread's wake-ups cost
    up to 100x the step itself. The setting is restored on exit."""
    before = torch.get_num_threads()
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


_SMALL_STEP = 1 << 16
"""Scalars per step (S B D^2) under which the loops run on one thread (``one_thread``)."""


@torch.no_grad()
def lyapunov(cell: Callable, inputs: Tensor, h: State | None = None, h0: State | None = None,
             *, starts: int = 3, jacobian: str = "auto", burn_in: int | None = None,
             generator: torch.Generator | None = None) -> LyapunovResult:
    """The largest Lyapunov exponent of h_t = cell(x_t, h_{t-1}) along a trajectory.

    Args:
        cell: ``cell(x, h) -> h_new`` in torch's cell convention (see ``solve_recurrence``);
            a tuple state (LSTM's (h, c)) counts as the concatenation of its tensors.
        inputs: (..., T, n).
        h: the trajectory (..., T, D) (or a tuple) along which the Jacobians are taken; None
            runs the sequential loop from h0 (in float64).
        h0: the state before the first step; None means zeros sized by the cell's
            ``hidden_size`` / ``state_sizes``.
        starts: random unit vectors the power iteration starts from (S); their estimates are
            averaged.
        jacobian: ``"auto"``, ``"analytic"``, ``"protocol"`` or ``"autograd"`` (``JACOBIANS``).
        burn_in: first steps left out of the average (the random vector's alignment to the
            growing direction); default min(T // 10, 100). The overshoot is measured over all
            steps, against the exponent of the steps after the burn-in.
        generator: draws the starts (torch's default generator if None).

    Module cells are evaluated as a float64 copy; a plain function is called on float64
    tensors. Everything after the cell (the vectors, the logs, the averages) is float64.

    Returns:
        ``LyapunovResult`` (exponent (...,), per_start (S, ...), overshoot (...,),
        log_growth (S, ..., T)).
    """
    if burn_in is None and isinstance(inputs, Tensor) and inputs.dim() >= 2:
        burn_in = min(inputs.shape[-2] // 10, 100)
    _check(cell, inputs, starts, burn_in)
    source = resolve_jacobian(cell, jacobian)
    batch = inputs.shape[:-2]
    D = sum(_state_sizes(cell) or (64,))
    with one_thread(starts * math.prod(batch) * D * D < _SMALL_STEP):
        return _lyapunov(cell, inputs, h, h0, starts, source, burn_in, generator)


def _lyapunov(cell, inputs, h, h0, starts, source, burn_in, generator) -> LyapunovResult:
    batch, (T, n) = inputs.shape[:-2], inputs.shape[-2:]
    B = math.prod(batch)
    cell64 = _as_float64(cell)
    X = inputs.detach().to(torch.float64).reshape(B, T, n)  # (B, T, n)
    if h0 is None:
        sizes = _state_sizes(cell)
        if sizes is None:
            raise ValueError(f"lyapunov: h0=None needs a cell with a 'hidden_size' or "
                             f"'state_sizes' attribute; {type(cell).__name__} has neither. "
                             f"Pass h0 of shape (..., D)")
        zeros = tuple(X.new_zeros(*batch, s) for s in sizes)
        is_tuple = len(sizes) > 1 or getattr(cell, "state_sizes", None) is not None
        h0 = zeros if is_tuple else zeros[0]
    layout = StateLayout.of(h0, "h0")
    fc = FlatCell(cell64, layout)
    D = layout.D
    h0_flat = _flat_state(h0, layout, batch, "h0", None)  # (B, D)
    if h is None:
        H = sequential(fc, X, h0_flat, torch.float64)  # (B, T, D)
    else:
        if StateLayout.of(h, "h") != layout:
            raise ValueError(f"lyapunov: h must have h0's structure (feature sizes "
                             f"{layout.sizes}); got {StateLayout.of(h, 'h').sizes}")
        H = _flat_state(h, layout, batch, "h", T)  # (B, T, D)
    if H.dtype != torch.float64:
        raise TypeError(f"lyapunov: the cell returned {H.dtype} on float64 inputs; give it "
                        f"float64 parameters")
    finite = torch.isfinite(H).all(dim=-1)  # (B, T)
    if not bool(finite.all()):
        b, t = (int(i) for i in torch.nonzero(~finite)[0])
        why = "the inputs are not finite there" if not bool(torch.isfinite(X[b, t]).all()) \
            else "the recurrence diverges" if h is None else "h is not finite there"
        raise ValueError(f"lyapunov: the trajectory is not finite at sequence {b} (flattened "
                         f"batch index), step {t}: {why}; the exponent needs a finite "
                         f"trajectory (pass a finite h for a cell whose Jacobian does not "
                         f"depend on it)")
    Hp = shift(H, h0_flat)  # (B, T, D)
    jv = jvp_function(cell64, fc, X, Hp, source)
    V = torch.randn(starts, B, D, dtype=torch.float64, generator=generator,
                    device="cpu").to(X.device)  # (S, B, D)
    logs = power_iteration(jv, V, T)  # (S, B, T)
    per_start = logs[..., burn_in:].mean(-1)  # (S, B)
    exponent = per_start.mean(0)  # (B,)
    over = overshoot_constant(logs, exponent).amax(0)  # (B,)
    return LyapunovResult(exponent=exponent.reshape(batch),
                          per_start=per_start.reshape(starts, *batch),
                          overshoot=over.reshape(batch),
                          log_growth=logs.reshape(starts, *batch, T), method=source)
