"""An inductor graph pass for the compiled cell and Jacobian (``paraseq.solve.jit``): matrix
products that are not worth a GEMM.

A user's cell evaluated on all B x T rows at once, and its forward-mode Jacobian, contain two
kinds of product that inductor hands to the BLAS as they stand:

- **A product by zero.** Forward mode differentiates h @ W^T + b along h's tangent only; the
  weights' tangent is zero, but the traced graph still multiplies the whole iterate by a
  zero matrix (h (N, D) @ zeros (D, 3D) for a GRU) and adds the result: one GEMM over all rows
  per linearisation, and its output read again. Such products are dropped from the sums that
  read them.
- **A product over one term** (K = 1: a cell with one input feature or a state of size one,
  x (N, 1) @ W^T (1, 3D)). The BLAS does these as rank-one updates at a small fraction of its
  speed (measured: 5.5 ms for N = 1.6e6, M = 3, against 2 ms for the same products as an
  elementwise multiply), and the gate arithmetic after it cannot fuse with an external call.
  They become the broadcast multiply a * b (plus the bias, for ``addmm``), which inductor fuses
  with the elementwise code that follows: the same products, exactly.

Registered as ``post_grad_custom_pre_pass`` (inductor's hook for such passes), so it sees the
graph after autograd's decompositions and before inductor's own fusion. Nothing else is
rewritten; a graph without such products is left as it was.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten

_KEEP_ZERO = {aten.expand.default, aten.view.default, aten._unsafe_view.default, aten.t.default,
              aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
              aten.squeeze.default, aten.permute.default, aten.transpose.int,
              aten.clone.default, aten._to_copy.default, aten.select.int, aten.slice.Tensor,
              aten.reshape.default, aten.split.Tensor, aten.split_with_sizes.default,
              aten.neg.default}  # ops whose result is all zero where their input is
_PRODUCTS = {aten.mm.default, aten.bmm.default, aten.mul.Tensor}


def _value(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _is_zero_fill(n: fx.Node) -> bool:
    t = n.target
    if t in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default,
             aten._efficientzerotensor.default):
        return True
    if t in (aten.full.default, aten.full_like.default, aten.new_full.default):
        fill = n.args[1] if t is not aten.new_full.default else n.args[2]
        return isinstance(fill, (int, float)) and not isinstance(fill, bool) and fill == 0
    return False


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = _value(a), _value(b)
    if va is None or vb is None or va.dtype != vb.dtype or va.device != vb.device:
        return False
    try:
        return len(va.shape) == len(vb.shape) and all(
            bool(x == y) for x, y in zip(va.shape, vb.shape, strict=True))
    except Exception:  # a symbolic comparison that cannot be decided
        return False


def _k_is_one(a: fx.Node, b: fx.Node) -> bool:
    va, vb = _value(a), _value(b)
    if va is None or vb is None or va.dim() != 2 or vb.dim() != 2:
        return False
    k1, k2 = va.shape[1], vb.shape[0]
    return isinstance(k1, int) and isinstance(k2, int) and k1 == 1 and k2 == 1


def _shape_args(graph: fx.Graph, n: fx.Node) -> list | None:
    """n's shape as arguments of a new node: ints, and for a symbolic size the graph's input
    that carries it; None where some size has no such input."""
    v = _value(n)
    if v is None:
        return None
    symbols = {}
    for p in graph.nodes:
        if p.op == "placeholder" and isinstance(p.meta.get("val"), torch.SymInt):
            symbols.setdefault(str(p.meta["val"]), p)
    out = []
    for d in v.shape:
        if isinstance(d, int):
            out.append(d)
        elif str(d) in symbols:
            out.append(symbols[str(d)])
        else:
            return None
    return out


def drop_zero_products(graph: fx.Graph) -> int:
    """Replace every a + Z (Z a product by an all-zero tensor) by a, broadcast to the sum's
    shape where it differs; returns how many adds went."""
    zero: set[fx.Node] = set()
    dropped = 0
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if _is_zero_fill(n):
            zero.add(n)
        elif n.target in _KEEP_ZERO and n.args and n.args[0] in zero:
            zero.add(n)
        elif n.target is operator.getitem and n.args[0] in zero:
            zero.add(n)
        elif n.target in _PRODUCTS and any(isinstance(a, fx.Node) and a in zero
                                           for a in n.args[:2]):
            zero.add(n)
        elif n.target is aten.add.Tensor and len(n.args) == 2 and not n.kwargs:
            a, b = n.args
            for keep, z in ((a, b), (b, a)):
                if not (isinstance(z, fx.Node) and z in zero and isinstance(keep, fx.Node)
                        and keep not in zero):
                    continue
                va, vn = _value(keep), _value(n)
                if va is None or vn is None or va.dtype != vn.dtype or va.device != vn.device:
                    break
                if _same_shape(keep, n):
                    n.replace_all_uses_with(keep)
                else:  # the zero term set the broadcast shape: keep it by an expand (a view)
                    shape = _shape_args(graph, n)
                    if shape is None or va.dim() > len(shape):
                        break
                    with graph.inserting_before(n):
                        new = graph.call_function(aten.expand.default, (keep, shape))
                    new.meta.update(n.meta)
                    n.replace_all_uses_with(new)
                dropped += 1
                break
    return dropped


def rank_one_products(graph: fx.Graph) -> int:
    """mm(a, b) and addmm(c, a, b) with one inner term (a (N, 1), b (1, M)) as broadcast
    multiplies; returns how many were rewritten."""
    done = 0
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is aten.mm.default and _k_is_one(*n.args[:2]):
            with graph.inserting_before(n):
                new = graph.call_function(aten.mul.Tensor, (n.args[0], n.args[1]))
        elif (n.target is aten.addmm.default and _k_is_one(*n.args[1:3])
              and n.kwargs.get("beta", 1) == 1 and n.kwargs.get("alpha", 1) == 1
              and len(n.args) == 3):
            with graph.inserting_before(n):
                prod = graph.call_function(aten.mul.Tensor, (n.args[1], n.args[2]))
                prod.meta["val"] = n.meta.get("val")
                new = graph.call_function(aten.add.Tensor, (n.args[0], prod))
        else:
            continue
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        done += 1
    return done


class SmallProducts(CustomGraphPass):
    """``drop_zero_products`` then ``rank_one_products``, then dead code removed."""

    def __call__(self, graph: fx.Graph) -> None:
        if drop_zero_products(graph) + rank_one_products(graph):
            graph.eliminate_dead_code()

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


PASS = SmallProducts()
