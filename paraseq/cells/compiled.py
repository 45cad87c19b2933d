"""Compiled sequential loops for the built-in cells on the CPU (numba), forward and the
reverse-time adjoint.

Shape letters: B batch, T time, H hidden size, P the size of h (proj_size for a projected
LSTM, else H), K = G H the gate pre-activations (G gates: Elman 1, GRU 3, LSTM 4), W the SIMD
width (16 float32 or 8 float64: one 64-byte vector).

On a CPU a recurrence over small states is bound by per-step overhead, not arithmetic:
torch.nn.GRU spends some 15 microseconds of dispatch per step whatever the size, while a step at
hidden 8, batch 16 is about 6 kFLOP. A compiled loop runs at arithmetic speed, so it is the bar
every parallel method must beat on a CPU.

The loops, each a ``torch.autograd.Function`` whose backward is one compiled reverse sweep
(backpropagation through time, recomputing the gates from the stored states) giving the
gradients of every input, from the input pre-activations gi = W_ih x + b_ih (B, T, K) that a
layer computes for all steps in one matmul:

    gru_sequence(gi, h0, weight_hh, bias_hh) -> h (B, T, H)
        torch's GRU (gates r, z, n; the reset gate scales W_hn h + b_hn)
    elman_sequence(gi, h0, weight_hh, bias_hh, nonlinearity="tanh") -> h (B, T, H)
        h_t = act(gi_t + W_hh h_{t-1} + b_hh), act tanh or relu (torch.nn.RNN)
    lstm_sequence(gi, h0, c0, weight_hh, bias_hh, weight_hr=None) -> (h (B, T, P), c (B, T, H))
        torch's LSTM (gates i, f, g, o; c = f c + i g, h = o tanh(c)); with weight_hr (P, H),
        h = W_hr (o tanh(c)) (proj_size)

weight_hh is torch's (K, P), or a (K,) vector for the diagonal-recurrence cells of
``paraseq.cells.functional`` (diag_gru, diag_lstm: W_hk h replaced by w_hk * h); bias_hh is
(K,) or None. The results equal the cell loops of ``paraseq.cells.functional`` (tested to 1e-10
in float64, ~1e-6 in float32). float32 and float64 CPU tensors only (``supported``); the
backward is not itself differentiable (double backward raises).

Two kernels, both explicit SIMD (a small numba extension below gives LLVM vectors, because
LLVM's auto-vectoriser left these short loops scalar):

- "lanes": a vector holds W batch rows of one unit; all rows advance in lockstep, one step at a
  time, so a step is a few vector instructions per unit and the dependency chain of one step
  (two transcendentals) is paid once for W rows. The recurrent product is K P vector FMAs per
  W rows. Best for small H, and at any H once B fills the vectors.
- "rows": a vector holds W units of one batch row (the product W_hh h as P vector FMAs per W
  gate units); rows run one after another. Best for few rows and a wide state: it wastes no
  lanes at B = 1.

``_plan`` picks one by the measured rule in its docstring. gi may have any strides (and is
never copied): the lanes kernel reads it fastest with the batch contiguous, memory (K, T, B),
which ``input_projection`` gives a layer at small H; the rows kernel with the gates contiguous,
torch's (T, B, K). The outputs come back as (B, T, .) views of memory laid out for the kernel,
(H, T, B) (lanes) or (T, B, H) (rows). Large problems split the batch across
``torch.get_num_threads()`` threads (the kernels release the GIL); see ``_plan``.

Measured (2-core AMD EPYC shared with other jobs, so CPU time of one thread, float32, GRU
forward including the input projection, against torch.nn.GRU in the same run;
``benchmarks/compiled.py``): hidden 1, batch 16, T = 1e5: 7.3 ms, 173x (JAX's jitted lax.scan:
6.3 ms); hidden 8, batch 16, T = 1e4: 8.8 ms, 17x (JAX: 39 ms); hidden 32, batch 16, T = 1e4:
60 to 70 ms, 3.5x (JAX: 93 ms). Where each loop beats torch's own kernel (forward, T = 1e3):
the GRU up to B H ~ 16384, the tanh RNN up to B H ~ 8192 (training: 4096), and the LSTM,
whose CPU kernel (oneDNN) is far quicker than torch's GRU, for H <= 8 at any B (training:
B <= 16) and at B = 1 up to H = 128 (training: 32).

numba is optional: ``AVAILABLE`` says whether it is installed; it is imported, and the kernels
compiled, on first use, then cached on disk (``cache=True``): the first call of a kernel (lanes
or rows, forward or backward, per dtype) costs its compile, 1.5 to 3 s of CPU here (all eight:
about 20 s), and in a later process the cache load (about 1 s for the first).

float32 uses a branch-free rational tanh (``_fast_tanh``, within 3.6e-7 of tanh) and
sigmoid(v) = (1 + tanh(v / 2)) / 2 through it; float64 computes tanh and sigmoid from a
vectorised expm1 (``_expm1_64``).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import threading

import numpy as np
import torch
from torch import Tensor

AVAILABLE = importlib.util.find_spec("numba") is not None
"""Whether numba is installed (it is imported, and the kernels compiled, on first use only)."""

__all__ = ["AVAILABLE", "elman_sequence", "gru_sequence", "input_projection", "lstm_sequence",
           "supported"]

_KERNELS: dict = {}
_BUILD_LOCK = threading.Lock()

# cell kinds, the kernels' first argument
_ELMAN_TANH, _ELMAN_RELU, _GRU, _LSTM = 0, 1, 2, 3
_NGATES = {_ELMAN_TANH: 1, _ELMAN_RELU: 1, _GRU: 3, _LSTM: 4}


def supported(x: Tensor) -> bool:
    """Whether the compiled loops serve this tensor (CPU, float32/float64, numba present)."""
    return AVAILABLE and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- float32 tanh

# A rational minimax approximation of tanh on [-7.9053, 7.9053] (odd degree-13 numerator,
# even degree-6 denominator; the coefficients Eigen uses for float), evaluated in float32 by
# Estrin's scheme (a shorter dependency chain than Horner's: the loop's latency is two of
# these per step): branch-free, and within 3.6e-7 of tanh everywhere (tested).
_TANH_CLAMP = np.float32(7.90531110763549805)
_TANH_P = tuple(np.float32(c) for c in (
    4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
    -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16))
_TANH_Q = tuple(np.float32(c) for c in (
    4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06))


def _clip(v, c):
    """min(max(v, -c), c); numba: also for SIMD vectors (an overload, see ``_define_simd``)."""
    return min(max(v, -c), c)


def _fast_tanh(v):
    x = _clip(v, _TANH_CLAMP)
    y = x * x
    y2 = y * y
    p = (_TANH_P[0] + _TANH_P[1] * y) + (_TANH_P[2] + _TANH_P[3] * y) * y2 \
        + ((_TANH_P[4] + _TANH_P[5] * y) + _TANH_P[6] * y2) * (y2 * y2)
    q = (_TANH_Q[0] + _TANH_Q[1] * y) + (_TANH_Q[2] + _TANH_Q[3] * y) * y2
    return x * p / q


# float64: tanh and sigmoid through expm1, itself by Cody and Waite's reduction x = k ln 2 + r,
# |r| <= ln 2 / 2, and the Taylor series of e^r - 1 to degree 13 (truncation < 1e-17 relative):
# branch-free, vectorised, within a few ulp (tested against torch in float64 to 1e-12).
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_ROUND = 6755399441055744.0  # 1.5 * 2 ** 52: x + _ROUND - _ROUND rounds x to an integer
_EXPM1_C = tuple(1.0 / math.factorial(n) for n in range(2, 14))  # 1/2!, ..., 1/13!


def _vpow2(k):
    """2 ** k, lane by lane (float64; an intrinsic, see ``_define_simd``)."""


def _expm1_64(x):
    """e^x - 1 for float64 vectors with |x| <= 709."""
    k = (x * _LOG2E + _ROUND) - _ROUND
    r = (x - k * _LN2_HI) - k * _LN2_LO
    c = _EXPM1_C
    p = c[11] * r + c[10]
    p = p * r + c[9]
    p = p * r + c[8]
    p = p * r + c[7]
    p = p * r + c[6]
    p = p * r + c[5]
    p = p * r + c[4]
    p = p * r + c[3]
    p = p * r + c[2]
    p = p * r + c[1]
    p = p * r + c[0]
    q = r + (r * r) * p  # e^r - 1
    s = _vpow2(k)
    return s * q + (s - 1.0)


def _tanh_from_expm1(u):
    """tanh(x) from u = e^(2x) - 1: u / (u + 2), accurate near 0 too."""
    return u / (u + 2.0)


# ----------------------------------------------------------------------------- SIMD vectors
# Filled in by _define_simd (numba is imported on first use only). A vector is an LLVM
# <W x float/double> value; W is the length of the tuple ``vw`` the kernels are given (so each
# width is its own compile-time specialisation).

def _vload(a, off, vw):
    """a[off:off + W] of a 1-D contiguous array."""


def _vload_s(a, off, s, n, vw):
    """a[off + l s] for lanes l < n, 0 in the lanes beyond."""


def _vstore(a, off, v):
    """a[off:off + W] = v."""


def _vstore_s(a, off, s, n, v):
    """a[off + l s] = v[l] for lanes l < n."""


def _vfull(x, a, vw):
    """A vector of a's dtype with every lane x."""


def _vsigmoid(v):
    """sigmoid, lane by lane (float32: through _fast_tanh)."""


def _vtanh(v):
    """tanh, lane by lane (float32: _fast_tanh)."""


def _vrelu(v):
    """max(v, 0)."""


def _vstep(v):
    """1 where v > 0, else 0 (relu's derivative as autograd takes it)."""


def _vmax(a, b):
    """max(a, b), lane by lane (b where either is nan)."""


def _vnan_to(v, x):
    """v with its nan lanes replaced by x."""


