"""Hostile inputs, on every path (the fused kernel, foreach, single-tensor):
torch-adopt's numbers, or a clear error raised before anything is updated
(no param, state or step count of any group changed)."""
import copy
import math
import pickle

import adopt
import numpy as np
import pytest
import torch

from adopt_triton import ADOPT
from harness import (ReferenceRun, against_torch_adopt, assert_bitwise_equal, assert_unchanged, hyper,
                     make_params, snapshot, through_disk, wide_grad)

PATHS = {"fused": dict(fused=True), "foreach": dict(fused=False, foreach=True),
         "single_tensor": dict(fused=False, foreach=False)}
SHAPES = [(17,), (5, 7), (1,)]


@pytest.fixture(params=PATHS, ids=PATHS.keys())
def path(request, kernel_device):
    """(flags, device) of one path: the kernel on its device, the eager paths on the CPU."""
    return PATHS[request.param], kernel_device if request.param == "fused" else "cpu"


def stepped(path, shapes=SHAPES, steps=2, **options):
    """An optimizer on ``path`` after ``steps`` steps, with gradients set for the next."""
    flags, device = path
    params = make_params(shapes, device)
    opt = ADOPT(params, **flags, **options)
    for _ in range(steps + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        if _ < steps:
            opt.step()
    return params, opt


def refuses(opt, params, error, match):
    """step() raises ``error`` and changes nothing."""
    before = snapshot(opt, params)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(opt, params, before)


def numpy_sqrt(n):
    return float(np.sqrt(n))


NUMBER_CLIPS = {"min": lambda n: min(n**0.25, 3.0), "math_sqrt": math.sqrt,
                "branch": lambda n: 0.5 if n < 4 else 1.5, "numpy": numpy_sqrt}


@pytest.mark.parametrize("clip", NUMBER_CLIPS.values(), ids=NUMBER_CLIPS.keys())
def test_clip_lambda_written_for_numbers_works_with_many_tensors(path, clip):
    """torch-adopt calls clip_lambda with a float; with several tensors at
    different step counts (param 2 starts late) ours gives its numbers."""
    flags, device = path
    against_torch_adopt(device, dict(lr=1e-2, clip_lambda=clip), flags=flags, grad_spread=1.0,
                        has_grad=lambda step, index: index != 2 or step >= 3)


def test_clip_lambda_is_never_called_for_a_first_step(path):
    calls = []

    def clip(n):
        calls.append(n.clone() if torch.is_tensor(n) else n)
        if not torch.is_tensor(n) and n == 0:
            raise AssertionError("called with n = 0")
        return n**0.5
    params, opt = stepped(path, steps=0, clip_lambda=clip)
    for step in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    values = [float(v) for c in calls for v in (c.flatten().tolist() if torch.is_tensor(c) else [c])]
    assert values and 0.0 not in values


def test_a_failing_clip_lambda_changes_nothing_in_any_group(path):
    """Groups [a] and [b, c], b and c starting two steps later: the clip is
    evaluated for all groups before any update, and the user's own exception
    propagates as itself."""
    flags, device = path
    a, b, c = make_params([(9,), (4, 3), (130,)], device)
    bad = set()

    def clip(n):
        if not torch.is_tensor(n) and n in bad:
            raise ValueError(f"no clip for {n}")
        return n**0.25 if not torch.is_tensor(n) else torch.where(n == 2, float("nan"), n**0.25)
    opt = ADOPT([{"params": [a]}, {"params": [b, c]}], lr=1e-2, clip_lambda=clip, **flags)
    for step in range(4):
        for p in (a, b, c):
            p.grad = torch.randn_like(p) if p is a or step >= 2 else None
        opt.step()
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    bad.add(2.0)  # b and c are at n = 2 now, a at n = 4
    refuses(opt, [a, b, c], ValueError, "no clip for 2.0")


@pytest.mark.parametrize("step", [torch.tensor(3.0, dtype=torch.float64), torch.tensor(3),
                                  torch.tensor([3.0]), torch.tensor([3], dtype=torch.int32)],
                         ids=["float64", "int64", "shape_1", "int32_shape_1"])
def test_checkpoint_step_of_another_dtype_or_shape_is_converted(path, step):
    """torch-adopt accepts these step counts; ours reads them as the number they are."""
    flags, device = path
    params = make_params(SHAPES, device)
    expected = ReferenceRun(params)
    opt = ADOPT(params, lr=1e-2, **flags)
    saved = opt.state_dict()
    saved["state"] = {i: dict(step=step.clone(), exp_avg=torch.zeros(s), exp_avg_sq=torch.rand(s) + 0.5)
                      for i, s in enumerate(SHAPES)}
    opt.load_state_dict(through_disk(saved))
    for i in range(len(SHAPES)):
        expected.tensors.steps[i].fill_(3.0)
        expected.tensors.exp_avg_sqs[i].copy_(saved["state"][i]["exp_avg_sq"])
    for _ in range(10):
        grads = [wide_grad(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
        expected.step(grads, hyper())
    for i, p in enumerate(params):
        assert opt.state[p]["step"].dtype == torch.float32 and float(opt.state[p]["step"]) == 13
        torch.testing.assert_close(p.detach().cpu(), expected.tensors.params[i])


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 2.5, 2.0**25])
def test_checkpoint_with_an_impossible_step_is_refused_at_load(path, value):
    params, opt = stepped(path)
    saved = through_disk(opt.state_dict())
    saved["state"][1]["step"] = torch.tensor(value)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="the checkpoint's step of state 1 is"):
        opt.load_state_dict(saved)
    assert_unchanged(opt, params, before)


