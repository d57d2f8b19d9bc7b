"""The cached step program: reused while nothing moves, rebuilt whenever an
address, shape, dtype, layout, gradient set or state changes, never launched
with a stale address; its launch tables live as long as the optimizer.
Every case runs the fused kernel against the eager reference, bit for bit."""
import gc
import weakref

import pytest
import torch

from adopt_triton import ADOPT
from harness import (ReferenceRun, assert_matches_reference, assert_unchanged, hyper, make_params,
                     snapshot, through_disk, wide_grad)

SHAPES = [(17,), (5, 7), (4099,), (1,)]
STEPS = 12
OPTIONS = dict(lr=1e-2, weight_decay=0.02, decouple=True)
HYPER = hyper(**OPTIONS)


def lockstep(device, event=None, shapes=SHAPES, active=lambda step, index: True, dtype=torch.float32):
    """ADOPT(fused=True) and the reference, stepped together with the same
    gradients; ``event(step, params, opt, ref)`` may change anything before a
    step (the same change on both sides). Checked after every step."""
    params = make_params(shapes, device, dtype)
    ref = ReferenceRun(params)
    opt = ADOPT(params, fused=True, **OPTIONS)
    for step in range(STEPS):
        if event is not None:
            event(step, params, opt, ref)
        indices = [i for i in range(len(params)) if active(step, i)]
        grads = {i: wide_grad(params[i].shape, dtype=params[i].dtype) for i in indices}
        for i, p in enumerate(params):
            p.grad = grads[i].to(device) if i in grads else None
        opt.step()
        ref.step([grads[i] for i in indices], HYPER, indices)
        assert_matches_reference(opt, params, ref, f"step {step}")
    return params, opt


def test_param_data_replaced_by_a_new_tensor(kernel_device):
    def event(step, params, opt, ref):
        if step in (3, 7):  # same Parameter object, new storage (as module.to() and .half() do)
            values = torch.randn(params[2].shape)
            params[2].data = values.to(kernel_device)
            ref.tensors.params[2].copy_(values)
    lockstep(kernel_device, event)


def test_new_gradient_objects_every_step_as_zero_grad_set_to_none(kernel_device):
    """A model's backward makes new gradient tensors after every
    zero_grad(set_to_none=True): the launch takes them (not the old addresses)."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(13, 29), torch.nn.Tanh(), torch.nn.Linear(29, 5)).to(kernel_device)
    params = list(model.parameters())
    ref = ReferenceRun(params)
    opt = ADOPT(params, fused=True, **OPTIONS)
    seen = set()
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in params)
        x = torch.randn(8, 13, device=kernel_device)
        model(x).square().mean().backward()
        seen.update(p.grad.data_ptr() for p in params)
        opt.step()
        ref.step([p.grad for p in params], HYPER)
        assert_matches_reference(opt, params, ref, f"step {step}")
    if kernel_device == "cpu":
        assert len(seen) > len(params)  # the CPU allocator did hand out new addresses


def test_grads_appearing_late_and_disappearing(kernel_device):
    """Each step another subset has gradients (MoE experts, frozen layers)."""
    pattern = torch.rand(STEPS, len(SHAPES), generator=torch.Generator().manual_seed(4)) < 0.6
    params, opt = lockstep(kernel_device, active=lambda step, index: bool(pattern[step, index]))
    for i, p in enumerate(params):
        assert float(opt.state[p]["step"]) == int(pattern[:, i].sum())


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "step"])
def test_state_tensor_replaced_by_the_user(kernel_device, key):
    def event(step, params, opt, ref):
        if step == 5:
            old = opt.state[params[1]][key]
            opt.state[params[1]][key] = old * 0.5 if key != "step" else torch.tensor(2.0, device=old.device)
            ref_state = ref.state_of(1)
            ref_state[key].copy_(ref_state[key] * 0.5 if key != "step" else torch.tensor(2.0))
    params, opt = lockstep(kernel_device, event)
    if key == "step":
        assert float(opt.state[params[1]]["step"]) == 2 + STEPS - 5


def test_state_dict_of_a_param_replaced_and_cleared(kernel_device):
    def event(step, params, opt, ref):
        if step == 4:  # a whole state dict, new tensors
            opt.state[params[0]] = {k: v.clone() for k, v in opt.state[params[0]].items()}
        if step == 8:  # state dropped: the param starts over, as a new one would
            opt.state.pop(params[3])
            for column in ref.tensors[2:5]:
                column[3].zero_()
    lockstep(kernel_device, event)


def test_param_dtype_change_rebuilds_the_launch(kernel_device):
    """float32 -> bf16 params (float32 state, valid for bf16 params): the
    kernel's bf16 variant from then on, as the reference rounds."""
    def event(step, params, opt, ref):
        if step == 6:
            params[0].data = params[0].data.to(torch.bfloat16)
            ref.tensors.params[0] = ref.tensors.params[0].to(torch.bfloat16)
    params, opt = lockstep(kernel_device, event)
    assert params[0].dtype == torch.bfloat16 and opt.state[params[0]]["exp_avg"].dtype == torch.float32


