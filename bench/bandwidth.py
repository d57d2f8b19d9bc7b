"""Bandwidth sweep of the fused kernel alone (launch tables built beforehand):

    python bench/bandwidth.py

Achieved GB/s = bytes moved / median time, with the byte model of common.py
(update step: 28 B/element in fp32; first step: read g, write v, 8 B/element),
next to a device-to-device copy of the same byte count measured in the same
run. Rows go to bench/results/<device>-<date>.json (case "kernel_sweep"),
and triton's perf_report writes its table and plot beside them.
"""
import torch
import triton

import common
from adopt_triton.kernels import adopt as kernel

SIZES = [2**k for k in (range(10, 15) if common.SMOKE else range(20, 29))]
MODES = {"update": common.update_bytes_per_element, "first_step": common.first_step_bytes_per_element}
ROWS = []


def kernel_call(numel, mode, dtype=torch.float32):
    """A launch over one tensor whose step count keeps it in `mode` (the
    kernel does not bump steps), on random data (never zeros)."""
    param, grad, exp_avg = (torch.randn(numel, device=common.DEVICE, dtype=dtype) for _ in range(3))
    exp_avg_sq = torch.rand(numel, device=common.DEVICE, dtype=dtype)
    step = torch.full((), 0.0 if mode == "first_step" else 1.0, device=common.DEVICE)
    plan = kernel.make_plan(kernel.plan_key([param], [grad], [exp_avg], [exp_avg_sq], [step]),
                            param.device)
    scalars = kernel.StepScalars.make(lr=1e-3, beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=0.0)
    tensors = (param, grad, exp_avg, exp_avg_sq, step)  # the plan holds their addresses only

    def launch(_keep_alive=tensors):
        kernel.adopt_step_(plan, dtype, scalars, clip_mode=kernel.DEFAULT_CLIP, maximize=False,
                           weight_decay_mode=kernel.NO_WEIGHT_DECAY)
    return launch


@triton.testing.perf_report(triton.testing.Benchmark(
    x_names=["numel"], x_vals=SIZES, x_log=True, line_arg="mode",
    line_vals=["update", "copy_update_bytes", "first_step", "copy_first_step_bytes"],
    line_names=["ADOPT update (28 B/el)", "copy, same bytes", "ADOPT first step (8 B/el)",
                "copy, same bytes (first step)"],
    ylabel="GB/s", plot_name="adopt-kernel-bandwidth", args={}))
def sweep(numel, mode):
    kernel_mode = mode.replace("copy_", "").replace("_bytes", "") if mode.startswith("copy") else mode
    n_bytes = numel * MODES[kernel_mode](torch.float32)
    if mode.startswith("copy"):
        return common.copy_bandwidth_gbps(n_bytes)
    gbps = n_bytes / common.median_ms(kernel_call(numel, mode)) / 1e6
    copy = common.copy_bandwidth_gbps(n_bytes)
    ROWS.append(dict(case="kernel_sweep", impl=f"adopt_triton_kernel_{mode}", dtype="float32",
                     numel=numel, n_tensors=1, ms=n_bytes / gbps / 1e6, gbps=gbps,
                     pct_of_copy_bw=100 * gbps / copy, peak_extra_mb=None))
    return gbps


def main():
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    sweep.run(print_data=True, save_path=str(common.RESULTS_DIR))
    largest = SIZES[-1] * common.update_bytes_per_element(torch.float32)
    path = common.record(ROWS, copy_gbps=common.copy_bandwidth_gbps(largest),
                         command="python bench/bandwidth.py")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