def _define_simd(numba) -> None:
    import operator

    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic, models, overload, register_model

    g = globals()

    class _Vec(types.Type):
        def __init__(self, dtype, width):
            self.dtype, self.width = dtype, width
            super().__init__(name=f"paraseq.Vec({dtype}x{width})")

    # numba's disk cache pickles the types of a kernel's variables: make the class findable
    _Vec.__module__, _Vec.__qualname__ = __name__, "_Vec"
    g["_Vec"] = _Vec

    @register_model(_Vec)
    class _VecModel(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            be = ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.width)
            super().__init__(dmm, fe_type, be)

    i32 = ir.IntType(32)

    def splat(context, builder, val, fromty, vt):
        s = context.cast(builder, val, fromty, vt.dtype)
        v = builder.insert_element(ir.Constant(context.get_value_type(vt), ir.Undefined), s,
                                   ir.Constant(i32, 0))
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, vt.width),
                                                        [0] * vt.width))

    def both(context, builder, sig, args, vt):
        return [a if isinstance(t, _Vec) else splat(context, builder, a, t, vt)
                for a, t in zip(args, sig.args, strict=True)]

    @intrinsic
    def vload(typingctx, a, off, vw):
        vt = _Vec(a.dtype, vw.count)

        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = builder.gep(arr.data, [args[1]])
            ptr = builder.bitcast(ptr, ir.PointerType(context.get_value_type(vt)))
            return builder.load(ptr, align=sig.args[0].dtype.bitwidth // 8)
        return vt(a, off, vw), codegen

    def lane_loop(builder, n, width, body):
        """for lane in range(min(n, width)): body(lane), as an IR loop (a small function body
        whatever W: the kernels have dozens of these)."""
        ity = n.type
        pre = builder.block
        loop = builder.append_basic_block("lanes")
        done = builder.append_basic_block("lanes.done")
        count = builder.select(builder.icmp_signed("<", n, ir.Constant(ity, width)), n,
                               ir.Constant(ity, width))
        builder.cbranch(builder.icmp_signed(">", count, ir.Constant(ity, 0)), loop, done)
        builder.position_at_end(loop)
        lane = builder.phi(ity)
        lane.add_incoming(ir.Constant(ity, 0), pre)
        body(lane)
        nxt = builder.add(lane, ir.Constant(ity, 1))
        lane.add_incoming(nxt, builder.block)
        builder.cbranch(builder.icmp_signed("<", nxt, count), loop, done)
        builder.position_at_end(done)
        return pre, loop

    @intrinsic
    def vload_s(typingctx, a, off, s, n, vw):
        vt = _Vec(a.dtype, vw.count)

        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            _, off, s, n, _ = args
            buf = cgutils.alloca_once_value(builder,
                                            ir.Constant(context.get_value_type(vt), None))

            def body(lane):
                x = builder.load(builder.gep(arr.data, [builder.add(off, builder.mul(lane, s))]))
                v = builder.load(buf)
                builder.store(builder.insert_element(v, x, builder.trunc(lane, i32)), buf)
            lane_loop(builder, n, vt.width, body)
            return builder.load(buf)
        return vt(a, off, s, n, vw), codegen

    @intrinsic
    def vstore(typingctx, a, off, v):
        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = builder.bitcast(builder.gep(arr.data, [args[1]]), ir.PointerType(args[2].type))
            builder.store(args[2], ptr, align=sig.args[0].dtype.bitwidth // 8)
            return context.get_dummy_value()
        return types.none(a, off, v), codegen

    @intrinsic
    def vstore_s(typingctx, a, off, s, n, v):
        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            _, off, s, n, vec = args

            def body(lane):
                x = builder.extract_element(vec, builder.trunc(lane, i32))
                builder.store(x, builder.gep(arr.data, [builder.add(off, builder.mul(lane, s))]))
            lane_loop(builder, n, sig.args[4].width, body)
            return context.get_dummy_value()
        return types.none(a, off, s, n, v), codegen

    @intrinsic
    def ld(typingctx, a, off, s, n, vw):
        """vload where s == 1 and n == W, else vload_s: one intrinsic, so that the dozens of
        call sites cost the compiler little."""
        vt = _Vec(a.dtype, vw.count)

        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            _, off, s, n, _ = args
            vty = context.get_value_type(vt)
            buf = cgutils.alloca_once(builder, vty)
            ity = n.type
            fast = builder.and_(builder.icmp_signed("==", s, ir.Constant(ity, 1)),
                                builder.icmp_signed("==", n, ir.Constant(ity, vt.width)))
            with builder.if_else(fast, likely=True) as (then, otherwise):
                with then:
                    ptr = builder.bitcast(builder.gep(arr.data, [off]), ir.PointerType(vty))
                    builder.store(builder.load(ptr, align=sig.args[0].dtype.bitwidth // 8),
                                  buf)
                with otherwise:
                    builder.store(ir.Constant(vty, None), buf)

                    def body(lane):
                        x = builder.load(builder.gep(arr.data,
                                                     [builder.add(off, builder.mul(lane, s))]))
                        builder.store(builder.insert_element(builder.load(buf), x,
                                                             builder.trunc(lane, i32)), buf)
                    lane_loop(builder, n, vt.width, body)
            return builder.load(buf)
        return vt(a, off, s, n, vw), codegen

    @intrinsic
    def st(typingctx, a, off, s, n, v, vw):
        """vstore where s == 1 and n == W, else vstore_s."""
        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            _, off, s, n, vec, _ = args
            ity = n.type
            width = sig.args[4].width
            fast = builder.and_(builder.icmp_signed("==", s, ir.Constant(ity, 1)),
                                builder.icmp_signed("==", n, ir.Constant(ity, width)))
            with builder.if_else(fast, likely=True) as (then, otherwise):
                with then:
                    ptr = builder.bitcast(builder.gep(arr.data, [off]), ir.PointerType(vec.type))
                    builder.store(vec, ptr, align=sig.args[0].dtype.bitwidth // 8)
                with otherwise:
                    def body(lane):
                        x = builder.extract_element(vec, builder.trunc(lane, i32))
                        builder.store(x, builder.gep(arr.data,
                                                     [builder.add(off, builder.mul(lane, s))]))
                    lane_loop(builder, n, width, body)
            return context.get_dummy_value()
        return types.none(a, off, s, n, v, vw), codegen

    @intrinsic
    def vfull(typingctx, x, a, vw):
        vt = _Vec(a.dtype, vw.count)

        def codegen(context, builder, sig, args):
            return splat(context, builder, args[0], sig.args[0], vt)
        return vt(x, a, vw), codegen

    def binop(name):
        @intrinsic
        def op(typingctx, a, b):
            vt = a if isinstance(a, _Vec) else b

            def codegen(context, builder, sig, args):
                x, y = both(context, builder, sig, args, vt)
                return getattr(builder, name)(x, y, flags=("contract",))
            return vt(a, b), codegen
        return op

    def cmpsel(pred, pick):
        """select(x pred y, x, y) ("min"/"max") or select(x pred y, 1, 0) ("step")."""
        @intrinsic
        def op(typingctx, a, b):
            vt = a if isinstance(a, _Vec) else b

            def codegen(context, builder, sig, args):
                x, y = both(context, builder, sig, args, vt)
                c = builder.fcmp_ordered(pred, x, y)
                if pick == "step":
                    one = splat(context, builder, context.get_constant(vt.dtype, 1.0), vt.dtype,
                                vt)
                    return builder.select(c, one, ir.Constant(one.type, None))
                if pick == "keep":  # select(y pred x, y, x): a nan x stays nan
                    return builder.select(builder.fcmp_ordered(pred, y, x), y, x)
                return builder.select(c, x, y)
            return vt(a, b), codegen
        return op

    vmax, vgt = cmpsel(">", "max"), cmpsel(">", "step")
    # min/max that keep a nan in their first argument (clip and relu must not turn a nan
    # input into a finite output: torch's tanh, sigmoid and relu return nan)
    kmin, kmax = cmpsel("<", "keep"), cmpsel(">", "keep")

    def is_vec(*ts):
        return any(isinstance(t, _Vec) for t in ts)

    for pyop, name in ((operator.add, "fadd"), (operator.sub, "fsub"), (operator.mul, "fmul"),
                       (operator.truediv, "fdiv")):
        def make(fn):
            def ov(a, b):
                if is_vec(a, b):
                    return lambda a, b: fn(a, b)
            return ov
        overload(pyop)(make(binop(name)))

    @intrinsic
    def vneg(typingctx, a):
        def codegen(context, builder, sig, args):
            return builder.fneg(args[0])
        return a(a), codegen

    @overload(operator.neg)
    def ov_neg(a):
        if is_vec(a):
            return lambda a: vneg(a)

    @overload(_clip)
    def ov_clip(v, c):
        if is_vec(v):
            return lambda v, c: kmin(kmax(v, -c), c)
        return lambda v, c: min(max(v, -c), c)

    @intrinsic
    def vpow2(typingctx, k):
        """2 ** k for float64 lanes holding integers in [-1022, 1023] (the exponent bits)."""
        def codegen(context, builder, sig, args):
            ivec = ir.VectorType(ir.IntType(64), sig.args[0].width)
            ki = builder.fptosi(args[0], ivec)
            bits = builder.shl(builder.add(ki, ir.Constant(ivec, [1023] * ivec.count)),
                               ir.Constant(ivec, [52] * ivec.count))
            return builder.bitcast(bits, args[0].type)
        return k(k), codegen

    g["_vpow2"] = vpow2
    ftanh = numba.njit(inline="always", cache=True)(_fast_tanh)
    expm1 = numba.njit(cache=True)(_expm1_64)

    @overload(_vtanh)
    def ov_tanh(v):
        if v.dtype == types.float32:
            return lambda v: ftanh(v)
        return lambda v: _tanh_from_expm1(expm1(2.0 * _clip(v, 20.0)))

    half = np.float32(0.5)

    @overload(_vsigmoid)
    def ov_sigmoid(v):
        if v.dtype == types.float32:
            return lambda v: half + half * ftanh(half * v)
        return lambda v: 1.0 / (2.0 + expm1(-_clip(v, 700.0)))

    @overload(_vrelu)
    def ov_relu(v):
        return lambda v: kmax(v, 0.0)

    @overload(_vstep)
    def ov_step(v):
        return lambda v: vgt(v, 0.0)

    @overload(_vmax)
    def ov_vmax(a, b):
        return lambda a, b: vmax(a, b)

    @intrinsic
    def vnan_to(typingctx, v, x):
        def codegen(context, builder, sig, args):
            vec = args[0]
            fill = splat(context, builder, args[1], sig.args[1], sig.args[0])
            return builder.select(builder.fcmp_ordered("==", vec, vec), vec, fill)
        return v(v, x), codegen

    g["_vnan_to"] = vnan_to

    for name, fn in (("_vload", vload), ("_vload_s", vload_s), ("_vstore", vstore),
                     ("_vstore_s", vstore_s), ("_vfull", vfull), ("_ld", ld), ("_st", st)):
        g[name] = fn


# ----------------------------------------------------------------------------- kernels
# Helpers the kernels call, compiled (inline) in _build. All arrays are 1-D and contiguous
# (matrices flattened row-major) except gi, the outputs and the upstream gradients, which are
# flat views of any strided layout read with their strides (sb, st, sj): element (b, t, j) at
# b sb + t st + j sj.


def _ld(a, off, s, n, vw):
    """W lanes from a at off with stride s, the first n valid (0 beyond): a vector load when
    s == 1 and n == W."""


def _st(a, off, s, n, v, vw):
    """The first n lanes of v to a at off with stride s."""


def _gru_f(xr, xz, xn, yr, yz, yn, hp):
    r = _vsigmoid(xr + yr)
    z = _vsigmoid(xz + yz)
    n = _vtanh(xn + r * yn)
    return n + z * (hp - n)


def _gru_b(xr, xz, xn, yr, yz, yn, hp, d):
    """d = dL/dh_t -> (dpre_r, dpre_z, dpre_n, d(W_hn h + b_hn), dL/dh_{t-1} directly)."""
    r = _vsigmoid(xr + yr)
    z = _vsigmoid(xz + yz)
    n = _vtanh(xn + r * yn)
    dn = d * (1.0 - z) * (1.0 - n * n)
    dz = d * (hp - n) * z * (1.0 - z)
    dr = dn * yn * r * (1.0 - r)
    return dr, dz, dn, dn * r, d * z


def _elman_f(relu, x, y):
    return _vrelu(x + y) if relu else _vtanh(x + y)


def _elman_b(relu, x, y, d):
    pre = x + y
    if relu:
        return d * _vstep(pre)
    h = _vtanh(pre)
    return d * (1.0 - h * h)


def _lstm_f(xi, xf, xg, xo, yi, yf, yg, yo, cp):
    """-> (i, f, g, o, c, tanh(c)); h = o tanh(c)."""
    i = _vsigmoid(xi + yi)
    f = _vsigmoid(xf + yf)
    g = _vtanh(xg + yg)
    o = _vsigmoid(xo + yo)
    c = f * cp + i * g
    return i, f, g, o, c, _vtanh(c)


def _lstm_b(i, f, g, o, tc, cp, dm, dc):
    """dm = dL/d(o tanh c), dc = dL/dc_t from later steps -> (dpre_i, dpre_f, dpre_g, dpre_o,
    dL/dc_{t-1})."""
    dct = dc + dm * o * (1.0 - tc * tc)
    return (dct * g * i * (1.0 - i), dct * cp * f * (1.0 - f), dct * i * (1.0 - g * g),
            dm * tc * o * (1.0 - o), dct * f)


def _res(v, f):
    """|v - f| / (1 + |f|), lane by lane, with nan read as inf (it never passes a tolerance)."""
    d = v - f
    return _vnan_to(_vmax(d, -d) / (1.0 + _vmax(f, -f)), np.inf)


def _gru_newton(xr, xz, xn, yr, yz, yn, ur, uz, un, hp, hq):
    """One unit of a GRU Newton sweep (``paraseq.cells.newton``): x the input pre-activations,
    y = W_hh h + b_hh at the current iterate h (hp = h_{t-1}), u the same at the new one
    (hq = h'_{t-1}). -> (f(h_{t-1}), f + J (hq - hp) (the new h_t, unsanitised),
    f(h'_{t-1}))."""
    r = _vsigmoid(xr + yr)
    z = _vsigmoid(xz + yz)
    nv = _vtanh(xn + r * yn)
    f = nv + z * (hp - nv)
    a = (1.0 - z) * (1.0 - nv * nv) * r
    jd = (z * (hq - hp) + a * ((un - yn) + yn * (1.0 - r) * (ur - yr))
          + (hp - nv) * z * (1.0 - z) * (uz - yz))
    return f, f + jd, _gru_f(xr, xz, xn, ur, uz, un, hq)


def _elman_newton(relu, x, y, u):
    """``_gru_newton`` for the Elman cell."""
    f = _elman_f(relu, x, y)
    if relu:
        jd = _vstep(x + y) * (u - y)
    else:
        jd = (1.0 - f * f) * (u - y)
    return f, f + jd, _elman_f(relu, x, u)


def _lstm_newton(xi, xf, xg, xo, yi, yf, yg, yo, ui, uf, ug, uo, cp, cq):
    """``_gru_newton`` for the LSTM, state (h, c) (the h parts enter through y and u). ->
    (f_h, f_c at the current iterate, the new h_t and c_t (unsanitised), f_h, f_c at the new
    one)."""
    ig, fg, gg, og, fc, tc = _lstm_f(xi, xf, xg, xo, yi, yf, yg, yo, cp)
    fh = og * tc
    dc = (fg * (cq - cp) + cp * fg * (1.0 - fg) * (uf - yf)
          + gg * ig * (1.0 - ig) * (ui - yi) + ig * (1.0 - gg * gg) * (ug - yg))
    dh = og * (1.0 - og) * (uo - yo) * tc + og * (1.0 - tc * tc) * dc
    n2 = _lstm_f(xi, xf, xg, xo, ui, uf, ug, uo, cq)
    return fh, fc, fh + dh, fc + dc, n2[3] * n2[5], n2[4]


def _lanes_fwd(cell, gi, gs, h0, c0, w, wd, bh, diag, whr, oh, ohs, oc, ocs, T, H, P, lo, hi,
               vw):
    """Rows [lo, hi) of the batch, W at a time in lockstep. h0 (B, P), c0 (B, H) row-major;
    w (K, P) row-major or wd (K,) (diag); whr (P, H) (an LSTM with P < H: proj)."""
    W = len(vw)
    K = bh.shape[0]
    NG = (hi - lo + W - 1) // W
    proj = cell == _LSTM and whr.shape[0] > 0
    relu = cell == _ELMAN_RELU
    hS = np.zeros(NG * P * W, dtype=bh.dtype)  # per group: P vectors of W lanes
    cS = np.zeros(NG * H * W if cell == _LSTM else 1, dtype=bh.dtype)
    gh = np.empty(K * W, dtype=bh.dtype)
    mS = np.empty(H * W, dtype=bh.dtype)
    for grp in range(NG):
        b0 = lo + grp * W
        n = min(W, hi - b0)
        for k in range(P):
            _vstore(hS, (grp * P + k) * W, _vload_s(h0, b0 * P + k, P, n, vw))
        if cell == _LSTM:
            for i in range(H):
                _vstore(cS, (grp * H + i) * W, _vload_s(c0, b0 * H + i, H, n, vw))
    sb, st, sj = gs
    ob, ot, oi = ohs
    cb, ct, ci = ocs
    for t in range(T):
        for grp in range(NG):
            b0 = lo + grp * W
            n = min(W, hi - b0)
            hb = grp * P * W
            if diag:
                for j in range(K):
                    _vstore(gh, j * W, wd[j] * _vload(hS, hb + (j % H) * W, vw) + bh[j])
            else:
                # four rows of W_hh at a time: four independent FMA chains share each load of h
                j = 0
                while j + 4 <= K:
                    a0 = _vfull(bh[j], gh, vw)
                    a1 = _vfull(bh[j + 1], gh, vw)
                    a2 = _vfull(bh[j + 2], gh, vw)
                    a3 = _vfull(bh[j + 3], gh, vw)
                    for k in range(P):
                        hk = _vload(hS, hb + k * W, vw)
                        a0 = a0 + w[j * P + k] * hk
                        a1 = a1 + w[(j + 1) * P + k] * hk
                        a2 = a2 + w[(j + 2) * P + k] * hk
                        a3 = a3 + w[(j + 3) * P + k] * hk
                    _vstore(gh, j * W, a0)
                    _vstore(gh, (j + 1) * W, a1)
                    _vstore(gh, (j + 2) * W, a2)
                    _vstore(gh, (j + 3) * W, a3)
                    j += 4
                for jj in range(j, K):
                    acc = _vfull(bh[jj], gh, vw)
                    for k in range(P):
                        acc = acc + w[jj * P + k] * _vload(hS, hb + k * W, vw)
                    _vstore(gh, jj * W, acc)
            x0 = t * st + b0 * sb
            o0 = t * ot + b0 * ob
            if cell == _GRU:
                for i in range(H):
                    h = _gru_f(_ld(gi, x0 + i * sj, sb, n, vw),
                               _ld(gi, x0 + (H + i) * sj, sb, n, vw),
                               _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw),
                               _vload(gh, i * W, vw), _vload(gh, (H + i) * W, vw),
                               _vload(gh, (2 * H + i) * W, vw), _vload(hS, hb + i * W, vw))
                    _vstore(hS, hb + i * W, h)
                    _st(oh, o0 + i * oi, ob, n, h, vw)
            elif cell == _LSTM:
                c0_ = t * ct + b0 * cb
                for i in range(H):
                    cp = _vload(cS, (grp * H + i) * W, vw)
                    gates = _lstm_f(_ld(gi, x0 + i * sj, sb, n, vw),
                                    _ld(gi, x0 + (H + i) * sj, sb, n, vw),
                                    _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw),
                                    _ld(gi, x0 + (3 * H + i) * sj, sb, n, vw),
                                    _vload(gh, i * W, vw), _vload(gh, (H + i) * W, vw),
                                    _vload(gh, (2 * H + i) * W, vw),
                                    _vload(gh, (3 * H + i) * W, vw), cp)
                    c = gates[4]
                    m = gates[3] * gates[5]
                    _vstore(cS, (grp * H + i) * W, c)
                    _st(oc, c0_ + i * ci, cb, n, c, vw)
                    if proj:
                        _vstore(mS, i * W, m)
                    else:
                        _vstore(hS, hb + i * W, m)
                        _st(oh, o0 + i * oi, ob, n, m, vw)
                if proj:
                    for p in range(P):
                        acc = _vfull(0.0, gh, vw)
                        for i in range(H):
                            acc = acc + whr[p * H + i] * _vload(mS, i * W, vw)
                        _vstore(hS, hb + p * W, acc)
                        _st(oh, o0 + p * oi, ob, n, acc, vw)
            else:
                for i in range(H):
                    h = _elman_f(relu, _ld(gi, x0 + i * sj, sb, n, vw), _vload(gh, i * W, vw))
                    _vstore(hS, hb + i * W, h)
                    _st(oh, o0 + i * oi, ob, n, h, vw)


def _lanes_bwd(cell, gi, gs, h0, c0, w, wd, bh, diag, whr, oh, ohs, oc, ocs, gh_, ghs, gc_,
               gcs, dgi, dgs, dh0, dc0, dw, dwd, dbh, dwhr, T, H, P, lo, hi, vw):
    """The adjoint of _lanes_fwd over rows [lo, hi): gh_/gc_ the upstream gradients of the
    outputs (strides ghs/gcs), dgi written with strides dgs, dh0 (B, P), dc0 (B, H) row-major;
    the weight gradients accumulate per lane: dw (K, P, W), dwd (K, W), dbh (K, W),
    dwhr (P, H, W)."""
    W = len(vw)
    K = bh.shape[0]
    NG = (hi - lo + W - 1) // W
    lstm = cell == _LSTM
    proj = lstm and whr.shape[0] > 0
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    hp = np.empty(P * W, dtype=dt)
    cp = np.empty(H * W, dtype=dt)
    gh = np.empty(K * W, dtype=dt)
    dy = np.empty(K * W, dtype=dt)
    dh = np.empty(P * W, dtype=dt)
    dhn = np.empty(P * W, dtype=dt)
    dc = np.empty(H * W, dtype=dt)
    sv = np.empty(6 * H * W if lstm else 1, dtype=dt)  # i, f, g, o, tanh(c), m per unit
    dm = np.empty(H * W, dtype=dt)
    sb, st, sj = gs
    ob, ot, oi = ohs
    cb, ct, ci = ocs
    gb, gt, gk = ghs
    qb, qt, qi = gcs
    db_, dt_, dj = dgs
    zero = _vfull(0.0, dh, vw)
    for grp in range(NG):
        b0 = lo + grp * W
        n = min(W, hi - b0)
        for k in range(P):
            _vstore(dh, k * W, zero)
        for i in range(H):
            _vstore(dc, i * W, zero)
        for t in range(T - 1, -1, -1):
            # the state before step t
            for k in range(P):
                if t == 0:
                    v = _vload_s(h0, b0 * P + k, P, n, vw)
                else:
                    v = _ld(oh, (t - 1) * ot + b0 * ob + k * oi, ob, n, vw)
                _vstore(hp, k * W, v)
            if lstm:
                for i in range(H):
                    if t == 0:
                        v = _vload_s(c0, b0 * H + i, H, n, vw)
                    else:
                        v = _ld(oc, (t - 1) * ct + b0 * cb + i * ci, cb, n, vw)
                    _vstore(cp, i * W, v)
            if diag:
                for j in range(K):
                    _vstore(gh, j * W, wd[j] * _vload(hp, (j % H) * W, vw) + bh[j])
            else:
                # four rows of W_hh at a time: four independent FMA chains share each load of h
                j = 0
                while j + 4 <= K:
                    a0 = _vfull(bh[j], gh, vw)
                    a1 = _vfull(bh[j + 1], gh, vw)
                    a2 = _vfull(bh[j + 2], gh, vw)
                    a3 = _vfull(bh[j + 3], gh, vw)
                    for k in range(P):
                        hk = _vload(hp, k * W, vw)
                        a0 = a0 + w[j * P + k] * hk
                        a1 = a1 + w[(j + 1) * P + k] * hk
                        a2 = a2 + w[(j + 2) * P + k] * hk
                        a3 = a3 + w[(j + 3) * P + k] * hk
                    _vstore(gh, j * W, a0)
                    _vstore(gh, (j + 1) * W, a1)
                    _vstore(gh, (j + 2) * W, a2)
                    _vstore(gh, (j + 3) * W, a3)
                    j += 4
                for jj in range(j, K):
                    acc = _vfull(bh[jj], gh, vw)
                    for k in range(P):
                        acc = acc + w[jj * P + k] * _vload(hp, k * W, vw)
                    _vstore(gh, jj * W, acc)
            for k in range(P):  # dL/dh_t: from step t + 1 and from the output at t
                _vstore(dh, k * W, _vload(dh, k * W, vw)
                        + _ld(gh_, t * gt + b0 * gb + k * gk, gb, n, vw))
            x0 = t * st + b0 * sb
            d0 = t * dt_ + b0 * db_
            for k in range(P):
                _vstore(dhn, k * W, zero)
            if cell == _GRU:
                for i in range(H):
                    r = _gru_b(_ld(gi, x0 + i * sj, sb, n, vw),
                               _ld(gi, x0 + (H + i) * sj, sb, n, vw),
                               _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw),
                               _vload(gh, i * W, vw), _vload(gh, (H + i) * W, vw),
                               _vload(gh, (2 * H + i) * W, vw), _vload(hp, i * W, vw),
                               _vload(dh, i * W, vw))
                    _st(dgi, d0 + i * dj, db_, n, r[0], vw)
                    _st(dgi, d0 + (H + i) * dj, db_, n, r[1], vw)
                    _st(dgi, d0 + (2 * H + i) * dj, db_, n, r[2], vw)
                    _vstore(dy, i * W, r[0])
                    _vstore(dy, (H + i) * W, r[1])
                    _vstore(dy, (2 * H + i) * W, r[3])
                    _vstore(dhn, i * W, r[4])
            elif lstm:
                for i in range(H):
                    s = _lstm_f(_ld(gi, x0 + i * sj, sb, n, vw),
                                _ld(gi, x0 + (H + i) * sj, sb, n, vw),
                                _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw),
                                _ld(gi, x0 + (3 * H + i) * sj, sb, n, vw),
                                _vload(gh, i * W, vw), _vload(gh, (H + i) * W, vw),
                                _vload(gh, (2 * H + i) * W, vw), _vload(gh, (3 * H + i) * W, vw),
                                _vload(cp, i * W, vw))
                    for q in range(4):
                        _vstore(sv, (q * H + i) * W, s[q])
                    _vstore(sv, (4 * H + i) * W, s[5])
                    _vstore(sv, (5 * H + i) * W, s[3] * s[5])
                    # dL/dc_t: from step t + 1 and from the output at t
                    _vstore(dc, i * W, _vload(dc, i * W, vw)
                            + _ld(gc_, t * qt + b0 * qb + i * qi, qb, n, vw))
                if proj:
                    for i in range(H):
                        acc = _vfull(0.0, dm, vw)
                        for p in range(P):
                            acc = acc + whr[p * H + i] * _vload(dh, p * W, vw)
                        _vstore(dm, i * W, acc)
                    for p in range(P):
                        dp = _vload(dh, p * W, vw)
                        for i in range(H):
                            o = (p * H + i) * W
                            _vstore(dwhr, o, _vload(dwhr, o, vw)
                                    + dp * _vload(sv, (5 * H + i) * W, vw))
                for i in range(H):
                    r = _lstm_b(_vload(sv, i * W, vw), _vload(sv, (H + i) * W, vw),
                                _vload(sv, (2 * H + i) * W, vw), _vload(sv, (3 * H + i) * W, vw),
                                _vload(sv, (4 * H + i) * W, vw), _vload(cp, i * W, vw),
                                _vload(dm if proj else dh, i * W, vw), _vload(dc, i * W, vw))
                    for q in range(4):
                        _st(dgi, d0 + (q * H + i) * dj, db_, n, r[q], vw)
                        _vstore(dy, (q * H + i) * W, r[q])
                    _vstore(dc, i * W, r[4])
            else:
                for i in range(H):
                    r1 = _elman_b(relu, _ld(gi, x0 + i * sj, sb, n, vw), _vload(gh, i * W, vw),
                                  _vload(dh, i * W, vw))
                    _st(dgi, d0 + i * dj, db_, n, r1, vw)
                    _vstore(dy, i * W, r1)
            # through W_hh: the parameter gradients and dL/dh_{t-1}
            for j in range(K):
                _vstore(dbh, j * W, _vload(dbh, j * W, vw) + _vload(dy, j * W, vw))
            if diag:
                for j in range(K):
                    u = (j % H) * W
                    dyj = _vload(dy, j * W, vw)
                    _vstore(dwd, j * W, _vload(dwd, j * W, vw) + dyj * _vload(hp, u, vw))
                    _vstore(dhn, u, _vload(dhn, u, vw) + wd[j] * dyj)
            else:
                for j in range(K):
                    dyj = _vload(dy, j * W, vw)
                    for k in range(P):
                        o = (j * P + k) * W
                        _vstore(dw, o, _vload(dw, o, vw) + dyj * _vload(hp, k * W, vw))
                k = 0
                while k + 4 <= P:  # four columns of W_hh at a time
                    a0 = _vload(dhn, k * W, vw)
                    a1 = _vload(dhn, (k + 1) * W, vw)
                    a2 = _vload(dhn, (k + 2) * W, vw)
                    a3 = _vload(dhn, (k + 3) * W, vw)
                    for j in range(K):
                        dyj = _vload(dy, j * W, vw)
                        a0 = a0 + w[j * P + k] * dyj
                        a1 = a1 + w[j * P + k + 1] * dyj
                        a2 = a2 + w[j * P + k + 2] * dyj
                        a3 = a3 + w[j * P + k + 3] * dyj
                    _vstore(dhn, k * W, a0)
                    _vstore(dhn, (k + 1) * W, a1)
                    _vstore(dhn, (k + 2) * W, a2)
                    _vstore(dhn, (k + 3) * W, a3)
                    k += 4
                for kk in range(k, P):
                    acc = _vload(dhn, kk * W, vw)
                    for j in range(K):
                        acc = acc + w[j * P + kk] * _vload(dy, j * W, vw)
                    _vstore(dhn, kk * W, acc)
            for k in range(P):
                _vstore(dh, k * W, _vload(dhn, k * W, vw))
        for k in range(P):
            _vstore_s(dh0, b0 * P + k, P, n, _vload(dh, k * W, vw))
        if lstm:
            for i in range(H):
                _vstore_s(dc0, b0 * H + i, H, n, _vload(dc, i * W, vw))


