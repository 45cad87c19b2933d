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
    x, ref = x.detach(), ref.detach()
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


def _all_reduce_grads(params, group):
    for p in params:
        dist.all_reduce(p.grad, group=group)


@check(1, 2, 3, 4)
def check_solve_gradients(rank, group, P):
    for name, method in (("gru", "newton"), ("diag_gru", "quasi_newton"), ("lstm", "newton")):
        for kind in ("even", "empty"):
            cell = _cells(6)[name]
            T = 29
            g = torch.Generator().manual_seed(4)
            x = torch.randn(2, T, 2, generator=g, dtype=torch.float64)
            w = torch.randn(2, T, cell.state_sizes[0] if hasattr(cell, "state_sizes")
                            else cell.hidden_size, generator=g, dtype=torch.float64)
            D0 = w.shape[-1]
            sizes = getattr(cell, "state_sizes", (D0,))
            h0 = [0.2 * torch.ones(2, s, dtype=torch.float64) for s in sizes]

            def loss_of(states, w):
                h = states[0] if isinstance(states, tuple) else states
                return (h * w).sum()

            xr = x.clone().requires_grad_()
            h0r = [h.clone().requires_grad_() for h in h0]
            st = paraseq.solve_recurrence(cell, xr, tuple(h0r) if len(h0r) > 1 else h0r[0],
                                          method=method, tol=1e-12)
            loss_of(st, w).backward()
            ref_p = [p.grad.clone() for p in cell.parameters()]
            cell.zero_grad()
            lens = split(T, P, kind)
            xd = piece(x, lens, rank, 1).clone().requires_grad_()
            h0d = [h.clone().requires_grad_() for h in h0]
            sd = dsolve(cell, xd, tuple(h0d) if len(h0d) > 1 else h0d[0], group=group,
                        method=method, tol=1e-12)
            loss_of(sd, piece(w, lens, rank, 1)).backward()
            _all_reduce_grads(list(cell.parameters()), group)
            what = f"{name} {kind} {lens}"
            for p, r in zip(cell.parameters(), ref_p, strict=True):
                close(p.grad, r, "param grad " + what)
            close(xd.grad, piece(xr.grad, lens, rank, 1), "input grad " + what)
            for hd, hr in zip(h0d, h0r, strict=True):
                want = hr.grad if rank == 0 else torch.zeros_like(hr)
                close(hd.grad if hd.grad is not None else torch.zeros_like(hr), want,
                      "h0 grad " + what)


class _NanCell(torch.nn.Module):
    """tanh cell whose output is nan where the input's first feature is above 5."""

    hidden_size = 3

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(0.5 * torch.eye(3, dtype=torch.float64))

    def forward(self, x, h):
        out = torch.tanh(h @ self.w + x)
        return torch.where(x[:, :1] > 5, torch.full_like(out, float("nan")), out)


