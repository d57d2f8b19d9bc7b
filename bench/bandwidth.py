"""Bandwidth sweep of the fused kernel alone (launch tables built beforehand):

    python bench/bandwidth.py

Achieved GB/s = bytes moved / median time, with the byte model of common.py
(update step: 28 B/element in fp32, 22 with bf16 params and fp32 state;
first step: read g, write v, 8 B/element),
next to a device-to-device copy of the same byte count measured in the same
run. Rows go to bench/results/<device>-<date>.json (case "kernel_sweep"),
and triton's perf_report writes its table and plot beside them.
"""
import torch
import triton

import common
from adopt_triton.kernels import adopt as kernel

SIZES = [2**k for k in (range(10, 15) if common.SMOKE else range(20, 29))]
# mode -> (param/grad dtype, state dtype, step count, bytes per element)
MODES = {
    "update": (torch.float32, torch.float32, 1.0, common.update_bytes_per_element(torch.float32)),
    "update_bf16": (torch.bfloat16, torch.float32, 1.0, common.update_bytes_per_element(torch.bfloat16)),
    "first_step": (torch.float32, torch.float32, 0.0, common.first_step_bytes_per_element(torch.float32)),
}
ROWS = []


def kernel_call(numel, mode):
    """A launch over one tensor whose step count keeps it in `mode` (the
    kernel does not bump steps), on random data (never zeros)."""
    dtype, state_dtype, count, _ = MODES[mode]
    param, grad = (torch.randn(numel, device=common.DEVICE).to(dtype) for _ in range(2))
    exp_avg = torch.randn(numel, device=common.DEVICE).to(state_dtype)
    exp_avg_sq = torch.rand(numel, device=common.DEVICE).to(state_dtype)
    step = torch.full((), count, device=common.DEVICE)
    plan = kernel.make_plan(kernel.plan_key([param], [grad], [exp_avg], [exp_avg_sq], [step]),
                            param.device)
    scalars = kernel.StepScalars.make(lr=1e-3, beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=0.0)
    tensors = (param, grad, exp_avg, exp_avg_sq, step)  # the plan holds their addresses only

    def launch(_keep_alive=tensors):
        kernel.adopt_step_(plan, dtype, scalars, clip_mode=kernel.DEFAULT_CLIP, maximize=False,
                           weight_decay_mode=kernel.NO_WEIGHT_DECAY, state_dtype=state_dtype)
    return launch


@triton.testing.perf_report(triton.testing.Benchmark(
    x_names=["numel"], x_vals=SIZES, x_log=True, line_arg="mode",
    line_vals=[m for mode in MODES for m in (mode, "copy_" + mode)],
    line_names=[n for mode, spec in MODES.items()
                for n in (f"ADOPT {mode} ({spec[3]} B/el)", f"copy, same bytes as {mode}")],
    ylabel="GB/s", plot_name="adopt-kernel-bandwidth", args={}))
def sweep(numel, mode):
    kernel_mode = mode.removeprefix("copy_")
    n_bytes = numel * MODES[kernel_mode][3]
    if mode != kernel_mode:
        return common.copy_bandwidth_gbps(n_bytes)
    gbps = n_bytes / common.median_ms(kernel_call(numel, mode)) / 1e6
    ROWS.append(dict(case="kernel_sweep", impl=f"adopt_triton_kernel_{mode}",
                     dtype=str(MODES[mode][0]).removeprefix("torch."), numel=numel, n_tensors=1,
                     bytes_per_element=MODES[mode][3], ms=n_bytes / gbps / 1e6, gbps=gbps,
                     pct_of_copy_bw=100 * gbps / common.copy_bandwidth_gbps(n_bytes),
                     peak_extra_mb=None))
    return gbps


def main():
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    sweep.run(print_data=True, save_path=str(common.RESULTS_DIR))
    largest = SIZES[-1] * MODES["update"][3]
    path = common.record(ROWS, copy_gbps=common.copy_bandwidth_gbps(largest),
                         command="python bench/bandwidth.py")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