def _rows_fwd(cell, gi, gs, h0, c0, wT, wd, bh, diag, whrT, oh, ohs, oc, ocs, T, H, P, lo, hi,
              vw):
    """Rows [lo, hi) one after another, vectors over W units. Padded (zeros beyond H or P):
    wT (P, NQ Hp), wd and bh (NQ Hp), whrT (H, Pp)."""
    W = len(vw)
    NQ = _NGATES_T[cell]
    Hp = (H + W - 1) // W * W
    Pp = (P + W - 1) // W * W
    proj = cell == _LSTM and whrT.shape[0] > 0
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    hS = np.zeros(max(Pp, Hp), dtype=dt)
    cS = np.zeros(Hp, dtype=dt)
    mS = np.zeros(Hp, dtype=dt)
    gh = np.empty(NQ * Hp, dtype=dt)
    sb, st, sj = gs
    ob, ot, oi = ohs
    cb, ct, ci = ocs
    for b in range(lo, hi):
        hS[:] = 0.0
        for k in range(P):
            hS[k] = h0[b * P + k]
        if cell == _LSTM:
            cS[:] = 0.0
            for i in range(H):
                cS[i] = c0[b * H + i]
        for t in range(T):
            KB = NQ * Hp // W
            if diag:
                for q in range(NQ):
                    for ib in range(Hp // W):
                        o = q * Hp + ib * W
                        _vstore(gh, o, _vload(wd, o, vw) * _vload(hS, ib * W, vw)
                                + _vload(bh, o, vw))
            else:
                # four vectors of gate units at a time, held in registers across k
                R = NQ * Hp
                jb = 0
                while jb + 4 <= KB:
                    o = jb * W
                    a0 = _vload(bh, o, vw)
                    a1 = _vload(bh, o + W, vw)
                    a2 = _vload(bh, o + 2 * W, vw)
                    a3 = _vload(bh, o + 3 * W, vw)
                    for k in range(P):
                        hk = hS[k]
                        a0 = a0 + _vload(wT, k * R + o, vw) * hk
                        a1 = a1 + _vload(wT, k * R + o + W, vw) * hk
                        a2 = a2 + _vload(wT, k * R + o + 2 * W, vw) * hk
                        a3 = a3 + _vload(wT, k * R + o + 3 * W, vw) * hk
                    _vstore(gh, o, a0)
                    _vstore(gh, o + W, a1)
                    _vstore(gh, o + 2 * W, a2)
                    _vstore(gh, o + 3 * W, a3)
                    jb += 4
                for jj in range(jb, KB):
                    o = jj * W
                    acc = _vload(bh, o, vw)
                    for k in range(P):
                        acc = acc + _vload(wT, k * R + o, vw) * hS[k]
                    _vstore(gh, o, acc)
            x0 = b * sb + t * st
            o0 = b * ob + t * ot
            for ib in range(Hp // W):
                i0 = ib * W
                n = min(W, H - i0)
                if cell == _GRU:
                    h = _gru_f(_ld(gi, x0 + i0 * sj, sj, n, vw),
                               _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                               _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                               _vload(gh, i0, vw), _vload(gh, Hp + i0, vw),
                               _vload(gh, 2 * Hp + i0, vw), _vload(hS, i0, vw))
                    _vstore(hS, i0, h)
                    _st(oh, o0 + i0 * oi, oi, n, h, vw)
                elif cell == _LSTM:
                    s = _lstm_f(_ld(gi, x0 + i0 * sj, sj, n, vw),
                                _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (3 * H + i0) * sj, sj, n, vw),
                                _vload(gh, i0, vw), _vload(gh, Hp + i0, vw),
                                _vload(gh, 2 * Hp + i0, vw), _vload(gh, 3 * Hp + i0, vw),
                                _vload(cS, i0, vw))
                    m = s[3] * s[5]
                    _vstore(cS, i0, s[4])
                    _st(oc, b * cb + t * ct + i0 * ci, ci, n, s[4], vw)
                    if proj:
                        _vstore(mS, i0, m)
                    else:
                        _vstore(hS, i0, m)
                        _st(oh, o0 + i0 * oi, oi, n, m, vw)
                else:
                    h = _elman_f(relu, _ld(gi, x0 + i0 * sj, sj, n, vw), _vload(gh, i0, vw))
                    _vstore(hS, i0, h)
                    _st(oh, o0 + i0 * oi, oi, n, h, vw)
            if proj:
                for pb in range(Pp // W):
                    _vstore(hS, pb * W, _vfull(0.0, hS, vw))
                for i in range(H):
                    mi = mS[i]
                    for pb in range(Pp // W):
                        o = pb * W
                        _vstore(hS, o, _vload(hS, o, vw) + _vload(whrT, i * Pp + o, vw) * mi)
                for pb in range(Pp // W):
                    p0 = pb * W
                    _st(oh, o0 + p0 * oi, oi, min(W, P - p0), _vload(hS, p0, vw), vw)


def _rows_bwd(cell, gi, gs, h0, c0, wT, wd, bh, diag, whrT, oh, ohs, oc, ocs, gh_, ghs, gc_,
              gcs, dgi, dgs, dh0, dc0, wR, whr, dw, dwd, dbh, dwhr, T, H, P, lo, hi, vw):
    """The adjoint of _rows_fwd over rows [lo, hi). Also padded: wR (K, Pp) = W_hh's rows,
    whr (P, Hp); the gradients accumulate (summed over rows): dw (K, Pp), dwd and dbh (NQ Hp),
    dwhr (P, Hp)."""
    W = len(vw)
    NQ = _NGATES_T[cell]
    Hp = (H + W - 1) // W * W
    Pp = (P + W - 1) // W * W
    lstm = cell == _LSTM
    proj = lstm and whrT.shape[0] > 0
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    Mp = max(Pp, Hp)
    hp = np.zeros(Mp, dtype=dt)
    cp = np.zeros(Hp, dtype=dt)
    gh = np.empty(NQ * Hp, dtype=dt)
    dy = np.zeros(NQ * Hp, dtype=dt)
    dh = np.zeros(Mp, dtype=dt)
    dhn = np.zeros(Mp, dtype=dt)
    dc = np.zeros(Hp, dtype=dt)
    sv = np.zeros(6 * Hp if lstm else 1, dtype=dt)
    dm = np.zeros(Hp, dtype=dt)
    sb, st, sj = gs
    ob, ot, oi = ohs
    cb, ct, ci = ocs
    gb, gt, gk = ghs
    qb, qt, qi = gcs
    db_, dt_, dj = dgs
    zero = _vfull(0.0, dh, vw)
    for b in range(lo, hi):
        dh[:] = 0.0
        dc[:] = 0.0
        for t in range(T - 1, -1, -1):
            for kb in range(Pp // W):
                k0 = kb * W
                nk = min(W, P - k0)
                if t == 0:
                    v = _vload_s(h0, b * P + k0, 1, nk, vw)
                else:
                    v = _ld(oh, b * ob + (t - 1) * ot + k0 * oi, oi, nk, vw)
                _vstore(hp, k0, v)
                _vstore(dh, k0, _vload(dh, k0, vw)
                        + _ld(gh_, b * gb + t * gt + k0 * gk, gk, nk, vw))
                _vstore(dhn, k0, zero)
            if lstm:
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    if t == 0:
                        v = _vload_s(c0, b * H + i0, 1, n, vw)
                    else:
                        v = _ld(oc, b * cb + (t - 1) * ct + i0 * ci, ci, n, vw)
                    _vstore(cp, i0, v)
            KB = NQ * Hp // W
            if diag:
                for q in range(NQ):
                    for ib in range(Hp // W):
                        o = q * Hp + ib * W
                        _vstore(gh, o, _vload(wd, o, vw) * _vload(hp, ib * W, vw)
                                + _vload(bh, o, vw))
            else:
                # four vectors of gate units at a time, held in registers across k
                R = NQ * Hp
                jb = 0
                while jb + 4 <= KB:
                    o = jb * W
                    a0 = _vload(bh, o, vw)
                    a1 = _vload(bh, o + W, vw)
                    a2 = _vload(bh, o + 2 * W, vw)
                    a3 = _vload(bh, o + 3 * W, vw)
                    for k in range(P):
                        hk = hp[k]
                        a0 = a0 + _vload(wT, k * R + o, vw) * hk
                        a1 = a1 + _vload(wT, k * R + o + W, vw) * hk
                        a2 = a2 + _vload(wT, k * R + o + 2 * W, vw) * hk
                        a3 = a3 + _vload(wT, k * R + o + 3 * W, vw) * hk
                    _vstore(gh, o, a0)
                    _vstore(gh, o + W, a1)
                    _vstore(gh, o + 2 * W, a2)
                    _vstore(gh, o + 3 * W, a3)
                    jb += 4
                for jj in range(jb, KB):
                    o = jj * W
                    acc = _vload(bh, o, vw)
                    for k in range(P):
                        acc = acc + _vload(wT, k * R + o, vw) * hp[k]
                    _vstore(gh, o, acc)
            x0 = b * sb + t * st
            d0 = b * db_ + t * dt_
            if lstm:
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    s = _lstm_f(_ld(gi, x0 + i0 * sj, sj, n, vw),
                                _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                                _ld(gi, x0 + (3 * H + i0) * sj, sj, n, vw),
                                _vload(gh, i0, vw), _vload(gh, Hp + i0, vw),
                                _vload(gh, 2 * Hp + i0, vw), _vload(gh, 3 * Hp + i0, vw),
                                _vload(cp, i0, vw))
                    for q in range(4):
                        _vstore(sv, q * Hp + i0, s[q])
                    _vstore(sv, 4 * Hp + i0, s[5])
                    _vstore(sv, 5 * Hp + i0, s[3] * s[5])
                    _vstore(dc, i0, _vload(dc, i0, vw)
                            + _ld(gc_, b * qb + t * qt + i0 * qi, qi, n, vw))
                if proj:
                    for ib in range(Hp // W):
                        _vstore(dm, ib * W, zero)
                    for p in range(P):
                        dp = dh[p]
                        for ib in range(Hp // W):
                            o = ib * W
                            _vstore(dm, o, _vload(dm, o, vw) + _vload(whr, p * Hp + o, vw) * dp)
                            _vstore(dwhr, p * Hp + o, _vload(dwhr, p * Hp + o, vw)
                                    + _vload(sv, 5 * Hp + o, vw) * dp)
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    r = _lstm_b(_vload(sv, i0, vw), _vload(sv, Hp + i0, vw),
                                _vload(sv, 2 * Hp + i0, vw), _vload(sv, 3 * Hp + i0, vw),
                                _vload(sv, 4 * Hp + i0, vw), _vload(cp, i0, vw),
                                _vload(dm if proj else dh, i0, vw), _vload(dc, i0, vw))
                    for q in range(4):
                        _st(dgi, d0 + (q * H + i0) * dj, dj, n, r[q], vw)
                        _vstore(dy, q * Hp + i0, r[q])
                    _vstore(dc, i0, r[4])
            else:
                for ib in range(Hp // W):
                    i0 = ib * W
                    n = min(W, H - i0)
                    if cell == _GRU:
                        r = _gru_b(_ld(gi, x0 + i0 * sj, sj, n, vw),
                                   _ld(gi, x0 + (H + i0) * sj, sj, n, vw),
                                   _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw),
                                   _vload(gh, i0, vw), _vload(gh, Hp + i0, vw),
                                   _vload(gh, 2 * Hp + i0, vw), _vload(hp, i0, vw),
                                   _vload(dh, i0, vw))
                        _st(dgi, d0 + i0 * dj, dj, n, r[0], vw)
                        _st(dgi, d0 + (H + i0) * dj, dj, n, r[1], vw)
                        _st(dgi, d0 + (2 * H + i0) * dj, dj, n, r[2], vw)
                        _vstore(dy, i0, r[0])
                        _vstore(dy, Hp + i0, r[1])
                        _vstore(dy, 2 * Hp + i0, r[3])
                        _vstore(dhn, i0, r[4])
                    else:
                        r1 = _elman_b(relu, _ld(gi, x0 + i0 * sj, sj, n, vw), _vload(gh, i0, vw),
                                      _vload(dh, i0, vw))
                        _st(dgi, d0 + i0 * dj, dj, n, r1, vw)
                        _vstore(dy, i0, r1)
            # the padded lanes of dy hold finite values that only meet zero weights below
            for jb in range(NQ * Hp // W):
                o = jb * W
                _vstore(dbh, o, _vload(dbh, o, vw) + _vload(dy, o, vw))
            if diag:
                for q in range(NQ):
                    for ib in range(Hp // W):
                        o = q * Hp + ib * W
                        dyq = _vload(dy, o, vw)
                        _vstore(dwd, o, _vload(dwd, o, vw) + dyq * _vload(hp, ib * W, vw))
                        _vstore(dhn, ib * W, _vload(dhn, ib * W, vw) + _vload(wd, o, vw) * dyq)
            else:
                for q in range(NQ):
                    for i in range(H):
                        j = q * H + i
                        dyj = dy[q * Hp + i]
                        for kb in range(Pp // W):
                            o = kb * W
                            _vstore(dw, j * Pp + o, _vload(dw, j * Pp + o, vw)
                                    + _vload(hp, o, vw) * dyj)
                            _vstore(dhn, o, _vload(dhn, o, vw) + _vload(wR, j * Pp + o, vw) * dyj)
            for kb in range(Pp // W):
                _vstore(dh, kb * W, _vload(dhn, kb * W, vw))
        for k in range(P):
            dh0[b * P + k] = dh[k]
        if lstm:
            for i in range(H):
                dc0[b * H + i] = dc[i]


# ----------------------------------------------------------------------------- Newton sweeps
# The kernels of paraseq.cells.newton (see there), here because numba's on-disk cache keys a
# kernel on its own source file only: kept in another file, they would go on running a stale
# build of the helpers above after these changed.

_NEWTON_CLIP = 1e8  # as paraseq.solve.iterate.CLIP


def _lanes_newton(cell, gi, gs, h0, c0, w, bh, hb, hs, cb, cs, gb, gss, start, first, pmax,
                  smax, omax, tol, T, H, lo, hi, vw):  # pragma: no cover - compiled
    """One Newton sweep over batch rows [lo, hi) (lo a multiple of W), W rows in lockstep.

    gi (B, T, K) and the iterate hb (B, T, H) and gb (B, T, K), g_t = W_hh h_{t-1} + b_hh of it,
    are flat views with strides gs, hs, gss; hb and gb are updated in place to the new iterate.
    h0 (B, H) row-major; w (K, H) row-major; bh (K,). start[grp]: the first step group grp
    sweeps (T: none). Written per group: first[grp], the first step whose new residual is
    above tol (T if none); pmax[grp], the largest new residual before it; smax[grp], the
    largest over the swept steps; omax[grp], the largest residual of the iterate it was given
    over the same steps. The LSTM's state is (h, c): c0 (B, H) row-major, cb (B, T, H) with
    strides cs, its iterate of c, updated in place too; the residual is the larger of h's and
    c's."""
    W = len(vw)
    K = bh.shape[0]
    NG = (hi - lo + W - 1) // W
    g0 = lo // W
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    hop = np.zeros(NG * H * W, dtype=dt)  # h_{t-1} of the old iterate, per group
    hnp = np.zeros(NG * H * W, dtype=dt)  # h'_{t-1} of the new one
    gn = np.zeros(NG * K * W, dtype=dt)  # g'_t = W_hh h'_{t-1} + b_hh
    lstm = cell == _LSTM
    cop = np.zeros(NG * H * W if lstm else 1, dtype=dt)  # c_{t-1}, old and new (LSTM)
    cnp = np.zeros(NG * H * W if lstm else 1, dtype=dt)
    book = np.zeros(NG * 5 * W, dtype=dt)  # per group: seen, count, pm, sm, om
    sb, st, sj = gs
    hb_, ht, hj = hs
    gb_, gt, gj = gss
    cb_, ct, cj = cs
    t_lo = T
    for grp in range(NG):
        t_lo = min(t_lo, start[g0 + grp])
    one = _vfull(1.0, gn, vw)
    zero = _vfull(0.0, gn, vw)
    for t in range(t_lo, T):
        for grp in range(NG):
            s = start[g0 + grp]
            if t < s:
                continue
            b0 = lo + grp * W
            n = min(W, hi - b0)
            ho = grp * H * W
            go = grp * K * W
            if t == s:  # the state before the sweep's first step is the unchanged h_{s-1}
                for i in range(H):
                    if s == 0:
                        v = _ld(h0, b0 * H + i, H, n, vw)
                    else:
                        v = _ld(hb, (s - 1) * ht + b0 * hb_ + i * hj, hb_, n, vw)
                    _vstore(hop, ho + i * W, v)
                    _vstore(hnp, ho + i * W, v)
                    if lstm:
                        if s == 0:
                            v = _ld(c0, b0 * H + i, H, n, vw)
                        else:
                            v = _ld(cb, (s - 1) * ct + b0 * cb_ + i * cj, cb_, n, vw)
                        _vstore(cop, ho + i * W, v)
                        _vstore(cnp, ho + i * W, v)
                for j in range(K):
                    _vstore(gn, go + j * W, _ld(gb, s * gt + b0 * gb_ + j * gj, gb_, n, vw))
            x0 = t * st + b0 * sb
            q0 = t * gt + b0 * gb_
            h_0 = t * ht + b0 * hb_
            c_0 = t * ct + b0 * cb_
            rm = zero
            om = zero
            for i in range(H):
                hp = _vload(hop, ho + i * W, vw)
                hq = _vload(hnp, ho + i * W, vw)
                old = _ld(hb, h_0 + i * hj, hb_, n, vw)
                if lstm:
                    cp = _vload(cop, ho + i * W, vw)
                    cq = _vload(cnp, ho + i * W, vw)
                    oldc = _ld(cb, c_0 + i * cj, cb_, n, vw)
                    xi = _ld(gi, x0 + i * sj, sb, n, vw)
                    xf = _ld(gi, x0 + (H + i) * sj, sb, n, vw)
                    xg = _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw)
                    xo = _ld(gi, x0 + (3 * H + i) * sj, sb, n, vw)
                    yi = _ld(gb, q0 + i * gj, gb_, n, vw)
                    yf = _ld(gb, q0 + (H + i) * gj, gb_, n, vw)
                    yg = _ld(gb, q0 + (2 * H + i) * gj, gb_, n, vw)
                    yo = _ld(gb, q0 + (3 * H + i) * gj, gb_, n, vw)
                    ui = _vload(gn, go + i * W, vw)
                    uf = _vload(gn, go + (H + i) * W, vw)
                    ug = _vload(gn, go + (2 * H + i) * W, vw)
                    uo = _vload(gn, go + (3 * H + i) * W, vw)
                    fh, fc, hr, cr, f2h, f2c = _lstm_newton(xi, xf, xg, xo, yi, yf, yg, yo, ui,
                                                            uf, ug, uo, cp, cq)
                    h = _clip(_vnan_to(hr, 0.0), _NEWTON_CLIP)
                    c = _clip(_vnan_to(cr, 0.0), _NEWTON_CLIP)
                    rm = _vmax(rm, _vmax(_res(h, f2h), _res(c, f2c)))
                    om = _vmax(om, _vmax(_res(old, fh), _res(oldc, fc)))
                    _vstore(hop, ho + i * W, old)
                    _vstore(hnp, ho + i * W, h)
                    _vstore(cop, ho + i * W, oldc)
                    _vstore(cnp, ho + i * W, c)
                    _st(hb, h_0 + i * hj, hb_, n, h, vw)
                    _st(cb, c_0 + i * cj, cb_, n, c, vw)
                    continue
                if cell == _GRU:
                    xr = _ld(gi, x0 + i * sj, sb, n, vw)
                    xz = _ld(gi, x0 + (H + i) * sj, sb, n, vw)
                    xn = _ld(gi, x0 + (2 * H + i) * sj, sb, n, vw)
                    yr = _ld(gb, q0 + i * gj, gb_, n, vw)
                    yz = _ld(gb, q0 + (H + i) * gj, gb_, n, vw)
                    yn = _ld(gb, q0 + (2 * H + i) * gj, gb_, n, vw)
                    ur = _vload(gn, go + i * W, vw)
                    uz = _vload(gn, go + (H + i) * W, vw)
                    un = _vload(gn, go + (2 * H + i) * W, vw)
                    f, hr, f2 = _gru_newton(xr, xz, xn, yr, yz, yn, ur, uz, un, hp, hq)
                else:
                    f, hr, f2 = _elman_newton(relu, _ld(gi, x0 + i * sj, sb, n, vw),
                                              _ld(gb, q0 + i * gj, gb_, n, vw),
                                              _vload(gn, go + i * W, vw))
                h = _clip(_vnan_to(hr, 0.0), _NEWTON_CLIP)
                rm = _vmax(rm, _res(h, f2))
                om = _vmax(om, _res(old, f))
                _vstore(hop, ho + i * W, old)
                _vstore(hnp, ho + i * W, h)
                _st(hb, h_0 + i * hj, hb_, n, h, vw)
            for j in range(K):  # the new iterate's g_t
                _st(gb, q0 + j * gj, gb_, n, _vload(gn, go + j * W, vw), vw)
            # g'_{t+1} = W_hh h'_t + b_hh: four rows of W_hh share each load of h'
            j = 0
            while j + 4 <= K:
                a0 = _vfull(bh[j], gn, vw)
                a1 = _vfull(bh[j + 1], gn, vw)
                a2 = _vfull(bh[j + 2], gn, vw)
                a3 = _vfull(bh[j + 3], gn, vw)
                for k in range(H):
                    hk = _vload(hnp, ho + k * W, vw)
                    a0 = a0 + w[j * H + k] * hk
                    a1 = a1 + w[(j + 1) * H + k] * hk
                    a2 = a2 + w[(j + 2) * H + k] * hk
                    a3 = a3 + w[(j + 3) * H + k] * hk
                _vstore(gn, go + j * W, a0)
                _vstore(gn, go + (j + 1) * W, a1)
                _vstore(gn, go + (j + 2) * W, a2)
                _vstore(gn, go + (j + 3) * W, a3)
                j += 4
            for jj in range(j, K):
                acc = _vfull(bh[jj], gn, vw)
                for k in range(H):
                    acc = acc + w[jj * H + k] * _vload(hnp, ho + k * W, vw)
                _vstore(gn, go + jj * W, acc)
            # bookkeeping per lane: seen (a step above tol so far), count of steps before it,
            # the largest residual before it, over all swept steps, and of the old iterate
            bo = grp * 5 * W
            seen = _vmax(_vload(book, bo, vw), _vstep(rm - tol))
            _vstore(book, bo, seen)
            _vstore(book, bo + W, _vload(book, bo + W, vw) + (one - seen))
            _vstore(book, bo + 2 * W,
                      _vmax(_vload(book, bo + 2 * W, vw), _clip(rm, tol) * (one - seen)))
            _vstore(book, bo + 3 * W, _vmax(_vload(book, bo + 3 * W, vw), rm))
            _vstore(book, bo + 4 * W, _vmax(_vload(book, bo + 4 * W, vw), om))
    for grp in range(NG):
        s = start[g0 + grp]
        b0 = lo + grp * W
        n = min(W, hi - b0)
        bo = grp * 5 * W
        if s >= T:
            first[g0 + grp] = T
            pmax[g0 + grp] = 0.0
            smax[g0 + grp] = 0.0
            omax[g0 + grp] = 0.0
            continue
        c = book[bo + W]
        p = book[bo + 2 * W]
        m = book[bo + 3 * W]
        o = book[bo + 4 * W]
        for lane in range(1, n):
            c = min(c, book[bo + W + lane])
            p = max(p, book[bo + 2 * W + lane])
            m = max(m, book[bo + 3 * W + lane])
            o = max(o, book[bo + 4 * W + lane])
        first[g0 + grp] = s + int(c)
        pmax[g0 + grp] = p
        smax[g0 + grp] = m
        omax[g0 + grp] = o


def _rows_newton(cell, gi, gs, h0, c0, wT, bh, hb, hs, cb, cs, gb, gss, start, first, pmax,
                 smax, omax, tol, T, H, lo, hi, vw):  # pragma: no cover - compiled
    """``_lanes_newton`` for batch rows [lo, hi) one after another, vectors over W units (the
    better layout for a few rows): wT (H, NQ Hp) and bh (NQ Hp) padded with zeros to Hp, a
    multiple of W, per gate; start/first/... are per batch row. hb and gb are this module's
    buffers, padded likewise: memory (T, B, Hp) and (T, B, NQ, Hp), zero in the padding, so
    every access to them is a whole vector; hs, gss give their (b, t) strides. The LSTM's cb
    is laid out as hb (strides cs)."""
    W = len(vw)
    NQ = _NGATES_T[cell]
    Hp = (H + W - 1) // W * W
    R = NQ * Hp
    relu = cell == _ELMAN_RELU
    dt = bh.dtype
    hop = np.zeros(Hp, dtype=dt)
    hnp = np.zeros(Hp, dtype=dt)
    gn = np.zeros(R, dtype=dt)
    lstm = cell == _LSTM
    cop = np.zeros(Hp, dtype=dt)
    cnp = np.zeros(Hp, dtype=dt)
    scratch = np.zeros(2 * W, dtype=dt)
    sb, st, sj = gs
    hb_, ht = hs
    gb_, gt = gss
    cb_, ct = cs
    zero = _vfull(0.0, gn, vw)
    for b in range(lo, hi):
        s = start[b]
        if s >= T:
            first[b] = T
            pmax[b] = 0.0
            smax[b] = 0.0
            omax[b] = 0.0
            continue
        for ib in range(Hp // W):
            i0 = ib * W
            n = min(W, H - i0)
            if s == 0:
                v = _ld(h0, b * H + i0, 1, n, vw)
            else:
                v = _vload(hb, (s - 1) * ht + b * hb_ + i0, vw)
            _vstore(hop, i0, v)
            _vstore(hnp, i0, v)
            if lstm:
                if s == 0:
                    v = _ld(c0, b * H + i0, 1, n, vw)
                else:
                    v = _vload(cb, (s - 1) * ct + b * cb_ + i0, vw)
                _vstore(cop, i0, v)
                _vstore(cnp, i0, v)
            for q in range(NQ):
                _vstore(gn, q * Hp + i0, _vload(gb, s * gt + b * gb_ + q * Hp + i0, vw))
        seen = False
        fb = T
        pm = 0.0
        sm = 0.0
        om = 0.0
        for t in range(s, T):
            x0 = b * sb + t * st
            q0 = b * gb_ + t * gt
            h_0 = b * hb_ + t * ht
            c_0 = b * cb_ + t * ct
            rm = zero
            orm = zero
            for ib in range(Hp // W):
                i0 = ib * W
                n = min(W, H - i0)
                hp = _vload(hop, i0, vw)
                hq = _vload(hnp, i0, vw)
                old = _vload(hb, h_0 + i0, vw)
                if lstm:
                    cp = _vload(cop, i0, vw)
                    cq = _vload(cnp, i0, vw)
                    oldc = _vload(cb, c_0 + i0, vw)
                    xi = _ld(gi, x0 + i0 * sj, sj, n, vw)
                    xf = _ld(gi, x0 + (H + i0) * sj, sj, n, vw)
                    xg = _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw)
                    xo = _ld(gi, x0 + (3 * H + i0) * sj, sj, n, vw)
                    yi = _vload(gb, q0 + i0, vw)
                    yf = _vload(gb, q0 + Hp + i0, vw)
                    yg = _vload(gb, q0 + 2 * Hp + i0, vw)
                    yo = _vload(gb, q0 + 3 * Hp + i0, vw)
                    ui = _vload(gn, i0, vw)
                    uf = _vload(gn, Hp + i0, vw)
                    ug = _vload(gn, 2 * Hp + i0, vw)
                    uo = _vload(gn, 3 * Hp + i0, vw)
                    fh, fc, hr, cr, f2h, f2c = _lstm_newton(xi, xf, xg, xo, yi, yf, yg, yo, ui,
                                                            uf, ug, uo, cp, cq)
                    h = _clip(_vnan_to(hr, 0.0), _NEWTON_CLIP)
                    c = _clip(_vnan_to(cr, 0.0), _NEWTON_CLIP)
                    rm = _vmax(rm, _vmax(_res(h, f2h), _res(c, f2c)))
                    orm = _vmax(orm, _vmax(_res(old, fh), _res(oldc, fc)))
                    _vstore(hop, i0, old)
                    _vstore(hnp, i0, h)
                    _vstore(cop, i0, oldc)
                    _vstore(cnp, i0, c)
                    _vstore(hb, h_0 + i0, h)
                    _vstore(cb, c_0 + i0, c)
                    for q in range(NQ):  # the new iterate's g_t
                        _vstore(gb, q0 + q * Hp + i0, _vload(gn, q * Hp + i0, vw))
                    continue
                if cell == _GRU:
                    xr = _ld(gi, x0 + i0 * sj, sj, n, vw)
                    xz = _ld(gi, x0 + (H + i0) * sj, sj, n, vw)
                    xn = _ld(gi, x0 + (2 * H + i0) * sj, sj, n, vw)
                    yr = _vload(gb, q0 + i0, vw)
                    yz = _vload(gb, q0 + Hp + i0, vw)
                    yn = _vload(gb, q0 + 2 * Hp + i0, vw)
                    ur = _vload(gn, i0, vw)
                    uz = _vload(gn, Hp + i0, vw)
                    un = _vload(gn, 2 * Hp + i0, vw)
                    f, hr, f2 = _gru_newton(xr, xz, xn, yr, yz, yn, ur, uz, un, hp, hq)
                else:
                    f, hr, f2 = _elman_newton(relu, _ld(gi, x0 + i0 * sj, sj, n, vw),
                                              _vload(gb, q0 + i0, vw), _vload(gn, i0, vw))
                h = _clip(_vnan_to(hr, 0.0), _NEWTON_CLIP)
                rm = _vmax(rm, _res(h, f2))
                orm = _vmax(orm, _res(old, f))
                _vstore(hop, i0, old)
                _vstore(hnp, i0, h)
                _vstore(hb, h_0 + i0, h)
                for q in range(NQ):  # the new iterate's g_t
                    _vstore(gb, q0 + q * Hp + i0, _vload(gn, q * Hp + i0, vw))
            # g'_{t+1} = W_hh h'_t + b_hh, vectors over gate units
            KB = R // W
            jb = 0
            while jb + 4 <= KB:
                o = jb * W
                a0 = _vload(bh, o, vw)
                a1 = _vload(bh, o + W, vw)
                a2 = _vload(bh, o + 2 * W, vw)
                a3 = _vload(bh, o + 3 * W, vw)
                for k in range(H):
                    hk = hnp[k]
                    a0 = a0 + _vload(wT, k * R + o, vw) * hk
                    a1 = a1 + _vload(wT, k * R + o + W, vw) * hk
                    a2 = a2 + _vload(wT, k * R + o + 2 * W, vw) * hk
                    a3 = a3 + _vload(wT, k * R + o + 3 * W, vw) * hk
                _vstore(gn, o, a0)
                _vstore(gn, o + W, a1)
                _vstore(gn, o + 2 * W, a2)
                _vstore(gn, o + 3 * W, a3)
                jb += 4
            for jj in range(jb, KB):
                o = jj * W
                acc = _vload(bh, o, vw)
                for k in range(H):
                    acc = acc + _vload(wT, k * R + o, vw) * hnp[k]
                _vstore(gn, o, acc)
            _vstore(scratch, 0, rm)
            _vstore(scratch, W, orm)
            m = scratch[0]
            o_ = scratch[W]
            for lane in range(1, W):
                m = max(m, scratch[lane])
                o_ = max(o_, scratch[W + lane])
            sm = max(sm, m)
            om = max(om, o_)
            if not seen:
                if m <= tol:
                    pm = max(pm, m)
                else:
                    seen = True
                    fb = t
        first[b] = fb
        pmax[b] = pm
        smax[b] = sm
        omax[b] = om


_NGATES_T = (1, 1, 3, 4)  # _NGATES as a tuple the kernels index (a compile-time constant)

_VEC_HELPERS = ("_tanh_from_expm1", "_gru_f", "_gru_b", "_elman_f", "_elman_b", "_lstm_f",
                "_lstm_b", "_res", "_gru_newton", "_elman_newton", "_lstm_newton")
_ENTRY = ("_lanes_fwd", "_lanes_bwd", "_rows_fwd", "_rows_bwd", "_lanes_newton", "_rows_newton")


def _build() -> dict:
    """Imports numba, defines the SIMD extension and compiles (or loads from numba's on-disk
    cache) the kernels, once per process."""
    if _KERNELS:
        return _KERNELS
    if not AVAILABLE:
        raise RuntimeError("paraseq.cells.compiled needs numba: pip install numba")
    with _BUILD_LOCK:
        if _KERNELS:
            return _KERNELS
        import numba

        _define_simd(numba)
        g = globals()
        for name in _VEC_HELPERS:
            g[name] = numba.njit(cache=True)(g[name])
        kernels = {name: numba.njit(cache=True, nogil=True, error_model="numpy")(g[name])
                   for name in _ENTRY}
        _KERNELS.update(kernels)
    return _KERNELS


# ----------------------------------------------------------------------------- the plan

_SPLIT_MIN_WORK = 1 << 28
"""The lanes kernel splits the batch across threads only when T B K P (the multiply-adds of the
recurrent products) reaches this, with at least two pieces of ``_LANES_MIN_GROUPS`` groups.
Measured on the 2-core machine while others loaded it (load 2.6 to 3.4; wall time, two
threads against one): GRU H = 32, B = 256, T = 1e3 (T B K P = 7.9e8): 53 against 64 to 110 ms;
H = 64, B = 128 (1.6e9): 66 against 66 ms; tanh RNN H = 16, B = 512 (1.3e8): 15 to 17 against
12 ms; GRU H = 1, B = 256, T = 1e4: 22 against 10 ms. A step at small H is latency-bound, and
lockstep over all groups on one thread beats pieces on two. The rows kernel never splits: at
H = 64, B = 8 two threads took 12 to 15 ms against 12 ms."""

_pool = None
_pool_pid = None


def _width(dtype: torch.dtype) -> int:
    return 16 if dtype == torch.float32 else 8


def _plan(B: int, T: int, H: int, P: int, K: int, dtype: torch.dtype) -> tuple[str, int]:
    """(kernel, threads) for a problem.

    kernel: "lanes" when B >= min(W, max(2, H)), else "rows". Measured (2-core AMD EPYC, kernel
    CPU time, T chosen for ~0.1 s; rows time / lanes time, > 1 where lanes is faster), GRU
    forward float32 (W = 16):

        H \\ B   1     2     4     8     16
        2      0.75  1.35  2.58  4.43  8.88
        4      0.44  0.84  1.62  3.08  4.47
        8      0.46  0.60  0.79  1.62  2.61
        16     0.46  0.58  0.69  1.29  1.18
        32     0.25  0.36  0.60  0.70  1.89
        64     0.24  0.24  0.46  0.83  1.73

    The same crossover (within one step of B) for the GRU backward, the LSTM and the tanh
    RNN in float32, and in float64 (W = 8): at H = 8 rows 0.71x at B = 4, lanes 1.19x at
    B = 8. Rows wins at B = 1 everywhere: a lane kernel then fills one lane in W.

    threads: the lanes kernel's batch is split across torch.get_num_threads() threads (the
    kernels release the GIL) when T B K P >= ``_SPLIT_MIN_WORK`` and there are at least two
    pieces of ``_LANES_MIN_GROUPS`` groups of W rows; see ``_SPLIT_MIN_WORK`` for the
    measurements.
    """
    W = _width(dtype)
    lanes = B >= min(W, max(2, H))
    nt = 1
    if lanes and T * B * K * P >= _SPLIT_MIN_WORK:
        nt = max(1, min(torch.get_num_threads(), -(-B // W) // _LANES_MIN_GROUPS))
    return ("lanes" if lanes else "rows"), nt


_PIECES_PER_THREAD = 4

_LANES_MIN_GROUPS = 4
"""A piece of the lanes kernel's batch has at least this many groups of W rows: the groups of
a piece advance in lockstep, and at small H fewer leave the step's latency exposed (GRU, H = 1,
B = 256, T = 1e4 on one thread: one piece of 16 groups 14.7 ms, eight pieces of 2 groups one
after another 54 ms)."""


def _run_split(fn, B: int, W: int, nt: int, lanes: bool) -> list:
    """fn(lo, hi) over ranges of batch rows (whole groups of W rows for the lanes kernel) on
    nt threads, the calling one and nt - 1 from a pool; returns the results in range order.
    With more than one thread the batch is cut into up to ``_PIECES_PER_THREAD`` nt pieces
    that the threads take in turn, so a thread the operating system does not schedule (another
    process holds the core) leaves its pieces to the others instead of holding up the call."""
    if nt <= 1:
        return [fn(0, B)]
    global _pool, _pool_pid
    units = -(-B // W) if lanes else B
    n = min(units // _LANES_MIN_GROUPS if lanes else units, _PIECES_PER_THREAD * nt)
    if n <= 1:
        return [fn(0, B)]
    bounds = [units * i // n for i in range(n + 1)]
    if lanes:
        bounds = [min(B, u * W) for u in bounds]
    if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < nt - 1:
        from concurrent.futures import ThreadPoolExecutor

        _pool, _pool_pid = ThreadPoolExecutor(max_workers=nt - 1,
                                              thread_name_prefix="paraseq-cells"), os.getpid()
    results: list = [None] * n
    counter = itertools.count()  # next() is atomic under the GIL

    def work() -> None:
        while (i := next(counter)) < n:
            results[i] = fn(bounds[i], bounds[i + 1])

    futures = [_pool.submit(work) for _ in range(nt - 1)]
    work()
    for f in futures:
        f.result()
    return results


# ----------------------------------------------------------------------------- tensors <-> kernels


def _flat(t: Tensor) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A 1-D NumPy view over the memory a (B, T, X) tensor spans, and its strides."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    return t.detach().as_strided((span,), (1,)).numpy(), tuple(t.stride())


def _vec(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).numpy()


def _alloc(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """torch.empty, with transparent huge pages asked for on large buffers (the first write
    into fresh memory faults every 4 KiB page in: at hidden 32, batch 16, T = 1e4 the input
    projection took 64 ms with torch's allocation, 31 ms into huge pages; see
    ``paraseq.scan.compiled._empty``)."""
    from ..scan.compiled import _empty

    return _empty(shape, dtype)


def _empty_like_layout(B: int, T: int, X: int, lanes: bool, like: Tensor) -> Tensor:
    """A (B, T, X) tensor laid out as the kernel writes fastest: (X, T, B) or (T, B, X)."""
    if lanes:
        return _alloc((X, T, B), like.dtype).permute(2, 1, 0)
    return _alloc((T, B, X), like.dtype).transpose(0, 1)


def _alloc_like(t: Tensor) -> Tensor:
    """An uninitialised tensor with t's shape and the order of its strides (dense)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    out = _alloc(tuple(t.shape[d] for d in order), t.dtype)
    return out.permute(*sorted(range(t.dim()), key=lambda d: order[d]))


def _pad(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


class _Weights:
    """The recurrent weights of one call in the layouts of the chosen kernel."""

    def __init__(self, cell: int, weight_hh: Tensor, bias_hh: Tensor, weight_hr: Tensor | None,
                 H: int, P: int, lanes: bool, W: int):
        NQ = _NGATES[cell]
        self.diag = weight_hh.dim() == 1
        dt = weight_hh.dtype
        empty = np.zeros(0, dtype=np.float32 if dt == torch.float32 else np.float64)
        wh = weight_hh.detach()
        bh = bias_hh.detach()
        whr = None if weight_hr is None else weight_hr.detach()
        self.empty = empty
        if lanes:
            self.w = empty if self.diag else _vec(wh)  # (K, P)
            self.wd = _vec(wh) if self.diag else empty  # (K,)
            self.bh = _vec(bh)
            self.whr = empty if whr is None else _vec(whr)  # (P, H)
            return
        Hp, Pp = -(-H // W) * W, -(-P // W) * W
        self.Hp, self.Pp = Hp, Pp
        if self.diag:
            self.wT = self.wR = empty
            self.wd = _vec(_pad(wh.view(NQ, H), (NQ, Hp)))
        else:
            self.wT = _vec(_pad(wh.view(NQ, H, P).permute(2, 0, 1), (P, NQ, Hp)))  # (P, NQ Hp)
            self.wR = _vec(_pad(wh, (NQ * H, Pp)))  # (K, Pp)
            self.wd = empty
        self.bh = _vec(_pad(bh.view(NQ, H), (NQ, Hp)))
        self.whrT = empty if whr is None else _vec(_pad(whr.t(), (H, Pp)))  # (H, Pp)
        self.whr = empty if whr is None else _vec(_pad(whr, (P, Hp)))  # (P, Hp)


def _forward(cell: int, gi: Tensor, h0: Tensor, c0: Tensor | None, weight_hh: Tensor,
             bias_hh: Tensor, weight_hr: Tensor | None):
    """Runs the forward kernel: h (B, T, P) and, for the LSTM, c (B, T, H)."""
    B, T, K = gi.shape
    NQ = _NGATES[cell]
    H = K // NQ
    P = h0.shape[-1]
    if B * T == 0:
        return gi.new_zeros(B, T, P), (gi.new_zeros(B, T, H) if cell == _LSTM else None), "-"
    kernel, nt = _plan(B, T, H, P, K, gi.dtype)
    lanes = kernel == "lanes"
    W = _width(gi.dtype)
    vw = (0,) * W
    lstm = cell == _LSTM
    wts = _Weights(cell, weight_hh, bias_hh, weight_hr, H, P, lanes, W)
    oh = _empty_like_layout(B, T, P, lanes, gi)
    oc = _empty_like_layout(B, T, H, lanes, gi) if lstm else None
    gif, gs = _flat(gi)
    ohf, ohs = _flat(oh)
    ocf, ocs = _flat(oc) if lstm else (wts.empty, (0, 0, 0))
    h0f = _vec(h0)
    c0f = _vec(c0) if lstm else wts.empty
    k = _build()
    if lanes:
        def part(lo, hi):
            k["_lanes_fwd"](cell, gif, gs, h0f, c0f, wts.w, wts.wd, wts.bh, wts.diag, wts.whr,
                            ohf, ohs, ocf, ocs, T, H, P, lo, hi, vw)
    else:
        def part(lo, hi):
            k["_rows_fwd"](cell, gif, gs, h0f, c0f, wts.wT, wts.wd, wts.bh, wts.diag, wts.whrT,
                           ohf, ohs, ocf, ocs, T, H, P, lo, hi, vw)
    _run_split(part, B, W, nt, lanes)
    return oh, oc, kernel


def _backward(cell: int, gi: Tensor, h0: Tensor, c0: Tensor | None, weight_hh: Tensor,
              bias_hh: Tensor, weight_hr: Tensor | None, oh: Tensor, oc: Tensor | None,
              g_h: Tensor | None, g_c: Tensor | None, kernel: str):
    """The adjoint sweep: (dgi, dh0, dc0, dweight_hh, dbias_hh, dweight_hr)."""
    B, T, K = gi.shape
    NQ = _NGATES[cell]
    H = K // NQ
    P = h0.shape[-1]
    proj = weight_hr is not None
    if B * T == 0:
        return (torch.zeros_like(gi), torch.zeros_like(h0),
                None if c0 is None else torch.zeros_like(c0), torch.zeros_like(weight_hh),
                torch.zeros_like(bias_hh), None if not proj else torch.zeros_like(weight_hr))
    lanes = kernel == "lanes"
    _, nt = _plan(B, T, H, P, K, gi.dtype)
    W = _width(gi.dtype)
    vw = (0,) * W
    lstm = cell == _LSTM
    wts = _Weights(cell, weight_hh, bias_hh, weight_hr, H, P, lanes, W)
    if g_h is None:
        g_h = gi.new_zeros(1, 1, 1).expand(B, T, P)
    if lstm and g_c is None:
        g_c = gi.new_zeros(1, 1, 1).expand(B, T, H)
    dgi = _alloc_like(gi)  # the layout of gi
    dh0 = gi.new_empty(B, P)
    dc0 = gi.new_empty(B, H) if lstm else None
    gif, gs = _flat(gi)
    ohf, ohs = _flat(oh)
    ocf, ocs = _flat(oc) if lstm else (wts.empty, (0, 0, 0))
    ghf, ghs = _flat(g_h)
    gcf, gcs = _flat(g_c) if lstm else (wts.empty, (0, 0, 0))
    dgif, dgs = _flat(dgi)
    h0f = _vec(h0)
    c0f = _vec(c0) if lstm else wts.empty
    dh0f = dh0.numpy().reshape(-1)
    dc0f = dc0.numpy().reshape(-1) if lstm else wts.empty
    k = _build()
    diag = wts.diag
    dtype = gi.dtype

    if lanes:
        def part(lo, hi):
            dw = torch.zeros(0 if diag else K * P * W, dtype=dtype)
            dwd = torch.zeros(K * W if diag else 0, dtype=dtype)
            dbh = torch.zeros(K * W, dtype=dtype)
            dwhr = torch.zeros(P * H * W if proj else 0, dtype=dtype)
            k["_lanes_bwd"](cell, gif, gs, h0f, c0f, wts.w, wts.wd, wts.bh, diag, wts.whr, ohf,
                            ohs, ocf, ocs, ghf, ghs, gcf, gcs, dgif, dgs, dh0f, dc0f, dw.numpy(),
                            dwd.numpy(), dbh.numpy(), dwhr.numpy(), T, H, P, lo, hi, vw)
            dwh = dwd.view(K, W).sum(1) if diag else dw.view(K, P, W).sum(2)
            return (dwh, dbh.view(K, W).sum(1),
                    dwhr.view(P, H, W).sum(2) if proj else None)
    else:
        Hp, Pp = wts.Hp, wts.Pp

        def part(lo, hi):
            dw = torch.zeros(0 if diag else K * Pp, dtype=dtype)
            dwd = torch.zeros(NQ * Hp if diag else 0, dtype=dtype)
            dbh = torch.zeros(NQ * Hp, dtype=dtype)
            dwhr = torch.zeros(P * Hp if proj else 0, dtype=dtype)
            k["_rows_bwd"](cell, gif, gs, h0f, c0f, wts.wT, wts.wd, wts.bh, diag, wts.whrT,
                           ohf, ohs, ocf, ocs, ghf, ghs, gcf, gcs, dgif, dgs, dh0f, dc0f, wts.wR,
                           wts.whr, dw.numpy(), dwd.numpy(), dbh.numpy(), dwhr.numpy(), T, H, P,
                           lo, hi, vw)
            dwh = (dwd.view(NQ, Hp)[:, :H].reshape(K) if diag
                   else dw.view(K, Pp)[:, :P])
            return (dwh, dbh.view(NQ, Hp)[:, :H].reshape(K),
                    dwhr.view(P, Hp)[:, :H] if proj else None)
    parts = _run_split(part, B, W, nt, lanes)
    dwh = sum(p[0] for p in parts)
    dbh = sum(p[1] for p in parts)
    dwhr = sum(p[2] for p in parts) if proj else None
    return dgi, dh0, dc0, dwh.reshape(weight_hh.shape), dbh, dwhr


# ----------------------------------------------------------------------------- autograd


class _Sequence(torch.autograd.Function):
    """The compiled loop of one cell as a Function of (gi, h0, c0, weight_hh, bias_hh,
    weight_hr); c0 and weight_hr are None where the cell has none."""

    @staticmethod
    def forward(ctx, cell, gi, h0, c0, weight_hh, bias_hh, weight_hr):
        oh, oc, kernel = _forward(cell, gi, h0, c0, weight_hh, bias_hh, weight_hr)
        ctx.cell, ctx.kernel = cell, kernel
        ctx.save_for_backward(gi, h0, c0, weight_hh, bias_hh, weight_hr, oh, oc)
        if cell == _LSTM:
            return oh, oc
        return oh

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_h, g_c=None):
        gi, h0, c0, weight_hh, bias_hh, weight_hr, oh, oc = ctx.saved_tensors
        dgi, dh0, dc0, dwh, dbh, dwhr = _backward(ctx.cell, gi, h0, c0, weight_hh, bias_hh,
                                                  weight_hr, oh, oc, g_h, g_c, ctx.kernel)
        return None, dgi, dh0, dc0, dwh, dbh, dwhr


def _check(fn: str, gi: Tensor, states: tuple[tuple[str, Tensor, int], ...], weight_hh: Tensor,
           bias_hh: Tensor | None, NQ: int, P: int, weight_hr: Tensor | None = None) -> None:
    if not isinstance(gi, Tensor) or gi.dim() != 3:
        raise ValueError(f"{fn}: gi must be a (B, T, {NQ} H) tensor; got "
                         f"{tuple(gi.shape) if isinstance(gi, Tensor) else type(gi).__name__}")
    if not supported(gi):
        raise ValueError(f"{fn}: the compiled loops take float32/float64 CPU tensors with numba "
                         f"installed; got {gi.dtype} on {gi.device} (numba installed: "
                         f"{AVAILABLE})")
    B, _, K = gi.shape
    if K % NQ:
        raise ValueError(f"{fn}: gi.shape[-1] must be {NQ} H; got {K}")
    H = K // NQ
    for name, s, size in states:
        if not isinstance(s, Tensor) or tuple(s.shape) != (B, size):
            raise ValueError(f"{fn}: {name} must have shape (B, {size}) = ({B}, {size}); got "
                             f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}")
    if tuple(weight_hh.shape) not in ((K, P), (K,)) or (weight_hh.dim() == 1 and P != H):
        raise ValueError(f"{fn}: weight_hh must have shape ({K}, {P}) (or ({K},), diagonal "
                         f"recurrence); got {tuple(weight_hh.shape)}")
    if bias_hh is not None and tuple(bias_hh.shape) != (K,):
        raise ValueError(f"{fn}: bias_hh must have shape ({K},) or be None; got "
                         f"{tuple(bias_hh.shape)}")
    if weight_hr is not None and tuple(weight_hr.shape) != (P, H):
        raise ValueError(f"{fn}: weight_hr must have shape (P, H) = ({P}, {H}); got "
                         f"{tuple(weight_hr.shape)}")


def _prep(gi, t):
    return None if t is None else t.to(gi.dtype)


def gru_sequence(gi: Tensor, h0: Tensor, weight_hh: Tensor, bias_hh: Tensor | None) -> Tensor:
    """All T states of the GRU from gi (B, T, 3 H) and h0 (B, H): (B, T, H); differentiable in
    gi, h0, weight_hh ((3 H, H), or (3 H,): diagonal recurrence) and bias_hh ((3 H,) or None:
    zeros)."""
    H = gi.shape[-1] // 3
    _check("gru_sequence", gi, (("h0", h0, H),), weight_hh, bias_hh, 3, H)
    if bias_hh is None:
        bias_hh = gi.new_zeros(gi.shape[-1])
    return _Sequence.apply(_GRU, gi, _prep(gi, h0), None, _prep(gi, weight_hh),
                           _prep(gi, bias_hh), None)


def elman_sequence(gi: Tensor, h0: Tensor, weight_hh: Tensor, bias_hh: Tensor | None,
                   nonlinearity: str = "tanh") -> Tensor:
    """All T states of the Elman RNN h_t = act(gi_t + W_hh h_{t-1} + b_hh) from gi (B, T, H)
    and h0 (B, H): (B, T, H); act "tanh" or "relu" (torch.nn.RNN); weight_hh (H, H) or (H,)
    (diagonal recurrence); bias_hh (H,) or None."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"elman_sequence: nonlinearity must be 'tanh' or 'relu'; got "
                         f"{nonlinearity!r}")
    H = gi.shape[-1]
    _check("elman_sequence", gi, (("h0", h0, H),), weight_hh, bias_hh, 1, H)
    if bias_hh is None:
        bias_hh = gi.new_zeros(H)
    cell = _ELMAN_TANH if nonlinearity == "tanh" else _ELMAN_RELU
    return _Sequence.apply(cell, gi, _prep(gi, h0), None, _prep(gi, weight_hh),
                           _prep(gi, bias_hh), None)


def lstm_sequence(gi: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor, bias_hh: Tensor | None,
                  weight_hr: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """All T states of the LSTM from gi (B, T, 4 H), h0 (B, P) and c0 (B, H): (h (B, T, P),
    c (B, T, H)), P = H, or proj_size with weight_hr (P, H) (h = W_hr (o tanh(c))); weight_hh
    (4 H, P), or (4 H,) (diagonal recurrence, no projection); bias_hh (4 H,) or None.
    Differentiable in every tensor argument."""
    H = gi.shape[-1] // 4
    P = H if weight_hr is None else weight_hr.shape[0]
    _check("lstm_sequence", gi, (("h0", h0, P), ("c0", c0, H)), weight_hh, bias_hh, 4, P,
           weight_hr)
    if bias_hh is None:
        bias_hh = gi.new_zeros(gi.shape[-1])
    return _Sequence.apply(_LSTM, gi, _prep(gi, h0), _prep(gi, c0), _prep(gi, weight_hh),
                           _prep(gi, bias_hh), _prep(gi, weight_hr))




class _Projection(torch.autograd.Function):
    """x2 (N, n) -> W x2^T + b as (K, N) (lanes: batch contiguous) or x2 W^T + b as (N, K),
    into a buffer with huge pages (``_alloc``)."""

    @staticmethod
    def forward(ctx, x2, weight, bias, lanes):
        N, n = x2.shape
        K = weight.shape[0]
        if lanes:
            gi = _alloc((K, N), x2.dtype)
            if n == 1:  # an outer product
                torch.mul(weight, x2.reshape(1, N), out=gi)
            else:
                torch.mm(weight, x2.t(), out=gi)
            if bias is not None:
                gi.add_(bias.unsqueeze(1))  # addmm's broadcast bias would cost a pass more
        else:
            gi = _alloc((N, K), x2.dtype)
            if bias is None:
                torch.mm(x2, weight.t(), out=gi)
            else:
                torch.addmm(bias, x2, weight.t(), out=gi)
        ctx.save_for_backward(x2, weight)
        ctx.lanes, ctx.bias = lanes, bias is not None
        return gi

    @staticmethod
    def backward(ctx, g):
        x2, weight = ctx.saved_tensors
        gNK = g.t() if ctx.lanes else g  # (N, K)
        dx = gNK @ weight if ctx.needs_input_grad[0] else None
        dw = gNK.t() @ x2 if ctx.needs_input_grad[1] else None
        db = gNK.sum(0) if ctx.bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


_LANES_LAYOUT_MAX_H = 4
"""``input_projection`` lays gi out batch-contiguous, (K, T, B), only up to this hidden size:
there the lanes kernel is bound by the latency of a step and its W-lane vector loads save
~20% (GRU, B = 16: H = 1, T = 1e5: projection + kernel 10.2 ms against 16.5 ms reading
torch's (T, B, K) layout lane by lane; H = 4: 7.1 against 9.1 ms). From H = 8 on the matmul
in torch's orientation, whose bias comes free, costs less than the transposed one plus a bias
pass (H = 32: 44 against 51 ms) and the kernel, bound by arithmetic, reads either layout at
the same speed."""


def input_projection(x: Tensor, weight_ih: Tensor, bias_ih: Tensor | None,
                     hidden_size: int) -> Tensor:
    """gi = W_ih x + b_ih for all steps of x (T, B, n): (B, T, K), laid out for the kernel the
    compiled loops will pick for this batch and hidden size: memory (K, T, B) (the batch
    contiguous) for the lanes kernel at small H (``_LANES_LAYOUT_MAX_H``), torch's (T, B, K)
    otherwise; F.linear's values and gradients, into a buffer with huge pages (``_alloc``)."""
    T, B, n = x.shape
    K = weight_ih.shape[0]
    if not supported(x) or weight_ih.dtype != x.dtype:
        return torch.nn.functional.linear(x, weight_ih, bias_ih).transpose(0, 1)
    lanes = (hidden_size <= _LANES_LAYOUT_MAX_H
             and _plan(B, T, hidden_size, hidden_size, K, x.dtype)[0] == "lanes")
    gi = _Projection.apply(x.reshape(T * B, n), weight_ih, bias_ih, lanes)
    if lanes:
        return gi.view(K, T, B).permute(2, 1, 0)
    return gi.view(T, B, K).transpose(0, 1)
