"""paraseq.cells: the cells against torch's, every analytic Jacobian and diagonal against
torch.func, solve_recurrence on the cells against the plain loop (values and gradients), and
bad input.

Shape letters: B batch, T time, N rows, n input size, H hidden size, D state size.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paraseq
from paraseq import cells
from paraseq.cells import DiagGRUCell, DiagLSTMCell, ElmanCell, GRUCell, LSTMCell

F64 = torch.float64

# name -> (constructor of ours, constructor of torch's or None, tuple state?)
KINDS = {
    "tanh": (lambda n, H, **kw: ElmanCell(n, H, nonlinearity="tanh", **kw),
             lambda n, H, **kw: torch.nn.RNNCell(n, H, nonlinearity="tanh", **kw), False),
    "relu": (lambda n, H, **kw: ElmanCell(n, H, nonlinearity="relu", **kw),
             lambda n, H, **kw: torch.nn.RNNCell(n, H, nonlinearity="relu", **kw), False),
    "gru": (GRUCell, torch.nn.GRUCell, False),
    "lstm": (LSTMCell, torch.nn.LSTMCell, True),
    "diag_gru": (DiagGRUCell, None, False),
    "diag_lstm": (DiagLSTMCell, None, True),
}
TORCH_KINDS = ["tanh", "relu", "gru", "lstm"]


def make(kind, n, H, *, bias=True, dtype=F64, seed=0):
    torch.manual_seed(seed)
    return KINDS[kind][0](n, H, bias=bias, dtype=dtype)


def random_state(kind, N, H, dtype=F64, generator=None):
    hs = [torch.randn(N, H, dtype=dtype, generator=generator)
          for _ in range(2 if KINDS[kind][2] else 1)]
    return tuple(hs) if len(hs) == 2 else hs[0]


def flat(state):
    return torch.cat(state, dim=-1) if isinstance(state, tuple) else state


def loop(cell, x, h0):
    """The reference: the plain loop over time with autograd, without paraseq. x (B, T, n)."""
    h, out = h0, []
    for t in range(x.shape[1]):
        h = cell(x[:, t], h)
        out.append(h)
    if isinstance(h0, tuple):
        return tuple(torch.stack([o[i] for o in out], dim=1) for i in range(len(h0)))
    return torch.stack(out, dim=1)  # (B, T, H)


# ----------------------------------------------------------------------------- torch's cells


@pytest.mark.parametrize("dtype, atol", [(F64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_modules_equal_torch_cells_both_ways(kind, bias, dtype, atol):
    ours_cls, torch_cls, is_tuple = KINDS[kind]
    n, H, N = 5, 7, 11
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, n, dtype=dtype, generator=g)
    h = random_state(kind, N, H, dtype, g)
    for direction in ("torch->ours", "ours->torch"):
        torch.manual_seed(2 if direction == "torch->ours" else 3)
        src = (torch_cls if direction == "torch->ours" else ours_cls)(n, H, bias=bias,
                                                                      dtype=dtype)
        dst = (ours_cls if direction == "torch->ours" else torch_cls)(n, H, bias=bias,
                                                                      dtype=dtype)
        dst.load_state_dict(src.state_dict())  # strict: the same names and shapes
        for h_in in (h, None):
            a, b = src(x, h_in), dst(x, h_in)
            assert flat(a).dtype == dtype
            torch.testing.assert_close(flat(a), flat(b), rtol=0, atol=atol)
        # unbatched, as torch's cells accept it
        h1 = tuple(t[0] for t in h) if is_tuple else h[0]
        torch.testing.assert_close(flat(src(x[0], h1)), flat(dst(x[0], h1)), rtol=0, atol=atol)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_parameters_and_initialisation_are_torchs(kind, bias):
    ours_cls, torch_cls, _ = KINDS[kind]
    torch.manual_seed(7)
    ours = ours_cls(4, 6, bias=bias)
    torch.manual_seed(7)
    ref = torch_cls(4, 6, bias=bias)
    a, b = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert list(a) == list(b)
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)  # same draws, same order
    assert ours.hidden_size == 6 and ours.input_size == 4 and ours.bias is bias
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]


@pytest.mark.parametrize("kind", ["diag_gru", "diag_lstm"])
def test_diagonal_cells_parameters(kind):
    K = 3 if kind == "diag_gru" else 4
    cell = make(kind, 4, 9)
    shapes = {k: tuple(v.shape) for k, v in cell.named_parameters()}
    assert shapes == {"weight_ih": (K * 9, 4), "weight_hh": (K * 9,), "bias_ih": (K * 9,),
                      "bias_hh": (K * 9,)}
    for p in cell.parameters():
        assert p.abs().max() <= 1 / 3 and p.std() > 0.05  # uniform(-1/sqrt(H), 1/sqrt(H))
    no_bias = KINDS[kind][0](4, 9, bias=False)
    assert no_bias.bias_ih is None and set(no_bias.state_dict()) == {"weight_ih", "weight_hh"}
    if kind == "diag_lstm":
        assert no_bias.state_sizes == (9, 9)
    else:
        assert not hasattr(no_bias, "state_sizes")


def test_state_sizes():
    assert LSTMCell(2, 5).state_sizes == (5, 5) and DiagLSTMCell(2, 5).state_sizes == (5, 5)
    assert GRUCell(2, 5).hidden_size == 5 and isinstance(ElmanCell(2, 5).hidden_size, int)


# ----------------------------------------------------------------------------- Jacobians


def autograd_jacobian(cell, x, h):
    """J (N, D, D) by torch.func: jacrev of one row, vmapped over the rows."""
    is_tuple = isinstance(h, tuple)
    H = (h[0] if is_tuple else h).shape[-1]

    def row(x1, h1):  # (n,), (D,) -> (D,)
        state = (h1[None, :H], h1[None, H:]) if is_tuple else h1[None]
        return flat(cell(x1[None], state))[0]

    return torch.func.vmap(torch.func.jacrev(row, argnums=1))(x, flat(h))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(list(KINDS)), N=st.integers(1, 6), n=st.integers(1, 5),
       H=st.integers(1, 6), bias=st.booleans(), scale=st.sampled_from([0.5, 1.0, 3.0]),
       seed=st.integers(0, 2**16))
def test_analytic_jacobians_equal_autograd(kind, N, n, H, bias, scale, seed):
    cell = make(kind, n, H, bias=bias, seed=seed)
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(scale * H ** 0.5)  # beyond the initial range: saturated and linear gates
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, n, dtype=F64, generator=g)
    h = random_state(kind, N, H, generator=g)
    J_ref = autograd_jacobian(cell, x, h)  # (N, D, D)
    out, J = cell.forward_with_jacobian(x, h)
    out_d, d = cell.forward_with_jacobian_diagonal(x, h)
    D = J_ref.shape[-1]
    assert J.shape == (N, D, D) and d.shape == (N, D)
    # forward runs torch's kernel, the Jacobian paths the same equations in Python: an ulp
    torch.testing.assert_close(flat(out), flat(cell(x, h)), rtol=0, atol=1e-14)
    torch.testing.assert_close(flat(out_d), flat(cell(x, h)), rtol=0, atol=1e-14)
    torch.testing.assert_close(J, J_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(d, torch.diagonal(J_ref, dim1=-2, dim2=-1), rtol=0, atol=1e-10)
    if kind.startswith("diag"):  # diagonal (GRU), or four diagonal H x H blocks (LSTM)
        mask = torch.eye(H, dtype=torch.bool).repeat(D // H, D // H)  # (D, D)
        assert (J_ref[:, ~mask] == 0).all() and (J[:, ~mask] == 0).all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_jacobians_are_differentiable_in_the_parameters(kind):
    """grad="unrolled" differentiates through the linearisation: the analytic Jacobian must
    carry the parameters' gradients (checked against autograd's Jacobian's)."""
    cell = make(kind, 3, 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, dtype=F64, generator=g)
    h = random_state(kind, 5, 4, generator=g)
    w = torch.randn(5, flat(h).shape[-1], flat(h).shape[-1], dtype=F64, generator=g)
    for fn in ("full", "diag"):
        if fn == "full":
            a = (cell.forward_with_jacobian(x, h)[1] * w).sum()
            b = (autograd_jacobian(cell, x, h) * w).sum()
        else:
            a = (cell.forward_with_jacobian_diagonal(x, h)[1] * w[:, 0]).sum()
            b = (torch.diagonal(autograd_jacobian(cell, x, h), dim1=-2, dim2=-1) * w[:, 0]).sum()
        ga, gb = (torch.autograd.grad(s, list(cell.parameters()), allow_unused=True,
                                      materialize_grads=True) for s in (a, b))
        for u, v in zip(ga, gb, strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=1e-10)


