"""Per-step time of every implementation on every parameter set:

    pytest bench/ --benchmark-only

GB/s = the fewest bytes the step must move (common.py's byte model, for the
params' dtype and the state dtype the implementation keeps: 28 B/element for
fp32, 22 for bf16 params with fp32 state, 14 with bf16 state) / median time;
% of copy is against a device-to-device copy of that byte count measured in
the same run.
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
# ADOPT_BENCH_SELECT: "all", "headline" (peers.HEADLINE on common.headline_sets()),
# or "rest" (every other case/implementation pair).
SELECT = os.environ.get("ADOPT_BENCH_SELECT", "all")
if SELECT not in ("all", "headline", "rest"):
    raise ValueError(f"ADOPT_BENCH_SELECT={SELECT!r}: use all, headline or rest")


def selected(case, impl):
    headline = case in common.headline_sets() and impl in peers.HEADLINE
    return SELECT == "all" or headline == (SELECT == "headline")


# Headline cases first, each case with every implementation, so that a run cut
# short has complete comparisons; the implementations that compile for minutes
# (peers.SLOW_TO_COMPILE) come last, one after the other.
ORDER = {case: i for i, case in reversed(list(enumerate(common.headline_sets() + CASES)))}


def _order(item):
    case, impl, dtype = item
    slow = impl in peers.SLOW_TO_COMPILE
    return slow, IMPLS.index(impl) if slow else 0, ORDER[case], IMPLS.index(impl), list(DTYPES).index(dtype)


CASES_IMPLS_DTYPES = sorted(((case, impl, dtype) for impl in IMPLS for case in CASES for dtype in DTYPES
                             if selected(case, impl)), key=_order)

def state_dtype(optimizer, param):
    """The dtype of the first param-shaped tensor in the optimizer's state
    for ``param`` (float32 if none is found)."""
    found = getattr(optimizer, "exp_avgs", [])
    pending = [getattr(optimizer, "state", {}).get(param, {})]
    while pending and not found:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif torch.is_tensor(item) and item.shape == param.shape:
            found = [item]
    return found[0].dtype if found else torch.float32


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    if common.DEVICE == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("case,impl,dtype", CASES_IMPLS_DTYPES, ids=["-".join(c) for c in CASES_IMPLS_DTYPES])
def test_step_time(benchmark, results, case, impl, dtype):
    factory, reason = peers.load(impl)
    if factory is None:
        results.add_absent(impl, reason)
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
    bytes_per_element = common.update_bytes_per_element(DTYPES[dtype], state_dtype(optimizer, params[0]))
    n_bytes = numel * bytes_per_element
    gbps = n_bytes / ms / 1e6
    results.add(dict(case=case, impl=impl, dtype=dtype, numel=numel, n_tensors=len(params),
                     bytes_per_element=bytes_per_element, ms=ms, gbps=gbps,
                     pct_of_copy_bw=100 * gbps / common.copy_bandwidth_gbps(n_bytes),
                     peak_extra_mb=peak_extra_mb))
