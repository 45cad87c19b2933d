"""form="triton" of linear_attention (the chunked form as Triton kernels) against the float64
loop, forward and gradients, and against its pure-torch twin (form="chunked").

On a machine without a GPU the kernels run through triton's interpreter (TRITON_INTERPRET=1,
set here before triton is imported); the sizes stay small because the interpreter executes
every program in NumPy. Skipped where triton is not installed.

Shape letters: B batch, H heads, T steps, d key size, K feature size, V value size.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before triton is imported: it reads the variable then
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.autograd import gradcheck  # noqa: E402

from paraseq.attention import (  # noqa: E402
    choose_form,
    chunked_triton,
    last_form,
    linear_attention,
    triton_attention,
)
from paraseq.scan import gpu  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")

# linear_attention's keyword arguments per case; "vector"/"scalar"/"per-head" are drawn in make
CONFIGS = {
    "elu1": dict(),
    "relu": dict(feature_map="relu"),
    "identity": dict(feature_map="identity"),
    "taylor": dict(feature_map="taylor"),
    "retnet": dict(feature_map="identity", decay=0.9),
    "decay-per-head": dict(decay="per-head"),
    "mamba2": dict(feature_map="identity", gate="scalar"),
    "gla": dict(feature_map="identity", gate="vector"),
    "gla-elu1": dict(gate="vector"),
}


def make(cfg, B, H, T, d, dv, dtype=torch.float64, seed=0, state=False, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, n, dtype=torch.float64, generator=g) for n in (d, d, dv))
    kw = dict(CONFIGS[cfg])
    if kw.get("decay") == "per-head":
        kw["decay"] = 0.7 + 0.3 * torch.rand(H, dtype=torch.float64, generator=g)
    if kw.get("gate") == "vector":
        kw["gate"] = 0.5 + 0.5 * torch.rand(B, H, T, d, dtype=torch.float64, generator=g)
    if kw.get("gate") == "scalar":
        kw["gate"] = 0.5 + 0.5 * torch.rand(B, H, T, dtype=torch.float64, generator=g)
    if state:
        fmap = kw.get("feature_map", "elu1")
        K = d + 1 if fmap == "taylor" else d
        kw["initial_state"] = torch.rand(B, H, K, dv + (fmap != "identity"),
                                         dtype=torch.float64, generator=g)
    kw = {n: x.to(device, dtype) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), kw


def rel(x, ref):
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("cfg", "T", "chunk"), [
    *((cfg, T, 16) for cfg in CONFIGS for T in (1, 17, 70)),
    ("elu1", 130, 64), ("mamba2", 130, 64), ("retnet", 128, 64)])
def test_forward_equals_the_loop_float64(cfg, T, chunk):
    """Every gate kind, T a multiple of the chunk or not, one step, with an initial state
    (but for T = 17), and the final state."""
    q, k, v, kw = make(cfg, 2, 3, T, 5, 4, state=T != 17, seed=T)
    o_ref, S_ref = linear_attention(q, k, v, form="naive", return_state=True, **kw)
    o, S = linear_attention(q, k, v, form="triton", chunk_size=chunk, return_state=True, **kw)
    assert last_form() == "triton"
    assert o.dtype == torch.float64 and o.shape == o_ref.shape and o.device.type == DEVICE.type
    assert rel(o, o_ref) < 1e-10
    assert rel(S, S_ref) < 1e-10


@pytest.mark.parametrize("cfg", ["elu1", "taylor", "retnet", "mamba2", "gla"])
def test_float32_within_1e_5_and_equal_to_its_torch_twin(cfg):
    q, k, v, kw = make(cfg, 1, 2, 150, 16, 8, dtype=torch.float32, seed=3, state=True)
    q64, k64, v64, kw64 = make(cfg, 1, 2, 150, 16, 8, seed=3, state=True)
    o_ref = linear_attention(q64, k64, v64, form="naive", **kw64)
    o = linear_attention(q, k, v, form="triton", chunk_size=32, **kw)
    twin = linear_attention(q, k, v, form="chunked", chunk_size=32, **kw)
    assert o.dtype == torch.float32
    assert rel(o, o_ref) < 1e-5
    assert rel(o, twin) < 1e-5  # the same arithmetic, summed in another order


def _grad_inputs(cfg, T, d, dv, seed):
    q, k, v, kw = make(cfg, 1, 2, T, d, dv, state=True, seed=seed)
    names = ["q", "k", "v", "initial_state"] + [
        n for n in ("gate", "decay") if isinstance(kw.get(n), torch.Tensor)]
    inputs = [x.clone().requires_grad_() for x in [q, k, v] + [kw[n] for n in names[3:]]]
    rest = {n: x for n, x in kw.items() if n not in names}

    def f(form, *xs):
        extra = dict(zip(names[3:], xs[3:], strict=True))
        return linear_attention(*xs[:3], form=form, chunk_size=16, return_state=True,
                                **extra, **rest)

    return inputs, f


@pytest.mark.parametrize("cfg", ["elu1", "mamba2", "gla-elu1"])
def test_gradcheck(cfg):
    inputs, f = _grad_inputs(cfg, 6, 2, 2, seed=1)
    assert gradcheck(partial(f, "triton"), inputs, fast_mode=True)


@pytest.mark.parametrize("cfg", ["identity", "decay-per-head", "mamba2", "gla"])
@pytest.mark.parametrize("use_state", [True, False])
def test_gradients_equal_autograd_through_the_loop(cfg, use_state):
    """T = 37 crosses two chunks and a tail; the loss reads o and (or not) the final state, so
    the state's gradient enters the reverse walk (or is absent)."""
    inputs, f = _grad_inputs(cfg, 37, 3, 4, seed=2)
    g = torch.Generator().manual_seed(5)
    o, S = f("naive", *inputs)
    wo = torch.randn(o.shape, dtype=torch.float64, generator=g).to(DEVICE)
    ws = torch.randn(S.shape, dtype=torch.float64, generator=g).to(DEVICE) * use_state
    grads = {}
    for form in ("naive", "triton"):
        o, S = f(form, *inputs)
        loss = (o * wo).sum() + ((S * ws).sum() if use_state else 0)
        grads[form] = torch.autograd.grad(loss, inputs)
    for got, want in zip(grads["triton"], grads["naive"], strict=True):
        assert rel(got, want) < 1e-10


