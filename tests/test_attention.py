"""paraseq.attention: every form against the float64 loop, and the loop against the definition.

Shape letters: B batch, H heads, T steps, d key size, K feature size, V value size.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from paraseq.attention import (
    FEATURE_MAPS,
    choose_form,
    chunked_attention,
    linear_attention,
    naive_attention,
    recurrent_attention,
)

FORMS = ["parallel", "recurrent", "chunked"]


def rand(*shape, dtype=torch.float64, g=None):
    return torch.randn(*shape, dtype=dtype, generator=g)


def phi_ref(name, x, dim_seq=-2):
    """The feature maps written out again, independently of paraseq.attention.features."""
    if name == "elu1":
        return torch.where(x > 0, x + 1, x.exp())
    if name == "relu":
        return x.clamp_min(0)
    if name == "identity":
        return x
    if name == "taylor":
        xn = x / x.norm(dim=-1, keepdim=True)
        return torch.cat([torch.ones_like(x[..., :1]), xn], -1)
    raise AssertionError(name)


def definition(q, k, v, *, fmap="elu1", normalize=True, log_g=None, causal=True, S0=None,
               eps=1e-6):
    """o_i = sum_j w_ij sim(q_i, k_j) v_j / (sum_j w_ij sim(q_i, k_j) + eps), the sum written out
    term by term (O(T^2)), w_ij = prod_(j < l <= i) g_l; plus the initial state read by q_i."""
    q, k, v = phi_ref(fmap, q.double()), phi_ref(fmap, k.double()), v.double()
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    B, H, T, K = q.shape
    if not normalize:  # linear_attention's default scale without normaliser: K^-1/2
        q = q * K ** -0.5
    G = None if log_g is None else log_g.double().cumsum(-2).expand(B, H, T, K)
    o = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for i in range(T):
        for j in range(T if not causal else i + 1):
            w = q[:, :, i] * k[:, :, j]  # (B, H, K)
            if G is not None:
                w = w * (G[:, :, i] - G[:, :, j]).exp()
            o[:, :, i] += w.sum(-1, keepdim=True) * v[:, :, j]
        if S0 is not None:
            qi = q[:, :, i] if G is None else q[:, :, i] * G[:, :, i].exp()
            o[:, :, i] += (qi[..., None] * S0.double()).sum(-2)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    return o


def rel(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)
            ).item()


# (kwargs to linear_attention, log_g builder for the definition, feature size offset)
CONFIGS = {
    "elu1": dict(),
    "relu": dict(feature_map="relu"),
    "identity": dict(feature_map="identity"),
    "taylor": dict(feature_map="taylor"),
    "elu1-noncausal": dict(causal=False),
    "identity-noncausal": dict(feature_map="identity", causal=False),
    "softmax-noncausal": dict(feature_map="softmax", causal=False),
    "retnet": dict(feature_map="identity", decay=0.9),
    "decay-per-head": dict(decay="per-head"),
    "gla": dict(feature_map="identity", gate="vector"),
    "gla-elu1": dict(gate="vector"),
    "mamba2": dict(feature_map="identity", gate="scalar"),
}


def make(cfg, B, H, T, d, dv, dtype=torch.float64, seed=0, state=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(B, H, T, d, g=g), rand(B, H, T, d, g=g), rand(B, H, T, dv, g=g)
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
        norm = fmap not in ("identity", "softmax")
        kw["initial_state"] = torch.rand(B, H, K, dv + norm, dtype=torch.float64, generator=g)
    cast = {n: x.to(dtype) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    return q.to(dtype), k.to(dtype), v.to(dtype), cast


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c != "softmax-noncausal"])
@pytest.mark.parametrize("state", [False, True])
def test_naive_loop_is_the_definition(cfg, state):
    if state and CONFIGS[cfg].get("feature_map") == "softmax":
        pytest.skip("no state")
    q, k, v, kw = make(cfg, 2, 2, 9, 3, 4, state=state)
    fmap = kw.get("feature_map", "elu1")
    log_g = None
    if "decay" in kw:
        dec = torch.as_tensor(kw["decay"], dtype=torch.float64).reshape(-1)
        log_g = dec.log()[None, :, None, None].expand(2, 2, 9, 1)
    if "gate" in kw:
        lg = kw["gate"].log()
        log_g = lg[..., None] if lg.dim() == 3 else lg
    ref = definition(q, k, v, fmap=fmap, normalize=fmap != "identity", log_g=log_g,
                     causal=kw.get("causal", True), S0=kw.get("initial_state"))
    o = linear_attention(q, k, v, form="naive", **kw)
    assert rel(o, ref) < 1e-12


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("T", [1, 17, 70])
def test_forms_equal_the_loop_float64(form, cfg, T):
    state = CONFIGS[cfg].get("feature_map") != "softmax" and T != 17
    q, k, v, kw = make(cfg, 2, 3, T, 5, 4, state=state, seed=T)
    o_ref, S_ref = linear_attention(q, k, v, form="naive", return_state=True, **kw)
    o, S = linear_attention(q, k, v, form=form, chunk_size=16, return_state=True, **kw)
    assert o.dtype == torch.float64 and o.shape == o_ref.shape
    assert rel(o, o_ref) < 1e-10
    assert rel(S, S_ref) < 1e-10


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cfg", ["elu1", "taylor", "retnet", "gla", "mamba2", "elu1-noncausal"])
def test_forms_float32_within_1e_5(form, cfg):
    q, k, v, kw = make(cfg, 1, 2, 150, 16, 8, dtype=torch.float32, seed=3)
    q64, k64, v64, kw64 = make(cfg, 1, 2, 150, 16, 8, seed=3)
    o_ref = linear_attention(q64, k64, v64, form="naive", **kw64)
    o = linear_attention(q, k, v, form=form, chunk_size=32, **kw)
    assert o.dtype == torch.float32
    assert rel(o, o_ref) < 1e-5


@pytest.mark.parametrize("cfg", ["elu1", "gla"])
def test_final_state_equals_the_recurrent_forms(cfg):
    q, k, v, kw = make(cfg, 2, 2, 45, 4, 3, state=True)
    _, S_rec = linear_attention(q, k, v, form="recurrent", return_state=True, **kw)
    for form in ("parallel", "chunked"):
        _, S = linear_attention(q, k, v, form=form, chunk_size=8, return_state=True, **kw)
        assert rel(S, S_rec) < 1e-12


def test_state_carries_over_a_split():
    """Attending to the first half, then the second from the first's final state, is
    attending to the whole: the state is the whole past."""
    q, k, v, kw = make("gla-elu1", 1, 2, 40, 4, 3)
    o = linear_attention(q, k, v, **kw)
    gate = kw.pop("gate")
    o1, S = linear_attention(q[:, :, :23], k[:, :, :23], v[:, :, :23], gate=gate[:, :, :23],
                             form="chunked", chunk_size=8, return_state=True)
    o2 = linear_attention(q[:, :, 23:], k[:, :, 23:], v[:, :, 23:], gate=gate[:, :, 23:],
                          form="chunked", chunk_size=8, initial_state=S)
    assert rel(torch.cat([o1, o2], 2), o) < 1e-12


@pytest.mark.parametrize("form", ["naive", *FORMS])
@pytest.mark.parametrize("cfg", ["elu1", "gla", "softmax-noncausal"])
def test_cu_seqlens_packs_independent_sequences(form, cfg):
    lengths = [5, 17, 1, 30]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    T = sum(lengths)
    q, k, v, kw = make(cfg, 1, 2, T, 4, 3, state=cfg != "softmax-noncausal")
    S0 = kw.pop("initial_state", None)
    if S0 is not None:
        S0 = torch.rand(len(lengths), *S0.shape[1:], dtype=torch.float64)
    o, S = linear_attention(q, k, v, form=form, chunk_size=8, cu_seqlens=cu, initial_state=S0,
                            return_state=True, **kw)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        kwi = {n: (x[:, :, s:e] if n == "gate" else x) for n, x in kw.items()}
        oi, Si = linear_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], form="naive",
                                  initial_state=None if S0 is None else S0[i:i + 1],
                                  return_state=True, **kwi)
        assert rel(o[:, :, s:e], oi) < 1e-10
        assert rel(S[i:i + 1], Si) < 1e-10


def test_layout_bthd_is_the_transpose():
    q, k, v, kw = make("gla-elu1", 2, 3, 20, 4, 5)
    o = linear_attention(q, k, v, **kw)
    t = [x.transpose(1, 2) for x in (q, k, v)]
    o2 = linear_attention(*t, layout="bthd", gate=kw["gate"].transpose(1, 2))
    assert o2.shape == (2, 20, 3, 5)
    assert rel(o2.transpose(1, 2), o) < 1e-14


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    q, k, v, kw = make("retnet", 1, 2, 300, 16, 16, dtype=dtype)
    o = linear_attention(q, k, v, form="chunked", **kw)
    assert o.dtype == dtype
    ref = linear_attention(q.double(), k.double(), v.double(), form="naive", **kw)
    # the inputs were rounded to dtype; the sum over 300 steps adds little beyond one rounding
    assert rel(o, ref) < 2e-2


def test_linformer_matches_its_loop_and_is_softmax_attention_at_full_rank():
    g = torch.Generator().manual_seed(0)
    q, k, v = rand(2, 2, 12, 4, g=g), rand(2, 2, 12, 4, g=g), rand(2, 2, 12, 3, g=g)
    E, F = rand(5, 12, g=g), rand(5, 12, g=g)
    o = linear_attention(q, k, v, feature_map="linformer", causal=False, projection=(E, F))
    ref = linear_attention(q, k, v, feature_map="linformer", causal=False, projection=(E, F),
                           form="naive")
    assert rel(o, ref) < 1e-12
    eye = torch.eye(12, dtype=torch.float64)  # E = F = I: plain softmax attention
    o = linear_attention(q, k, v, feature_map="linformer", causal=False, projection=(eye, eye))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel(o, sdpa) < 1e-12


def test_separate_softmax_is_q_softmax_times_k_softmax_v():
    q, k, v, _ = make("elu1", 1, 2, 10, 4, 3)
    o = linear_attention(q, k, v, feature_map="softmax", causal=False)
    ref = q.softmax(-1) @ (k.softmax(-2).transpose(-1, -2) @ v)
    assert rel(o, ref) < 1e-12


@pytest.mark.parametrize("form", ["parallel", "recurrent", "chunked"])
@pytest.mark.parametrize("cfg", ["elu1", "taylor", "gla-elu1", "mamba2", "retnet",
                                 "elu1-noncausal"])
def test_gradcheck(form, cfg):
    q, k, v, kw = make(cfg, 1, 1, 6, 2, 2, state=True)
    names = ["q", "k", "v", "initial_state"] + [n for n in ("gate",) if n in kw]
    inputs = [q, k, v] + [kw[n] for n in names[3:]]
    inputs = [x.clone().requires_grad_() for x in inputs]
    rest = {n: x for n, x in kw.items() if n not in names}

    def f(*xs):
        extra = dict(zip(names[3:], xs[3:], strict=True))
        return linear_attention(*xs[:3], form=form, chunk_size=4, return_state=True,
                                **extra, **rest)

    assert gradcheck(f, inputs, fast_mode=True)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 90), d=st.integers(1, 9),
       dv=st.integers(1, 6), chunk=st.integers(1, 40), form=st.sampled_from(FORMS),
       cfg=st.sampled_from(["elu1", "relu", "gla-elu1", "mamba2", "retnet", "elu1-noncausal"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_forms_equal_the_loop(B, H, T, d, dv, chunk, form, cfg, dtype):
    q, k, v, kw = make(cfg, B, H, T, d, dv, dtype=dtype, seed=T * d)
    q64, k64, v64, kw64 = make(cfg, B, H, T, d, dv, seed=T * d)
    o_ref = linear_attention(q64, k64, v64, form="naive", **kw64)
    o = linear_attention(q, k, v, form=form, chunk_size=chunk, **kw)
    assert o.dtype == dtype and o.shape == (B, H, T, dv)
    assert rel(o, o_ref) < (1e-10 if dtype == torch.float64 else 1e-5)


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


@pytest.mark.parametrize("cfg", ["elu1", "retnet", "gla"])
def test_chunked_backward_keeps_no_state_per_step(cfg):
    """The chunked form saves O(T (K + V + C) + T K V / C) for the backward; the recurrent loop
    keeps one (K, V) state per step, O(T K V). Measured by what autograd saves, at two T."""
    d, C = 32, 64
    counts = {}
    for T in (512, 1024):
        q, k, v, kw = make(cfg, 1, 1, T, d, d)
        q.requires_grad_()
        counts[T] = saved_numel(partial(linear_attention, q, k, v, form="chunked",
                                        chunk_size=C, **kw))
        if T == 512:
            rec = saved_numel(partial(linear_attention, q, k, v, form="recurrent", **kw))
            assert rec >= T * d * d  # the loop does keep a state per step
    per_step = (counts[1024] - counts[512]) / 512
    assert per_step < d * d / 4, per_step  # far below one (K, V) state per step
    assert counts[1024] < 2.2 * counts[512]  # linear in T


def test_chunked_forms_signature_matches_naive():
    q, k, v = (rand(1, 1, 5, 2) for _ in range(3))
    for fn in (naive_attention, recurrent_attention, chunked_attention):
        o, S = fn(q, k, v, None, None, True)
        assert o.shape == (1, 1, 5, 2) and S.shape == (1, 1, 2, 2)


def test_auto_picks_by_length_and_gate():
    cpu = torch.device("cpu")
    pick = dict(causal=True, gate_over_k=False, needs_grad=True, device=cpu)
    assert choose_form(1, 64, **pick) == "recurrent"
    assert choose_form(100, 64, **pick) == "parallel"
    assert choose_form(10_000, 64, **pick) == "chunked"
    assert choose_form(100, 64, **{**pick, "gate_over_k": True}) == "chunked"
    q, k, v = (rand(1, 1, 300, 4) for _ in range(3))
    assert rel(linear_attention(q, k, v), linear_attention(q, k, v, form="naive")) < 1e-12


def test_feature_maps_registry():
    assert set(FEATURE_MAPS) == {"elu1", "relu", "identity", "taylor", "softmax"}
    x = rand(3, 4)
    assert (FEATURE_MAPS["elu1"][0](x) > 0).all()
    t = FEATURE_MAPS["taylor"][0](x)
    y = FEATURE_MAPS["taylor"][0](rand(3, 4))
    assert ((t * y).sum(-1) >= 0).all()  # 1 + q_n . k_n >= 0


@pytest.mark.parametrize(("kwargs", "arg"), [
    (dict(k=rand(1, 2, 5, 3)), "q, k, v shapes"),
    (dict(v=rand(1, 2, 4, 3)), "q, k, v shapes"),
    (dict(feature_map="gelu"), "feature_map"),
    (dict(feature_map="softmax"), "causal"),
    (dict(feature_map="linformer", projection=(rand(2, 5), rand(2, 5))), "causal"),
    (dict(decay=1.5), "decay"),
    (dict(decay=0.0), "decay"),
    (dict(decay=torch.tensor([0.5, -0.1])), "decay"),
    (dict(gate=torch.full((1, 2, 5, 4), 1.2, dtype=torch.float64)), "gate"),
    (dict(gate=rand(1, 2, 5, 3).abs()), "gate"),
    (dict(decay=0.9, causal=False), "decay/gate"),
    (dict(cu_seqlens=[0, 3, 2, 5]), "cu_seqlens"),
    (dict(cu_seqlens=[0, 3, 4]), "cu_seqlens"),
    (dict(cu_seqlens=[1, 5]), "cu_seqlens"),
    (dict(form="fast"), "form"),
    (dict(layout="btdh"), "layout"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(initial_state=rand(1, 2, 4, 4)), "initial_state"),
    (dict(feature_map="linformer", causal=False), "projection"),
])
def test_bad_input_names_the_argument(kwargs, arg):
    args = dict(q=rand(1, 2, 5, 4), k=rand(1, 2, 5, 4), v=rand(1, 2, 5, 4))
    for n in ("q", "k", "v"):
        if n in kwargs:
            args[n] = kwargs.pop(n)
    with pytest.raises(ValueError, match=f"linear_attention: {arg.replace('/', '.')}"):
        linear_attention(args["q"], args["k"], args["v"], **kwargs)


def test_cu_seqlens_needs_batch_one():
    q = rand(2, 1, 5, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        linear_attention(q, q, q, cu_seqlens=[0, 5])


def test_bfloat16_keeps_up_with_float32_on_the_chunked_form():
    q, k, v, _ = make("elu1", 1, 4, 1000, 32, 32, dtype=torch.float32)
    o32 = linear_attention(q, k, v, form="chunked")
    o16 = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), form="chunked")
    assert math.isfinite(o16.float().abs().max().item())
    assert rel(o16, o32) < 3e-2


# ---------------------------------------------------------------- paraseq.nn.LinearAttention

@pytest.mark.parametrize(("fmap", "gate"), [("elu1", None), ("relu", "decay"),
                                            ("identity", "gla"), ("taylor", "scalar"),
                                            ("elu1", "gla")])
def test_module_step_by_step_equals_the_whole_sequence(fmap, gate):
    from paraseq.nn import LinearAttention

    torch.manual_seed(0)
    m = LinearAttention(12, 3, feature_map=fmap, gate=gate, chunk_size=8).double()
    x = torch.randn(2, 29, 12, dtype=torch.float64)
    y, S = m(x, return_state=True, form="chunked")
    assert y.shape == x.shape
    ys, state = [], None
    for t in range(29):
        yt, state = m.step(x[:, t], state)
        ys.append(yt)
    assert rel(torch.stack(ys, 1), y) < 1e-12
    assert rel(state, S) < 1e-12
    for form in ("parallel", "recurrent", "naive"):
        assert rel(m(x, form=form), y) < 1e-12


def test_block_decodes_and_trains():
    from paraseq.nn import LinearTransformerBlock

    torch.manual_seed(0)
    blk = LinearTransformerBlock(16, 4, gate="gla").double()
    x = torch.randn(1, 40, 16, dtype=torch.float64, requires_grad=True)
    y = blk(x)
    ys, state = [], None
    for t in range(40):
        yt, state = blk.step(x[:, t].detach(), state)
        ys.append(yt)
    assert rel(torch.stack(ys, 1), y.detach()) < 1e-12
    y.square().mean().backward()
    grads = [p.grad for p in blk.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and x.grad[:, :-1].abs().sum() > 0  # causal: earlier steps matter


def test_module_bad_arguments():
    from paraseq.nn import LinearAttention

    with pytest.raises(ValueError, match="feature_map"):
        LinearAttention(8, 2, feature_map="softmax")
    with pytest.raises(ValueError, match="gate"):
        LinearAttention(8, 2, gate="mamba")
    with pytest.raises(ValueError, match="divisible"):
        LinearAttention(10, 3)
    with pytest.raises(ValueError, match="x must be"):
        LinearAttention(8, 2)(torch.randn(3, 8))


def test_one_chunk_one_feature_gated():
    """N = K = V = 1: the chunk scan's coefficients read as diagonal, not as 1 x 1 matrices."""
    q, k, v = (rand(1, 1, 1, 1) for _ in range(3))
    g = torch.full((1, 1, 1), 0.5, dtype=torch.float64)
    o = linear_attention(q, k, v, gate=g, feature_map="identity", form="chunked")
    assert rel(o, linear_attention(q, k, v, gate=g, feature_map="identity", form="naive")) < 1e-14


def test_cli_attention_runs_tiny(tmp_path, capsys):
    from paraseq.cli import main

    rc = main(["attention", "--lengths", "16", "--models", "softmax", "elu1", "gla",
               "--budget", "0.2", "--max-steps", "2", "--tokens", "32", "--embed", "8",
               "--heads", "2", "--layers", "1", "--text-bytes", "20000", "--generate", "8",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "softmax" in out and "gla" in out and "writes, by the recurrent form" in out
    assert (tmp_path / "attention.png").exists()
    # the three forms agree on the trained models (float32)
    errs = [float(line.split()[5]) for line in out.splitlines()
            if line.startswith(("elu1 ", "gla ")) and "e-" in line.split()[5]]
    assert errs and max(errs) < 1e-4
