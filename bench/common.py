"""What the benchmarks share: where they run, the parameter sets, the byte
model, timing, and the results file with its provenance.

On a CUDA device the kernels are compiled and timed at full size. Anywhere
else (CI) the same code runs as a CPU smoke test: Triton's interpreter, tiny
sizes, and results labelled as CPU numbers.
"""
import datetime
import functools
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time

import torch

# Compiled kernels on a CUDA machine, the interpreter elsewhere; must be set
# before adopt_triton's kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import triton  # noqa: E402

import adopt_triton  # noqa: E402
from adopt_triton.kernels.adopt import INTERPRETED  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
SMOKE = DEVICE == "cpu"
RESULTS_DIR = pathlib.Path(os.environ.get("ADOPT_BENCH_RESULTS", pathlib.Path(__file__).parent / "results"))

# Bytes moved per element of one step, by (param/grad dtype, state dtype):
# update: read p, g, m, v + write p, m, v; first step: read g + write v.
# torch.int8 state: 8-bit codes of m and sqrt(v), plus their float32 block
# maxima (one per 64 elements each, read and written: 0.25 B/element).
ELEMENT_SIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.int8: 1, torch.uint8: 1}
BLOCK_MAXIMA_BYTES = 2 * 2 * 4 / 64


def update_bytes_per_element(param_dtype, state_dtype=torch.float32, remainder_bits=0):
    """Read p, g, m, v and write p, m, v (+ block maxima for 8-bit state, + the
    master weight's remainder read and written: 16 or 8 bits)."""
    maxima = BLOCK_MAXIMA_BYTES if state_dtype in (torch.int8, torch.uint8) else 0  # codes of m, of sqrt(v)
    return 3 * ELEMENT_SIZE[param_dtype] + 4 * ELEMENT_SIZE[state_dtype] + maxima + remainder_bits // 4


def first_step_bytes_per_element(param_dtype, state_dtype=torch.float32):
    return ELEMENT_SIZE[param_dtype] + ELEMENT_SIZE[state_dtype]


def _gpt2_124m():
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d)] + block * layers + [(d,), (d,)]


def _llama_1b():  # Llama-3.2-1B: 16 layers, d 2048, 8 kv heads of 64, MLP 8192, tied embeddings
    d, kv, mlp, vocab, layers = 2048, 512, 8192, 128256, 16
    block = [(d, d), (kv, d), (kv, d), (d, d), (mlp, d), (mlp, d), (d, mlp), (d,), (d,)]
    return [(vocab, d)] + block * layers + [(d,)]


def _small(count, largest):
    gen = torch.Generator().manual_seed(0)
    return [(int(n),) for n in torch.randint(1, largest + 1, (count,), generator=gen)]


def headline_sets():
    """The parameter sets of the headline comparison (bench/run_gpu.sh stage c)."""
    if SMOKE:
        return ["gpt2_124m_shaped", "llama_1b_shaped", "one_tensor_2^13", "small_tensors_x1000"]
    return ["gpt2_124m", "llama_1b", "one_tensor_2^26", "small_tensors_x1000"]


def parameter_sets():
    """name -> list of shapes. Full size on CUDA; on the CPU smoke run each
    dimension is divided (at least 1 element) so the interpreter finishes."""
    if SMOKE:
        shrink = lambda shapes, k: [tuple(max(1, s // k) for s in shape) for shape in shapes]  # noqa: E731
        return {"one_tensor_2^10": [(2**10,)], "one_tensor_2^13": [(2**13,)],
                "gpt2_124m_shaped": shrink(_gpt2_124m(), 64), "llama_1b_shaped": shrink(_llama_1b(), 256),
                "small_tensors_x1000": _small(100, 64)}
    sets = {f"one_tensor_2^{k}": [(2**k,)] for k in (20, 24, 26, 28)}
    sets.update(gpt2_124m=_gpt2_124m(), llama_1b=_llama_1b(), small_tensors_x1000=_small(1000, 4096))
    return sets


def device_name():
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({model}, Triton interpreter)"


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats=None):
    """Median time of fn() in ms: CUDA events (triton's do_bench) on the GPU,
    a host clock around a synchronised call on the CPU."""
    if DEVICE == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(repeats or 5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(n_bytes):
    """A device-to-device copy moving n_bytes in all (half read, half written),
    measured once per byte count."""
    n = max(1, int(n_bytes) // 8)
    src, dst = torch.randn(n, device=DEVICE), torch.empty(n, device=DEVICE)
    return 8 * n / median_ms(lambda: dst.copy_(src)) / 1e6


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def results_path():
    """results/<device>-<date>.json; ADOPT_BENCH_DATE pins the date, so that a run
    crossing midnight (bench/run_gpu.sh sets it) still writes one file."""
    name = "cpu-smoke" if SMOKE else slug(device_name())
    date = os.environ.get("ADOPT_BENCH_DATE") or datetime.date.today().isoformat()
    return RESULTS_DIR / f"{name}-{date}.json"


def record(rows, absent=(), copy_gbps=None, command=None):
    """Merge rows into this device's results file for today (a row replaces
    an earlier one with the same case, impl, dtype and size). ``command`` is
    the run's (ADOPT_BENCH_COMMAND when a script runs several steps); each
    step's own command is listed under ``steps``."""
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {"rows": [], "absent": {}}
    data.update(
        device=device_name(), smoke=SMOKE, date=datetime.datetime.now().isoformat(timespec="seconds"),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        python=platform.python_version(),
        command=os.environ.get("ADOPT_BENCH_COMMAND") or command or " ".join(sys.argv),
        adopt_triton=str(pathlib.Path(adopt_triton.__file__).parent), headline_sets=headline_sets(),
        note=("CPU smoke run through Triton's interpreter: these numbers test the benchmark "
              "code, they are not GPU results") if SMOKE else "")
    step = command or " ".join(sys.argv)
    data["steps"] = data.get("steps", []) + ([step] if step not in data.get("steps", []) else [])
    if copy_gbps is not None:
        data["copy_bandwidth_gbps"] = copy_gbps
    key = lambda row: (row["case"], row["impl"], row["dtype"], row["numel"], row["n_tensors"])  # noqa: E731
    merged = {key(row): row for row in data["rows"]}
    merged.update({key(row): row for row in rows})
    data["rows"] = list(merged.values())
    data["absent"].update(dict(absent))
    partial = path.with_suffix(".json.partial")  # replaced in one step: a kill never leaves half a file
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)
    return path
