"""Per-step time of every implementation on every parameter set:

    pytest bench/ --benchmark-only

GB/s = the bytes our fused kernel must move for the step (common.py's byte
model: 28 B/element for fp32, 22 for bf16 params with fp32 state) / median
time, the same byte count for every implementation in a row; % of copy is
against a device-to-device copy of that byte count measured in the same run.
Only opt.step() is timed (on CUDA followed by a synchronisation); gradients
are set once, before."""
import gc
import os

import pytest
import torch

import common
import peers

SETS = common.parameter_sets()
CASES = [c for c in SETS if c in os.environ.get("ADOPT_BENCH_SETS", ",".join(SETS)).split(",")]
IMPLS = [i for i in peers.IMPLEMENTATIONS
         if i in os.environ.get("ADOPT_BENCH_IMPLS", ",".join(peers.IMPLEMENTATIONS)).split(",")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    if common.DEVICE == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_step_time(benchmark, results, case, impl, dtype):
    factory, reason = peers.load(impl)
    if factory is None:
        results.absent[impl] = reason
        pytest.skip(f"{impl} is absent: {reason}")
    gen = torch.Generator(device=common.DEVICE).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, device=common.DEVICE, generator=gen).to(DTYPES[dtype]))
              for shape in SETS[case]]
    for p in params:
        p.grad = torch.randn(p.shape, device=common.DEVICE, generator=gen).to(p.dtype)
    try:
        optimizer = factory(params)
        optimizer.step()  # state, compilation, launch tables
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
        pytest.skip(f"{impl} does not run {dtype}: {type(error).__name__}: {str(error)[:200]}")
    peak_extra_mb = None
    if common.DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        optimizer.step()
        torch.cuda.synchronize()
        peak_extra_mb = (torch.cuda.max_memory_allocated() - before) / 2**20

    def step():
        optimizer.step()
        common.synchronize()
    benchmark.group = f"{case} {dtype}"
    benchmark(step)
    ms = benchmark.stats.stats.median * 1e3
    numel = sum(p.numel() for p in params)
    n_bytes = numel * common.update_bytes_per_element(DTYPES[dtype])
    gbps = n_bytes / ms / 1e6
    results.rows.append(dict(case=case, impl=impl, dtype=dtype, numel=numel, n_tensors=len(params),
                             ms=ms, gbps=gbps, pct_of_copy_bw=100 * gbps / common.copy_bandwidth_gbps(n_bytes),
                             peak_extra_mb=peak_extra_mb))
