"""paraseq.nn modules against torch.nn's, and the diagonal-recurrence modules' convergence.

    python benchmarks/nn.py                  # both parts, the grids in benchmarks/README.md
    python benchmarks/nn.py --quick          # a smoke run (seconds)
    python benchmarks/nn.py --markdown --csv nn.csv
    python benchmarks/nn.py --part diag      # only the diagonal modules

Part "gru": paraseq.nn.GRU (method "newton" and "auto") against torch.nn.GRU with the same
weights (input size 4, one layer, float32, batch_first), forward under no_grad and
forward+backward (loss = sum of outputs). Speedups are torch's time over paraseq's, taken in
the same run. err is max |out - torch's out|.

Part "diag": DiagGRU and DiagLSTM (hidden 64, batch 4) with exact Newton (DiagGRU:
quasi_newton, exact for a diagonal Jacobian; DiagLSTM: newton on its 2 x 2 blocks) at growing
T: iterations and time, against the same module's sequential path (DiagGRU: the compiled loop,
DiagLSTM: a Python loop over the cell) and against torch.nn.GRU of the same width. The
iteration count is the point: it stays flat in T.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paraseq.nn as pnn
from paraseq.bench import cpu_name, format_table, time_call

N_IN = 4




def _timed(module, x, backward: bool, repeats: int):
    def fwd():
        if backward:
            out = module(x)[0]
            out.sum().backward()
            return out
        with torch.no_grad():
            return module(x)[0]
    return time_call(fwd, repeats=repeats, warmup=1).median


def gru_rows(quick: bool, repeats: int) -> list[dict]:
    hidden = [1, 8] if quick else [1, 4, 8, 16, 32]
    batches = [1, 16] if quick else [1, 16, 64]
    lengths = [1000] if quick else [1000, 10_000]
    rows = []
    for backward in (False, True):
        for H in hidden:
            for B in batches:
                for T in lengths:
                    torch.manual_seed(H * 1000 + B + T)
                    ref = torch.nn.GRU(N_IN, H, batch_first=True)
                    x = torch.randn(B, T, N_IN, requires_grad=backward)  # (B, T, n)
                    with torch.no_grad():
                        want = ref(x)[0]
                    row = dict(pass_="fwd+bwd" if backward else "fwd", hidden=H, batch=B, T=T,
                               torch=_timed(ref, x, backward, repeats))
                    for method in ("newton", "auto"):
                        m = pnn.GRU(N_IN, H, batch_first=True, method=method)
                        m.load_state_dict(ref.state_dict())
                        row[method] = _timed(m, x, backward, repeats)
                        with torch.set_grad_enabled(backward):
                            out = m(x)[0]
                        infos = m.last_solve_info
                        row[f"{method}_err"] = (out.detach() - want).abs().max().item()
                        row[f"{method}_iters"] = infos[0].iterations if infos else ""
                        if method == "auto":
                            row["auto_chose"] = m.last_path
                    rows.append(row)
                    print(f"  {row['pass_']} H={H} B={B} T={T}: torch {row['torch']:.4f} s, "
                          f"newton {row['newton']:.4f} s, auto {row['auto']:.4f} s "
                          f"({row['auto_chose']})", file=sys.stderr, flush=True)
    return rows


def diag_rows(quick: bool, repeats: int) -> list[dict]:
    lengths = [100, 1000] if quick else [100, 1000, 10_000, 100_000]
    H, B = (16, 2) if quick else (64, 4)
    rows = []
    for name in ("DiagGRU", "DiagLSTM"):
        for T in lengths:
            torch.manual_seed(T)
            # exact Newton: DiagGRU's diagonal scan, DiagLSTM's 2 x 2 blocks
            method = "quasi_newton" if name == "DiagGRU" else "newton"
            par = getattr(pnn, name)(N_IN, H, batch_first=True, method=method)
            seq = getattr(pnn, name)(N_IN, H, batch_first=True, method="sequential")
            seq.load_state_dict(par.state_dict())
            ref = torch.nn.GRU(N_IN, H, batch_first=True)
            x = torch.randn(B, T, N_IN)  # (B, T, n)
            with torch.no_grad():
                out = par(x)[0]
                info = par.last_solve_info[0]
                want = seq(x)[0]
            budget_loop = T <= (10_000 if not quick else 1000)
            with torch.no_grad():
                seq(x)
            row = dict(module=name, hidden=H, batch=B, T=T, method=info.method,
                       loop_kind=seq.last_path,
                       iterations=info.iterations, converged=info.converged,
                       parallel=_timed(par, x, False, repeats),
                       loop=_timed(seq, x, False, 1) if budget_loop else None,
                       torch_gru=_timed(ref, x, False, repeats),
                       err=(out - want).abs().max().item())
            rows.append(row)
            print(f"  {name} T={T}: {info.method} {info.iterations} iterations, "
                  f"{row['parallel']:.4f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    p.add_argument("--part", choices=["gru", "diag", "both"], default="both")
    p.add_argument("--markdown", action="store_true", help="print GitHub markdown tables")
    p.add_argument("--csv", type=Path, help="write the rows of both parts here")
    args = p.parse_args(argv)
    repeats = 3 if args.quick else 5
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# paraseq benchmarks/nn.py on {cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {load:.2f}, {datetime.date.today()}")
    records = []
    if args.part in ("gru", "both"):
        rows = gru_rows(args.quick, repeats)
        records += rows
        print("\n## paraseq.nn.GRU vs torch.nn.GRU (float32, input 4; ms, speedup over "
              "torch.nn.GRU)")
        print(format_table(
            ["pass", "hidden", "batch", "T", "torch.nn.GRU", "newton", "auto", "auto chose",
             "newton iters", "max err"],
            [[r["pass_"], r["hidden"], r["batch"], f"{r['T']:.0e}", f"{r['torch'] * 1e3:.1f}",
              f"{r['newton'] * 1e3:.1f} ({r['torch'] / r['newton']:.2f}x)",
              f"{r['auto'] * 1e3:.1f} ({r['torch'] / r['auto']:.2f}x)", r["auto_chose"],
              r["newton_iters"], f"{max(r['newton_err'], r['auto_err']):.1e}"] for r in rows],
            args.markdown))
    if args.part in ("diag", "both"):
        rows = diag_rows(args.quick, repeats)
        records += rows
        print("\n## Diagonal-recurrence modules: Newton iterations stay flat in T "
              "(float32, forward; ms)")
        print(format_table(
            ["module", "hidden", "batch", "T", "method", "iterations", "parallel",
             "own loop (kind)", "torch.nn.GRU (same width)", "max err vs loop"],
            [[r["module"], r["hidden"], r["batch"], f"{r['T']:.0e}", r["method"],
              r["iterations"], f"{r['parallel'] * 1e3:.1f}",
              "skip" if r["loop"] is None else
              f"{r['loop'] * 1e3:.1f} ({r['loop'] / r['parallel']:.1f}x, {r['loop_kind']})",
              f"{r['torch_gru'] * 1e3:.1f} ({r['torch_gru'] / r['parallel']:.1f}x)",
              f"{r['err']:.1e}"] for r in rows],
            args.markdown))
    if args.csv:
        keys = sorted({k for r in records for k in r})
        with args.csv.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
