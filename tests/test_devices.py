"""Tensors on two devices: a ValueError naming both, before anything runs.

The checks compare devices, whatever they are; on a machine without a GPU the meta device
stands in for CUDA (a module or tensor on "meta" with CPU inputs takes the same branch as one
on "cuda" with CPU inputs). Where CUDA is present, the CUDA cases run as well (``-m cuda``).
"""

from __future__ import annotations

import pytest
import torch

import paraseq
import paraseq.nn as pnn
from paraseq.cells import modules
from paraseq.solve import solve_recurrence

# marked so that benchmarks/gpu.py (pytest -m cuda) runs these on the GPU; without one
# they run here all the same (meta standing in for CUDA)
pytestmark = pytest.mark.cuda
CUDA = torch.cuda.is_available()
OTHERS = ["meta"] + (["cuda"] if CUDA else [])


@pytest.mark.parametrize("other", OTHERS)
@pytest.mark.parametrize("which", ["a", "b", "x0"])
def test_linear_scan_names_both_devices(other, which):
    t = {"a": torch.rand(7, 2, 2), "b": torch.rand(7, 2), "x0": torch.rand(2)}
    t[which] = t[which].to(other)
    moved, ref = (which, "b") if which != "b" else ("a", "b")
    first, second = (t[moved].device, t[ref].device)
    with pytest.raises(ValueError, match=rf"{moved} is on {first}.* but b is on {second}"):
        paraseq.linear_scan(t["a"], t["b"], t["x0"])


@pytest.mark.parametrize("other", OTHERS)
@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN", "DiagGRU"])
@pytest.mark.parametrize("module_moved", [True, False])
def test_nn_module_and_input_on_two_devices(other, kind, module_moved):
    m = getattr(pnn, kind)(3, 4)
    x = torch.randn(10, 2, 3)
    if module_moved:
        m = m.to(other)
    else:
        x = x.to(other)
    w = next(m.parameters()).device
    with pytest.raises(ValueError, match=rf"input on {x.device}.* and weights on {w}"):
        m(x)


@pytest.mark.parametrize("other", OTHERS)
def test_solve_recurrence_cell_and_inputs_on_two_devices(other):
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match=rf"cell's weight_ih is on {other}.* but inputs are "
                                         rf"on cpu"):
        solve_recurrence(modules.GRUCell(3, 4).to(other), x)
    with pytest.raises(ValueError, match=rf"weight_ih is on cpu but inputs are on {other}"):
        solve_recurrence(modules.GRUCell(3, 4), x.to(other))

    def make():  # a function cell whose weight lives in its closure
        w = torch.randn(4, 4, device=other, requires_grad=True)
        return lambda x_t, h: torch.tanh(h @ w + x_t)

    with pytest.raises(ValueError, match=rf"a tensor the cell holds is on {other}"):
        solve_recurrence(make(), torch.randn(2, 10, 4), torch.zeros(2, 4))


def test_one_device_still_runs():
    """The check passes what it should: all on the CPU, and all on meta (shapes only)."""
    cell = modules.GRUCell(3, 4)
    assert solve_recurrence(cell, torch.randn(2, 10, 3)).shape == (2, 10, 4)
    meta = solve_recurrence(cell.to("meta"), torch.randn(2, 10, 3, device="meta"))
    assert meta.shape == (2, 10, 4) and meta.device.type == "meta"