@pytest.mark.parametrize("cfg", ["identity", "mamba2", "gla"])
def test_wide_features(cfg):
    """K = 80: a (128)-wide feature block, chunks of 32 (16 for GLA), two value blocks."""
    inputs, f = _grad_inputs(cfg, 45, 80, 40, seed=4)
    o, S = f("triton", *inputs)
    o_ref, S_ref = f("naive", *inputs)
    assert rel(o, o_ref) < 1e-10 and rel(S, S_ref) < 1e-10
    got = torch.autograd.grad(o.sum() + S.sum(), inputs)
    want = torch.autograd.grad(o_ref.sum() + S_ref.sum(), inputs)
    assert all(rel(a, b) < 1e-10 for a, b in zip(got, want, strict=True))


def test_half_precision_accumulates_in_float32():
    q, k, v, kw = make("retnet", 1, 2, 100, 16, 16, dtype=torch.bfloat16)
    q.requires_grad_()
    o = linear_attention(q, k, v, form="triton", **kw)
    assert o.dtype == torch.bfloat16
    ref = linear_attention(q.double(), k.double(), v.double(), form="naive", **kw)
    assert rel(o, ref) < 2e-2
    o.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


def test_packed_sequences():
    lengths = [5, 23, 1]
    cu = torch.tensor([0, 5, 28, 29])
    q, k, v, kw = make("gla-elu1", 1, 2, sum(lengths), 4, 3)
    o = linear_attention(q, k, v, form="triton", cu_seqlens=cu, **kw)
    ref = linear_attention(q, k, v, form="naive", cu_seqlens=cu, **kw)
    assert rel(o, ref) < 1e-10


def test_non_causal_runs_the_torch_state_form():
    q, k, v, _ = make("elu1", 1, 2, 20, 4, 3)
    o = linear_attention(q, k, v, form="triton", causal=False)
    assert rel(o, linear_attention(q, k, v, form="naive", causal=False)) < 1e-12


def saved_numel(fn):
    """How many numbers autograd keeps for the backward of fn()."""
    total = 0

    def pack(x):
        nonlocal total
        total += x.numel()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return total


