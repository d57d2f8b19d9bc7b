"""One launch for many tensors: identical results, constant launch count,
per-tensor step counts, cached launch tables."""
import adopt
import pytest
import torch

from adopt_triton import ADOPT, Tensors, adopt as functional_adopt
from harness import (ReferenceRun, assert_bitwise_equal, assert_matches_reference, clone_tensors, hyper,
                     through_disk, wide_grad)

HYPER = hyper(betas=(0.9, 0.999), weight_decay=0.01)


def mixed_sizes(count, largest=10_000):
    """Log-uniform sizes from 1 to `largest`, both ends included."""
    sizes = torch.logspace(0, torch.log10(torch.tensor(float(largest))), count).round().long()
    return sizes[torch.randperm(count)].tolist()


def state_for(sizes, device):
    params = [torch.randn(n, device=device) for n in sizes]
    return Tensors(params, [None] * len(params), [torch.zeros_like(p) for p in params],
                   [torch.zeros_like(p) for p in params], [torch.zeros((), device=device) for _ in params])


def test_300_tensors_in_one_launch_equal_one_launch_per_tensor(kernel_device, launches):
    sizes = mixed_sizes(300)
    together = state_for(sizes, kernel_device)
    alone = clone_tensors(together)
    for step in range(10):
        grads = [wide_grad((n,), kernel_device) for n in sizes]
        functional_adopt(together._replace(grads=grads), HYPER, fused=True)
        for i, grad in enumerate(grads):
            functional_adopt(alone.pick([i])._replace(grads=[grad]), HYPER, fused=True)
    assert list(map(len, launches)).count(300) == 10 and list(map(len, launches)).count(1) == 3000
    for column, name in ((0, "param"), (2, "exp_avg"), (3, "exp_avg_sq"), (4, "step")):
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
    assert list(map(len, launches)) == [count, count]  # one launch per step, whatever the count


def test_tensors_with_different_step_counts_share_a_launch(kernel_device, launches):
    """Param 1 gets its first gradient at step 5 (an unfrozen layer, an MoE
    expert that saw no tokens): in the same launch as param 0, it still gets
    its own v = g^2 initialisation and its own clip value. torch-adopt's
    foreach path decides both from the group's first tensor and gets it wrong."""
    shapes = [(301,), (4099,)]
    ours = [torch.nn.Parameter(torch.randn(s, device=kernel_device)) for s in shapes]
    theirs_foreach = [torch.nn.Parameter(p.detach().cpu().clone()) for p in ours]
    expected = ReferenceRun(ours)
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
        expected.step([grads[i] for i in active], hyper(), active)  # the single-tensor reference
    assert list(map(len, launches[5:])) == [2] * 7  # both tensors in each launch after step 5
    assert_matches_reference(opt, ours, expected)
    # torch-adopt foreach never initialised param 1's v: far from the reference.
    assert not torch.allclose(theirs_foreach[1].detach(), expected.tensors.params[1], atol=1e-3)


def test_launch_tables_are_cached_and_rebuilt_only_when_tensors_change(kernel_device, table_builds):
    params = [torch.nn.Parameter(torch.randn(n, device=kernel_device)) for n in (3, 70, 500)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = ADOPT(params, fused=True)
    for _ in range(4):  # gradients refilled in place: same storage
        for p in params:
            p.grad.copy_(torch.randn_like(p))
        opt.step()
    assert table_builds == [3]
    old_grad = params[1].grad
    params[1].grad = torch.randn_like(params[1])  # new storage for one gradient: new addresses only
    opt.step()
    assert table_builds == [3]
    extra = torch.nn.Parameter(torch.randn(9, device=kernel_device))
    extra.grad = torch.randn_like(extra)
    opt.add_param_group({"params": [extra], "lr": 1e-2})
    opt.step()
    assert table_builds == [3, 1]  # the new group's table; the first group's is reused
    opt.load_state_dict(through_disk(opt.state_dict()))  # new state tensors
    opt.step()
    assert table_builds == [3, 1, 3, 1]
    del old_grad
