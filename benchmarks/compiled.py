"""The compiled sequential loops (paraseq.cells.compiled) against torch.nn.GRU/LSTM/RNN.

    python benchmarks/compiled.py                   # the grid below, forward and fwd+bwd
    python benchmarks/compiled.py --quick           # a smoke run (seconds, after the compile)
    python benchmarks/compiled.py --cells lstm rnn --hidden 8 32 --batch 1 16 --length 1000
    python benchmarks/compiled.py --clock cpu --threads 1   # on a shared machine, see below

What is timed, per cell (GRU, LSTM, RNN with tanh), input size = hidden size, one layer,
float32, time-major input (T, B, H), the same weights on both sides:

- "compiled": what paraseq.nn runs on its compiled path: ``input_projection`` (the input
  matmul, laid out for the kernel), ``<cell>_sequence``, and the copy of the output into
  (T, B, H);
- "torch": torch.nn.GRU/LSTM/RNN on the same input.

"fwd" runs under no_grad; "fwd+bwd" takes the sum of the outputs and backpropagates into the
input and every parameter. Speedup = torch's time / compiled's, both from the same run. err is
max |out - torch's out|. "kernel" is the compiled kernel picked (paraseq.cells.compiled._plan).

Timing: one untimed call, then the median of --repeats calls (3 at most for calls over 1 s).
--clock wall (default) times with perf_counter; --clock cpu with process_time, the CPU time of
this process (all its threads): on a machine others are loading, wall times swing with their
load while CPU times stay near what the work costs (the ratios of two single-threaded runs are
then the fair comparison: --threads 1).

--bound prints, instead, the speedup over torch on a grid of (B, H) at one T, forward and
fwd+bwd, for the bounds in paraseq.nn: where the compiled loop beats torch's fused kernel.

--first-call prints, instead, what the first forward of a paraseq.nn.GRU costs in a fresh
process (hidden 8, T = 500, float32, no_grad), on the compiled loop (method "auto") and on the
compiled Newton sweeps (method "newton", ``paraseq.cells.newton``), with the lanes kernel
(batch 16) and the rows kernel (batch 1): once with an empty NUMBA_CACHE_DIR (the first call
compiles) and once with the cache that run wrote (the first call loads it), and the second
call for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paraseq.bench import cpu_name, format_table
from paraseq.cells import compiled

CELLS = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM, "rnn": torch.nn.RNN}
GATES = {"gru": 3, "lstm": 4, "rnn": 1}


def _timer(clock: str):
    return time.process_time if clock == "cpu" else time.perf_counter


def timed(fn, repeats: int, clock: str) -> float:
    """Median seconds of fn() over repeats calls after one untimed call."""
    now = _timer(clock)
    t0 = now()
    fn()
    first = now() - t0
    n = min(repeats, 3) if first > 1.0 else repeats
    times = []
    for _ in range(n):
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times)


def compiled_forward(cell: str, ref: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """paraseq's compiled path for one layer: (T, B, H) output."""
    H = ref.hidden_size
    B = x.shape[1]
    gi = compiled.input_projection(x, ref.weight_ih_l0, ref.bias_ih_l0, H)  # (B, T, K H)
    h0 = x.new_zeros(B, H)
    if cell == "gru":
        out = compiled.gru_sequence(gi, h0, ref.weight_hh_l0, ref.bias_hh_l0)
    elif cell == "rnn":
        out = compiled.elman_sequence(gi, h0, ref.weight_hh_l0, ref.bias_hh_l0, "tanh")
    else:
        out = compiled.lstm_sequence(gi, h0, x.new_zeros(B, H), ref.weight_hh_l0,
                                     ref.bias_hh_l0)[0]
    return out.transpose(0, 1).contiguous()  # (T, B, H)


def measure(cell: str, H: int, B: int, T: int, backward: bool, repeats: int,
            clock: str) -> dict:
    torch.manual_seed(0)
    ref = CELLS[cell](H, H)
    x = torch.randn(T, B, H, requires_grad=backward)

    def ours():
        if backward:
            out = compiled_forward(cell, ref, x)
            out.sum().backward()
            return out
        with torch.no_grad():
            return compiled_forward(cell, ref, x)

    def theirs():
        if backward:
            out = ref(x)[0]
            out.sum().backward()
            return out
        with torch.no_grad():
            return ref(x)[0]

    with torch.no_grad():
        err = (compiled_forward(cell, ref, x) - ref(x)[0]).abs().max().item()
    t_ours = timed(ours, repeats, clock)
    t_torch = timed(theirs, repeats, clock)
    kernel = compiled._plan(B, T, H, H, GATES[cell] * H, x.dtype)
    return {"cell": cell, "H": H, "B": B, "T": T, "pass": "fwd+bwd" if backward else "fwd",
            "kernel": f"{kernel[0]}/{kernel[1]}t", "compiled_ms": 1e3 * t_ours,
            "torch_ms": 1e3 * t_torch, "speedup": t_torch / t_ours, "err": err}


