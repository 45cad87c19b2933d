"""paraseq.solve._graph_pass: products by zero dropped, products over one term as broadcast
multiplies; the compiled functions' results unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as Fn
from torch.fx.experimental.proxy_tensor import make_fx

from paraseq.solve import _graph_pass as gp
from paraseq.solve import jit

aten = torch.ops.aten


def _targets(graph: fx.Graph) -> list:
    return [n.target for n in graph.nodes if n.op == "call_function"]


def test_rank_one_products_become_multiplies_with_the_same_values():
    x, w, b = torch.randn(50, 1), torch.randn(6, 1), torch.randn(6)

    def f(x, w, b):
        return torch.addmm(b, x, w.t()) + torch.mm(x, w.t()) * 2

    gm = make_fx(f)(x, w, b)
    assert gp.rank_one_products(gm.graph) == 2
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert aten.mm.default not in _targets(gm.graph)
    assert aten.addmm.default not in _targets(gm.graph)
    torch.testing.assert_close(gm(x, w, b), f(x, w, b), rtol=0, atol=1e-6)


def test_wider_products_are_left_to_the_blas():
    x, w = torch.randn(50, 3), torch.randn(6, 3)
    gm = make_fx(lambda x, w: x @ w.t())(x, w)
    assert gp.rank_one_products(gm.graph) == 0
    assert aten.mm.default in _targets(gm.graph)


def test_products_by_zero_leave_the_sums_that_read_them():
    x, y = torch.randn(40, 8), torch.randn(40, 24)

    def f(x, y):
        z = torch.zeros(8, 24)
        return y + x @ z, (x @ z.expand(8, 24)).view(40, 1, 24) + y[:1].view(1, 1, 24)

    gm = make_fx(f)(x, y)
    assert gp.drop_zero_products(gm.graph) == 2  # the second one broadcast by an expand
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert aten.mm.default not in _targets(gm.graph)
    for got, want in zip(gm(x, y), f(x, y), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_nonzero_product_is_kept():
    x, y, w = torch.randn(40, 8), torch.randn(40, 24), torch.randn(8, 24)
    gm = make_fx(lambda x, y, w: y + x @ w)(x, y, w)
    assert gp.drop_zero_products(gm.graph) == 0
    assert aten.mm.default in _targets(gm.graph)


@pytest.mark.skipif(not jit.available(), reason="torch.compile unavailable")
def test_compiled_linearisation_is_unchanged_by_the_pass(monkeypatch):
    """A one-feature GRU-like cell, compiled with and without the pass, over two row counts
    (the row count is dynamic): the cell's values and its forward-mode Jacobian agree."""
    fired = []
    def counting(real):
        def run(graph):
            fired.append(real(graph))
            return fired[-1]
        return run

    for name in ("drop_zero_products", "rank_one_products"):
        monkeypatch.setattr(gp, name, counting(getattr(gp, name)))
    torch.manual_seed(0)
    w_ih, w_hh, b = torch.randn(3, 1), torch.randn(3, 1), torch.randn(3)

    def cell(x, h):
        g = Fn.linear(x, w_ih, b) + Fn.linear(h, w_hh)
        r, z, n = g.chunk(3, -1)
        return (1 - torch.sigmoid(z)) * torch.tanh(n * torch.sigmoid(r)) + torch.sigmoid(z) * h

    def lin(x, h):
        return torch.func.jvp(lambda hh: cell(x, hh), (h,), (torch.ones_like(h),))

    eager = lin
    with_pass = torch.compile(lin, options={"post_grad_custom_pre_pass": gp.PASS,
                                            "fx_graph_cache": False})  # the pass must run
    without = torch.compile(lin)
    for N in (300, 777):
        x, h = torch.randn(N, 1), torch.randn(N, 1)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(h, 0)
        for got in (with_pass(x, h), without(x, h)):
            for a, e in zip(got, eager(x, h), strict=True):
                torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    assert sum(fired) >= 2  # the one-term products x W_ih^T, h W_hh^T at least
