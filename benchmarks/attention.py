"""Time and peak memory of paraseq.attention's forms against torch's causal SDPA, on CPU.

    python benchmarks/attention.py [--quick] [--markdown] [--threads N]

Grid: causal, batch 1, 4 heads, float32, feature map elu1 with the normaliser (the default of
``linear_attention``), T in {1e3, 1e4, 1e5}, head size d in {64, 128}, forward (under no_grad)
and forward + backward (gradients of q, k, v from the sum of the outputs). Methods: the three
forms of ``linear_attention`` (chunk size 64) and ``torch.nn.functional.
scaled_dot_product_attention(q, k, v, is_causal=True)`` (softmax attention; on a CPU torch runs
its flash kernel, O(T) memory, O(T^2 d) time).

Every cell runs in a fresh process (python this-file --worker ...): the peak memory is the
process's peak resident set (ru_maxrss) during the first call minus its resident set just
before it, with the inputs already made: what the call itself needs, output included. Time:
median of up to 5 calls after that first (a warm-up), within a budget of 20 s per cell.
Skipped, and said so: the parallel form where its (H, T, T) score matrix would pass 1 GB;
SDPA at T = 1e5 (its O(T^2) time: about 100x the T = 1e4 cell; the estimate is printed with ~);
the recurrent form's backward at T = 1e5 (autograd keeps one (d, d + 1) state per step and
head: 6.6 GB at d = 64).

Targets (measured in this process, candidate and baseline interleaved, median of 5):
- chunked forward at T = 1e4, d = 64 against causal SDPA (target >= 5x), and against the
  matmuls the chunked form performs, timed alone on tensors of the same shapes (target: within
  2x); the FLOP rate of those matmuls is printed;
- memory linear in T: the chunked form's peak at the three T (from the grid);
- decoding: one recurrent step (``linear_attention`` on one token with the state) against
  re-running the parallel form on the 4096-step prefix (target >= 20x per token).

``--targets``: the chunked form's cells at d = 64 only (its memory at the three T), then the
timed targets. ``--quick`` (the CI smoke line): T = 1e3 and d = 64 only, and the targets at
T = 2e3 and a 512-step prefix; a few seconds. The load average is printed at the start and
the end: the timings of a shared machine are only as good as it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's paraseq

from paraseq.attention import linear_attention
from paraseq.bench import cpu_name, format_table, time_call

H, B, CHUNK = 4, 1, 64
METHODS = ("chunked", "parallel", "recurrent", "sdpa")


def make(T: int, d: int, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g).requires_grad_(grad) for _ in range(3)]


def call(method: str, q, k, v):
    if method == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return linear_attention(q, k, v, form=method, chunk_size=CHUNK)


def skip_reason(method: str, T: int, d: int, passes: str) -> str | None:
    if method == "parallel" and H * T * T * 4 > 2**30:
        return f"(H, T, T) scores {H * T * T * 4 / 2**30:.1f} GiB"
    if method == "sdpa" and T > 20_000:
        return "O(T^2) time"
    if method == "recurrent" and passes == "fwd+bwd" and T > 20_000:
        return f"one state per step: {T * H * d * (d + 1) * 4 / 2**30:.1f} GiB"
    return None


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(method: str, T: int, d: int, passes: str) -> dict:
    torch.set_num_threads(1)
    grad = passes == "fwd+bwd"
    q, k, v = make(T, d, grad)

    def run():
        if grad:
            call(method, q, k, v).sum().backward()
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                call(method, q, k, v)

    before = rss_bytes()
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    reps = 5 if first < 4 else 1
    timing = time_call(run, repeats=reps, warmup=0, budget=20.0) if reps > 1 else None
    return {"time": timing.median if timing else first, "peak": max(peak, 0)}


def run_cell(method: str, T: int, d: int, passes: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", method, str(T), str(d), passes],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def chunked_matmuls(T: int, d: int):
    """The four batched matmuls of the chunked form (elu1 with normaliser: values d + 1) on
    fresh tensors of their shapes, and their FLOP count."""
    N, C, K, V = -(-T // CHUNK), CHUNK, d, d + 1
    n = B * H * N
    qc, kc = torch.randn(n, C, K), torch.randn(n, C, K)
    vc, S = torch.randn(n, C, V), torch.randn(n, K, V)

    def mm():
        A = qc @ kc.transpose(-1, -2)  # (n, C, C)
        kc.transpose(-1, -2) @ vc  # (n, K, V): the chunk's state update
        torch.baddbmm(qc @ S, A, vc)  # (n, C, V)

    flops = 2 * n * (C * C * K + K * C * V + C * K * V + C * C * V)
    return mm, flops


def interleaved(fns: dict, repeats: int) -> dict:
    """Median time of each function, the functions run in turn, repeats rounds."""
    times: dict = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def targets(T: int, prefix: int, repeats: int) -> list[str]:
    lines = []
    d = 64
    q, k, v = make(T, d, False)
    mm, flops = chunked_matmuls(T, d)
    with torch.no_grad():
        t = interleaved({"chunked": lambda: call("chunked", q, k, v),
                         "sdpa": lambda: call("sdpa", q, k, v), "matmuls": mm}, repeats)
    lines.append(f"chunked forward, T = {T:,}, d = {d}: {t['chunked'] * 1e3:.1f} ms; causal "
                 f"SDPA {t['sdpa'] * 1e3:.1f} ms: {t['sdpa'] / t['chunked']:.1f}x faster "
                 f"(target >= 5x)")
    rate = flops / t["matmuls"] / 1e9
    lines.append(f"its matmuls alone: {t['matmuls'] * 1e3:.1f} ms ({rate:.1f} "
                 f"GFLOP/s over {flops / 1e9:.2f} GFLOP): chunked takes "
                 f"{t['chunked'] / t['matmuls']:.2f}x their time (target <= 2x)")
    # decoding: one step with the state against re-running the parallel form on the prefix
    qp, kp, vp = (x[:, :, :prefix] for x in (q, k, v))
    with torch.no_grad():
        _, S = linear_attention(qp[:, :, :-1], kp[:, :, :-1], vp[:, :, :-1], form="chunked",
                                return_state=True)
        last = [x[:, :, -1:] for x in (qp, kp, vp)]
        t = interleaved({
            "step": lambda: linear_attention(*last, form="recurrent", initial_state=S),
            "parallel": lambda: linear_attention(qp, kp, vp, form="parallel")},
            repeats)
        o_step = linear_attention(*last, form="recurrent", initial_state=S)
        o_par = linear_attention(qp, kp, vp, form="parallel")[:, :, -1:]
    err = ((o_step - o_par).abs().max() / o_par.abs().max()).item()
    lines.append(f"decoding at T = {prefix:,}: one recurrent step {t['step'] * 1e6:.0f} us; the "
                 f"parallel form on the prefix {t['parallel'] * 1e3:.1f} ms: "
                 f"{t['parallel'] / t['step']:.0f}x per token (target >= 20x); the two outputs "
                 f"agree to {err:.1e} relative")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 1e3, d = 64: a smoke run")
    p.add_argument("--targets", action="store_true",
                   help="the targets only: the chunked form's grid cells at d = 64 (memory at "
                        "three T), then the timed targets")
    p.add_argument("--markdown", action="store_true", help="GitHub markdown tables")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--worker", nargs=4, metavar=("METHOD", "T", "D", "PASSES"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        method, T, d, passes = args.worker
        print(json.dumps(worker(method, int(T), int(d), passes)))
        return 0
    torch.set_num_threads(args.threads)
    lengths = (1000,) if args.quick else (1000, 10_000, 100_000)
    dims = (64,) if args.quick or args.targets else (64, 128)
    methods = ("chunked",) if args.targets else METHODS
    print(f"# paraseq.attention on {cpu_name()}, torch {torch.__version__}, {args.threads} "
          f"thread(s); load average at start {os.getloadavg()[0]:.2f}")
    print(f"# causal, batch {B}, {H} heads, float32, elu1 + normaliser, chunk {CHUNK}\n")
    rows = []
    peaks: dict = {}
    cells = [(d, passes, T) for d in dims for passes in ("fwd", "fwd+bwd") for T in lengths]
    for i, (d, passes, T) in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] d = {d}, {passes}, T = {T:,}", file=sys.stderr, flush=True)
        row = [f"{T:,}", str(d), passes]
        res = {}
        for method in methods:
            why = skip_reason(method, T, d, passes)
            if why:
                est = ""
                if method == "sdpa" and (T // 10, d, passes, "sdpa") in peaks:
                    est = f" (~{peaks[(T // 10, d, passes, 'sdpa')]['time'] * 100:.0f} s)"
                row.append(f"skipped: {why}{est}")
                continue
            r = run_cell(method, T, d, passes)
            res[method] = r
            peaks[(T, d, passes, method)] = r
            if "error" in r:
                row.append(f"error: {r['error'][:40]}")
            else:
                row.append(f"{r['time'] * 1e3:,.1f} ms / {r['peak'] / 2**20:,.0f} MiB")
        sd, ch = res.get("sdpa", {}), res.get("chunked", {})
        row.append(f"{sd['time'] / ch['time']:.1f}x" if "time" in sd and "time" in ch else "")
        rows.append(row)
    print(format_table(["T", "d", "pass", *(f"{m} (time / peak)" for m in methods),
                        "SDPA / chunked"], rows, markdown=args.markdown))
    print()
    for d in dims:
        for passes in ("fwd", "fwd+bwd"):
            pk = [peaks.get((T, d, passes, "chunked"), {}).get("peak") for T in lengths]
            if len(lengths) > 1 and all(pk):
                ratios = ", ".join(f"{pk[i + 1] / pk[i]:.1f}x" for i in range(len(pk) - 1))
                print(f"chunked {passes} peak memory, d = {d}: "
                      + ", ".join(f"{x / 2**20:.0f} MiB" for x in pk)
                      + f" at T = {', '.join(f'{t:,}' for t in lengths)}: grows {ratios} per "
                        f"10x T (linear: 10x)")
    print()
    for line in (targets(2000, 512, 3) if args.quick else targets(10_000, 4096, 5)):
        print(line)
    print(f"\n# load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
