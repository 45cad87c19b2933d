"""Peers in ``python -m paraseq bench``: the grid's GRU workloads through JAX, DEER and
pararnn-torch, timed in the same run as torch.nn.GRU and paraseq, when they are installed.

None of them is a dependency. Each adapter is detected when the bench starts (its import is
guarded); an absent one leaves its columns reading "not installed". The adapters:

- ``jax``: a GRU written here as a jitted ``jax.lax.scan`` (the compiled sequential loop, the
  CPU's practical limit), with the *same weights* as the row's torch.nn.GRU (torch's gate order
  r, z, n; n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); h' = (1 - z) n + z h), on the same
  input, given to JAX time-major (T, B, H), the layout a scan wants (batch-major input made
  the loop up to 3.5x slower here, at H = 1, B = 16). The input projection for all steps is
  one matmul before the scan. Forward+backward is
  ``jax.value_and_grad`` of the sum of the outputs with respect to the weights and the input.
  Column ``jax err``: the largest difference from torch.nn.GRU's outputs (and, for fwd+bwd,
  from torch's gradient with respect to the input), so the comparison is of the same function.
- ``deer``: DEER (``seq1d`` of machine-discovery/deer: parallel Newton with dense H x H
  Jacobians, its default float32 tolerance atol 1e-4, rtol 1e-3) on the same GRU step and
  weights, vmapped over the batch of the time-major input as in DEER's own benchmark
  (experiments/01_speed_benchmark/seq1d.py); the input projection is
  precomputed for it as for the scan. It is not on PyPI (the PyPI package named ``deer`` is
  another project): a checkout of its repository on PYTHONPATH is detected. Its Jacobians
  take B T H^2 floats, so a cell whose estimate passes ``DEER_MEMORY_BYTES`` is marked
  "skip (memory)".
- ``pararnn``: pararnn-torch's ``ParaGRU`` with ``mix="diag"`` (ParaRNN's diagonal GRU, *not*
  torch.nn.GRU) run by ``ParaRNN(cell, solver="newton")`` with its default ``NewtonConfig``
  (at most 3 Newton iterations; on a CPU its eager Newton+scan path), against
  ``paraseq.nn.DiagGRU`` (``method="auto"``, and ``method="quasi_newton"``, the parallel path,
  which is exact Newton for a diagonal cell) holding the same function: ParaGRU's weights are
  mapped onto DiagGRU's (z' = 1 - z by negating the z rows, b_hn = 0), and column ``diag err``
  is the largest difference of the two outputs.

Timings: ``timing.time_call`` (median of ``repeats`` within ``budget`` seconds), after a
warm-up; JAX functions are compiled ahead of the timed runs (``jit(...).lower().compile()``),
so compile time is not counted. Every adapter runs in a ``try``: a failure is reported in its
column ("error: ..."), never stops the grid.

Shape letters: B batch, T length, H hidden (= input size).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .timing import time_call

PEERS = ("jax", "deer", "pararnn")
DEER_MEMORY_BYTES = 6 * 2**30
"""DEER cells estimated (``deer_bytes``) above this many bytes are not run."""

NOT_INSTALLED = "not installed"


@dataclass(frozen=True)
class PeerInfo:
    name: str
    available: bool
    label: str  # "jax 0.10.2 (cpu)", or why not: "not installed (...)"


def detect(names=PEERS) -> dict[str, PeerInfo]:
    """Which peers import here, with their versions (imports them: seconds, not minutes)."""
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; the peers are {list(PEERS)}")
    return {name: _detect_one(name) for name in names}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _detect_one(name: str) -> PeerInfo:
    try:
        if name == "jax":
            import jax

            jax.devices("cpu")
            return PeerInfo(name, True, f"jax {jax.__version__} (cpu)")
        if name == "deer":
            import jax

            jax.devices("cpu")
            try:
                from deer.fseq1d import seq1d  # noqa: F401
            except ModuleNotFoundError as exc:
                if exc.name in ("deer", "deer.fseq1d"):
                    why = ("" if exc.name == "deer" else
                           ": the importable deer is not machine-discovery/deer")
                    return PeerInfo(name, False, f"{NOT_INSTALLED}{why}")
                raise
            import deer

            return PeerInfo(name, True, f"DEER (machine-discovery/deer, from "
                                        f"{deer.__path__[0]})")
        if name == "pararnn":
            from pararnn import NewtonConfig, ParaGRU, ParaRNN  # noqa: F401

            return PeerInfo(name, True, f"pararnn-torch {_version('pararnn-torch')}")
    except ModuleNotFoundError as exc:
        return PeerInfo(name, False, f"{NOT_INSTALLED} (no module {exc.name!r})")
    except Exception as exc:  # a broken install is reported, not raised
        return PeerInfo(name, False, f"{NOT_INSTALLED} (import failed: "
                                     f"{type(exc).__name__}: {str(exc)[:80]})")
    raise AssertionError(name)


@dataclass
class PeerTimes:
    """One grid row's peer columns (seconds; None when not run, ``*_status`` says why)."""

    jax_status: str = NOT_INSTALLED
    jax_s: float | None = None
    jax_err: float | None = None
    deer_status: str = NOT_INSTALLED
    deer_s: float | None = None
    deer_err: float | None = None
    deer_converged: bool | None = None
    pararnn_status: str = NOT_INSTALLED
    pararnn_s: float | None = None
    pararnn_iters: int | None = None
    pararnn_residual: float | None = None
    diag_auto_s: float | None = None
    diag_auto_path: str = ""
    diag_parallel_s: float | None = None
    diag_err: float | None = None


