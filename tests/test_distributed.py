"""paraseq.distributed on real gloo process groups: one spawn of 4 processes for the module.

The processes make sub-groups of 1, 2, 3 and 4 ranks and run every check below inside them
(spawning and joining a group costs seconds; the checks cost milliseconds). Each check is
a function of (rank, group, P) that raises on failure; the test of the same name asserts that
it passed on every rank. Every check compares with the single-process paraseq result computed
on each rank from the same seed (float64: 1e-12; float32: 1e-6 relative).
"""

from __future__ import annotations

import datetime
import math
import traceback

import pytest
import torch
import torch.distributed as dist

import paraseq
from paraseq.distributed import PeerError
from paraseq.distributed import linear_scan as dlinear_scan
from paraseq.distributed import solve_recurrence as dsolve
from paraseq.distributed.launch import run_local

WORLD = 4
CHECKS: dict[str, tuple] = {}  # name -> (fn, group sizes it runs on)


def check(*sizes: int):
    def deco(fn):
        CHECKS[fn.__name__.removeprefix("check_")] = (fn, sizes)
        return fn
    return deco


def split(T: int, P: int, kind: str = "even") -> list[int]:
    """Chunk lengths summing to T: "even" (T not divisible by P), "uneven" (one rank holds
    most), "empty" (a rank with no steps)."""
    if kind == "even":
        base = [T // P] * P
        for i in range(T % P):
            base[i] += 1
        return base
    if kind == "uneven":
        rest = [max(1, T // (4 * P))] * (P - 1)
        return [*rest[:P // 2], T - sum(rest), *rest[P // 2:]]
    lens = split(T, P, "even")
    if P > 1:
        k = P // 2
        lens[k + 1 if k + 1 < P else 0] += lens[k]
        lens[k] = 0
    return lens


def piece(t: torch.Tensor, lens: list[int], rank: int, dim: int) -> torch.Tensor:
    s = sum(lens[:rank])
    return t.narrow(dim, s, lens[rank])


def close(x: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    if x.dtype in (torch.float64, torch.complex128):
        tol = 1e-12 * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
    else:
        tol = 1e-6 * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
    err = float((x - ref).abs().max()) if ref.numel() else 0.0
    if not (x.shape == ref.shape and err <= tol):
        raise AssertionError(f"{what}: shape {tuple(x.shape)} vs {tuple(ref.shape)}, "
                             f"max error {err:.3e} > {tol:.1e}")


def _scan_inputs(T, dense, dtype, seed, batch=(2,), D=3):
    g = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32

    def rnd(*shape):
        out = torch.randn(*shape, generator=g, dtype=torch.float64)
        if dtype.is_complex:
            out = torch.complex(out, torch.randn(*shape, generator=g, dtype=torch.float64))
        return out

    if dense:
        a = rnd(*batch, T, D, D) * (0.9 / D)  # contracting: errors do not grow with T
    else:
        a = 0.5 + 0.45 * torch.rand(*batch, T, D, generator=g, dtype=torch.float64)
        a = a.to(dtype) if not dtype.is_complex else a * torch.exp(1j * rnd(*batch, T, D).real)
    b, x0 = rnd(*batch, T, D), rnd(*batch, D)
    conv = (lambda t: t.to(dtype)) if dtype.is_complex or real == torch.float64 else \
        (lambda t: t.to(torch.float32))
    return conv(a), conv(b), conv(x0)


# -- the checks ------------------------------------------------------------------------------

@check(1, 2, 3, 4)
def check_scan_equals_single_process(rank, group, P):
    for dense in (False, True):
        for dtype in (torch.float64, torch.complex128, torch.float32):
            for reverse in (False, True):
                for kind in ("even", "uneven", "empty"):
                    T = 23
                    a, b, x0 = _scan_inputs(T, dense, dtype, seed=T + P)
                    ref = paraseq.linear_scan(a, b, x0, reverse=reverse)
                    lens = split(T, P, kind)
                    tdim = -3 if dense else -2
                    x = dlinear_scan(piece(a, lens, rank, tdim), piece(b, lens, rank, -2), x0,
                                     group=group, reverse=reverse)
                    close(x, piece(ref, lens, rank, -2),
                          f"dense={dense} {dtype} reverse={reverse} {kind} {lens}")


@check(1, 2, 3, 4)
def check_scan_gradients(rank, group, P):
    for dense in (False, True):
        for dtype in (torch.float64, torch.complex128):
            for reverse in (False, True):
                T = 19
                a, b, x0 = _scan_inputs(T, dense, dtype, seed=7 * P + dense)
                w = _scan_inputs(T, False, dtype, seed=99)[1]  # (2, T, 3) loss weights
                lens = split(T, P, "empty" if reverse else "even")
                tdim = -3 if dense else -2
                leaves = [t.clone().requires_grad_() for t in (a, b, x0)]
                ref = paraseq.linear_scan(*leaves, reverse=reverse)
                (ref * w).real.sum().backward()
                mine = [piece(a, lens, rank, tdim).clone().requires_grad_(),
                        piece(b, lens, rank, -2).clone().requires_grad_(),
                        x0.clone().requires_grad_()]
                x = dlinear_scan(*mine, group=group, reverse=reverse)
                (x * piece(w, lens, rank, -2)).real.sum().backward()  # this rank's loss
                what = f"dense={dense} {dtype} reverse={reverse} {lens}"
                close(mine[0].grad, piece(leaves[0].grad, lens, rank, tdim), "grad a " + what)
                close(mine[1].grad, piece(leaves[1].grad, lens, rank, -2), "grad b " + what)
                starts = rank == (P - 1 if reverse else 0)
                close(mine[2].grad, leaves[2].grad if starts else torch.zeros_like(x0),
                      "grad x0 " + what)


@check(1)
def check_scan_gradcheck_one_rank(rank, group, P):
    # gradcheck needs one function of all inputs: on a group of one rank it is the whole scan
    for dense in (False, True):
        a, b, x0 = _scan_inputs(6, dense, torch.complex128, seed=3, batch=(1,), D=2)
        for reverse in (False, True):
            ok = torch.autograd.gradcheck(
                lambda a, b, x0, r=reverse: dlinear_scan(a, b, x0, group=group, reverse=r),
                tuple(t.requires_grad_() for t in (a, b, x0)))
            assert ok


@check(2, 3)
def check_scan_mismatch_names_rank(rank, group, P):
    a, b, _ = _scan_inputs(5, False, torch.float64, seed=1)
    bad = P - 1
    cases = {"D": (a[..., :2], b[..., :2]), "dtype": (a.float(), b.float()),
             "batch dims": (a[:1], b[:1])}
    for what, (aa, bb) in cases.items():
        try:
            dlinear_scan(aa if rank == bad else a, bb if rank == bad else b, group=group)
        except ValueError as e:
            assert f"rank {bad} passed" in str(e), str(e)
        else:
            raise AssertionError(f"mismatched {what} did not raise")
    # the group still works afterwards
    dlinear_scan(a, b, group=group)


@check(2, 3)
def check_scan_bad_input_raises_everywhere(rank, group, P):
    a, b, _ = _scan_inputs(5, False, torch.float64, seed=1)
    bad = 1
    try:
        dlinear_scan("not a tensor" if rank == bad else a, b, group=group)
    except TypeError as e:
        assert rank == bad and "must be tensors" in str(e)
    except PeerError as e:
        assert rank != bad and f"rank {bad}" in str(e) and e.rank == bad, str(e)
    else:
        raise AssertionError("no error")


def _cells(seed):
    torch.manual_seed(seed)
    return {"gru": torch.nn.GRUCell(2, 3).double(),
            "diag_gru": paraseq.cells.DiagGRUCell(2, 4).double(),
            "lstm": paraseq.cells.LSTMCell(2, 3).double()}


def _solve_case(rank, group, P, name, method, T, kind, dtype=torch.float64, tol=1e-12):
    cell = _cells(5)[name].to(dtype)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, T, 2, generator=g, dtype=torch.float64).to(dtype)  # (B, T, n)
    sizes = getattr(cell, "state_sizes", None)
    h0 = tuple(0.3 * torch.ones(2, s, dtype=dtype) for s in sizes) if sizes else \
        0.3 * torch.ones(2, cell.hidden_size, dtype=dtype)
    ref, rinfo = paraseq.solve_recurrence(cell, x, h0, method=method, tol=tol, return_info=True)
    lens = split(T, P, kind)
    H, info = dsolve(cell, piece(x, lens, rank, 1), h0, group=group, method=method, tol=tol,
                     return_info=True)
    refs = ref if isinstance(ref, tuple) else (ref,)
    Hs = H if isinstance(H, tuple) else (H,)
    for r, h in zip(refs, Hs, strict=True):
        close(h, piece(r, lens, rank, 1), f"{name} {method} {kind} {lens}")
    return info, rinfo


@check(1, 2, 3, 4)
def check_solve_equals_single_process(rank, group, P):
    with torch.no_grad():
        for name, method in (("gru", "newton"), ("diag_gru", "quasi_newton"),
                             ("lstm", "newton"), ("gru", "quasi_newton"), ("gru", "jacobi"),
                             ("gru", "sequential")):
            for kind in ("even", "empty"):
                info, rinfo = _solve_case(rank, group, P, name, method, 37, kind)
                assert info.converged, info
                if method in ("newton", "quasi_newton") and name != "lstm":
                    # the same iterations as one process (the compiled sweeps excepted)
                    assert info.iterations == rinfo.iterations, (info, rinfo)


@check(2, 3)
def check_solve_float32(rank, group, P):
    with torch.no_grad():
        _solve_case(rank, group, P, "gru", "newton", 41, "uneven", torch.float32, tol=1e-6)


# -- the harness -----------------------------------------------------------------------------

def _run_checks(rank: int, size: int) -> dict[str, tuple[bool, str]]:
    groups = {p: dist.new_group(list(range(p)), timeout=datetime.timedelta(seconds=300))
              for p in range(1, size + 1)}
    out: dict[str, tuple[bool, str]] = {}
    for name, (fn, sizes) in CHECKS.items():
        for p in sizes:
            key = f"{name}[P={p}]"
            if rank >= p:
                continue
            torch.manual_seed(0)
            try:
                fn(rank, groups[p], p)
                out[key] = (True, "")
            except Exception:
                out[key] = (False, traceback.format_exc())
            dist.barrier(group=groups[p])  # the ranks leave every check together
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, tuple[bool, str]]]:
    return run_local(_run_checks, WORLD, threads=1, timeout_s=900, collective_timeout_s=300)


@pytest.mark.parametrize("name", [f"{n}[P={p}]" for n, (_, ps) in CHECKS.items() for p in ps])
def test_distributed(results, name):
    ran = [r for r in results if name in r]
    assert ran, f"{name} ran on no rank"
    failed = [f"rank {i}:\n{r[name][1]}" for i, r in enumerate(results)
              if name in r and not r[name][0]]
    assert not failed, "\n".join(failed)
    assert len(ran) == int(name.split("P=")[1].rstrip("]"))


def test_not_initialised_is_a_clear_error():
    a = torch.rand(5, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        dlinear_scan(a, a)


def test_split_helper():
    for T, P in ((23, 3), (7, 4), (100, 2)):
        for kind in ("even", "uneven", "empty"):
            assert sum(split(T, P, kind)) == T and min(split(T, P, kind)) >= 0
    assert 0 in split(23, 3, "empty") and math.prod(split(23, 3, "even")) > 0