def test_param_dtype_the_kernel_cannot_take_is_an_error_before_any_update(kernel_device):
    params = make_params(SHAPES, kernel_device)
    opt = ADOPT(params, fused=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    params[2].data = params[2].data.double()
    for p in params:
        p.grad = torch.randn_like(p)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="float64"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_load_state_dict_mid_run_continues_exactly(kernel_device):
    def event(step, params, opt, ref):
        if step == 5:
            opt.load_state_dict(through_disk(opt.state_dict()))
    lockstep(kernel_device, event)


def test_param_group_added_mid_run(kernel_device):
    params = make_params(SHAPES, kernel_device)
    extra = make_params([(33,), (3, 3)], kernel_device, seed=1)
    ref, extra_ref = ReferenceRun(params), ReferenceRun(extra)
    opt = ADOPT(params, fused=True, **OPTIONS)
    for step in range(STEPS):
        if step == 4:
            opt.add_param_group({"params": extra, "lr": 3e-2})
        groups = [(params, ref, HYPER)] + ([(extra, extra_ref, HYPER._replace(lr=3e-2))] if step >= 4 else [])
        for group_params, group_ref, group_hyper in groups:
            grads = [wide_grad(p.shape) for p in group_params]
            for p, g in zip(group_params, grads):
                p.grad = g.to(kernel_device)
            group_ref.step(grads, group_hyper)
        opt.step()
        for group_params, group_ref, _ in groups:
            assert_matches_reference(opt, group_params, group_ref, f"step {step}")


def test_launch_tables_belong_to_their_optimizer(kernel_device):
    """No shared cache: other optimizers stepping any number of parameter
    sets never free or replace this one's tables (a captured CUDA graph reads
    them), and they go when the optimizer goes."""
    params = make_params(SHAPES, kernel_device)
    opt = ADOPT(params, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    tables = [launch.tables for launch in opt._programs[id(opt.param_groups[0])].fused.launches]
    for i in range(80):  # more parameter sets than any cache of the old design held
        others = make_params([(i + 1,)], kernel_device, seed=i)
        others[0].grad = torch.randn_like(others[0])
        ADOPT(others, fused=True).step()
    opt.step()
    now = [launch.tables for launch in opt._programs[id(opt.param_groups[0])].fused.launches]
    assert all(a.meta is b.meta and a.block_tensor is b.block_tensor for a, b in zip(tables, now))
    alive = weakref.ref(now[0].meta)
    del opt, tables, now
    gc.collect()
    assert alive() is None


@pytest.mark.cuda
def test_captured_graph_replays_after_other_optimizers_stepped(kernel_device):
    if kernel_device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device and compiled kernels")
    graph_params, eager_params = make_params(SHAPES, "cuda"), make_params(SHAPES, "cuda")
    graph_opt = ADOPT(graph_params, lr=torch.tensor(1e-2, device="cuda"), capturable=True)
    eager_opt = ADOPT(eager_params, lr=torch.tensor(1e-2, device="cuda"), capturable=True)
    grads = [[wide_grad(p.shape, "cuda") for p in graph_params] for _ in range(8)]
    for p, g in zip(graph_params + eager_params, grads[0] + grads[0]):
        p.grad = g.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph_opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    eager_opt.step()
    for i in range(80):  # the old design's global cache held 64 tables
        others = make_params([(i + 1,)], "cuda", seed=i)
        others[0].grad = torch.randn_like(others[0])
        ADOPT(others, fused=True).step()
    torch.cuda.empty_cache()
    for step_grads in grads[1:]:
        for p, q, g in zip(graph_params, eager_params, step_grads):
            p.grad.copy_(g)
            q.grad.copy_(g)
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(graph_params, eager_params):
        assert torch.equal(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(graph_opt.state[a][key], eager_opt.state[b][key])


@pytest.mark.cuda
def test_direct_launch_equals_the_jit_launch_on_cuda(kernel_device, monkeypatch):
    if kernel_device != "cuda":
        pytest.skip("the direct launch exists for compiled kernels on CUDA")
    from adopt_triton.kernels import adopt as kernel
    runs = []
    for direct in (True, False):
        monkeypatch.setattr(kernel, "DIRECT_LAUNCH", direct)
        torch.manual_seed(9)
        params = make_params(SHAPES, "cuda", seed=9)
        opt = ADOPT(params, fused=True, **OPTIONS)
        for _ in range(STEPS):
            for p in params:
                p.grad = wide_grad(p.shape, "cuda")
            opt.step()
        runs.append(snapshot(opt, params))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