def deer_bytes(H: int, B: int, T: int, backward: bool) -> float:
    """A rough, slightly high estimate of DEER's peak memory in bytes: its (B, T, H, H)
    Jacobians held a few times over by the associative scan (more for fwd+bwd), plus its
    (B, T, H) iterates. Measured here (float32, B = 16): H = 32, T = 1e4 2.4 GB forward and
    3.2 GB forward+backward; H = 8, T = 1e5 2.3 GB forward."""
    if backward:
        return 4.0 * B * T * (5.0 * H * H + 60 * H)
    return 4.0 * B * T * (3.5 * H * H + 40 * H)


# --- the JAX GRU (written for this bench from torch.nn.GRU's equations) ---

def _jax_fns():
    import jax
    import jax.numpy as jnp

    def cell(h, gi, w_hh, b_hh):  # h (..., H), gi (..., 3 H): torch.nn.GRU's step
        gh = h @ w_hh.T + b_hh  # (..., 3 H)
        i_r, i_z, i_n = jnp.split(gi, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
        r = jax.nn.sigmoid(i_r + h_r)
        z = jax.nn.sigmoid(i_z + h_z)
        n = jnp.tanh(i_n + r * h_n)
        return (1.0 - z) * n + z * h

    def scan_gru(params, x):  # x (T, B, H) -> (T, B, H), h0 = 0
        w_ih, w_hh, b_ih, b_hh = params
        gi = x @ w_ih.T + b_ih  # (T, B, 3 H)
        h0 = jnp.zeros((x.shape[1], w_hh.shape[1]), x.dtype)  # (B, H)

        def step(h, g):
            h = cell(h, g, w_hh, b_hh)
            return h, h

        return jax.lax.scan(step, h0, gi)[1]

    def deer_gru(params, x):  # x (T, B, H) -> ((T, B, H), (B,) converged)
        from deer.fseq1d import seq1d

        w_ih, w_hh, b_ih, b_hh = params
        gi = x @ w_ih.T + b_ih  # (T, B, 3 H)
        h0 = jnp.zeros(w_hh.shape[1], x.dtype)  # (H,)

        def one(g):  # (T, 3 H) -> (T, H)
            res = seq1d(lambda h, gt, p: cell(h, gt, *p), h0, g, (w_hh, b_hh))
            return res.value, res.success

        return jax.vmap(one, in_axes=1, out_axes=(1, 0))(gi)

    return jax, scan_gru, deer_gru


def _to_jax(jax, t: torch.Tensor):
    import numpy as np

    return jax.device_put(np.asarray(t.detach().cpu().numpy()), jax.devices("cpu")[0])


def _jax_program(jax, fn, backward: bool, aux: bool):
    """fn(params, x) -> outputs (aux: (outputs, extra)); returns g(params, x) -> (outputs, extra,
    grad_x or None), forward only or value_and_grad of the outputs' sum."""
    def fwd(params, x):
        out = fn(params, x)
        return out if aux else (out, None)

    if not backward:
        def prog(params, x):
            out, extra = fwd(params, x)
            return out, extra, None
    else:
        def loss(params, x):
            out, extra = fwd(params, x)
            return out.sum(), (out, extra)

        def prog(params, x):
            (_, (out, extra)), grads = jax.value_and_grad(loss, argnums=(0, 1),
                                                          has_aux=True)(params, x)
            return out, extra, grads[1]
    return jax.jit(prog)


# --- the row: every installed peer on the grid's workload ---

def measure(w, ref: torch.nn.GRU, x: torch.Tensor, want: torch.Tensor,
            peers: dict[str, PeerInfo], *, repeats: int, budget: float, history: dict,
            skip_after: float) -> PeerTimes:
    """Times the installed ``peers`` on workload ``w`` (a ``grid.Workload``): ``ref`` is the
    row's torch.nn.GRU, ``x`` (B, T, H) its input and ``want`` its output (B, T, H).
    ``history`` and ``skip_after`` as in ``grid.measure``."""
    res = PeerTimes()
    want_grad = None

    def timed(name: str, run: Callable[[], object], warm: bool = False) -> float | None:
        """``warm``: ``run`` has just run once (no warm-up needed)."""
        key = (name, w.hidden, w.batch, w.pass_)
        prev = history.get(key)
        est = prev[1] * w.T / prev[0] if prev else 0.0
        if est > skip_after:
            return None
        t = time_call(run, repeats=repeats, warmup=1 if est < budget and not warm else 0,
                      budget=budget).median
        history[key] = (w.T, t)
        return t

    def skipped(name: str) -> bool:
        prev = history.get((name, w.hidden, w.batch, w.pass_))
        return bool(prev) and prev[1] * w.T / prev[0] > skip_after

    jax_peers = [n for n in ("jax", "deer") if n in peers and peers[n].available]
    if jax_peers:
        jax, scan_gru, deer_gru = _jax_fns()
        sd = ref.state_dict()
        params = tuple(_to_jax(jax, sd[k]) for k in ("weight_ih_l0", "weight_hh_l0",
                                                     "bias_ih_l0", "bias_hh_l0"))
        xj = _to_jax(jax, x.transpose(0, 1).contiguous())  # (T, B, H)
        want = want.transpose(0, 1)  # (T, B, H)
        if w.backward:  # torch's gradient of the outputs' sum to the input, for the err column
            xg = x.detach().clone().requires_grad_(True)
            ref(xg)[0].sum().backward()
            want_grad = xg.grad.transpose(0, 1)  # (T, B, H)
    for name in jax_peers:
        try:
            if name == "deer" and deer_bytes(w.hidden, w.batch, w.T, w.backward) \
                    > DEER_MEMORY_BYTES:
                res.deer_status = "skip (memory)"
                continue
            if skipped(name):
                setattr(res, f"{name}_status", "skip")
                continue
            fn = scan_gru if name == "jax" else deer_gru
            prog = _jax_program(jax, fn, w.backward, aux=name == "deer").lower(params, xj)
            prog = prog.compile()  # compile time is not timed
            out, extra, gx = jax.block_until_ready(prog(params, xj))  # also the warm-up
            err = float((_torch(out) - want).abs().max())
            if gx is not None:
                err = max(err, float((_torch(gx) - want_grad).abs().max()))
            t = timed(name, lambda p=prog: jax.block_until_ready(p(params, xj)), warm=True)
            setattr(res, f"{name}_s", t)
            setattr(res, f"{name}_err", err)
            setattr(res, f"{name}_status", "ok" if t is not None else "skip")
            if name == "deer":
                res.deer_converged = bool(_np(extra).all())
        except Exception as exc:  # a peer's failure is a column, not a crash
            setattr(res, f"{name}_status", _error(exc))
    if "pararnn" in peers and peers["pararnn"].available:
        try:
            _measure_pararnn(w, res, timed, skipped)
        except Exception as exc:
            res.pararnn_status = _error(exc)
    return res


def _np(a):
    import numpy as np

    return np.asarray(a)


def _torch(a) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(a))  # a writable copy


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''}"


