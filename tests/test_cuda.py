"""On a CUDA machine, every test that takes the `kernel_device` fixture runs
again with the compiled kernels on CUDA tensors (the rest of this session
interprets them on the CPU).
Tolerances are those of the CPU tests: bit-exact to the reference
(sqrt_rn/div_rn/fma on the GPU), assert_close against torch-adopt."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from adopt_triton.kernels.adopt import INTERPRETED

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not INTERPRETED, reason="this session already runs the compiled kernels on CUDA")
def test_compiled_kernels_on_cuda():
    files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py")
                   if "kernel_device" in p.read_text() and p.name != "test_cuda.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT / "tests", env=dict(os.environ, TRITON_INTERPRET="0"),
        capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
