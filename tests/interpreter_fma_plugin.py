"""pytest plugin for runs under Triton < 3.7 (the lent GPU image has 3.6.0;
.ci/run tests the kernels under it too):

    python3 -P -m pytest -p interpreter_fma_plugin tests/test_kernel.py

Triton 3.6's interpreter evaluates ``tl.fma(x, y, z)`` as ``x * y + z``,
rounding twice; from 3.7 on it rounds once, as the GPU does. The kernel is
specified (and tested) bit for bit with its fmas, so under 3.6's interpreter
the tests would test the interpreter. This plugin gives that interpreter a
correctly rounded float32 fma: the float64 product of two float32 values is
exact, and their float64 sum rounded to odd, then rounded to float32, is
rounded once. It changes nothing where the interpreter has a true fma, and
nothing on the GPU (compiled kernels never use the interpreter).
"""
import numpy as np


def fma_float32(x, y, z):
    x, y, z = (np.asarray(a, dtype=np.float64) for a in np.broadcast_arrays(x, y, z))
    with np.errstate(invalid="ignore", over="ignore"):
        product = x * y                       # exact: 24 + 24 significant bits
        total = product + z
        back = total - z                      # TwoSum: the exact error of the addition
        error = (product - back) + (z - (total - back))
        odd = (total.view(np.int64) & 1) == 1
        nudge = np.isfinite(total) & (error != 0) & ~odd
        total = np.where(nudge, np.nextafter(total, np.copysign(np.inf, error)), total)
        return total.astype(np.float32)


def pytest_configure(config):
    from triton.runtime import interpreter
    if hasattr(interpreter._interpreter, "fma_fp32"):  # a true fma already (Triton >= 3.7)
        return
    original = interpreter.InterpreterBuilder.create_fma

    def create_fma(self, x, y, z):
        if z.data.dtype != np.float32:
            return original(self, x, y, z)
        return interpreter.TensorHandle(fma_float32(x.data, y.data, z.data), z.dtype.scalar)
    interpreter.InterpreterBuilder.create_fma = create_fma