def diag_gru_from_paragru(cell, **kwargs):
    """A ``paraseq.nn.DiagGRU`` (batch_first) computing the same function as pararnn's
    ``ParaGRU(mix="diag")`` ``cell``: ParaGRU has z = sigmoid(a_z h + W_z x + b_z),
    r likewise, n = tanh(a_n (r h) + W_n x + b_n), h' = (1 - z) h + z n (W_x's rows in the
    order z, r, n; a_* clamped by ``clipped_a``); DiagGRU has torch's r, z, n with
    h' = (1 - z') n + z' h, so z' = 1 - z = sigmoid(-(...)): the z rows are negated and
    b_hh = 0."""
    from ..nn import DiagGRU

    H, n_in = cell.hidden_size, cell.input_size
    a_z, a_r, a_n = (a.detach() for a in cell.clipped_a())
    W = cell.W_x.weight.detach()  # (3 H, n): z, r, n
    b = cell.W_x.bias.detach()
    W_z, W_r, W_n = W.split(H)
    b_z, b_r, b_n = b.split(H)
    m = DiagGRU(n_in, H, batch_first=True, dtype=W.dtype, **kwargs)
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.cat([W_r, -W_z, W_n]))
        m.bias_ih_l0.copy_(torch.cat([b_r, -b_z, b_n]))
        m.weight_hh_l0.copy_(torch.cat([a_r, -a_z, a_n]))
        m.bias_hh_l0.zero_()
    return m