def test_a_step_count_assigned_mid_run_is_converted_or_refused(path):
    params, opt = stepped(path)
    opt.state[params[0]]["step"] = torch.tensor([5], dtype=torch.int64)
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 6 and opt.state[params[0]]["step"].dtype == torch.float32
    opt.state[params[2]]["step"] = 3  # a Python number, as torch-adopt's own checkpoints never hold
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert float(opt.state[params[2]]["step"]) == 4 and opt.state[params[2]]["step"].dtype == torch.float32
    opt.state[params[1]]["step"] = torch.tensor(-1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="a step count is -1.0"):
        opt.step()
    opt.state[params[1]]["step"] = before[5].clone()  # as it was (snapshot: p, step, m, v per param)
    assert_unchanged(opt, params, before)


def test_expanded_or_self_overlapping_params_are_refused(path):
    flags, device = path
    good = make_params([(6,)], device)[0]
    expanded = torch.nn.Parameter(torch.randn(1, device=device).expand(5))
    opt = ADOPT([good, expanded], **flags)
    good.grad, expanded.grad = torch.randn(6, device=device), torch.randn(5, device=device)
    refuses(opt, [good, expanded], RuntimeError, "parameter of parameter 1 .* share memory")


def test_a_state_tensor_that_overlaps_itself_is_refused(path):
    params, opt = stepped(path)
    opt.state[params[0]]["exp_avg"] = torch.zeros(1, device=params[0].device).expand(17)
    refuses(opt, params, RuntimeError, "exp_avg of parameter 0 .* share memory")


def test_the_same_parameter_twice_is_refused_naming_both():
    p, q = make_params([(3,), (4,)])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\] .* same tensor as "
                                         r"param_groups\[0\]\['params'\]\[0\]"):
        ADOPT([p, q, p])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] .* same tensor as "
                                         r"param_groups\[0\]\['params'\]\[0\]"):
        ADOPT([{"params": [p]}, {"params": [q, p]}])
    opt = ADOPT([p])
    with pytest.raises(ValueError, match="same tensor"):
        opt.add_param_group({"params": [q, p]})
    assert len(opt.param_groups) == 1


def test_params_sharing_memory_are_refused(path):
    flags, device = path
    base = torch.randn(10, device=device)
    first, second = torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])
    opt = ADOPT([first, second], **flags)
    first.grad, second.grad = torch.randn(6, device=device), torch.randn(6, device=device)
    refuses(opt, [first, second], RuntimeError, "parameters 0 and 1 of a param group share memory")


