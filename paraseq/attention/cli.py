"""``python -m paraseq attention``: a character-level language model on Python's own source.

Shape letters: B batch, T context length, E embedding size, L vocabulary (256 bytes).

The text is the standard library's own .py files (no download), read as bytes. Every model is
the same small causal Transformer (byte embedding, learned positions, pre-norm blocks, a
linear read-out) with a different attention: softmax (torch's scaled_dot_product_attention),
linear attention with each causal feature map (elu1, relu, taylor), and gated linear attention
(GLA: a data-dependent decay per key feature). Parameter counts are equal: GLA's gate
projection is paid for by a narrower MLP (the counts are printed).

Each (model, T) is trained with AdamW for a wall-time budget (``--budget`` seconds, at most
``--max-steps`` steps) on the same batches; then, on held-out text: the loss, the bytes autograd
keeps for the backward of one training step (the memory that grows with T), and for the linear
models the three forms (parallel, chunked, recurrent) run on the trained model and their
logits compared. Finally the best linear model writes text by the recurrent form, one byte at
a time from its state. A plot (loss against step and against wall time) is saved.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import LinearTransformerBlock

MODELS = ("softmax", "elu1", "relu", "taylor", "gla")
VOCAB = 256


class SoftmaxAttention(nn.Module):
    """Causal softmax attention with LinearAttention's projections (same parameters)."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(embed_dim, embed_dim, bias=False) for _ in range(4))

    def forward(self, x: Tensor, state=None, *, return_state: bool = False, form=None):
        B, T, E = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, H, T, Dh)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        y = self.out_proj(o.transpose(1, 2).reshape(B, T, E))  # (B, T, E)
        return (y, None) if return_state else y


class CharLM(nn.Module):
    def __init__(self, kind: str, embed_dim: int, num_heads: int, layers: int, max_len: int):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(VOCAB, embed_dim)
        self.pos = nn.Parameter(torch.randn(max_len, embed_dim) * 0.02)
        E = embed_dim
        ratio = 4.0
        if kind == "gla":  # the gate's E^2 + E parameters come out of the MLP's hidden width
            ratio = (4 * E - round((E * E + E) / (2 * E + 1))) / E
        attn = {"feature_map": "identity", "gate": "gla"} if kind == "gla" else (
            {"feature_map": kind} if kind != "softmax" else {})
        self.blocks = nn.ModuleList(
            LinearTransformerBlock(E, num_heads, mlp_ratio=ratio, **attn) for _ in range(layers))
        if kind == "softmax":
            for blk in self.blocks:
                blk.attn = SoftmaxAttention(E, num_heads)
        self.norm = nn.LayerNorm(E)
        self.head = nn.Linear(E, VOCAB)

    def forward(self, x: Tensor, form: str | None = None) -> Tensor:
        """x: (B, T) bytes -> logits (B, T, L)."""
        h = self.embed(x) + self.pos[: x.shape[1]]  # (B, T, E)
        for blk in self.blocks:
            h = blk(h, form=form)
        return self.head(self.norm(h))  # (B, T, L)

    @torch.no_grad()
    def generate(self, prompt: bytes, n: int, temperature: float, g: torch.Generator) -> bytes:
        """Byte by byte from the blocks' states: the recurrent form, O(1) per byte."""
        states: list = [None] * len(self.blocks)
        out = bytearray(prompt)
        logits = None
        for t in range(len(prompt) + n):
            if t >= self.pos.shape[0]:
                break
            if t >= len(prompt):
                p = torch.softmax(logits / temperature, dim=-1)
                out.append(int(torch.multinomial(p, 1, generator=g)))
            h = self.embed(torch.tensor([out[t]])) + self.pos[t]  # (1, E)
            for i, blk in enumerate(self.blocks):
                h, states[i] = blk.step(h, states[i])
            logits = self.head(self.norm(h))[0]  # (L,)
        return bytes(out)


def load_text(max_bytes: int) -> torch.Tensor:
    """The standard library's .py files, concatenated, as bytes (uint8)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    blob = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward of fn() (distinct storages, counted once)."""
    seen: dict = {}

    def pack(x):
        seen[(x.untyped_storage().data_ptr(), x.dtype)] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(seen.values())


