"""Bandwidth sweep of the fused kernel alone (launch tables built beforehand):

    python bench/bandwidth.py                # every variant over 2^20, 2^22, ... 2^28 elements
    python bench/bandwidth.py --block-sweep  # BLOCK_SIZE x num_warps, one 2^26 tensor

Achieved GB/s = bytes moved / median time, with the byte model of common.py
(update step: 28 B/element in fp32, 22 with bf16 or fp16 params and fp32
state, 20 with fp32 params and bf16 state, 14 with bf16 params and state;
16.25 with fp32 params and 8-bit state, 10.25 with bf16 params, 12.25 with a
24-bit master's remainder too;
first step: read g, write v, 8 B/element), next to a device-to-device copy of
the same byte count measured in the same run. Rows go to
bench/results/<device>-<date>.json (case "kernel_sweep", and "block_sweep"
for the launch configurations), each merged as soon as it is measured;
triton's perf_report writes its table and plot beside them.
"""
import argparse
import contextlib
from typing import NamedTuple

import torch

import common  # first: it sets TRITON_INTERPRET on a CPU machine, before triton is imported
import triton  # noqa: E402
from adopt_triton.kernels import adopt as kernel  # noqa: E402

SIZES = [2**k for k in (range(10, 15, 2) if common.SMOKE else range(20, 29, 2))]


class Mode(NamedTuple):
    dtype: torch.dtype        # params and gradients
    state_dtype: torch.dtype  # exp_avg and exp_avg_sq
    step: float               # the step count the kernel sees: 0 is the first-step case
    stochastic: bool          # bf16 stores with stochastic rounding
    bytes_per_element: float
    remainder_bits: int = 0   # master weights: 16 (32-bit master) or 8 (24-bit) beside a bf16 param


def _update(dtype, state_dtype=torch.float32, stochastic=False, remainder_bits=0):
    return Mode(dtype, state_dtype, 1.0, stochastic,
                common.update_bytes_per_element(dtype, state_dtype, remainder_bits), remainder_bits)


# Every variant the kernel has (param dtype x state dtype x rounding), and the first step.
MODES = {
    "update": _update(torch.float32),
    "update_bf16": _update(torch.bfloat16),
    "update_fp16": _update(torch.float16),
    "update_fp32_bf16_state": _update(torch.float32, torch.bfloat16),
    "update_bf16_state": _update(torch.bfloat16, torch.bfloat16),
    "update_bf16_state_stochastic": _update(torch.bfloat16, torch.bfloat16, stochastic=True),
    "update_8bit_state": _update(torch.float32, torch.int8),
    "update_bf16_8bit_state": _update(torch.bfloat16, torch.int8),
    "update_bf16_8bit_state_master24": _update(torch.bfloat16, torch.int8, remainder_bits=8),
    "first_step": Mode(torch.float32, torch.float32, 0.0, False,
                       common.first_step_bytes_per_element(torch.float32)),
}
ROWS = []


def kernel_call(numel, mode):
    """A launch over one tensor whose step count keeps it in `mode` (the
    kernel does not bump steps), on random data (never zeros). The one place
    that uses the kernel module's internal API (tables, variant, launch)."""
    spec = MODES[mode]
    param, grad = (torch.randn(numel, device=common.DEVICE).to(spec.dtype) for _ in range(2))
    exp_avg = torch.randn(numel, device=common.DEVICE).to(spec.state_dtype)
    exp_avg_sq = torch.rand(numel, device=common.DEVICE).to(spec.state_dtype) if spec.state_dtype != torch.int8 \
        else torch.randint(1, 256, (numel,), device=common.DEVICE, dtype=torch.uint8)  # codes of sqrt(v)
    step = torch.full((), spec.step, device=common.DEVICE)
    tensors = (param, grad, exp_avg, exp_avg_sq, step) + compact_operands(numel, spec)
    tables = kernel.make_tables([numel], [[t.data_ptr() for t in tensors]], param.device)  # addresses only
    scalars = kernel.StepScalars.make(lr=1e-3, beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=0.0)
    variant = kernel.Variant(spec.dtype, spec.state_dtype, False, kernel.NO_WEIGHT_DECAY, kernel.DEFAULT_CLIP,
                             scalars.lerp_from_end, False, False, False, spec.stochastic, spec.remainder_bits)

    def launch(_keep_alive=tensors):
        kernel.launch(tables, variant, scalars, seed=1234)
    return launch