def test_plain_functions_equal_the_modules():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=F64, generator=g)
    h = torch.randn(4, 5, dtype=F64, generator=g)
    c = torch.randn(4, 5, dtype=F64, generator=g)
    for kind, fns in (("tanh", (cells.elman, cells.elman_jacobian,
                                cells.elman_jacobian_diagonal)),
                      ("gru", (cells.gru, cells.gru_jacobian, cells.gru_jacobian_diagonal)),
                      ("diag_gru", (cells.diag_gru, cells.diag_gru_jacobian,
                                    cells.diag_gru_jacobian_diagonal)),
                      ("lstm", (cells.lstm, cells.lstm_jacobian, cells.lstm_jacobian_diagonal)),
                      ("diag_lstm", (cells.diag_lstm, cells.diag_lstm_jacobian,
                                     cells.diag_lstm_jacobian_diagonal))):
        cell = make(kind, 3, 5)
        state = (h, c) if KINDS[kind][2] else h
        params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        assert torch.equal(flat(fns[0](x, state, *params)), flat(cell(x, state)))
        assert torch.equal(fns[1](x, state, *params)[1], cell.forward_with_jacobian(x, state)[1])
        assert torch.equal(fns[2](x, state, *params)[1],
                           cell.forward_with_jacobian_diagonal(x, state)[1])


