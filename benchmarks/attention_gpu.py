"""Linear attention on a GPU: paraseq's chunked form (torch), its Triton kernels, fla's
``chunk_linear_attn`` and ``chunk_gla``, and torch's causal scaled_dot_product_attention.

    python benchmarks/attention_gpu.py [--dry-run] [--out DIR] [--lengths T ...] [--dims d ...]

``gpu_section(dry_run, out_dir)`` is what ``benchmarks/gpu.py`` calls; it returns one dict per
cell (and writes them to ``out_dir/attention_gpu.json`` and a table to ``attention_gpu.md``).

Grid: batch 1, 4 heads, float32, causal, T in {1e3, 1e4, 1e5}, head size d in {64, 128},
forward (under no_grad) and forward + backward (gradients of every input from the sum of
the outputs). Two linear-attention ops, each by every implementation at hand:
- ``linear``: sim(q, k) = q . k d^-1/2, no normaliser, no decay (fla's ``chunk_linear_attn``
  with ``normalize=False``; paraseq's ``feature_map="identity"``);
- ``gla``: a data-dependent decay per key feature, log g = logsigmoid(x) / 16 (fla's
  ``chunk_gla``; paraseq's ``gate=g``);
and ``softmax``: ``scaled_dot_product_attention(q, k, v, is_causal=True)``, O(T^2 d) time.

Implementations: ``paraseq chunked`` (``form="chunked"``: batched matmuls in torch),
``paraseq triton`` (``form="triton"``), ``fla`` (only where ``import fla`` works: it is not a
dependency of paraseq; put it on the path, e.g. a git-ignored folder), ``torch sdpa``.

Time: CUDA events around each call, one warm-up call first (it compiles the Triton kernels),
the median of up to 10 calls (one for a cell slower than 0.75 s; within 3 s). The whole
grid: 84 cells (with fla) and 32 float64 references, a few minutes on one GPU (``lengths=``,
``dims=`` shrink it). Peak memory: the CUDA allocator's peak during one call minus what was
allocated before it (inputs excluded), outputs and what autograd keeps included. Error: the
largest |o - o_ref| / max |o_ref| over the output, o_ref by paraseq's chunked form in
float64 (which the test suite holds to the float64 loop at 1e-10); with a backward, also the
same for dq (the gradient of q). SDPA's reference is SDPA in float64 where its (H, T, T)
float64 scores fit (T <= 1e4), "-" past that.
A cell that runs out of memory or fails says so in ``note``.

``--dry-run``: tiny sizes (T = 50, d = 16, 2 heads, one timed call), on the GPU if there is
one, else on the CPU with the Triton kernels under triton's interpreter (set
TRITON_INTERPRET=1 before triton is imported: this script does, when run on its own); a few
seconds.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

_DRY = "--dry-run" in sys.argv and __name__ == "__main__"
if _DRY and "triton" not in sys.modules:
    try:  # before torch: the interpreter only counts if it is on when triton is imported
        import torch.cuda as _probe  # imports torch, not triton
        if not _probe.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's paraseq

from paraseq.attention import chunked_triton, linear_attention  # noqa: E402
from paraseq.bench import format_table  # noqa: E402

LENGTHS = (1_000, 10_000, 100_000)
DIMS = (64, 128)
HEADS, BATCH = 4, 1
FIELDS = ("op", "form", "T", "d", "heads", "batch", "dtype", "pass", "ms", "peak_mib",
          "max_err", "max_err_dq", "note")


def _fla():
    """fla's two ops, or None where fla does not import."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # any failure to import means: not at hand
        return None
    return chunk_linear_attn, chunk_gla


def _layout_kw(fn) -> dict:
    """fla's layout flag where its version has one: (B, T, H, d), the layout used here."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {"head_first": False} if "head_first" in params else {}


def _impls(op: str, fla) -> dict:
    """name -> fn(q, k, v, log_g) -> o, inputs and output in (B, T, H, d)."""
    def paraseq(form):
        def run(q, k, v, lg):
            gate = None if lg is None else lg.exp()
            return linear_attention(q, k, v, feature_map="identity", gate=gate, form=form,
                                    layout="bthd")
        return run

    impls = {"paraseq chunked": paraseq("chunked"), "paraseq triton": paraseq("triton")}
    if fla is not None:
        lin, gla = fla
        if op == "linear":
            kw = _layout_kw(lin)
            impls["fla chunk_linear_attn"] = lambda q, k, v, lg: lin(q, k, v, normalize=False,
                                                                     **kw)[0]
        else:
            kw = _layout_kw(gla)
            impls["fla chunk_gla"] = lambda q, k, v, lg: gla(q, k, v, lg, **kw)[0]
    return impls


def _sdpa(q, k, v, lg):
    o = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
    return o.transpose(1, 2)


def _timer(device: torch.device):
    def elapsed(fn) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return elapsed


def _peak_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _inputs(op: str, T: int, d: int, heads: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(BATCH, T, heads, d, generator=g) for _ in range(3))  # (B, T, H, d)
    lg = None
    if op == "gla":  # GLA's gate: logsigmoid / 16, close to 1
        lg = F.logsigmoid(torch.randn(BATCH, T, heads, d, generator=g)) / 16  # (B, T, H, d)
    return [None if x is None else x.to(device, dtype) for x in (q, k, v, lg)]


def _reference(op: str, xs, grad: bool):
    """o (and dq) in float64: paraseq's chunked form, or SDPA."""
    xs = [None if x is None else x.detach().double().requires_grad_(grad) for x in xs]
    fn = _sdpa if op == "softmax" else _impls(op, None)["paraseq chunked"]
    with torch.set_grad_enabled(grad):
        o = fn(*xs)
        dq = torch.autograd.grad(o.sum(), xs[0])[0] if grad else None
    return o.detach(), dq