def clip_at_module_level(n):
    return n**0.3


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_copies_keep_every_option_and_step_exactly_like_the_original(kernel_device, copier):
    params = make_params(SHAPES, kernel_device, torch.bfloat16)
    opt = ADOPT(params, lr=1e-2, fused=True, state_dtype=torch.bfloat16, bf16_stochastic_round=True,
                stochastic_round_seed=11, clip_lambda=clip_at_module_level)
    for _ in range(3):
        for p in params:
            p.grad = wide_grad(p.shape, spread=1.0).to(torch.bfloat16).to(kernel_device)
        opt.step()
    if copier == "deepcopy":
        twin_params, twin = copy.deepcopy((params, opt))
    else:
        twin_params, twin = pickle.loads(pickle.dumps((params, opt)))
    for name in ("state_dtype", "bf16_stochastic_round", "stochastic_round_seed"):
        assert getattr(twin, name) == getattr(opt, name), name
    assert twin.clip_lambda is clip_at_module_level
    assert twin.state_dict()["param_groups"][0]["fused"] is None  # the portable-layout hook came along
    for _ in range(10):
        for p, q in zip(params, twin_params):
            p.grad = wide_grad(p.shape, spread=1.0).to(torch.bfloat16).to(kernel_device)
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], twin.state[q][key])


def test_pickled_optimizer_with_a_lambda_clip_refuses_to_step_until_given_one(path):
    params, opt = stepped(path, clip_lambda=lambda n: n**0.3)
    twin_params, twin = pickle.loads(pickle.dumps((params, opt)))
    for p in twin_params:
        p.grad = torch.randn_like(p)
    refuses(twin, twin_params, RuntimeError, "unpickled without its clip_lambda")
    twin.clip_lambda = lambda n: n**0.3
    twin.step()
    assert all(float(twin.state[p]["step"]) == 3 for p in twin_params)


@pytest.mark.parametrize("name,value", [("lr", 1e39), ("weight_decay", 1e39), ("eps", 1e39)])
def test_hyperparameters_beyond_float32_are_refused(path, name, value):
    flags, _ = path
    with pytest.raises(ValueError, match=f"Invalid {name}: 1e\\+39 \\(beyond float32"):
        ADOPT(make_params(SHAPES), **{name: value})
    params, opt = stepped(path, weight_decay=0.1)
    opt.param_groups[0][name] = value  # as a scheduler or a user could
    refuses(opt, params, ValueError, f"{name}=1e\\+39 is beyond the float32 range")


def test_lr_times_weight_decay_beyond_float32_is_refused(path):
    params, opt = stepped(path, weight_decay=0.1, decouple=True)
    opt.param_groups[0].update(lr=1e20, weight_decay=1e20)
    refuses(opt, params, ValueError, "lr \\* weight_decay=1e\\+40 is beyond the float32 range")


def test_a_param_whose_dtype_no_longer_matches_its_state_is_refused(path):
    """The param turned float64 after its float32 state existed: torch-adopt
    fails inside ATen after updating other params; ours refuses first."""
    params, opt = stepped(path)
    params[1].data = params[1].data.double()
    params[1].grad = torch.randn_like(params[1])
    refuses(opt, params, RuntimeError, "parameter 1|float64")