@pytest.mark.parametrize("cfg", ["identity", "gla"])
def test_keeps_no_state_per_chunk_for_the_backward(cfg):
    """The kernel saves q, k, v, the gate and the final state: O(T (K + V) + K V). Measured
    on the op itself (the feature map and the normaliser are the api's) at two T."""
    d = 32
    counts = {}
    for T in (256, 512):
        q, k, v, kw = make(cfg, 1, 1, T, d, d)
        q.requires_grad_()
        lg = None if "gate" not in kw else kw["gate"].log()
        counts[T] = saved_numel(lambda q=q, k=k, v=v, lg=lg: triton_attention(q, k, v, lg))
    per_step = (counts[512] - counts[256]) / 256
    assert per_step <= 4 * d, per_step  # q, k, v and the gate: no (K, V) per chunk or step


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 80), d=st.integers(1, 9),
       dv=st.integers(1, 40), chunk=st.integers(1, 80),
       cfg=st.sampled_from(["elu1", "relu", "gla-elu1", "mamba2", "retnet"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_equals_the_loop(B, H, T, d, dv, chunk, cfg, dtype):
    """Shapes that are not powers of two, several value blocks (dv > 32), any chunk size."""
    q, k, v, kw = make(cfg, B, H, T, d, dv, dtype=dtype, seed=T * d)
    q64, k64, v64, kw64 = make(cfg, B, H, T, d, dv, seed=T * d)
    o_ref = linear_attention(q64, k64, v64, form="naive", **kw64)
    o = linear_attention(q, k, v, form="triton", chunk_size=chunk, **kw)
    assert o.dtype == dtype and o.shape == (B, H, T, dv)
    assert rel(o, o_ref) < (1e-10 if dtype == torch.float64 else 1e-5)


def test_auto_picks_triton_on_cuda_and_says_so():
    cuda = torch.device("cuda")
    pick = dict(causal=True, gate_over_k=False, needs_grad=True, device=cuda)
    assert choose_form(10_000, 64, **pick) == "triton"
    assert choose_form(10_000, 64, **{**pick, "gate_over_k": True}) == "triton"
    assert choose_form(10_000, 512, **pick) == "chunked"  # K past the kernel's register block
    assert choose_form(100, 64, **pick) == "parallel"
    assert choose_form(10_000, 64, **{**pick, "causal": False}) == "chunked"
    cpu = {**pick, "device": torch.device("cpu")}
    assert choose_form(10_000, 64, **cpu) == "chunked"  # CPU behaviour unchanged
    q, k, v, _ = make("elu1", 1, 1, 600, 4, 4)  # past the parallel form's 512 steps on CUDA
    linear_attention(q, k, v)
    assert last_form() == ("triton" if CUDA else "chunked")


def test_module_reports_its_form():
    from paraseq.nn import LinearAttention

    m = LinearAttention(8, 2, gate="gla", chunk_size=16).double().to(DEVICE)
    x = torch.randn(1, 40, 8, dtype=torch.float64, device=DEVICE)
    y = m(x, form="triton")
    assert m.last_form == "triton"
    assert rel(y, m(x, form="naive")) < 1e-10 and m.last_form == "naive"


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(gpu, "AVAILABLE", False)
    assert not chunked_triton.available()
    assert choose_form(10_000, 64, causal=True, gate_over_k=False, needs_grad=True,
                       device=torch.device("cuda")) == "chunked"
    q = torch.rand(1, 1, 5, 2)
    with pytest.raises(ValueError, match=r"linear_attention: form 'triton'.*pip install triton"):
        linear_attention(q, q, q, form="triton")


@pytest.mark.skipif(CUDA, reason="the CPU-only error")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q = torch.rand(1, 1, 5, 2)
    with pytest.raises(ValueError, match=r"form 'triton'.*TRITON_INTERPRET=1.*form='chunked'"):
        linear_attention(q, q, q, form="triton")
    with pytest.raises(ValueError, match=r"form='triton' cannot run here"):
        triton_attention(q, q, q)
    linear_attention(q, q, q)  # auto: unchanged
    assert last_form() in ("parallel", "chunked")


def test_large_feature_size_is_refused():
    q = torch.rand(1, 1, 3, 300, device=DEVICE)
    with pytest.raises(ValueError, match="K <= 256"):
        triton_attention(q, q, q)


@pytest.mark.slow
def test_gpu_benchmark_section_dry_run(tmp_path):
    """benchmarks/attention_gpu.py's section (what benchmarks/gpu.py calls) runs on tiny
    sizes and its rows agree with the float64 reference."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_gpu.py"
    spec = importlib.util.spec_from_file_location("attention_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.gpu_section(True, tmp_path, lengths=(20,))
    forms = {r["form"] for r in rows}
    assert {"paraseq chunked", "paraseq triton", "torch sdpa"} <= forms
    assert all(r["ms"] is not None and r["max_err"] < 1e-5 for r in rows), rows
    assert all(r["max_err_dq"] < 1e-5 for r in rows if r["pass"] == "fwd+bwd")
    assert (tmp_path / "attention_gpu.json").exists()