def register(sub) -> None:
    p = sub.add_parser(
        "attention", help="linear vs softmax attention: a byte-level LM on Python's own source",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096],
                   help="context lengths T (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--budget", type=float, default=8.0,
                   help="seconds of training per model and T (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--tokens", type=int, default=4096,
                   help="bytes per batch: batch = max(1, tokens // T) (default: %(default)s)")
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--text-bytes", type=int, default=2_000_000,
                   help="bytes of the standard library read (default: %(default)s)")
    p.add_argument("--generate", type=int, default=200, help="bytes to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: %(default)s; small models on a shared machine "
                        "lose more to thread contention than they gain)")
    p.add_argument("--out", default="paraseq-out", help="folder for the plot")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..bench import format_table
    from ..cli import _pyplot

    for name in ("budget", "max_steps", "tokens", "embed", "heads", "layers", "text_bytes"):
        if getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be > 0", file=sys.stderr)
            return 2
    if min(args.lengths) < 2 or args.embed % args.heads:
        print("error: --lengths must be >= 2 and --embed divisible by --heads", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_text(args.text_bytes)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    if len(val) <= max(args.lengths) + 1:
        print("error: --text-bytes too small for the longest --lengths", file=sys.stderr)
        return 2
    print(f"text: {len(data):,} bytes of the standard library's .py files "
          f"({Path(sysconfig.get_paths()['stdlib'])}); models: E = {args.embed}, "
          f"{args.heads} heads, {args.layers} layers; {args.budget:g} s of training each\n")
    rows, curves, forms_rows = [], {}, []
    best = None
    for T in args.lengths:
        B = max(1, args.tokens // T)
        g = torch.Generator().manual_seed(args.seed + T)
        starts = [torch.randint(0, len(train) - T - 1, (B,), generator=g)
                  for _ in range(args.max_steps)]
        vstart = torch.randint(0, len(val) - T - 1, (max(1, B),), generator=g)
        vx = torch.stack([val[s:s + T] for s in vstart.tolist()])  # (B, T)
        vy = torch.stack([val[s + 1:s + T + 1] for s in vstart.tolist()])  # (B, T)
        for kind in args.models:
            torch.manual_seed(args.seed)
            model = CharLM(kind, args.embed, args.heads, args.layers, max(args.lengths))
            n_params = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
            # untimed warm-up (the first call of a compiled scan kernel compiles it)
            model(torch.zeros(1, min(T, 130), dtype=torch.long)).sum().backward()
            model.zero_grad()
            losses, walls = [], []
            t0 = time.perf_counter()
            bar = tqdm(range(args.max_steps), desc=f"T={T} {kind}", leave=False,
                       file=sys.stderr)
            for step in bar:
                s = starts[step].tolist()
                x = torch.stack([train[i:i + T] for i in s])  # (B, T)
                y = torch.stack([train[i + 1:i + T + 1] for i in s])  # (B, T)
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                walls.append(time.perf_counter() - t0)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if walls[-1] > args.budget:
                    break
            bar.close()
            curves[(kind, T)] = (losses, walls)
            model.eval()
            with torch.no_grad():
                vloss = F.cross_entropy(model(vx).flatten(0, 1), vy.flatten()).item()
            x1 = vx[:1]
            mem = saved_bytes(lambda m=model, x=x1: m(x))
            rows.append([kind, f"{T:,}", f"{n_params:,}", str(len(losses)),
                         f"{walls[-1] / len(losses) * 1e3:.0f}",
                         f"{sum(losses[-5:]) / len(losses[-5:]):.3f}", f"{vloss:.3f}",
                         f"{mem / 2**20:.1f}"])
            if kind != "softmax":
                forms_rows.append(compare_forms(model, x1, kind, T))
                if best is None or (T, -vloss) > (best[1], -best[2]):
                    best = (model, T, vloss, kind)
    print(format_table(["model", "T", "params", "steps", "ms/step", "train loss",
                        "val loss", "kept for bwd (MiB, batch 1)"], rows))
    if forms_rows:
        print("\nthe three forms on each trained linear model (one held-out sequence, float32):")
        print(format_table(["model", "T", "parallel ms", "chunked ms", "recurrent ms",
                            "max |logits - chunked|", "kept for bwd MiB: parallel / chunked "
                            "/ recurrent"], forms_rows))
    if best is not None and args.generate > 0:
        model, T, vloss, kind = best
        g = torch.Generator().manual_seed(args.seed)
        text = model.generate(b"def ", min(args.generate, max(args.lengths) - 4), 0.8, g)
        print(f"\n{kind} (T = {T}, val loss {vloss:.3f}) writes, by the recurrent form:\n")
        print(text.decode("utf-8", errors="replace"))
    if not args.no_plot:
        plt = _pyplot()
        if plt is not None:
            path = plot(plt, curves, args)
            print(f"\nplot saved to {path}")
    return 0


def compare_forms(model: CharLM, x: Tensor, kind: str, T: int) -> list[str]:
    """Logits of the trained model by each form, their time and the bytes kept for backward."""
    out, times, mem = {}, {}, {}
    for form in ("chunked", "parallel", "recurrent"):
        if form == "parallel" and kind == "gla" and T > 512:
            times[form], mem[form] = None, None  # its (T, T, K) gated scores: O(T^2 K)
            continue
        with torch.no_grad():
            t0 = time.perf_counter()
            out[form] = model(x, form=form)
            times[form] = time.perf_counter() - t0
        mem[form] = saved_bytes(lambda f=form: model(x, form=f)) if T <= 1024 or \
            form != "recurrent" else None
    err = max((out[f] - out["chunked"]).abs().max().item() for f in out)

    def ms(f):
        return "skipped" if times[f] is None else f"{times[f] * 1e3:.0f}"

    def mib(f):
        return "-" if mem[f] is None else f"{mem[f] / 2**20:.1f}"

    return [kind, f"{T:,}", ms("parallel"), ms("chunked"), ms("recurrent"), f"{err:.1e}",
            f"{mib('parallel')} / {mib('chunked')} / {mib('recurrent')}"]


def plot(plt, curves: dict, args: argparse.Namespace) -> Path:
    lengths = sorted({T for _, T in curves})
    fig, axes = plt.subplots(len(lengths), 2, figsize=(11, 3.2 * len(lengths)), squeeze=False)
    for r, T in enumerate(lengths):
        for kind in args.models:
            if (kind, T) not in curves:
                continue
            losses, walls = curves[(kind, T)]
            axes[r][0].plot(range(1, len(losses) + 1), losses, label=kind)
            axes[r][1].plot(walls, losses, label=kind)
        axes[r][0].set(xlabel="step", ylabel="train loss (nats/byte)", title=f"T = {T}")
        axes[r][1].set(xlabel="wall time (s)", ylabel="train loss", title=f"T = {T}")
        axes[r][0].legend(fontsize=8)
        for ax in axes[r]:
            ax.set_ylim(top=min(6.0, max(math.log(VOCAB), ax.get_ylim()[1])))
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "attention.png"
    fig.savefig(path, dpi=110)
    return path