def test_beta1_zero_is_bit_exact_except_the_sign_of_a_zero_exp_avg(kernel_device):
    """With beta1 = 0 exp_avg is the clipped update itself. Where that is an
    exact zero (a zero gradient), ATen's own lerp gives +0.0 or -0.0
    depending on whether an element falls in its vectorised or scalar loop;
    the kernel always takes the vectorised formula. Every other bit agrees."""
    params = make_params([(4099,), (13,)], kernel_device)
    expected = ReferenceRun(params)
    opt = ADOPT(params, lr=1e-2, betas=(0.0, 0.9999), fused=True)
    for step in range(12):
        grads = [wide_grad(p.shape) for p in params]
        for g in grads:
            g[torch.randperm(g.numel())[: g.numel() // 4]] = 0.0
        for p, g in zip(params, grads):
            p.grad = g.to(kernel_device)
        opt.step()
        expected.step(grads, hyper(betas=(0.0, 0.9999)))
    for i, p in enumerate(params):
        ours, ref = opt.state[p]["exp_avg"].cpu(), expected.tensors.exp_avgs[i]
        assert torch.equal(ours, ref)  # == treats -0.0 and +0.0 as equal
        assert torch.equal(ours.abs(), ref.abs())
        torch.testing.assert_close(p.detach().cpu(), expected.tensors.params[i], rtol=0, atol=0)
        assert torch.equal(opt.state[p]["exp_avg_sq"].cpu(), expected.tensors.exp_avg_sqs[i])


@pytest.mark.parametrize("bad,error", [
    (dict(lr="0.1"), TypeError), (dict(lr=None), TypeError), (dict(eps=None), TypeError),
    (dict(betas=0.9), ValueError), (dict(betas=(0.9, "a")), ValueError),
    (dict(lr=torch.tensor(1e39, dtype=torch.float64)), ValueError),
    (dict(lr=torch.tensor(1e20), weight_decay=1e20), ValueError),
], ids=["lr_str", "lr_none", "eps_none", "betas_float", "betas_str", "tensor_lr_1e39", "lr_times_wd"])
def test_a_bad_param_group_is_refused_whole(path, bad, error):
    """The error names the value, the optimizer keeps its groups as they
    were, and the same params can then be added correctly."""
    params, opt = stepped(path)
    flags, device = path
    extra = make_params([(9,)], device)
    with pytest.raises(error, match="Invalid"):
        opt.add_param_group(dict(params=extra, **bad))
    with pytest.raises(error, match="Invalid"):
        ADOPT(extra, **flags, **bad)
    assert len(opt.param_groups) == 1
    opt.add_param_group(dict(params=extra, lr=1e-2))
    extra[0].grad = torch.randn_like(extra[0])
    opt.step()
    assert float(opt.state[extra[0]]["step"]) == 1


def test_a_refused_load_changes_nothing():
    """torch refuses a checkpoint whose groups do not fit; the checkpoint's
    stochastic-rounding seed and state must not have been taken before."""
    source_params = make_params([(5000,), (7,)])
    source = ADOPT(source_params, state_dtype=torch.int8, stochastic_round_seed=777)
    for p in source_params:
        p.grad = torch.randn_like(p)
    source.step()
    checkpoint = source.state_dict()
    params = make_params([(5000,)])
    opt = ADOPT(params, state_dtype=torch.int8, stochastic_round_seed=1)
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="doesn't match the size"):
        opt.load_state_dict(checkpoint)
    assert opt.stochastic_round_seed == 1
    assert_unchanged(opt, params, before)
    fitting = ADOPT(make_params([(5000,), (7,)]), state_dtype=torch.int8, stochastic_round_seed=1)
    fitting.load_state_dict(checkpoint)
    assert fitting.stochastic_round_seed == 777


def test_a_clip_value_beyond_float32_clips_nothing_on_every_path(path):
    """The update clamps in float32, where 1e39 is inf: no clip, on every
    path, decided before any update (torch-adopt raises an overflow error
    from ATen after updating the groups before)."""
    runs = []
    for clip in (lambda n: 1e39, None):
        flags, device = path
        params = make_params(SHAPES, device, seed=3)
        opt = ADOPT(params[:1], clip_lambda=clip, **flags)
        opt.add_param_group(dict(params=params[1:]))
        gen = torch.Generator().manual_seed(8)
        for step in range(10):
            for i, p in enumerate(params):  # the first starts late: first and later steps in one step()
                p.grad = None if i == 0 and step < 3 else \
                    (torch.randn(p.shape, generator=gen) * 100).to(device)
            opt.step()
        runs.append(snapshot(opt, params))
    for index, (clipped, unclipped) in enumerate(zip(*runs)):
        assert_bitwise_equal(clipped, unclipped, f"item {index}")


@pytest.mark.parametrize("flags", [dict(fused=False, foreach=True), dict(fused=False, foreach=False)],
                         ids=["foreach", "single_tensor"])
def test_float64_params_clamp_a_custom_clip_in_float64(flags):
    """Only float32 math takes a clip value rounded to float32: float64
    params (eager paths) clamp with it as torch-adopt does, bit for bit."""
    params, theirs = make_params(SHAPES, dtype=torch.float64, seed=4), make_params(SHAPES, dtype=torch.float64, seed=4)
    ours = ADOPT(params, clip_lambda=lambda n: 0.1, **flags)
    reference = adopt.ADOPT(theirs, clip_lambda=lambda n: 0.1, foreach=False)
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        for p, q in zip(params, theirs):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            q.grad = p.grad.clone()
        ours.step()
        reference.step()
    for p, q in zip(params, theirs):
        assert_bitwise_equal(p, q, "param")


def test_a_gradient_whose_dtype_changed_under_data_is_refused(path):
    """``p.grad.data = `` a tensor of another dtype after the step was cached:
    refused (the kernel would read its bytes as the param's dtype)."""
    params, opt = stepped(path)
    params[0].grad.data = torch.ones(params[0].shape, dtype=torch.float16, device=params[0].device)
    refuses(opt, params, RuntimeError, "the grad of parameter 0 .*float16.* a gradient has its parameter's")
