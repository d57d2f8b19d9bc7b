"""The fused step allocates nothing of parameter size (CPU allocator, via the
profiler); torch-adopt's foreach step, measured the same way, allocates
several parameter-sized temporaries. The CUDA numbers come from bench/."""
import adopt
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from adopt_triton import ADOPT

SIZES = (50_000, 3_001, 7)


def allocations_of_one_step(make_optimizer):
    params = [torch.nn.Parameter(torch.randn(n)) for n in SIZES]
    opt = make_optimizer(params)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(2):  # state and launch tables exist: the steady state
        opt.step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]


@pytest.mark.parametrize("clip_lambda", [None, lambda n: n**0.5], ids=["default_clip", "custom_clip"])
def test_fused_step_allocates_nothing_of_parameter_size(clip_lambda):
    options = {} if clip_lambda is None else dict(clip_lambda=clip_lambda)
    ours = allocations_of_one_step(lambda ps: ADOPT(ps, fused=True, weight_decay=0.1, **options))
    assert max(ours, default=0) <= 4 * len(SIZES)  # step counts / clip values only
    theirs = allocations_of_one_step(lambda ps: adopt.ADOPT(ps, foreach=True, weight_decay=0.1))
    assert sum(theirs) >= 2 * 4 * sum(SIZES)  # the comparison point is real
