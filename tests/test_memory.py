"""The fused step allocates nothing of parameter size: measured with the CPU
allocator's profiler under the interpreter, with the CUDA allocator's peak on
a GPU. torch-adopt's foreach step, measured the same way, allocates several
parameter-sized temporaries (the comparison bench/ reports in MiB)."""
import adopt
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from adopt_triton import ADOPT

SIZES = (50_000, 3_001, 7)


def extra_bytes_of_one_step(make_optimizer, device):
    """(largest single allocation, total allocated) during one steady-state step."""
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in SIZES]
    opt = make_optimizer(params)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(2):  # state and launch tables exist: the steady state
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        return peak, peak
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    allocations = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    return max(allocations, default=0), sum(allocations)


@pytest.mark.parametrize("clip_lambda", [None, lambda n: n**0.5], ids=["default_clip", "custom_clip"])
def test_fused_step_allocates_nothing_of_parameter_size(kernel_device, clip_lambda):
    options = {} if clip_lambda is None else dict(clip_lambda=clip_lambda)
    largest, _ = extra_bytes_of_one_step(
        lambda ps: ADOPT(ps, fused=True, weight_decay=0.1, **options), kernel_device)
    # Step counts (float64 for a custom clip_lambda) and clip values only (the CUDA
    # allocator rounds up to 512 B blocks).
    assert largest <= (8 * len(SIZES) if kernel_device == "cpu" else 4096)
    _, theirs = extra_bytes_of_one_step(
        lambda ps: adopt.ADOPT(ps, foreach=True, weight_decay=0.1), kernel_device)
    assert theirs >= 2 * 4 * sum(SIZES)  # the comparison point is real
