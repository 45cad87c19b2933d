"""A user's cell, its Jacobian and Newton's right-hand side as one torch.compile'd function
(``jacobian="compiled"``).

Shape letters: N rows (batch x time flattened), n input size, D state size.

Per Newton iteration the general loop needs, on all N rows, f = cell(x, h), the Jacobian
J = df/dh (N, D, D) and the scan's right-hand side b = f - J h. Eagerly, torch.func gets J by
forward mode with one batched call per op of the cell (``FlatCell.func_full``). Here the same
forward-mode chain rule is traced once and compiled by torch.compile (inductor: C++ on a CPU,
Triton on a GPU), so that f, J and b come out of a few fused loops. The basis tangents are
made inside the per-row function (``vmap`` over the rows outside, over the D basis vectors
inside), so that the tangents of h @ W^T are W's columns, computed once, not once per row.

One compilation per (cell, D, n, dtype, device), reused by every later call (the row count is
a dynamic dimension, so new batch sizes and lengths do not recompile). The first call pays
the compilation (seconds: ``first_call_seconds`` records it). Where torch.compile fails (no
C++ compiler, a cell Dynamo cannot trace), a RuntimeWarning says so once per cell and the
eager torch.func path serves instead: the results are the same either way.
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from .cell import FlatCell

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cell -> {key: entry}
_STRONG: dict[int, dict] = {}  # cells that cannot be weakly referenced, by id
first_call_seconds: dict[tuple, float] = {}
"""Seconds the first call of each compiled function took (tracing and compiling included),
by (type name of the cell, kind, D, n, dtype, device)."""

_FAILED = object()

CHOOSE_ROWS = 1 << 15
"""From this many rows on, the compiled cell alone ("f") is timed once against the eager cell
on the CPU (on this many rows, ``_pick``) and the faster one kept per (cell, D, n, dtype):
inductor does not vectorise every cell (at D = 1, a GRU's gates read with stride 3 compile to
a scalar loop 1.7x slower than the eager cell), while the Jacobian's compiled function wins
everywhere measured."""


def available() -> bool:
    """Whether torch.compile can run here at all."""
    return hasattr(torch, "compile") and not torch.compiler.is_compiling()


def _fresh(fn: Callable, tag: str) -> Callable:
    """``fn`` with its own code object: Dynamo keeps its compiled entries on the code object
    and caps how many it keeps, so each (cell, shapes) gets one of its own instead of every
    cell sharing (and exhausting) one."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}")
    new = type(fn)(code, fn.__globals__, f"{fn.__name__}_{tag}", fn.__defaults__,
                   fn.__closure__)
    return new


