"""The CPU step (adopt_triton.cpu) against torch.optim.AdamW(fused=True) on the
same tensors, in one run, interleaved, plus a CPU copy of the same bytes:

    python bench/cpu_step.py [--threads 2] [--repeats 7] [--cases ...] [--dtypes ...]
    python bench/cpu_step.py --threshold      # per-tensor calls vs the bucket, by size
    python bench/cpu_step.py --eager          # foreach vs single-tensor (fused=False), by size
    python bench/cpu_step.py --compile-time   # first step in fresh processes
    python bench/cpu_step.py --numerics       # distance to the reference and to torch-adopt
    python bench/cpu_step.py --sqrt           # the single-tensor path's sqrt: numpy vs float64
    python bench/cpu_step.py --readme README.md [results.json]   # the README's CPU table

Each repeat times one ``step()`` of every implementation in turn (gradients
set once, before), so load on a shared machine hits all of them alike; the
ratio to AdamW is the median of the per-repeat ratios. GB/s = the bytes the
step must move (bench/common.py's byte model, per implementation's state
dtype) / median time; copy = ``dst.copy_(src)`` moving the same bytes for
the float32 byte model. Results: bench/results/cpu-step-<cpu>-<date>.json
(or $ADOPT_BENCH_RESULTS).
"""
import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from common import RESULTS_DIR, _gpt2_124m, _small, slug, update_bytes_per_element

from adopt_triton import ADOPT, cpu  # noqa: E402  (after common set TRITON_INTERPRET)