def grid(args) -> list[tuple[str, int, int, int]]:
    if args.quick:
        return [(c, H, B, 1000) for c in args.cells for H in (1, 8) for B in (1, 16)]
    out = []
    for c in args.cells:
        for H in args.hidden:
            for B in args.batch:
                for T in args.length:
                    out.append((c, H, B, T))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--hidden", nargs="+", type=int, default=[1, 8, 32, 64])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--length", nargs="+", type=int, default=[10_000])
    p.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"],
                   choices=["fwd", "fwd+bwd"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--bound", action="store_true",
                   help="speedup over torch on a (B, H) grid at --length[0]")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--first-call", action="store_true",
                   help="the compile / cache-load cost of the first call, in fresh processes")
    args = p.parse_args()
    if args.first_call:
        return first_call(args.markdown)
    if not compiled.AVAILABLE:
        print("numba is not installed: nothing to time", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# paraseq.cells.compiled vs torch.nn; {cpu_name()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; clock {args.clock}; float32")
    if args.bound:
        return bound(args)
    rows = []
    for cell, H, B, T in grid(args):
        for ps in args.passes:
            r = measure(cell, H, B, T, ps == "fwd+bwd", args.repeats, args.clock)
            print(f"{cell} H={H} B={B} T={T} {ps}: {r['speedup']:.1f}x", file=sys.stderr,
                  flush=True)
            rows.append([r["cell"], r["H"], r["B"], r["T"], r["pass"], r["kernel"],
                         f"{r['compiled_ms']:.2f}", f"{r['torch_ms']:.1f}",
                         f"{r['speedup']:.1f}x", f"{r['err']:.1e}"])
    headers = ["cell", "H", "B", "T", "pass", "kernel", "compiled ms", "torch ms", "speedup",
               "err"]
    print(format_table(headers, rows, args.markdown))
    return 0


_FIRST_CALL = """
import json, sys, time
import torch
import paraseq.nn as pn
method, B = sys.argv[1], int(sys.argv[2])
m = pn.GRU(8, 8, batch_first=True, method=method)
x = torch.randn(B, 500, 8)
with torch.no_grad():
    t = time.perf_counter(); m(x); first = time.perf_counter() - t
    t = time.perf_counter(); m(x); second = time.perf_counter() - t
print(json.dumps({"first": first, "second": second, "path": m.last_path}))
"""


def first_call(markdown: bool) -> int:
    rows = []
    root = str(Path(__file__).resolve().parent.parent)
    for method, B in (("auto", 16), ("auto", 1), ("newton", 16), ("newton", 1)):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache,
                       PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
            for state in ("cold", "warm"):
                out = subprocess.run([sys.executable, "-c", _FIRST_CALL, method, str(B)],
                                     env=env, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                kernel = compiled._plan(B, 500, 8, 8, 24, torch.float32)[0]
                rows.append([f"GRU(method={method!r})", B, r["path"], kernel, state,
                             f"{r['first']:.2f}", f"{r['second'] * 1e3:.2f}"])
                print(f"{method} B={B} {state}: {r['first']:.2f} s", file=sys.stderr,
                      flush=True)
    print(format_table(["module", "batch", "path", "kernel", "cache", "first call s",
                        "second call ms"], rows, markdown))
    return 0


def bound(args) -> int:
    T = args.length[0]
    Hs = args.hidden if args.hidden != [1, 8, 32, 64] else [8, 32, 64, 128, 256]
    Bs = args.batch if args.batch != [1, 16] else [1, 4, 16, 64, 256]
    for cell in args.cells:
        for ps in args.passes:
            rows = []
            for H in Hs:
                row = [f"H={H}"]
                for B in Bs:
                    r = measure(cell, H, B, T, ps == "fwd+bwd", args.repeats, args.clock)
                    row.append(f"{r['speedup']:.2f}x {r['kernel'][0]}")
                    print(f"{cell} {ps} H={H} B={B}: {r['speedup']:.2f}x", file=sys.stderr,
                          flush=True)
                rows.append(row)
            print(f"\n{cell} {ps}, T={T}: torch time / compiled time (l: lanes, r: rows)")
            print(format_table(["", *(f"B={B}" for B in Bs)], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