def _build(fc: FlatCell, kind: str, D: int, tag: str) -> Callable:
    layout, cell = fc.layout, fc.cell

    def row(xr: Tensor, hr: Tensor) -> Tensor:  # (n,), (D,) -> (D,)
        out = cell(xr.unsqueeze(0), layout.unflatten(hr.unsqueeze(0)))
        return layout.flatten(tuple(out) if layout.is_tuple else out).squeeze(0)

    if kind == "f":
        def evaluate(x: Tensor, h: Tensor) -> Tensor:  # (N, n), (N, D) -> (N, D)
            out = cell(x, layout.unflatten(h))
            return layout.flatten(tuple(out) if layout.is_tuple else out)

        fn = evaluate
    else:
        def lin_row(xr: Tensor, hr: Tensor) -> tuple[Tensor, Tensor]:
            basis = torch.eye(D, dtype=hr.dtype, device=hr.device)  # not batched over rows

            def column(v: Tensor) -> tuple[Tensor, Tensor]:
                return torch.func.jvp(lambda hh: row(xr, hh), (hr,), (v,))

            f, cols = torch.func.vmap(column)(basis)  # (D, D) f repeated, cols[j] = J[:, j]
            return f[0], cols

        def linearise(x: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            F, JT = torch.func.vmap(lin_row)(x, h)  # (N, D), (N, D, D): JT[r, j, i] = J[r, i, j]
            b = F - (JT * h.unsqueeze(-1)).sum(1)  # f - J h: (N, D)
            return F, JT, b  # J is JT's transposed view (see ``call``): no copy

        fn = linearise
    return torch.compile(_fresh(fn, tag), dynamic=None, options=_options(D))


def _options(D: int) -> dict:
    """Inductor's options for state size D: ``_graph_pass.PASS`` (products by zero and over
    one term out of the BLAS); and since its CPU kernels vectorise the innermost dim (D here)
    with the widest registers (16 float32 lanes on AVX-512), at D = 8 half of every vector is
    masked off: 8-lane vectors fit such D exactly (1.2x faster at D = 8)."""
    from ._graph_pass import PASS

    options = {"post_grad_custom_pre_pass": PASS}  # no GEMMs by zero or over one term
    if D % 16 and D % 8 == 0:
        options["cpp.simdlen"] = 256
    return options



def _entry(fc: FlatCell, kind: str, x: Tensor, h: Tensor):
    cell = fc.cell
    key = (kind, h.shape[-1], x.shape[-1], h.dtype, h.device, fc.layout)
    try:
        per_cell = _CACHE.setdefault(cell, {})
    except TypeError:  # not weakly referenceable (a builtin function, say)
        per_cell = _STRONG.setdefault(id(cell), {})
    if key not in per_cell:
        per_cell[key] = None  # built on first use below
    return per_cell, key


def _pick(fc: FlatCell, fn: Callable, x: Tensor, h: Tensor) -> str:
    """"compiled" or "eager": the faster evaluation of the cell alone, timed on the same
    CHOOSE_ROWS rows five times each, alternating, the best of each kept (once per cell and key:
with three, load on a shared machine picked the slower one in one run of two)."""
    xs, hs = x[:CHOOSE_ROWS], h[:CHOOSE_ROWS]
    torch._dynamo.maybe_mark_dynamic(xs, 0)
    torch._dynamo.maybe_mark_dynamic(hs, 0)
    best = {"compiled": float("inf"), "eager": float("inf")}
    with torch.no_grad():
        for _ in range(5):
            for name, g in (("compiled", fn), ("eager", fc)):
                t0 = time.perf_counter()
                g(xs, hs)
                best[name] = min(best[name], time.perf_counter() - t0)
    return "compiled" if best["compiled"] <= best["eager"] else "eager"


def call(fc: FlatCell, kind: str, x: Tensor, h: Tensor):
    """The compiled ``kind`` ("f": f (N, D); "lin": f, J (N, D, D), b = f - J h) on rows x (N, n),
    h (N, D), or None where torch.compile is unavailable or failed for this cell (the caller
    then takes the eager path)."""
    if not available() or x.shape[0] < 2 or fc.func_ok is False:
        return None
    per_cell, key = _entry(fc, kind, x, h)
    fn = per_cell[key]
    if fn is _FAILED:
        return None
    first = fn is None
    if kind == "f" and not first and x.device.type == "cpu" and x.shape[0] >= CHOOSE_ROWS:
        pick = per_cell.get(("pick", *key))
        if pick is None:
            pick = per_cell[("pick", *key)] = _pick(fc, fn, x, h)
        if pick == "eager":
            return None
    if first:
        if fc.func_ok is None:  # torch.func traces the cell, rows independent (eagerly)
            with torch.no_grad():
                fc.func_full(x[:8], h[:8])
            if fc.func_ok is False:
                per_cell[key] = _FAILED
                return None
        tag = f"{len(first_call_seconds)}_{kind}"
        fn = per_cell[key] = _build(fc, kind, h.shape[-1], tag)
    torch._dynamo.maybe_mark_dynamic(x, 0)
    torch._dynamo.maybe_mark_dynamic(h, 0)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = fn(x, h)
    except Exception as exc:  # any compiler failure degrades to the eager path
        per_cell[key] = _FAILED
        warnings.warn(f"solve_recurrence: jacobian='compiled': torch.compile failed for "
                      f"{type(fc.cell).__name__} ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); using the eager "
                      f"torch.func Jacobians instead (same results, slower)", RuntimeWarning,
                      stacklevel=4)
        return None
    if kind == "lin":  # J as the transposed view of the JT that the function stored
        out = (out[0], out[1].transpose(1, 2), out[2])
    if first:
        first_call_seconds[(type(fc.cell).__name__, *key[:3], str(key[3]), str(key[4]))] = \
            time.perf_counter() - t0
    return out


def clear() -> None:
    """Forget every compiled function (tests; or to free the compiled code)."""
    _CACHE.clear()
    _STRONG.clear()
    first_call_seconds.clear()
