"""One launch for many tensors: identical results, constant launch count,
per-tensor step counts, cached launch tables."""
import io

import adopt
import pytest
import torch

from adopt_triton import ADOPT, dispatch, fused, reference
from adopt_triton.kernels import adopt as kernel
from harness import assert_bitwise_equal, wide_grad

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, clip_lambda=reference.default_clip_lambda,
             weight_decay=0.01, decouple=False, maximize=False)


@pytest.fixture
def launches(monkeypatch):
    """Records each launch of the fused kernel as the number of tensors it updates."""
    calls = []
    launch = kernel.adopt_step_

    def counting(plan, *args, **kwargs):
        calls.append(len(plan.key))
        return launch(plan, *args, **kwargs)
    monkeypatch.setattr(kernel, "adopt_step_", counting)
    return calls


@pytest.fixture
def plan_builds(monkeypatch):
    """Records each build of launch tables (the cache starts empty)."""
    monkeypatch.setattr(fused, "_PLAN_CACHE", type(fused._PLAN_CACHE)())
    calls = []
    build = kernel.make_plan

    def counting(key, device):
        calls.append(len(key))
        return build(key, device)
    monkeypatch.setattr(kernel, "make_plan", counting)
    return calls


def mixed_sizes(count, largest=10_000):
    """Log-uniform sizes from 1 to `largest`, both ends included."""
    sizes = torch.logspace(0, torch.log10(torch.tensor(float(largest))), count).round().long()
    return sizes[torch.randperm(count)].tolist()


def state_for(sizes, device):
    params = [torch.randn(n, device=device) for n in sizes]
    return (params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros((), device=device) for _ in params])


def test_300_tensors_in_one_launch_equal_one_launch_per_tensor(kernel_device, launches):
    sizes = mixed_sizes(300)
    together = state_for(sizes, kernel_device)
    alone = [[t.clone() for t in column] for column in together]
    for step in range(10):
        grads = [wide_grad((n,), kernel_device) for n in sizes]
        dispatch.adopt(together[0], grads, together[1], together[2], together[3], fused=True,
                       **HYPER)
        for i, grad in enumerate(grads):
            dispatch.adopt([alone[0][i]], [grad], [alone[1][i]], [alone[2][i]], [alone[3][i]],
                           fused=True, **HYPER)
    assert launches.count(300) == 10 and launches.count(1) == 3000
    for column, name in zip(range(4), ("param", "exp_avg", "exp_avg_sq", "step")):
        for i in range(len(sizes)):
            assert_bitwise_equal(together[column][i], alone[column][i], f"{name} of tensor {i}")


@pytest.mark.parametrize("count", [1, 30, 300])
def test_launch_count_does_not_grow_with_the_number_of_tensors(kernel_device, launches, count):
    params = [torch.nn.Parameter(torch.randn(n, device=kernel_device)) for n in mixed_sizes(count, 1000)]
    opt = ADOPT(params, fused=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert launches == [count, count]  # one launch per step, whatever the count


def test_tensors_with_different_step_counts_share_a_launch(kernel_device, launches):
    """Param 1 gets its first gradient at step 5 (an unfrozen layer, an MoE
    expert that saw no tokens): in the same launch as param 0, it still gets
    its own v = g^2 initialisation and its own clip value. torch-adopt's
    foreach path decides both from the group's first tensor and gets it wrong."""
    shapes = [(301,), (4099,)]
    ours = [torch.nn.Parameter(torch.randn(s, device=kernel_device)) for s in shapes]
    theirs_foreach = [torch.nn.Parameter(p.detach().cpu().clone()) for p in ours]
    expected = [p.detach().cpu().clone() for p in ours]
    state = [[torch.zeros_like(p) for p in expected], [torch.zeros_like(p) for p in expected],
             [torch.tensor(0.0) for _ in expected]]
    opt = ADOPT(ours, lr=1e-2, fused=True)
    foreach_opt = adopt.ADOPT(theirs_foreach, lr=1e-2, foreach=True)
    for step in range(12):
        active = [0] if step < 5 else [0, 1]
        grads = {i: wide_grad(shapes[i]) for i in active}
        for i in range(2):
            ours[i].grad = grads[i].to(kernel_device) if i in grads else None
            theirs_foreach[i].grad = grads[i].clone() if i in grads else None
        opt.step()
        foreach_opt.step()
        for i in active:  # the single-tensor reference, one tensor at a time
            reference.adopt([expected[i]], [grads[i]], [state[0][i]], [state[1][i]], [state[2][i]],
                            lr=1e-2, beta1=0.9, beta2=0.9999, eps=1e-6,
                            clip_lambda=reference.default_clip_lambda, weight_decay=0.0,
                            decouple=False, maximize=False)
    assert launches[5:] == [2] * 7  # both tensors in each launch after step 5
    for i in range(2):
        assert_bitwise_equal(ours[i], expected[i], f"param {i}")
        assert_bitwise_equal(opt.state[ours[i]]["exp_avg_sq"], state[1][i], f"exp_avg_sq {i}")
        assert float(opt.state[ours[i]]["step"]) == float(state[2][i])
    # torch-adopt foreach never initialised param 1's v: far from the reference.
    assert not torch.allclose(theirs_foreach[1].detach(), expected[1], atol=1e-3)


def test_launch_tables_are_cached_and_rebuilt_only_when_tensors_change(kernel_device, plan_builds):
    params = [torch.nn.Parameter(torch.randn(n, device=kernel_device)) for n in (3, 70, 500)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = ADOPT(params, fused=True)
    for _ in range(4):  # gradients refilled in place: same storage
        for p in params:
            p.grad.copy_(torch.randn_like(p))
        opt.step()
    assert plan_builds == [3]
    old_grad = params[1].grad
    params[1].grad = torch.randn_like(params[1])  # new storage for one gradient
    opt.step()
    assert plan_builds == [3, 3]
    extra = torch.nn.Parameter(torch.randn(9, device=kernel_device))
    extra.grad = torch.randn_like(extra)
    opt.add_param_group({"params": [extra], "lr": 1e-2})
    opt.step()
    assert plan_builds == [3, 3, 1]  # the new group's table; the first group's is reused
    opt.load_state_dict(opt.state_dict())  # the same state tensors: nothing to rebuild
    opt.step()
    assert plan_builds == [3, 3, 1]
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=True))  # new state tensors
    opt.step()
    assert plan_builds == [3, 3, 1, 3, 1]
    del old_grad