def _measure_pararnn(w, res: PeerTimes, timed, skipped) -> None:
    from pararnn import NewtonConfig, ParaGRU, ParaRNN

    torch.manual_seed(w.hidden * 104729 + w.batch * 131 + w.T)
    cell = ParaGRU(w.hidden, w.hidden)
    para = ParaRNN(cell, config=NewtonConfig(), solver="newton")
    auto = diag_gru_from_paragru(cell, method="auto")
    par = diag_gru_from_paragru(cell, method="quasi_newton")
    x = torch.randn(w.batch, w.T, w.hidden, requires_grad=w.backward)  # (B, T, H)

    def runner(module, first=lambda y: y):
        def run():
            if w.backward:
                out = first(module(x))
                out.sum().backward()
                return out
            with torch.no_grad():
                return first(module(x))
        return run

    if skipped("pararnn"):
        res.pararnn_status = "skip"
    else:
        res.pararnn_s = timed("pararnn", runner(para))
        res.pararnn_status = "ok" if res.pararnn_s is not None else "skip"
        if para.last_stats:
            res.pararnn_iters = para.last_stats[0].iters
            r = para.last_stats[0].max_residual
            res.pararnn_residual = None if math.isnan(r) else float(r)
    first = lambda y: y[0]  # noqa: E731
    res.diag_auto_s = timed("diag_auto", runner(auto, first))
    res.diag_auto_path = auto.last_path
    res.diag_parallel_s = timed("diag_parallel", runner(par, first))
    if res.pararnn_s is not None:
        with torch.no_grad():
            got, want = para(x), auto(x)[0]
        res.diag_err = float((got - want).abs().max())


# --- the peers table ---

PEER_HEADERS = ["pass", "hidden", "batch", "T", "auto ms", "newton ms", "jax scan ms",
                "jax err", "auto/jax", "DEER ms", "DEER err", "DEER/newton",
                "pararnn ParaGRU(diag) ms", "its", "DiagGRU auto ms", "DiagGRU qN ms",
                "diag err", "ParaGRU/DiagGRU"]


def _ms(t: float | None, status: str = "ok") -> str:
    if t is not None:
        return f"{t * 1e3:.1f}"
    return "skip" if status == "ok" else status


def _ratio(num: float | None, den: float | None) -> str:
    return "" if num is None or den is None or den <= 0 else f"{num / den:.2f}x"


def _err(e: float | None) -> str:
    return "" if e is None else f"{e:.1e}"


def peer_rows(results) -> list[list[str]]:
    out = []
    for r in results:
        p = r.peers
        deer_err = _err(p.deer_err) + (" (not converged)" if p.deer_converged is False else "")
        out.append([r.pass_, str(r.hidden), str(r.batch), f"{r.T:.0e}",
                    "skip" if r.auto_s is None else f"{r.auto_s * 1e3:.1f}",
                    "skip" if r.newton_s is None else f"{r.newton_s * 1e3:.1f}",
                    _ms(p.jax_s, p.jax_status), _err(p.jax_err), _ratio(r.auto_s, p.jax_s),
                    _ms(p.deer_s, p.deer_status), deer_err, _ratio(p.deer_s, r.newton_s),
                    _ms(p.pararnn_s, p.pararnn_status),
                    "" if p.pararnn_iters is None else str(p.pararnn_iters),
                    ("" if p.pararnn_status == NOT_INSTALLED else _ms(p.diag_auto_s))
                    + (f" ({p.diag_auto_path})" if p.diag_auto_path else ""),
                    "" if p.pararnn_status == NOT_INSTALLED else _ms(p.diag_parallel_s),
                    _err(p.diag_err), _ratio(p.pararnn_s, p.diag_auto_s)])
    return out


NOTES = textwrap.fill(
    "auto/jax: paraseq auto's time over the jitted JAX lax.scan GRU with the same weights "
    "(target <= 1.5x for hidden <= 32). DEER/newton: DEER's time over paraseq's forced "
    "Newton (target >= 2x). jax err, DEER err: largest difference from torch.nn.GRU's "
    "outputs (fwd+bwd: and from its input gradient). pararnn ParaGRU(diag) is ParaRNN's "
    "diagonal GRU, not torch.nn.GRU: it is compared with paraseq.nn.DiagGRU holding the same "
    "function (diag err: the largest difference of their outputs; DiagGRU qN: "
    "method='quasi_newton', its parallel path); its: ParaGRU's Newton iterations; "
    "ParaGRU/DiagGRU: pararnn's time over DiagGRU auto's.", 96)
