"""User-written cells in parallel: paraseq.solve_recurrence on cells that know nothing of paraseq
(no analytic Jacobians), against the cell's own loop, a torch.compile'd loop, paraseq's
compiled Newton sweeps for the same function, and DEER-JAX with the same weights.

    python benchmarks/any_cell.py                  # the table in benchmarks/README.md
    python benchmarks/any_cell.py --quick          # a smoke run (well under a minute)
    python benchmarks/any_cell.py --cells gru --workloads 8,1,100000 --markdown

The cells (``--cells``), all nn.Modules taking (x (N, n), h (N, D)) as torch's cells do:

- ``gru``: torch.nn.GRU's equations written by hand (r, z, n gates);
- ``mlp``: a residual MLP, h + 0.1 tanh(W2 tanh(W1 [x, h] + b1) + b2), hidden width 2 D;
- ``lstm``: torch.nn.LSTM's equations by hand, state (h, c) (D counts both);
- ``essay``: the seed essay's h_t = tanh(A h_{t-1} + u_t).

Workloads ``hidden,batch,T`` (default: the four of issue 16); input size = hidden. With
``--threads 1`` (the default) the process is pinned to one CPU, so that DEER's XLA runs on
one thread as torch does. Columns:

- ``loop``: ``method="sequential"``, one cell call per step (Python);
- ``compiled loop``: the same loop over ``torch.compile(cell)`` (its compilation not timed);
- ``newton``: ``method="newton"`` with the default Jacobians (``jacobian="auto"``: torch.func's
  forward mode, eager); ``newton [compiled]``: ``jacobian="compiled"``, the cell, its Jacobian
  and the scan's right-hand side compiled together (``paraseq.solve.jit``; its first call,
  compilation included, is the ``first call`` column and is not in the timed median);
  ``quasi_newton [compiled]`` likewise with the diagonal; ``auto``: ``method="auto"``;
- ``sweeps``: paraseq's own GRUCell / LSTMCell holding the same weights by ``method="newton"``,
  which takes the compiled Newton sweeps of ``paraseq.cells.newton``;
- ``DEER``: machine-discovery/deer's ``seq1d`` (jitted; its default float32 tolerance, atol
  1e-4 and rtol 1e-3 on the step) on the same function and weights (gru and essay), vmapped
  over the batch as in DEER's own benchmark, where ``jax`` and a DEER checkout (on PYTHONPATH)
  import; its compilation is not timed. DEER reports no iteration count: ``its`` is the
  smallest ``max_iter`` for which it reports success, less one (full runs only).

Iteration counts (``its``) are paraseq's ``info.iterations`` at its default tolerance (1e-5 on
max |h_t - f(h_{t-1}, x_t)| / (1 + |f|), stricter than DEER's) and per time chunk where a solve
is split in time (``DENSE_MEMORY_LIMIT``). Times: median of ``--repeats`` after a warm-up, one
thread, float32, forward under no_grad. ``err``: largest difference from the loop's states.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paraseq import solve_recurrence
from paraseq.bench import cpu_name, format_table
from paraseq.solve import jit

WORKLOADS = [(8, 1, 100_000), (8, 16, 10_000), (1, 16, 100_000), (32, 16, 10_000)]
QUICK = [(8, 1, 1_200), (4, 4, 300)]
CELLS = ("gru", "mlp", "lstm", "essay")


class HandGRU(nn.Module):
    """torch.nn.GRUCell's equations, written by hand (parameter names as torch's)."""

    def __init__(self, n: int, D: int):
        super().__init__()
        self.hidden_size = D
        ref = nn.GRUCell(n, D)
        self.weight_ih, self.weight_hh = ref.weight_ih, ref.weight_hh
        self.bias_ih, self.bias_hh = ref.bias_ih, ref.bias_hh

    def forward(self, x, h):  # (N, n), (N, D) -> (N, D)
        i_r, i_z, i_n = Fn.linear(x, self.weight_ih, self.bias_ih).chunk(3, -1)
        h_r, h_z, h_n = Fn.linear(h, self.weight_hh, self.bias_hh).chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h


class HandLSTM(nn.Module):
    """torch.nn.LSTMCell's equations by hand; state (h, c)."""

    def __init__(self, n: int, D: int):
        super().__init__()
        self.state_sizes = (D, D)
        ref = nn.LSTMCell(n, D)
        self.weight_ih, self.weight_hh = ref.weight_ih, ref.weight_hh
        self.bias_ih, self.bias_hh = ref.bias_ih, ref.bias_hh

    def forward(self, x, state):
        h, c = state
        g = Fn.linear(x, self.weight_ih, self.bias_ih) + Fn.linear(h, self.weight_hh, self.bias_hh)
        i, f, gg, o = g.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        return torch.sigmoid(o) * torch.tanh(c), c


