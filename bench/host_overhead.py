"""Host work of ``opt.step()`` on many tiny tensors, where nothing but host
work matters, against ``torch.optim.AdamW(fused=True)`` on the same tensors
in the same run:

    python bench/host_overhead.py [--counts 148,1000] [--repeats 200] [--readme README.md]

On the CPU (Triton's interpreter) the kernel launch is replaced by a no-op,
so ours is the host work alone; AdamW's is its whole CPU step. On CUDA both
really run: "host" is the time until step() returns, "device" the CUDA-event
time of the step, and the kernel launch alone is timed as our step issues it
(the compiled kernel called directly) and through Triton's JIT launcher.

Each parameter has 1 to 8 elements; every step sees the same gradient
tensors (a training loop whose gradients keep their storage), and a second
row ("new gradients") replaces every gradient before each step, as
``zero_grad(set_to_none=True)`` and a backward pass do. Medians of
``--repeats`` steps after warm-up. The results go into the results JSON
(common.record's file) under the key "host_overhead"; ``--readme`` puts the
table between the README's host-overhead markers.
"""
import argparse
import json
import os
import re
import statistics
import time

import torch

import common
from adopt_triton import ADOPT
from adopt_triton.kernels import adopt as kernel

START, END = "<!-- host-overhead:start -->", "<!-- host-overhead:end -->"


def tiny_params(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (count,), generator=gen).tolist()
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(common.DEVICE)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def time_steps(optimizer, params, repeats, new_grads=False):
    """Median host time (µs) of step() and, on CUDA, median device time (µs)."""
    for _ in range(3):  # state, tables, compilation
        optimizer.step()
    common.synchronize()
    host, device = [], []
    for _ in range(repeats):
        if new_grads:
            for p in params:
                p.grad = torch.randn_like(p)
        if common.DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        begin = time.perf_counter()
        optimizer.step()
        host.append((time.perf_counter() - begin) * 1e6)
        if common.DEVICE == "cuda":
            end.record()
            end.synchronize()
            device.append(start.elapsed_time(end) * 1e3)
    return statistics.median(host), statistics.median(device) if device else None


def launch_only_us(repeats):
    """CUDA: one launch of the kernel over 148 tiny tensors, as step() issues
    it (the compiled kernel called directly) and through the JIT launcher."""
    params = tiny_params(148)
    opt = ADOPT(params, fused=True)
    opt.step()
    fused = opt._programs[id(opt.param_groups[0])].fused
    launch = fused.launches[0]
    scalars = kernel.StepScalars.make(lr=1e-3, beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=0.0)
    variant = kernel.Variant(torch.float32, torch.float32, False, kernel.NO_WEIGHT_DECAY, kernel.DEFAULT_CLIP,
                             scalars.lerp_from_end, False, False, False, False)
    results = {}
    for label, direct in (("direct", True), ("jit", False)):
        saved, kernel.DIRECT_LAUNCH = kernel.DIRECT_LAUNCH, direct
        try:
            times = []
            for _ in range(repeats):
                begin = time.perf_counter()
                kernel.launch(launch.tables, variant, scalars)
                times.append((time.perf_counter() - begin) * 1e6)
            torch.cuda.synchronize()
        finally:
            kernel.DIRECT_LAUNCH = saved
        results[label] = statistics.median(times)
    return results


def measure(counts, repeats):
    stub = common.DEVICE == "cpu"
    real_launch = kernel.launch
    rows = []
    for count in counts:
        for new_grads in (False, True):
            params = tiny_params(count)
            ours = ADOPT(params, fused=True)
            if stub:
                kernel.launch = lambda *args, **kwargs: None
            try:
                ours_host, ours_device = time_steps(ours, params, repeats, new_grads)
            finally:
                kernel.launch = real_launch
            peers = tiny_params(count)
            adamw = torch.optim.AdamW(peers, fused=True)
            adamw_host, adamw_device = time_steps(adamw, peers, repeats, new_grads)
            rows.append(dict(n_tensors=count, new_grads=new_grads, ours_host_us=ours_host,
                             ours_device_us=ours_device, adamw_fused_host_us=adamw_host,
                             adamw_fused_device_us=adamw_device, ratio=ours_host / adamw_host))
    for new_grads in (False, True):
        same = sorted((r for r in rows if r["new_grads"] == new_grads), key=lambda r: r["n_tensors"])
        if len(same) > 1:
            first, last = same[0], same[-1]
            marginal = (last["ours_host_us"] - first["ours_host_us"]) / (last["n_tensors"] - first["n_tensors"])
            for row in same:
                row["marginal_us_per_tensor"] = marginal
    return rows


def markdown(result):
    launch = "kernel launch replaced by a no-op (host work alone)" if result["stubbed_launch"] else \
        "kernels really run"
    lines = [f"Device: **{result['device']}**, {result['date']}; torch {result['torch']}, "
             f"triton {result['triton']}; {launch}; AdamW is `torch.optim.AdamW(fused=True)`'s whole "
             f"step on the same tensors (1-8 elements each), same run; {result['threads']} threads, "
             f"load average {result['load_average']:.1f}. Command: `{result['command']}`.",
             "", "| tensors | gradients | ours, host µs | AdamW fused, µs | ours / AdamW | ours, µs per extra tensor |"
             + (" ours device µs | AdamW device µs |" if not result["stubbed_launch"] else ""),
             "|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if not result["stubbed_launch"] else "")]
    for r in result["rows"]:
        line = (f"| {r['n_tensors']} | {'new every step' if r['new_grads'] else 'same tensors'} | "
                f"{r['ours_host_us']:.0f} | {r['adamw_fused_host_us']:.0f} | {r['ratio']:.2f} | "
                f"{r.get('marginal_us_per_tensor', float('nan')):.2f} |")
        if not result["stubbed_launch"]:
            line += f" {r['ours_device_us']:.0f} | {r['adamw_fused_device_us']:.0f} |"
        lines.append(line)
    if result.get("launch_us"):
        lines += ["", "One launch over 148 tensors, host µs: as step() issues it (the compiled kernel "
                  f"called directly) {result['launch_us']['direct']:.1f}, through Triton's JIT launcher "
                  f"{result['launch_us']['jit']:.1f}."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="148,1000")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--readme", help="put the table into this README between its markers")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the CI machine's cores
    rows = measure([int(c) for c in args.counts.split(",")], args.repeats)
    path = common.record([], command="python bench/host_overhead.py " + " ".join(
        f"--{k} {v}" for k, v in (("counts", args.counts), ("repeats", args.repeats))))
    data = json.loads(path.read_text())
    data["host_overhead"] = dict(rows=rows, stubbed_launch=common.DEVICE == "cpu",
                                 load_average=os.getloadavg()[0], threads=torch.get_num_threads(),
                                 launch_us=launch_only_us(args.repeats) if common.DEVICE == "cuda" else None)
    path.write_text(json.dumps(data, indent=1) + "\n")
    table = markdown(dict(data["host_overhead"], device=data["device"], date=data["date"],
                          torch=data["torch"], triton=data["triton"], command=data["command"]))
    print(table)
    print(f"results: {path}")
    if args.readme:
        readme = open(args.readme).read()
        block = f"{START}\n{table}{END}"
        if START not in readme:
            raise SystemExit(f"{args.readme} has no {START} marker")
        open(args.readme, "w").write(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block,
                                            readme, flags=re.S))


if __name__ == "__main__":
    main()
