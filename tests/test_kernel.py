"""The fused kernel against the eager reference, bit for bit.

Tolerance, per tensor (params, exp_avg, exp_avg_sq): 0 ulp. The kernel
evaluates the reference's float32 operations in the same order with the same
fused multiply-adds and correctly rounded sqrt/div, on the interpreter (CPU)
and compiled (CUDA, sqrt_rn/div_rn), so any difference is a bug. The
reference always runs on CPU copies, where its rounding is defined.
"""
import itertools

import pytest
import torch

from adopt_triton import dispatch, reference
from harness import SIZES, assert_bitwise_equal, wide_grad

STEPS = 12
FLAG_COMBINATIONS = list(itertools.product(
    [False, True],                                    # maximize
    [(0.0, False), (0.05, False), (0.05, True)],      # weight_decay, decouple
    [lambda n: n**0.25, None],                        # clip on / off
))


def make_state(shape, device):
    param = torch.randn(shape, device=device)
    return [param, torch.zeros_like(param), torch.zeros_like(param), torch.tensor(0.0)]


def cpu_copy(state):
    return [t.detach().cpu().clone() for t in state]


def step_both(kernel_state, ref_state, grad, **hyper):
    """One step of the kernel on its device and of the reference on CPU copies."""
    param, exp_avg, exp_avg_sq, step = kernel_state
    dispatch.adopt([param], [grad], [exp_avg], [exp_avg_sq], [step], fused=True, **hyper)
    p, m, v, n = ref_state
    reference.adopt([p], [grad.cpu()], [m], [v], [n], **hyper)


def assert_states_equal(kernel_state, ref_state, what):
    for name, actual, expected in zip(("param", "exp_avg", "exp_avg_sq", "step"), kernel_state, ref_state):
        assert_bitwise_equal(actual, expected, f"{what} {name}")


def hyper(lr=1e-2, betas=(0.9, 0.9999), eps=1e-6, clip_lambda=lambda n: n**0.25,
          weight_decay=0.0, decouple=False, maximize=False):
    return dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, clip_lambda=clip_lambda,
                weight_decay=weight_decay, decouple=decouple, maximize=maximize)


@pytest.mark.parametrize("shape", SIZES, ids=str)
@pytest.mark.parametrize("maximize,decay,clip_lambda", FLAG_COMBINATIONS,
                         ids=[f"max{m}-wd{d[0]}{'dec' if d[1] else ''}-clip{c is not None}"
                              for m, d, c in FLAG_COMBINATIONS])
def test_kernel_matches_reference_bitwise(kernel_device, shape, maximize, decay, clip_lambda):
    state = make_state(shape, kernel_device)
    ref = cpu_copy(state)
    weight_decay, decouple = decay
    for i in range(STEPS):
        # A changing lr and an evolving clip value: runtime arguments, every step.
        h = hyper(lr=1e-2 * 0.8**i, clip_lambda=clip_lambda, weight_decay=weight_decay,
                  decouple=decouple, maximize=maximize)
        step_both(state, ref, wide_grad(shape, kernel_device), **h)
        assert_states_equal(state, ref, f"step {i}")


@pytest.mark.parametrize("betas", [(0.0, 0.5), (0.45, 0.1), (0.6, 0.999), (0.99, 0.9999)], ids=str)
def test_kernel_matches_reference_for_betas(kernel_device, betas):
    """Both branches of torch.lerp's formula (weight 1 - beta1 below and above 0.5)."""
    state = make_state((4099,), kernel_device)
    ref = cpu_copy(state)
    for i in range(STEPS):
        step_both(state, ref, wide_grad((4099,), kernel_device), **hyper(betas=betas, eps=1e-3))
        assert_states_equal(state, ref, f"step {i}")


def test_first_step_writes_only_exp_avg_sq(kernel_device):
    param = torch.randn(4099, device=kernel_device)
    exp_avg = torch.randn(4099, device=kernel_device)  # not zeros: any write would show
    exp_avg_sq = torch.randn(4099, device=kernel_device)
    p0, m0 = param.clone(), exp_avg.clone()
    grad = wide_grad((4099,), kernel_device)
    dispatch.adopt([param], [grad], [exp_avg], [exp_avg_sq], [torch.tensor(0.0)], fused=True,
                   **hyper(weight_decay=0.1))  # coupled decay reads p on the first step
    assert_bitwise_equal(param, p0, "param")
    assert_bitwise_equal(exp_avg, m0, "exp_avg")
    g = grad.cpu().add(p0.cpu(), alpha=0.1)
    assert_bitwise_equal(exp_avg_sq, g * g, "exp_avg_sq")


@pytest.mark.parametrize("clip_lambda", [lambda n: n**0.25, None], ids=["clip", "noclip"])
@pytest.mark.parametrize("maximize", [False, True])
def test_nan_and_inf_gradients_propagate_like_the_reference(kernel_device, clip_lambda, maximize):
    shape = (4099,)
    state = make_state(shape, kernel_device)
    ref = cpu_copy(state)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    for i in range(STEPS):
        grad = wide_grad(shape)
        where = torch.randint(0, shape[0], (40,))
        grad[where] = specials[torch.randint(0, len(specials), (40,))]
        h = hyper(clip_lambda=clip_lambda, maximize=maximize, weight_decay=0.01, eps=0.0 if i % 2 else 1e-6)
        step_both(state, ref, grad.to(kernel_device), **h)
        assert_states_equal(state, ref, f"step {i}")
    assert state[0].isnan().any() and state[2].isinf().any()  # the specials did reach the state


def test_large_and_odd_sizes_cover_several_programs(kernel_device):
    """A size that is not a multiple of the block and spans several programs."""
    from adopt_triton.kernels.adopt import BLOCK_SIZE
    shape = (2 * BLOCK_SIZE + 3,)
    state = make_state(shape, kernel_device)
    ref = cpu_copy(state)
    for i in range(3):
        step_both(state, ref, wide_grad(shape, kernel_device), **hyper())
        assert_states_equal(state, ref, f"step {i}")
