"""The SIMD layer of the compiled loops (``paraseq.cells.compiled``): a small numba extension
that gives the kernels LLVM vectors, because LLVM's auto-vectoriser left their short loops
scalar, and the vector tanh, sigmoid and relu.

A vector is an LLVM <W x float/double> value; W is the length of the tuple ``vw`` the kernels
are given (so each width is its own compile-time specialisation). The functions below whose
body is only a docstring are stubs: ``_define_simd(numba)``, called once by
``compiled._build``, registers the vector type, replaces the stubs ``_LINKED`` names by numba
intrinsics (``compiled._build`` then rebinds them in every kernel module) and overloads the
others (``_vtanh``, ``_vsigmoid``, ...) in place.
"""

from __future__ import annotations

import math

import numpy as np

_LINKED = ("_vpow2", "_vnan_to", "_vload", "_vload_s", "_vstore", "_vstore_s", "_vfull", "_ld",
           "_st", "_sload")
"""The stubs ``_define_simd`` replaces by intrinsics."""

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


def _sload(a, off):
    """a[off] of a 1-D contiguous array, off >= 0 (no wraparound of negative indices, which
    numba's indexing checks for on every access)."""


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

    @intrinsic
    def sload(typingctx, a, off):
        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            return builder.load(builder.gep(arr.data, [args[1]]))
        return a.dtype(a, off), codegen

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
                     ("_vstore_s", vstore_s), ("_vfull", vfull), ("_ld", ld), ("_st", st),
                     ("_sload", sload)):
        g[name] = fn


def _ld(a, off, s, n, vw):
    """W lanes from a at off with stride s, the first n valid (0 beyond): a vector load when
    s == 1 and n == W."""


def _st(a, off, s, n, v, vw):
    """The first n lanes of v to a at off with stride s."""