class MLPResidual(nn.Module):
    """h + 0.1 tanh(MLP([x, h])), one hidden layer of width 2 D."""

    def __init__(self, n: int, D: int):
        super().__init__()
        self.hidden_size = D
        self.inner = nn.Linear(n + D, 2 * D)
        self.outer = nn.Linear(2 * D, D)

    def forward(self, x, h):
        return h + 0.1 * torch.tanh(self.outer(torch.tanh(self.inner(torch.cat([x, h], -1)))))


class Essay(nn.Module):
    """The seed essay's recurrence h_t = tanh(A h_{t-1} + u_t), A of spectral radius ~0.9."""

    def __init__(self, n: int, D: int):
        super().__init__()
        self.hidden_size = D
        self.A = nn.Parameter(0.9 * torch.randn(D, D) / math.sqrt(D))

    def forward(self, u, h):
        return torch.tanh(h @ self.A.T + u)


def make_cell(kind: str, D: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return {"gru": HandGRU, "mlp": MLPResidual, "lstm": HandLSTM, "essay": Essay}[kind](D, D)


def own_cell(kind: str, cell: nn.Module):
    """paraseq's own cell holding the same function (its Newton sweeps), or None."""
    from paraseq.cells import GRUCell, LSTMCell

    if kind not in ("gru", "lstm"):
        return None
    D = cell.weight_hh.shape[1]
    own = (GRUCell if kind == "gru" else LSTMCell)(D, D)
    own.load_state_dict({k: v for k, v in cell.state_dict().items()})
    return own


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


# --- DEER-JAX, where installed ---

def deer_runner(kind: str, cell: nn.Module, x: torch.Tensor):
    """(run(max_iter) -> (states (B, T, D) as torch, all converged), label), or (None, why)."""
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from deer.fseq1d import DEER, seq1d
    except Exception as exc:  # not installed: a column that says so
        return None, f"not installed ({type(exc).__name__})"
    if kind not in ("gru", "essay"):
        return None, "-"
    cpu = jax.devices("cpu")[0]

    def put(t):
        return jax.device_put(np.asarray(t.detach().cpu().numpy()), cpu)

    if kind == "gru":
        params = tuple(put(getattr(cell, k)) for k in ("weight_hh", "bias_hh"))
        gi = put(Fn.linear(x, cell.weight_ih, cell.bias_ih).transpose(0, 1))  # (T, B, 3 D)

        def step(h, g, p):  # torch's GRU step on one row, from its equations
            w, b = p
            gh = w @ h + b
            i_r, i_z, i_n = jnp.split(g, 3)
            h_r, h_z, h_n = jnp.split(gh, 3)
            r = jax.nn.sigmoid(i_r + h_r)
            z = jax.nn.sigmoid(i_z + h_z)
            n = jnp.tanh(i_n + r * h_n)
            return (1.0 - z) * n + z * h
    else:
        params = (put(cell.A),)
        gi = put(x.transpose(0, 1))  # (T, B, D)

        def step(h, u, p):
            return jnp.tanh(p[0] @ h + u)

    D = x.shape[-1]
    progs = {}

    def run(max_iter: int = 10000):
        if max_iter not in progs:
            def solve(params, gi):
                h0 = jnp.zeros(D, gi.dtype)

                def one(g):  # (T, k) -> (T, D)
                    res = seq1d(step, h0, g, params, method=DEER(max_iter=max_iter))
                    return res.value, res.success
                return jax.vmap(one, in_axes=1, out_axes=(1, 0))(gi)
            progs[max_iter] = jax.jit(solve).lower(params, gi).compile()
        out, ok = jax.block_until_ready(progs[max_iter](params, gi))
        return torch.from_numpy(np.array(out)).transpose(0, 1), bool(np.asarray(ok).all())

    return run, f"jax {jax.__version__}"


# --- one row ---

def row(kind: str, D: int, B: int, T: int, repeats: int, deer_iters: bool,
        columns: set[str]) -> dict:
    cell = make_cell(kind, D, seed=D * 1000 + B + T)
    x = torch.randn(B, T, D)  # (B, T, D)
    h0 = (torch.zeros(B, D), torch.zeros(B, D)) if kind == "lstm" else torch.zeros(B, D)
    out: dict = {"cell": kind, "D": D, "B": B, "T": T}

    def flat(s):
        return torch.cat(s, -1) if isinstance(s, tuple) else s

    with torch.no_grad():
        ref = flat(solve_recurrence(cell, x, h0, method="sequential"))
        out["loop"] = median_time(lambda: solve_recurrence(cell, x, h0, method="sequential"),
                                  repeats)
        if "compiled_loop" in columns:
            try:
                ccell = torch.compile(cell, dynamic=False)
                ccell(x[:, 0], h0)

                def cloop():
                    h = h0
                    for t in range(T):
                        h = ccell(x[:, t], h)
                    return h
                out["compiled_loop"] = median_time(cloop, repeats)
            except Exception as exc:
                out["compiled_loop"] = f"error: {type(exc).__name__}"

        def solve(label, **kw):
            def run():
                return solve_recurrence(cell, x, h0, return_info=True, on_cost="ignore", **kw)
            t0 = time.perf_counter()
            H, info = run()
            first = time.perf_counter() - t0
            out[label] = median_time(run, repeats)
            out[label + "_its"] = info.iterations
            out[label + "_method"] = info.method
            out[label + "_first"] = first
            out[label + "_err"] = float((flat(H) - ref).abs().max())

        if "newton" in columns:
            solve("newton", method="newton")
        if "newton_c" in columns:
            solve("newton_c", method="newton", jacobian="compiled")
        if "quasi_c" in columns:
            solve("quasi_c", method="quasi_newton", jacobian="compiled")
        if "auto" in columns:
            solve("auto", method="auto")
        own = own_cell(kind, cell)
        if own is not None and "sweeps" in columns:
            def sweeps():
                return solve_recurrence(own, x, h0, method="newton", return_info=True)
            H, info = sweeps()
            out["sweeps"] = median_time(sweeps, repeats)
            out["sweeps_its"] = info.iterations
            out["sweeps_err"] = float((flat(H) - ref).abs().max())
        if "deer" in columns:
            run, label = deer_runner(kind, cell, x)
            out["deer_label"] = label
            if run is not None:
                H, ok = run()
                out["deer"] = median_time(run, repeats)
                out["deer_err"] = float((H - ref).abs().max())
                out["deer_ok"] = ok
                if deer_iters:
                    for m in range(1, 30):
                        if run(m)[1]:
                            out["deer_its"] = m - 1
                            break
    return out


def ms(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v * 1e3:.0f}" if v >= 0.1 else f"{v * 1e3:.1f}"


HEADERS = ["cell", "hidden, batch, T", "loop ms", "compiled loop ms", "newton ms (its)",
           "newton [compiled] ms (its)", "first call s", "quasi_newton [compiled] ms (its)",
           "auto ms (picks)", "sweeps ms (its)", "DEER ms (its)", "DEER / newton [compiled]",
           "newton [compiled] / sweeps", "max err"]


def table_row(r: dict) -> list[str]:
    def with_its(key):
        if key not in r:
            return "-"
        its = r.get(key + "_its")
        return ms(r[key]) + ("" if its is None else f" ({its})")

    def ratio(a, b):
        va, vb = r.get(a), r.get(b)
        ok = isinstance(va, float) and isinstance(vb, float)
        return f"{va / vb:.2f}x" if ok else "-"

    deer = with_its("deer") if "deer" in r else r.get("deer_label", "-")
    errs = [r[k] for k in r if k.endswith("_err")]
    T = r["T"]
    t_text = f"{T:.0e}".replace("+0", "") if T == 10 ** round(math.log10(T)) else str(T)
    return [r["cell"], f"{r['D']}, {r['B']}, {t_text}", ms(r["loop"]),
            ms(r.get("compiled_loop")), with_its("newton"), with_its("newton_c"),
            f"{r['newton_c_first']:.1f}" if "newton_c_first" in r else "-",
            with_its("quasi_c"),
            (ms(r["auto"]) + f" ({r['auto_method']})") if "auto" in r else "-",
            with_its("sweeps"), deer, ratio("deer", "newton_c"), ratio("newton_c", "sweeps"),
            f"{max(errs):.1e}" if errs else "-"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: small workloads")
    p.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    p.add_argument("--workloads", nargs="+", default=None,
                   help="hidden,batch,T triples (default: issue 16's four)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["compiled_loop", "newton", "newton_c", "quasi_c", "auto", "sweeps",
                            "deer"], help="columns not to run")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.threads == 1 and hasattr(os, "sched_setaffinity"):
        # one thread for every engine: torch is told, XLA (DEER) is not (its own pool would
        # take the other cores), so the process is pinned to one CPU, as `taskset -c 0` does
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if args.workloads:
        loads = [tuple(int(v) for v in w.split(",")) for w in args.workloads]
    else:
        loads = QUICK if args.quick else WORKLOADS
    columns = {"compiled_loop", "newton", "newton_c", "quasi_c", "auto", "sweeps", "deer"}
    if args.quick:  # compiling takes tens of seconds here: the smoke run stays eager
        columns -= {"compiled_loop", "newton_c", "quasi_c"}
    columns -= set(args.skip)
    print(f"# {datetime.date.today()}  {cpu_name()}  threads {args.threads}  load average "
          f"{os.getloadavg()[0]:.1f}  torch {torch.__version__}", flush=True)
    rows = []
    for kind in args.cells:
        for D, B, T in loads:
            r = row(kind, D, B, T, 1 if args.quick else args.repeats,
                    deer_iters=not args.quick, columns=columns)
            rows.append(table_row(r))
            print(format_table(HEADERS, rows[-1:], markdown=args.markdown), flush=True)
    print()
    print(format_table(HEADERS, rows, markdown=args.markdown))
    print(f"# load average at the end {os.getloadavg()[0]:.1f}; first compiled calls (s): "
          + ", ".join(f"{k[0]} {k[1]} D={k[2]}: {v:.1f}"
                      for k, v in jit.first_call_seconds.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