# ----------------------------------------------------------------------------- solve_recurrence


@pytest.mark.parametrize("method", ["newton", "quasi_newton"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_solve_recurrence_equals_the_loop(kind, method, monkeypatch):
    from paraseq.solve import api

    # the analytic Jacobians in the general loop (the compiled kernels: tests/test_solve.py)
    monkeypatch.setattr(api, "COMPILED_CELLS", False)
    cell = make(kind, 3, 4)
    g = torch.Generator().manual_seed(1)
    B, T = 2, 80
    x = torch.randn(B, T, 3, dtype=F64, generator=g)
    h0 = random_state(kind, B, 4, generator=g)
    with torch.no_grad():
        ref = loop(cell, x, h0)
        out, info = paraseq.solve_recurrence(cell, x, h0, method=method, jacobian="analytic",
                                             tol=1e-12, return_info=True)
    assert info.jacobian == "analytic" and info.converged and not info.fell_back
    torch.testing.assert_close(flat(out), flat(ref), rtol=0, atol=1e-9)
    # h0=None: zeros sized by hidden_size / state_sizes
    with torch.no_grad():
        zero = paraseq.solve_recurrence(cell, x, method=method, jacobian="auto", tol=1e-12)
        zeros = torch.zeros(B, 4, dtype=F64)
        ref0 = loop(cell, x, (zeros, zeros) if KINDS[kind][2] else zeros)
    torch.testing.assert_close(flat(zero), flat(ref0), rtol=0, atol=1e-9)


def test_diag_gru_newton_is_quasi_newton_and_fast():
    """DiagGRU's Jacobian is diagonal, so quasi_newton with the analytic diagonal is exact
    Newton: quadratic convergence, a handful of iterations at T = 10^4."""
    cell = make("diag_gru", 2, 8)
    g = torch.Generator().manual_seed(0)
    T = 10_000
    x = torch.randn(1, T, 2, dtype=F64, generator=g)
    h0 = torch.zeros(1, 8, dtype=F64)
    with torch.no_grad():
        out, info = paraseq.solve_recurrence(cell, x, h0, method="quasi_newton",
                                             jacobian="analytic", return_info=True)
        ref = loop(cell, x, h0)
    assert info.converged and not info.fell_back
    assert info.iterations <= 10, info.residuals
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    with torch.no_grad():  # the dense Newton iteration takes the same steps
        _, dense = paraseq.solve_recurrence(cell, x, h0, method="newton", jacobian="analytic",
                                            return_info=True)
    assert dense.iterations == info.iterations
    for a, b in zip(dense.residuals[:-1], info.residuals[:-1], strict=True):
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("method", ["newton", "quasi_newton"])
@pytest.mark.parametrize("kind", ["gru", "diag_gru"])
def test_implicit_gradients_equal_autograd_through_the_loop(kind, method):
    B, T, n, H = 2, 40, 3, 4
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(B, T, n, dtype=F64, generator=g)
    h00 = torch.randn(B, H, dtype=F64, generator=g)
    w = torch.randn(B, T, H, dtype=F64, generator=g)
    grads = []
    for use_solver in (True, False):
        cell = make(kind, n, H, seed=5)
        x = x0.clone().requires_grad_(True)
        h0 = h00.clone().requires_grad_(True)
        out = paraseq.solve_recurrence(cell, x, h0, method=method, jacobian="analytic",
                                       tol=1e-12) if use_solver else loop(cell, x, h0)
        (out * w).sum().backward()
        grads.append([x.grad, h0.grad, *(p.grad for p in cell.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------- bad input


def test_bad_input():
    with pytest.raises(ValueError, match=r"nonlinearity must be one of 'tanh', 'relu'; got "
                                         r"'sigmoid'"):
        ElmanCell(3, 4, nonlinearity="sigmoid")
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    W_ih, W_hh = torch.randn(4, 3), torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"elman: nonlinearity must be one of 'tanh', 'relu'"):
        cells.elman(x, h, W_ih, W_hh, nonlinearity="gelu")
    with pytest.raises(ValueError, match=r"elman_jacobian: nonlinearity must be one of"):
        cells.elman_jacobian(x, h, W_ih, W_hh, nonlinearity="gelu")
    with pytest.raises(ValueError, match=r"gru: weight_hh must have shape \(3 H, H\) = "
                                         r"\(12, 4\)"):
        cells.gru(x, h, torch.randn(12, 3), torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"diag_gru: weight_hh must have shape \(3 H,\)"):
        cells.diag_gru(x, h, torch.randn(12, 3), torch.randn(12, 4))
    with pytest.raises(ValueError, match=r"gru: weight_ih must have shape"):
        cells.gru(x, h, torch.randn(12, 2), torch.randn(12, 4))
    with pytest.raises(ValueError, match=r"bias_hh must have shape"):
        cells.gru(x, h, torch.randn(12, 3), torch.randn(12, 4), None, torch.randn(4))
    with pytest.raises(ValueError, match=r"h must have shape \(N, H\) = \(2, H\)"):
        cells.gru(x, torch.randn(3, 4), torch.randn(12, 3), torch.randn(12, 4))
    with pytest.raises(TypeError, match=r"lstm: state must be a tuple \(h, c\)"):
        cells.lstm(x, h, torch.randn(16, 3), torch.randn(16, 4))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor; got list"):
        cells.gru([[1.0]], h, torch.randn(12, 3), torch.randn(12, 4))
    with pytest.raises(ValueError, match=r"GRUCell.forward: x must have shape"):
        GRUCell(3, 4)(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match=r"GRUCell.forward_with_jacobian: x must have shape "
                                         r"\(N, n\)"):
        GRUCell(3, 4).forward_with_jacobian(torch.randn(3), torch.randn(4))
    with pytest.raises(TypeError, match=r"LSTMCell.forward: h must be a tuple \(h, c\)"):
        LSTMCell(3, 4)(x, h)
    with pytest.raises(ValueError, match=r"hidden_size must be >= 1; got 0"):
        GRUCell(3, 0)
    with pytest.raises(TypeError, match=r"input_size must be an int; got float"):
        DiagGRUCell(3.0, 4)


def test_diag_lstm_blocks_are_its_dense_jacobian():
    from paraseq.solve.cell import blocks_to_dense

    cell = make("diag_lstm", 3, 5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, dtype=F64, generator=g)
    state = (torch.randn(6, 5, dtype=F64, generator=g), torch.randn(6, 5, dtype=F64, generator=g))
    out, Jb = cell.forward_with_jacobian_blocks(x, state)
    assert Jb.shape == (6, 5, 2, 2)
    out_d, J = cell.forward_with_jacobian(x, state)
    torch.testing.assert_close(blocks_to_dense(Jb), J, rtol=0, atol=1e-15)
    assert torch.equal(flat(out), flat(out_d))
    params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    assert torch.equal(cells.diag_lstm_jacobian_blocks(x, state, *params)[1], Jb)