@check(2, 3)
def check_solve_nan_on_one_rank(rank, group, P):
    T = 30
    x = torch.randn(1, T, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[0, T - 4, 0] = 10.0  # the last rank's chunk holds the bad step
    cell = _NanCell()
    lens = split(T, P)
    with torch.no_grad():
        try:
            dsolve(cell, piece(x, lens, rank, 1), group=group, method="newton",
                   on_failure="raise")
        except paraseq.ConvergenceError as e:
            assert "ranks" in str(e)
        else:
            raise AssertionError("no ConvergenceError")
        ref, rinfo = paraseq.solve_recurrence(cell, x, method="newton", return_info=True)
        H, info = dsolve(cell, piece(x, lens, rank, 1), group=group, method="newton",
                         return_info=True)
        torch.testing.assert_close(H, piece(ref, lens, rank, 1), equal_nan=True, rtol=0,
                                   atol=1e-12)
        assert info.fell_back and info.fallback_from == rinfo.fallback_from, (info, rinfo)


@check(2, 3)
def check_solve_policies_when_not_converged(rank, group, P):
    cell = _cells(1)["gru"]
    T = 40
    x = 3 * torch.randn(2, T, 2, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
    lens = split(T, P, "uneven")
    xs = piece(x, lens, rank, 1)
    with torch.no_grad():
        try:
            dsolve(cell, xs, group=group, method="jacobi", max_iter=2, on_failure="raise")
        except paraseq.ConvergenceError as e:
            assert e.iterations == 2
        else:
            raise AssertionError("no ConvergenceError")
        ref, rinfo = paraseq.solve_recurrence(cell, x, method="jacobi", max_iter=2,
                                              return_info=True)
        H, info = dsolve(cell, xs, group=group, method="jacobi", max_iter=2, return_info=True)
        close(H, piece(ref, lens, rank, 1), "fallback")
        # two Jacobi sweeps from h_t = f(x_t, 0) make the first three steps exact
        assert info.fell_back and info.fallback_from == rinfo.fallback_from == 3, info
        import warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            _, info = dsolve(cell, xs, group=group, method="jacobi", max_iter=2,
                             on_failure="warn", return_info=True)
        assert not info.converged and any("did not converge" in str(m.message) for m in w)


class _RaisingCell(torch.nn.GRUCell):
    def __init__(self, bad: bool):
        super().__init__(2, 3, dtype=torch.float64)
        self.bad, self.calls = bad, 0

    def forward(self, x, h):
        self.calls += 1
        if self.bad and self.calls > 3:  # fails in the middle of the iterations
            raise RuntimeError("boom from the cell")
        return super().forward(x, h)


@check(2, 3)
def check_solve_rank_that_raises(rank, group, P):
    import time

    bad = P - 1
    cell = _RaisingCell(rank == bad)
    x = torch.randn(2, 20, 2, dtype=torch.float64)
    t = time.perf_counter()
    with torch.no_grad():
        try:
            dsolve(cell, x, group=group, method="newton", jacobian="autograd")
        except RuntimeError as e:
            if rank == bad:
                assert "boom" in str(e), str(e)
            else:
                assert isinstance(e, PeerError) and f"rank {bad}" in str(e), str(e)
        else:
            raise AssertionError("no error")
    assert time.perf_counter() - t < 30


@check(2, 3)
def check_solve_mismatch_names_rank(rank, group, P):
    cell = _cells(1)["gru"]
    x = torch.randn(2, 9, 2, dtype=torch.float64)
    bad = P - 1
    for what, xx in (("dtype", x.float()), ("batch", x[:1]), ("n", x[..., :1])):
        try:
            dsolve(cell.float() if what == "dtype" and rank == bad else cell,
                   xx if rank == bad else x, group=group)
        except (ValueError, TypeError) as e:
            assert f"rank {bad}" in str(e) or rank == bad, f"{what}: {e}"
        else:
            raise AssertionError(f"mismatched {what} did not raise")
        cell.double()


@check(1, 2, 3)
def check_sequence_parallel_gru_and_lstm(rank, group, P):
    from paraseq.distributed import SequenceParallel

    for Mod in (paraseq.nn.GRU, paraseq.nn.LSTM):
        torch.manual_seed(0)
        m = Mod(3, 4, num_layers=2, dtype=torch.float64, method="newton", tol=1e-12)
        T = 31
        x = torch.randn(T, 2, 3, dtype=torch.float64)
        ref_m = Mod(3, 4, num_layers=2, dtype=torch.float64, method="sequential")
        ref_m.load_state_dict(m.state_dict())
        out, hn = ref_m(x)
        loss_w = torch.randn(T, 2, 4, generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64)
        ((out * loss_w).sum() + (hn[0] if isinstance(hn, tuple) else hn).sum()).backward()
        lens = split(T, P, "uneven")
        sp = SequenceParallel(m, group)
        o, h = sp(piece(x, lens, rank, 0))
        close(o, piece(out, lens, rank, 0), f"{Mod.__name__} output")
        for a, b in zip(h if isinstance(h, tuple) else (h,),
                        hn if isinstance(hn, tuple) else (hn,), strict=True):
            close(a, b.detach(), f"{Mod.__name__} h_n")
        # each rank's loss: its slice of the output loss, h_n's term once (on its owner)
        last = max(r for r in range(P) if lens[r] > 0)
        hterm = (h[0] if isinstance(h, tuple) else h).sum() if rank == last else 0
        ((o * piece(loss_w, lens, rank, 0)).sum() + hterm).backward()
        sp.all_reduce_grads()
        for (name, p), q in zip(m.named_parameters(), ref_m.parameters(), strict=True):
            close(p.grad, q.grad, f"{Mod.__name__} grad {name}")


def _data_parallel_case(P):
    """A Newton GRU, its sequential twin with the same weights holding the single-process
    gradient of the summed losses over every rank's batch, and the batches."""
    torch.manual_seed(0)
    m = paraseq.nn.GRU(3, 4, dtype=torch.float64, method="newton", tol=1e-12)
    ref = paraseq.nn.GRU(3, 4, dtype=torch.float64, method="sequential")
    ref.load_state_dict(m.state_dict())
    xs = [torch.randn(25, 2, 3, generator=torch.Generator().manual_seed(r),
                      dtype=torch.float64) for r in range(P)]
    sum(ref(x)[0].pow(2).sum() for x in xs).backward()  # one process, the sum of the losses
    return m, ref, xs


@check(2)
def check_ddp_two_ranks(rank, group, P):
    from torch.nn.parallel import DistributedDataParallel as DDP

    m, ref, xs = _data_parallel_case(P)
    ddp = DDP(m, process_group=group)
    ddp(xs[rank])[0].pow(2).sum().backward()  # each rank its own batch; DDP averages
    for p, q in zip(m.parameters(), ref.parameters(), strict=True):
        close(p.grad * P, q.grad, "DDP grad")


@check(2)
def check_fsdp_two_ranks(rank, group, P):
    # FSDP (fully_shard, sharding each parameter across the ranks) trains paraseq's modules
    # unchanged too: the full gradients equal the single-process gradients of the summed losses
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    m, ref, xs = _data_parallel_case(P)
    fully_shard(m, mesh=DeviceMesh.from_group(group, "cpu"))
    m(xs[rank])[0].pow(2).sum().backward()  # each rank its own batch; FSDP averages
    for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
        close(p.grad.full_tensor() * P, q.grad, f"FSDP grad {name}")


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[-0.5, 2.0], [-2.0, -0.3]], dtype=torch.float64))

    def forward(self, t, y):
        return y @ self.A.T + torch.sin(t)


@check(1, 2, 3)
def check_odeint_equals_single_process(rank, group, P):
    from paraseq.distributed import odeint as dodeint

    f = _Linear()
    y0 = torch.tensor([[1.0, 0.0], [0.5, -1.0]], dtype=torch.float64)  # (2, 2)
    t = torch.linspace(0, 3, 41, dtype=torch.float64)
    for solver in ("newton", "sequential"):
        ref, rinfo = paraseq.odeint(f, y0, t, method="trapezoid", solver=solver, tol=1e-12,
                                    return_info=True)
        lens = split(41, P, "uneven" if P > 1 else "even")
        y, info = dodeint(f, y0, piece(t, lens, rank, 0), group=group, solver=solver, tol=1e-12,
                          return_info=True)
        close(y, piece(ref, lens, rank, 0), f"odeint {solver} {lens}")
        if solver == "newton":
            assert info.iterations == rinfo.iterations, (info, rinfo)


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
