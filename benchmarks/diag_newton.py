"""The diagonal cells' forced parallel path against pararnn-torch's CPU Newton (issue 16).

    python benchmarks/diag_newton.py [--workloads H,B,T ...] [--passes fwd fwd+bwd]
                                     [--repeats N] [--threads N] [--before] [--markdown]

Per workload (hidden H = input size, batch B, length T; float32, batch_first), in one run,
interleaved (every candidate once per round, ``--repeats`` rounds, the median; a candidate slower
than ``SLOW_S`` runs once; paraseq's candidates are warmed up first, the eager peers not):

- GRU, the same function: pararnn-torch's ``ParaRNN(ParaGRU(mix="diag"), solver="newton")``
  (its default NewtonConfig: at most 3 iterations; on a CPU its eager Newton and scan) and
  ``paraseq.nn.DiagGRU`` holding its weights (``paraseq.bench.peers.diag_gru_from_paragru``)
  with ``method="quasi_newton"`` (exact Newton for a diagonal cell: the compiled diagonal
  sweep of ``paraseq.cells.newton``) and ``method="auto"`` (the compiled loop); with
  ``--before``, also quasi_newton through the generic ``solve_recurrence``
  (``paraseq.nn.rnn.NEWTON_SWEEPS = False``, the path before the sweep). ``err``: the largest
  difference of DiagGRU's output from ParaGRU's.
- LSTM, comparable cells, not the same function: pararnn-torch's ``ParaLSTM`` (a coupled
  input-forget LSTM with peepholes, diagonal recurrence, 2 x 2 blocks per unit) by its Newton,
  and ``paraseq.nn.DiagLSTM`` (torch's LSTM with a diagonal recurrence; exact Newton on its
  2 x 2 blocks) with ``method="newton"``, both with their own initialisation.

fwd is under no_grad; fwd+bwd backpropagates the sum of the outputs to the input and every
weight. pararnn-torch is an optional peer (its own virtual environment: it pins triton < 3.7);
without it only paraseq's columns are filled.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paraseq.bench.peers import diag_gru_from_paragru
from paraseq.bench.timing import cpu_name, format_table
from paraseq.nn import DiagGRU, DiagLSTM, rnn

SLOW_S = 5.0
"""A candidate whose first timed run takes longer than this many seconds is run once (the
pararnn peers and the generic path at large sizes; their time is far from the others')."""

WORKLOADS = ((1, 16, 100_000), (8, 16, 10_000), (8, 1, 100_000), (32, 16, 10_000),
             (64, 16, 10_000))


def _pararnn():
    try:
        from pararnn import NewtonConfig, ParaGRU, ParaLSTM, ParaRNN
    except ImportError:
        return None
    return NewtonConfig, ParaGRU, ParaLSTM, ParaRNN


def _runner(module, x, backward, first):
    def run():
        if backward:
            out = first(module(x))
            out.sum().backward()
            return out
        with torch.no_grad():
            return first(module(x))
    return run


class _Generic:
    """A module run with the compiled sweeps off (the generic solver's path)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, x):
        old = rnn.NEWTON_SWEEPS
        rnn.NEWTON_SWEEPS = False
        try:
            return self.module(x)
        finally:
            rnn.NEWTON_SWEEPS = old


def measure(H, B, T, backward, repeats, before, peer):
    torch.manual_seed(H * 104729 + B * 131 + T)
    x = torch.randn(B, T, H, requires_grad=backward)  # (B, T, H)
    first = lambda y: y[0]  # noqa: E731
    same = lambda y: y  # noqa: E731
    cands = {}  # name -> (run, module)
    if peer is not None:
        NewtonConfig, ParaGRU, ParaLSTM, ParaRNN = peer
        cell = ParaGRU(H, H)
        para = ParaRNN(cell, config=NewtonConfig(), solver="newton")
        qn = diag_gru_from_paragru(cell, method="quasi_newton")
        auto = diag_gru_from_paragru(cell, method="auto")
        para_l = ParaRNN(ParaLSTM(H, H), config=NewtonConfig(), solver="newton")
        cands["ParaGRU newton"] = (_runner(para, x, backward, same), para)
        cands["ParaLSTM newton"] = (_runner(para_l, x, backward, same), para_l)
    else:
        qn = DiagGRU(H, H, batch_first=True, method="quasi_newton")
        auto = DiagGRU(H, H, batch_first=True)
        auto.load_state_dict(qn.state_dict())
    lstm = DiagLSTM(H, H, batch_first=True, method="newton")
    cands["DiagGRU qN"] = (_runner(qn, x, backward, first), qn)
    cands["DiagGRU auto"] = (_runner(auto, x, backward, first), auto)
    cands["DiagLSTM newton"] = (_runner(lstm, x, backward, first), lstm)
    if before:
        cands["DiagGRU qN generic"] = (_runner(_Generic(qn), x, backward, first), qn)
    for name, (run, _) in cands.items():  # warm-up (compiles paraseq's kernels)
        if not name.startswith("Para"):
            run()
    times = {name: [] for name in cands}
    for _ in range(repeats):
        for name, (run, _) in cands.items():
            if times[name] and times[name][0] > SLOW_S:
                continue  # one run of a slow baseline is enough
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    with torch.no_grad():
        qn(x)
    its = {"DiagGRU qN": max(i.iterations for i in qn.last_solve_info)}
    with torch.no_grad():
        lstm(x)
    its["DiagLSTM newton"] = max(i.iterations for i in lstm.last_solve_info)
    err = None
    if peer is not None:
        with torch.no_grad():
            err = float((para(x) - qn(x)[0]).abs().max())
            para(x)
            its["ParaGRU newton"] = para.last_stats[0].iters
            para_l(x)
            its["ParaLSTM newton"] = para_l.last_stats[0].iters
    return med, its, err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", help="H,B,T triples (default: the issue's five)")
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--before", action="store_true",
                   help="also DiagGRU quasi_newton through the generic solver")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loads = WORKLOADS if not args.workloads else \
        [tuple(int(v) for v in w.split(",")) for w in args.workloads]
    peer = _pararnn()
    print(f"{cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), load "
          f"{os.getloadavg()[0]:.2f}, pararnn-torch: "
          f"{'installed' if peer else 'not installed'}")
    headers = ["H, B, T", "pass", "load", "ParaGRU newton ms (its)", "DiagGRU qN ms (its)",
               "ParaGRU / DiagGRU qN", "DiagGRU auto ms", "err",
               "ParaLSTM newton ms (its)", "DiagLSTM newton ms (its)",
               "ParaLSTM / DiagLSTM"] + (["DiagGRU qN generic ms", "generic / sweep"]
                                         if args.before else [])
    rows = []
    for H, B, T in loads:
        for pass_ in args.passes:
            load = os.getloadavg()[0]
            med, its, err = measure(H, B, T, pass_ == "fwd+bwd", args.repeats, args.before,
                                    peer)

            def ms(name, med=med, its=its):
                if name not in med:
                    return "-"
                s = f"{med[name] * 1e3:.1f}"
                return s + (f" ({its[name]})" if name in its else "")

            def ratio(a, b, med=med):
                return f"{med[a] / med[b]:.1f}x" if a in med and b in med else "-"

            row = [f"{H}, {B}, {T:.0e}", pass_, f"{load:.1f}", ms("ParaGRU newton"),
                   ms("DiagGRU qN"), ratio("ParaGRU newton", "DiagGRU qN"),
                   ms("DiagGRU auto"), "-" if err is None else f"{err:.0e}",
                   ms("ParaLSTM newton"), ms("DiagLSTM newton"),
                   ratio("ParaLSTM newton", "DiagLSTM newton")]
            if args.before:
                row += [ms("DiagGRU qN generic"), ratio("DiagGRU qN generic", "DiagGRU qN")]
            rows.append(row)
            print(" | ".join(row), flush=True)
    print()
    print(format_table(headers, rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
