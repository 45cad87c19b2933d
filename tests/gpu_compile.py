"""Compiling paraseq's Triton kernels for a GPU on a machine without one.

Triton's interpreter (how the kernels' numbers are tested here) runs the kernels' Python, not
triton's GPU compiler, so a kernel the compiler rejects (a global that is not a constexpr, a
loop-carried variable that changes type) passes every interpreted test and fails on the first
GPU. ``compile_for_sm90`` takes each kernel through triton's compiler for an H100/H200
(sm_90: TTIR, TTGIR, LLVM IR, PTX, and the cubin by the ptxas triton ships) and reads
ptxas's register and spill counts. A subprocess: the tests' own process runs the interpreter
(TRITON_INTERPRET=1 is read when triton is imported).

Each case is a dict: module (dotted), kernel (name), dtype of the pointers ("fp32", "fp64";
a parameter named first_ptr is int32), constexprs ({name: value}), num_warps. Parameters are
typed by name: ``*_ptr`` pointers, ``s_*`` int64 strides, ``tol`` fp32, the rest int32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import importlib, inspect, json, os, subprocess, sys, tempfile
sys.path.insert(0, os.getcwd())
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for case in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(case["module"]), case["kernel"])
    ce, dt = case["constexprs"], case["dtype"]
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        sig[name] = ("constexpr" if name in ce else "*i32" if name == "first_ptr"
                     else f"*{dt}" if name.endswith("_ptr") else "fp32" if name == "tol"
                     else "i64" if name.startswith("s_") else "i32")
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": case["num_warps"]})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    out = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True, check=True).stderr
    os.unlink(f.name)
    regs = int(out.split("Used ")[1].split()[0])
    spill = int(out.split(" bytes spill stores")[0].split()[-1])
    print(json.dumps(dict(case, cubin=len(c.asm["cubin"]), regs=regs, spill=spill)))
"""


def compile_for_sm90(cases: list[dict]) -> list[dict]:
    """The cases compiled for sm_90: each case with cubin (bytes), regs and spill (bytes of
    spill stores a thread) added. Skips on a CUDA machine (the kernels run there), without
    triton, or without triton's nvidia backend."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a compile-only check for machines without a GPU (with one, the kernels run)")
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's nvidia backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(cases)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines()]
