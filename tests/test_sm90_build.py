"""The kernel compiles for Hopper (sm_90) on this CPU-only machine (Triton's
bundled LLVM and ptxas), in every variant family, and its PTX does what the
numerics rules say: correctly rounded sqrt and division, real fmas, no
approximate math, no register spills; with 16-byte-aligned tensors, fp32
loads are 16 bytes wide (the fp16 variant builds the unaligned path). The
interpreter never exercises the compiler, so this is what catches
GPU-only build errors before a GPU is lent. 8-bit variants (int8 state) load
8 codes of m and of v per thread as one 8-byte load on full blocks."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent

BUILD = r'''
import itertools, json, os, re, subprocess, tempfile
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import get_ptxas
from adopt_triton.kernels import adopt as k

signature = {"meta_ptr": "*i64", "block_tensor_ptr": "*i32", "lr_ptr": "*fp32", "clip_ptr": "*fp32",
             "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "neg_lr": "fp32", "weight_decay": "fp32",
             "neg_lr_weight_decay": "fp32", "lerp_coeff": "fp32", "beta2": "fp32",
             "one_minus_beta2": "fp32", "eps": "fp32", "seed": "i32"}
assert list(signature) + list(k._CONSTEXPRS) == list(k._adopt_kernel.arg_names)
dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "int8": tl.int8}
# (param, state, stochastic, weight decay, clip, on device, remainder bits); int8 state: 8-bit
variants = [("fp32", "fp32", False, 0, 0, False, 0), ("fp32", "fp32", True, 1, 1, True, 0),
            ("fp32", "fp32", True, 2, 2, False, 0), ("bf16", "fp32", False, 2, 1, True, 0),
            ("bf16", "bf16", True, 1, 2, True, 0), ("fp16", "fp32", False, 0, 1, False, 0),
            ("fp32", "bf16", True, 2, 1, False, 0), ("fp32", "int8", False, 0, 1, False, 0),
            ("bf16", "int8", True, 2, 2, True, 8), ("bf16", "fp32", False, 1, 1, False, 16),
            ("bf16", "bf16", True, 0, 1, True, 16)]
report = []
for param, state, stochastic, weight_decay, clip, on_device, remainder_bits in variants:
    variant = k.Variant(torch.float32, torch.float32, on_device, weight_decay, clip, clip == 2,
                        on_device, on_device, on_device, stochastic, remainder_bits)
    constexprs = dict(variant.constexprs(2048), DTYPE=dtypes[param], STATE_DTYPE=dtypes[state])
    full = dict(signature, **{name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn=k._adopt_kernel, signature=full, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, **k.COMPILE_OPTIONS))
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    ptxas = get_ptxas(90).path  # the ptxas triton itself uses for sm_90
    usage = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                           capture_output=True, text=True, check=True).stderr
    os.unlink(f.name)
    report.append(dict(variant=[param, state, stochastic, weight_decay, clip, on_device, remainder_bits],
                       spills=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", usage)),
                       registers=int(re.search(r"Used (\d+) registers", usage).group(1)),
                       sqrt_rn="sqrt.rn.f32" in ptx, div_rn="div.rn.f32" in ptx, fma_rn="fma.rn.f32" in ptx,
                       approximate=sorted(set(re.findall(r"\b(?:sqrt|div|rsqrt|rcp)\.approx\.\w+", ptx))),
                       wide_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx)),
                       wide_code_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v2\.b32", ptx))))
print(json.dumps(report))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the kernels are compiled and run for real")
def test_kernel_builds_for_sm90_with_the_intended_instructions():
    result = subprocess.run([sys.executable, "-P", "-c", BUILD], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report) == 11
    for row in report:
        assert row["spills"] == 0, row
        assert row["sqrt_rn"] and row["div_rn"] and row["fma_rn"], row
        assert row["approximate"] == [], row
        if row["variant"][:2] == ["fp32", "fp32"]:
            assert row["wide_loads"] >= 4, row  # p, g, m, v as 16-byte vector loads
        if row["variant"][:2] == ["fp32", "int8"]:
            assert row["wide_loads"] >= 2 and row["wide_code_loads"] >= 2, row  # p, g; m, v codes (8 bytes)