def compact_operands(numel, spec):
    """8-bit state: random codes (exp_avg_sq's as uint8) and positive block
    maxima; master weights: a remainder. Empty for the other modes."""
    if spec.state_dtype != torch.int8 and not spec.remainder_bits:
        return ()
    blocks = -(-numel // 64)
    device = common.DEVICE
    maxima = [torch.rand(blocks, device=device) + 0.5 for _ in range(2)] if spec.state_dtype == torch.int8 \
        else [torch.empty(0, device=device)] * 2
    remainder = torch.zeros(numel, device=device, dtype=torch.int8 if spec.remainder_bits == 8 else torch.int16) \
        if spec.remainder_bits else torch.empty(0, device=device)
    return (*maxima, remainder)


def current_launch_config():
    """The kernel's (BLOCK_SIZE, num_warps) as it would launch now."""
    if hasattr(kernel, "settings"):
        return tuple(kernel.settings())
    return kernel.BLOCK_SIZE, kernel.NUM_WARPS


@contextlib.contextmanager
def launch_config(block_size, num_warps):
    """Run the kernel with this BLOCK_SIZE and num_warps for the duration (the
    launch tables, built inside, depend on the block size). The one place that
    knows where the kernel keeps its launch configuration: its settings()
    override, or (older kernels) the module's BLOCK_SIZE and NUM_WARPS."""
    if hasattr(kernel, "settings") and hasattr(kernel, "_SETTINGS_OVERRIDE"):
        saved = kernel._SETTINGS_OVERRIDE
        kernel._SETTINGS_OVERRIDE = kernel.Settings(block_size, num_warps)
        restore = lambda: setattr(kernel, "_SETTINGS_OVERRIDE", saved)  # noqa: E731
    elif hasattr(kernel, "BLOCK_SIZE") and hasattr(kernel, "NUM_WARPS"):
        saved = kernel.BLOCK_SIZE, kernel.NUM_WARPS
        kernel.BLOCK_SIZE, kernel.NUM_WARPS = block_size, num_warps
        restore = lambda: setattr(kernel, "BLOCK_SIZE", saved[0]) or setattr(kernel, "NUM_WARPS", saved[1])  # noqa: E731
    else:
        raise RuntimeError("adopt_triton.kernels.adopt has neither settings() with _SETTINGS_OVERRIDE nor "
                           "BLOCK_SIZE/NUM_WARPS: adapt bench/bandwidth.py's launch_config")
    try:
        if current_launch_config() != (block_size, num_warps):
            raise RuntimeError(f"launch_config({block_size}, {num_warps}) did not take effect: "
                               f"the kernel reports {current_launch_config()}")
        yield
    finally:
        restore()


def measure(numel, mode, case, impl):
    """Time one launch configuration and variant; the row is recorded at once."""
    spec = MODES[mode]
    n_bytes = numel * spec.bytes_per_element
    ms = common.median_ms(kernel_call(numel, mode))
    gbps = n_bytes / ms / 1e6
    row = dict(case=case, impl=impl, dtype=str(spec.dtype).removeprefix("torch."), numel=numel,
               n_tensors=1, bytes_per_element=spec.bytes_per_element, ms=ms, gbps=gbps,
               pct_of_copy_bw=100 * gbps / common.copy_bandwidth_gbps(n_bytes), peak_extra_mb=None)
    ROWS.append(row)
    common.record([row])
    return row


@triton.testing.perf_report(triton.testing.Benchmark(
    x_names=["numel"], x_vals=SIZES, x_log=True, line_arg="mode",
    line_vals=[m for mode in MODES for m in (mode, "copy_" + mode)],
    line_names=[n for mode, spec in MODES.items()
                for n in (f"ADOPT {mode} ({spec.bytes_per_element} B/el)", f"copy, same bytes as {mode}")],
    ylabel="GB/s", plot_name="adopt-kernel-bandwidth", args={}))
def sweep(numel, mode):
    kernel_mode = mode.removeprefix("copy_")
    if mode != kernel_mode:
        return common.copy_bandwidth_gbps(numel * MODES[kernel_mode].bytes_per_element)
    return measure(numel, mode, "kernel_sweep", f"adopt_triton_kernel_{mode}")["gbps"]


def block_sweep_configs():
    """(BLOCK_SIZE, num_warps) pairs with at least 4 elements per thread (one
    16-byte fp32 vector); the interpreter ignores num_warps, so its run is tiny."""
    if common.SMOKE:
        return [(1024, 1), (4096, 2)]
    return [(block, warps) for block in (512, 1024, 2048, 4096, 8192) for warps in (2, 4, 8, 16)
            if block >= 4 * 32 * warps]


def block_sweep():
    numel = 2**13 if common.SMOKE else 2**26
    default = current_launch_config()
    configs = [default] + [c for c in block_sweep_configs() if c != default]
    print(f"{'mode':<14}{'BLOCK_SIZE':>11}{'num_warps':>10}{'ms':>10}{'GB/s':>9}{'% of copy':>10}")
    for mode in ("update", "update_bf16"):  # every configuration of fp32 before bf16
        for block_size, num_warps in configs:
            with launch_config(block_size, num_warps):
                row = measure(numel, mode, "block_sweep",
                              f"adopt_triton_kernel_{mode}_block{block_size}_warps{num_warps}")
            mark = "  (default)" if (block_size, num_warps) == default else ""
            print(f"{mode:<14}{block_size:>11}{num_warps:>10}{row['ms']:>10.4f}{row['gbps']:>9.0f}"
                  f"{row['pct_of_copy_bw']:>9.0f}%{mark}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-sweep", action="store_true", help="BLOCK_SIZE x num_warps instead of sizes")
    args = parser.parse_args()
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    try:
        if args.block_sweep:
            block_sweep()
        else:
            sweep.run(print_data=True, save_path=str(common.RESULTS_DIR))
    finally:  # also when interrupted: every measured row is in the file already
        largest = max((row["numel"] * row["bytes_per_element"] for row in ROWS), default=0)
        if largest:
            path = common.record([], copy_gbps=common.copy_bandwidth_gbps(largest))
            print(f"results: {path} ({len(ROWS)} rows)")


if __name__ == "__main__":
    main()