CASES = {"one_tensor_2^24": [(2**24,)], "64_tensors_2^18": [(2**18,)] * 64,
         "gpt2_124m": _gpt2_124m(), "small_tensors_x1000": _small(1000, 4096)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLS = {
    "adopt_triton_cpu": lambda params: ADOPT(params),  # fused=None: the compiled CPU step
    # bf16 state: AdamW's bytes per element for bf16 params (its state takes the params' dtype)
    "adopt_triton_cpu_bf16_state": lambda params: ADOPT(params, state_dtype=torch.bfloat16),
    "adopt_triton_eager": lambda params: ADOPT(params, fused=False),  # foreach=None: by size
    "adopt_triton_foreach": lambda params: ADOPT(params, fused=False, foreach=True),
    "adopt_triton_single_tensor": lambda params: ADOPT(params, fused=False, foreach=False),
    "torch_adopt": lambda params: __import__("adopt").ADOPT(params),  # single-tensor on the CPU
    "torch_adamw_fused": lambda params: torch.optim.AdamW(params, fused=True),
}
TARGET = {"one_tensor_2^24": 1.25, "64_tensors_2^18": 1.25, "gpt2_124m": 1.5}


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def state_dtype(optimizer, param):
    state = optimizer.state.get(param, {})
    return state["exp_avg"].dtype if "exp_avg" in state else param.dtype


def run_case(name, shapes, dtype, impls, repeats):
    """Rows for one parameter set: every implementation on the same params
    and gradients (each keeps its own state), timed in turn, ``repeats`` times."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    optimizers = {impl: IMPLS[impl](params) for impl in impls}
    load_before = os.getloadavg()[0]
    first_ms = {impl: timed(opt.step) for impl, opt in optimizers.items()}  # state, compilation
    for opt in optimizers.values():
        opt.step()
    numel = sum(p.numel() for p in params)
    copy_bytes = numel * update_bytes_per_element(torch.float32)
    src, dst = torch.randn(copy_bytes // 8), torch.empty(copy_bytes // 8)
    times = {impl: [] for impl in [*impls, "copy"]}
    for _ in range(repeats):
        for impl, opt in optimizers.items():
            times[impl].append(timed(opt.step))
        times["copy"].append(timed(lambda: dst.copy_(src)))
    copy_gbps = copy_bytes / statistics.median(times["copy"]) / 1e6
    rows = []
    for impl in impls:
        ms = statistics.median(times[impl])
        n_bytes = numel * update_bytes_per_element(dtype, state_dtype(optimizers[impl], params[0]))
        ratio = None
        if "torch_adamw_fused" in times:
            ratio = statistics.median(a / b for a, b in zip(times[impl], times["torch_adamw_fused"]))
        rows.append(dict(case=name, impl=impl, dtype=str(dtype).replace("torch.", ""), numel=numel,
                         n_tensors=len(params), ms=ms, ms_min=min(times[impl]),
                         first_step_ms=first_ms[impl], gbps=n_bytes / ms / 1e6,
                         pct_of_copy_bw=100 * n_bytes / ms / 1e6 / copy_gbps, copy_gbps=copy_gbps,
                         ratio_to_adamw_fused=ratio, load=[load_before, os.getloadavg()[0]]))
        print(f"{name:20s} {rows[-1]['dtype']:9s} {impl:27s} {ms:9.2f} ms (min {min(times[impl]):8.2f})"
              f" {rows[-1]['gbps']:6.1f} GB/s" + (f"  x{ratio:.2f} AdamW" if ratio else ""), flush=True)
    print(f"{name:20s} copy of {copy_bytes / 1e6:.0f} MB: {copy_gbps:.1f} GB/s", flush=True)
    del optimizers, params
    gc.collect()
    return rows


def threshold(repeats):
    """Per-tensor calls against the bucket for 64 tensors of each size."""
    rows = []
    for log2 in range(10, 18):
        params = [torch.nn.Parameter(torch.randn(2**log2 + 3)) for _ in range(64)]
        for p in params:
            p.grad = torch.randn_like(p)
        result = {}
        for label, limit in (("bucket", 1 << 40), ("direct", 0)):
            cpu.DIRECT_MIN_NUMEL = limit
            opt = ADOPT(params)
            opt.step(), opt.step()
            result[label] = statistics.median(timed(opt.step) for _ in range(repeats))
        print(f"64 x 2^{log2}+3: bucket {result['bucket']:.3f} ms, direct {result['direct']:.3f} ms", flush=True)
        rows.append(dict(numel=2**log2 + 3, n_tensors=64, **{f"{k}_ms": v for k, v in result.items()}))
    return rows


def eager_sweep(repeats):
    """The eager paths (fused=False) on 2^22 elements in all, cut into
    tensors of 2^k + 3: foreach against single-tensor, by tensor size, and
    the default (foreach=None) that chooses between them."""
    rows = []
    for log2 in range(8, 23, 2):
        params = [torch.nn.Parameter(torch.randn(2**log2 + 3)) for _ in range(2**(22 - log2))]
        for p in params:
            p.grad = torch.randn_like(p)
        opts = {label: ADOPT(params, fused=False, foreach=foreach)
                for label, foreach in (("foreach", True), ("single_tensor", False), ("default", None))}
        for opt in opts.values():
            opt.step(), opt.step()
        times = {label: [] for label in opts}
        for _ in range(repeats):
            for label, opt in opts.items():
                times[label].append(timed(opt.step))
        result = {f"{label}_ms": statistics.median(t) for label, t in times.items()}
        print(f"{len(params)} x 2^{log2}+3: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
        rows.append(dict(numel=2**log2 + 3, n_tensors=len(params), **result))
    return rows


def sqrt_routes(repeats):
    """The single-tensor path (fused=False, foreach=False) on 64 tensors of
    2^18: its sqrt from numpy against the float64 route it replaced,
    interleaved in one process."""
    from adopt_triton import reference
    params = [torch.nn.Parameter(torch.randn(2**18)) for _ in range(64)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = ADOPT(params, fused=False, foreach=False)
    opt.step(), opt.step()
    numpy, times = reference.numpy, {"numpy_ms": [], "float64_ms": []}
    try:
        for _ in range(repeats):
            for key in times:
                reference.numpy = numpy if key == "numpy_ms" else None  # None: the float64 route
                times[key].append(timed(opt.step))
    finally:
        reference.numpy = numpy
    result = {key: statistics.median(t) for key, t in times.items()}
    print("64 x 2^18, single-tensor step: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()))
    return [dict(numel=2**18, n_tensors=64, **result)]


def numerics(steps=12, numel=2**20 + 7):
    """How far the CPU step lands from the reference (the eager single-tensor
    path) and from torch-adopt's release, on the same gradients spanning ~8
    decades: per step, the share of elements that differ, the largest
    difference in float32 ulps, and the largest |a - b| / (atol + rtol |b|)
    with torch.testing's float32 tolerances (above 1 would fail assert_close)."""
    import adopt
    rows = []
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(numel, generator=gen)
    params = [torch.nn.Parameter(start.clone()) for _ in range(3)]
    opts = [ADOPT([params[0]], lr=1e-2), ADOPT([params[1]], lr=1e-2, fused=False, foreach=False),
            adopt.ADOPT([params[2]], lr=1e-2, foreach=False)]
    for step in range(steps):
        grad = (torch.randn(numel, generator=gen, dtype=torch.float64)
                * torch.exp(3 * torch.randn(numel, generator=gen, dtype=torch.float64))).float()
        for p, opt in zip(params, opts):
            p.grad = grad.clone()
            opt.step()
        for label, i in (("reference", 1), ("torch_adopt", 2)):
            for key in ("param", "exp_avg", "exp_avg_sq"):
                a, b = [params[j] if key == "param" else opts[j].state[params[j]][key] for j in (0, i)]
                a, b = a.detach(), b.detach()
                ulps = (a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max()
                closeness = ((a - b).abs() / (1e-5 + 1.3e-6 * b.abs())).max()
                rows.append(dict(step=step + 1, against=label, tensor=key,
                                 pct_differ=100 * float((a != b).float().mean()), max_ulp=int(ulps),
                                 max_over_tolerance=float(closeness)))
        print(f"step {step + 1}: " + "; ".join(f"{r['against']} {r['tensor']} {r['pct_differ']:.2f}% "
                                                f"{r['max_ulp']} ulp {r['max_over_tolerance']:.3f}"
                                                for r in rows[-6:]), flush=True)
    return rows


COMPILE_PROBE = """
import time, torch
torch.set_num_threads({threads})
from adopt_triton import ADOPT
params = [torch.nn.Parameter(torch.randn(s).to({dtype})) for s in [(2**17,)] * 9 + [(100,)]]
for p in params: p.grad = torch.randn_like(p)
opt = ADOPT(params)
start = time.perf_counter(); opt.step(); first = time.perf_counter() - start
start = time.perf_counter(); opt.step(); second = time.perf_counter() - start
print(first - second)
"""


def compile_times(threads):
    """Seconds the first step takes beyond a steady one, in a fresh process:
    with an empty inductor cache (cold) and with the cache it left (warm)."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        for dtype in ("torch.float32", "torch.bfloat16"):
            for label in ("cold", "warm"):
                code = COMPILE_PROBE.format(threads=threads, dtype=dtype)
                done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                      text=True, check=True)
                key = f"{dtype.split('.')[1]} {label}"
                out[key] = float(done.stdout.split()[-1])
                print(key, f"{out[key]:.1f} s", flush=True)
    return out


def readme_table(data):
    """The README's CPU table, from a results file's ``step`` (and ``compile``) sections."""
    step = data["step"]
    rows = {(r["case"], r["dtype"], r["impl"]): r for r in step["rows"]}
    lines = [f"{step['device']}, {step['threads']} threads, torch {step['torch']}, "
             f"`python bench/cpu_step.py` on {step['date'][:10]} (a case per run: the machine is shared, "
             "and each case ran when it was quiet). Median ms per `step()`; "
             "× AdamW: the median of the per-repeat ratios to `torch.optim.AdamW(fused=True)` on the "
             "same tensors; load: the 1-minute load average before / after the row.", "",
             "| params | dtype | compiled CPU step, ms | × AdamW fused | GB/s (copy) | bf16 state, ms (×) | "
             "eager default | foreach | single-tensor | torch-adopt | AdamW fused | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    measured = {(r["case"], r["dtype"]) for r in step["rows"]}
    for dtype, case in ((d, c) for d in DTYPES for c in CASES if (c, d) in measured):
        ours = rows[(case, dtype, "adopt_triton_cpu")]
        cell = lambda impl: f"{rows[(case, dtype, impl)]['ms']:.1f}" if (case, dtype, impl) in rows else "–"  # noqa: E731
        small_state = rows.get((case, dtype, "adopt_triton_cpu_bf16_state"))
        small_state = "–" if small_state is None else \
            f"{small_state['ms']:.1f} ({small_state['ratio_to_adamw_fused']:.2f})"
        lines.append(f"| {case} | {dtype} | {cell('adopt_triton_cpu')} | "
                     f"{ours['ratio_to_adamw_fused']:.2f} | {ours['gbps']:.0f} ({ours['copy_gbps']:.0f}) | "
                     f"{small_state} | {cell('adopt_triton_eager')} | {cell('adopt_triton_foreach')} | "
                     f"{cell('adopt_triton_single_tensor')} | "
                     f"{cell('torch_adopt')} | {cell('torch_adamw_fused')} | "
                     f"{ours['load'][0]:.1f} / {ours['load'][1]:.1f} |")
    if "compile" in data:
        times = data["compile"]["seconds"]
        lines += ["", "First step beyond a steady one, in a fresh process (nine tensors of 2^17 "
                  "elements and one of 100: every arity compiled; inductor's cache empty (cold) or "
                  f"filled by the previous process (warm); `{data['compile']['command']}`): " + ", ".join(
                      f"{k} {v:.1f} s" for k, v in times.items()) + "."]
    return "\n".join(lines)


def write_readme(readme, data):
    text = pathlib.Path(readme).read_text()
    start, end = "<!-- cpu-step-table:start -->", "<!-- cpu-step-table:end -->"
    head, rest = text.split(start)
    pathlib.Path(readme).write_text(f"{head}{start}\n{readme_table(data)}\n{end}{rest.split(end)[1]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps of each implementation")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated tensor sets")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="param dtypes")
    parser.add_argument("--impls", default=",".join(IMPLS), help="implementations to time")
    parser.add_argument("--threshold", action="store_true", help="per-tensor calls vs the bucket, by size")
    parser.add_argument("--compile-time", action="store_true", help="first step in fresh processes")
    parser.add_argument("--eager", action="store_true", help="foreach vs single-tensor (fused=False), by size")
    parser.add_argument("--numerics", action="store_true", help="distance to the reference and torch-adopt")
    parser.add_argument("--sqrt", action="store_true", help="the single-tensor path's sqrt: numpy vs float64")
    parser.add_argument("--readme", nargs="+", metavar=("README", "RESULTS"),
                        help="write the README's CPU table from RESULTS (default: the newest)")
    args = parser.parse_args()
    if args.readme:
        results = args.readme[1] if len(args.readme) > 1 else sorted(RESULTS_DIR.glob("cpu-step-*.json"))[-1]
        write_readme(args.readme[0], json.loads(pathlib.Path(results).read_text()))
        return
    torch.set_num_threads(args.threads)
    run = dict(device=cpu_name(), threads=args.threads, torch=torch.__version__,
               python=platform.python_version(), command=" ".join(["python", *sys.argv]),
               date=datetime.datetime.now().isoformat(timespec="seconds"),
               load_before=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.threshold:
        section, run["rows"] = "threshold", threshold(args.repeats)
    elif args.eager:
        section, run["rows"] = "eager", eager_sweep(args.repeats)
    elif args.sqrt:
        section, run["rows"] = "sqrt", sqrt_routes(args.repeats)
    elif args.numerics:
        section, run["rows"] = "numerics", numerics()
    elif args.compile_time:
        section, run["seconds"] = "compile", compile_times(args.threads)
    else:
        section, run["rows"] = "step", []
        for case in args.cases.split(","):
            for dtype in args.dtypes.split(","):
                run["rows"] += run_case(case, CASES[case], DTYPES[dtype], args.impls.split(","),
                                        args.repeats)
    run["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    path = RESULTS_DIR / f"cpu-step-{slug(cpu_name())}-{datetime.date.today().isoformat()}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if section == "step" and "step" in data:  # a row replaces the same case's, others stay
        key = lambda row: (row["case"], row["dtype"], row["impl"])  # noqa: E731
        fresh = {key(row) for row in run["rows"]}
        run["rows"] = [r for r in data["step"]["rows"] if key(r) not in fresh] + run["rows"]
    data[section] = run  # each mode keeps its latest run
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