def _rel(x, ref) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _cell(fn, xs, grad: bool, device, budget: float, max_reps: int):
    """(median seconds, peak MiB, o, dq) of fn on xs, forward or forward + backward."""
    leaves = [None if x is None else x.detach().requires_grad_(grad) for x in xs]
    out = {}

    def run():
        for x in leaves:
            if x is not None:
                x.grad = None
        with torch.set_grad_enabled(grad):
            o = fn(*leaves)
            if grad:
                o.sum().backward()
        out["o"] = o.detach()

    elapsed = _timer(device)
    first = elapsed(run)  # warm-up: compiles the kernels
    peak = _peak_mib(run, device)
    times = []
    deadline = time.perf_counter() + budget
    while len(times) < (max_reps if first < budget / 4 else 1) and (
            not times or time.perf_counter() < deadline):
        times.append(elapsed(run))
    dq = leaves[0].grad if grad else None
    return statistics.median(times), peak, out["o"], dq


def gpu_section(dry_run: bool, out_dir, *, lengths=None, dims=None,
                dtypes=(torch.float32,)) -> list[dict]:
    """The attention rows of the GPU benchmark (see the module's docstring). ``dry_run``:
    tiny sizes, a few seconds, on the CPU (Triton interpreted) where there is no GPU."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not dry_run:
        raise SystemExit("attention_gpu: no GPU here; use dry_run=True (--dry-run)")
    if dry_run:
        lengths, dims, heads, budget, max_reps = lengths or (50,), dims or (16,), 2, 1.0, 1
    else:
        lengths, dims, heads, budget, max_reps = lengths or LENGTHS, dims or DIMS, HEADS, 3.0, 10
    fla = _fla() if cuda else None
    triton_ok = chunked_triton.available(device)
    rows: list[dict] = []
    for dtype in dtypes:
        for d in dims:
            for T in lengths:
                for op in ("linear", "gla", "softmax"):
                    xs = _inputs(op, T, d, heads, dtype, device)
                    impls = {"torch sdpa": _sdpa} if op == "softmax" else _impls(op, fla)
                    for passes in ("fwd", "fwd+bwd"):
                        grad = passes == "fwd+bwd"
                        ref = None
                        if op != "softmax" or T <= 10_000:
                            try:
                                ref = _reference(op, xs, grad)
                            except torch.OutOfMemoryError:
                                ref = None
                        for name, fn in impls.items():
                            row = dict(op=op, form=name, T=T, d=d, heads=heads, batch=BATCH,
                                       dtype=str(dtype).removeprefix("torch."), **{
                                           "pass": passes}, ms=None, peak_mib=None,
                                       max_err=None, max_err_dq=None, note="")
                            if name == "paraseq triton" and not triton_ok:
                                row["note"] = ("skipped: " + chunked_triton.why_not(device))
                                rows.append(row)
                                continue
                            try:
                                t, peak, o, dq = _cell(fn, xs, grad, device, budget, max_reps)
                            except torch.OutOfMemoryError:
                                row["note"] = "out of memory"
                            except Exception as e:  # a row says what failed
                                row["note"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
                            else:
                                row.update(ms=t * 1e3, peak_mib=peak)
                                if ref is not None:
                                    row["max_err"] = _rel(o, ref[0])
                                    if grad:
                                        row["max_err_dq"] = _rel(dq, ref[1])
                            rows.append(row)
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                            print(_fmt(row), file=sys.stderr, flush=True)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention_gpu.json").write_text(json.dumps(rows, indent=1))
        (out / "attention_gpu.md").write_text(table(rows, markdown=True) + "\n")
    return rows


def _fmt(row: dict) -> str:
    return " ".join(f"{k}={row[k]}" for k in FIELDS if row[k] not in (None, ""))


def table(rows: list[dict], markdown: bool = False) -> str:
    def num(x, f):
        return "-" if x is None else format(x, f)

    return format_table(
        ["op", "form", "T", "d", "pass", "ms", "peak MiB", "max err o", "max err dq", "note"],
        [[r["op"], r["form"], f"{r['T']:,}", r["d"], r["pass"], num(r["ms"], ",.2f"),
          num(r["peak_mib"], ",.0f"), num(r["max_err"], ".1e"), num(r["max_err_dq"], ".1e"),
          r["note"]] for r in rows], markdown=markdown)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes; CPU if no GPU")
    p.add_argument("--out", default=None, help="folder for attention_gpu.json / .md")
    p.add_argument("--lengths", type=int, nargs="*", default=None)
    p.add_argument("--dims", type=int, nargs="*", default=None)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"
    print(f"# linear attention on {dev}, torch {torch.__version__}; fla "
          f"{'at hand' if _fla() is not None and torch.cuda.is_available() else 'not at hand'}")
    t0 = time.perf_counter()
    rows = gpu_section(args.dry_run, args.out, lengths=args.lengths, dims=args.dims)
    print(table(rows, markdown=args.markdown))
    print(f"\n# {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
