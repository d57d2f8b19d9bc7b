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

from adopt_triton import Tensors, adopt, reference
from adopt_triton.common import default_clip_lambda
from harness import SIZES, assert_bitwise_equal, clone_tensors, hyper, wide_grad

STEPS = 12
CLIPS = {"default_clip": default_clip_lambda,  # computed in the kernel
         "custom_clip": lambda n: n**0.25,     # evaluated by the host, one value per tensor
         "no_clip": None}
FLAG_COMBINATIONS = list(itertools.product(
    [False, True],                                    # maximize
    [(0.0, False), (0.05, False), (0.05, True)],      # weight_decay, decouple
    CLIPS,                                            # clip
))


def make_state(shape, device):
    param = torch.randn(shape, device=device)
    return Tensors([param], [None], [torch.zeros_like(param)], [torch.zeros_like(param)],
                   [torch.tensor(0.0, device=device)])


def cpu_copy(state):
    return clone_tensors(state, "cpu")


def step_both(kernel_state, ref_state, grad, h):
    """One step of the kernel on its device and of the reference on CPU copies."""
    adopt(kernel_state._replace(grads=[grad]), h, fused=True)
    reference.adopt(ref_state._replace(grads=[grad.cpu()]), h)


def assert_states_equal(kernel_state, ref_state, what):
    for name, i in (("param", 0), ("exp_avg", 2), ("exp_avg_sq", 3), ("step", 4)):
        assert_bitwise_equal(kernel_state[i][0], ref_state[i][0], f"{what} {name}")


@pytest.mark.parametrize("shape", SIZES, ids=str)
@pytest.mark.parametrize("maximize,decay,clip_lambda", FLAG_COMBINATIONS,
                         ids=[f"max{m}-wd{d[0]}{'dec' if d[1] else ''}-{c}"
                              for m, d, c in FLAG_COMBINATIONS])
def test_kernel_matches_reference_bitwise(kernel_device, shape, maximize, decay, clip_lambda):
    clip_lambda = CLIPS[clip_lambda]
    state = make_state(shape, kernel_device)
    ref = cpu_copy(state)
    weight_decay, decouple = decay
    for i in range(STEPS):
        # A changing lr and an evolving clip value: runtime arguments, every step.
        h = hyper(lr=1e-2 * 0.8**i, clip_lambda=clip_lambda, weight_decay=weight_decay,
                  decouple=decouple, maximize=maximize)
        step_both(state, ref, wide_grad(shape, kernel_device), h)
        assert_states_equal(state, ref, f"step {i}")


@pytest.mark.parametrize("betas", [(0.0, 0.5), (0.45, 0.1), (0.6, 0.999), (0.99, 0.9999)], ids=str)
def test_kernel_matches_reference_for_betas(kernel_device, betas):
    """Both branches of torch.lerp's formula (weight 1 - beta1 below and above 0.5)."""
    state = make_state((4099,), kernel_device)
    ref = cpu_copy(state)
    for i in range(STEPS):
        step_both(state, ref, wide_grad((4099,), kernel_device), hyper(betas=betas, eps=1e-3))
        assert_states_equal(state, ref, f"step {i}")


def test_first_step_writes_only_exp_avg_sq(kernel_device):
    param = torch.randn(4099, device=kernel_device)
    exp_avg = torch.randn(4099, device=kernel_device)  # not zeros: any write would show
    exp_avg_sq = torch.randn(4099, device=kernel_device)
    p0, m0 = param.clone(), exp_avg.clone()
    grad = wide_grad((4099,), kernel_device)
    adopt(Tensors([param], [grad], [exp_avg], [exp_avg_sq], [torch.tensor(0.0, device=kernel_device)]),
          hyper(weight_decay=0.1), fused=True)  # coupled decay reads p on the first step
    assert_bitwise_equal(param, p0, "param")
    assert_bitwise_equal(exp_avg, m0, "exp_avg")
    g = grad.cpu().add(p0.cpu(), alpha=0.1)
    assert_bitwise_equal(exp_avg_sq, g * g, "exp_avg_sq")


@pytest.mark.parametrize("clip_lambda", [default_clip_lambda, None], ids=["clip", "noclip"])
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
        step_both(state, ref, grad.to(kernel_device), h)
        assert_states_equal(state, ref, f"step {i}")
    assert state.params[0].isnan().any() and state.exp_avg_sqs[0].isinf().any()  # the specials reached the state


def test_large_and_odd_sizes_cover_several_programs(kernel_device):
    """A size that is not a multiple of the block and spans several programs."""
    from adopt_triton.kernels.adopt import settings
    shape = (2 * settings().block_size + 3,)
    state = make_state(shape, kernel_device)
    ref = cpu_copy(state)
    for i in range(3):
        step_both(state, ref, wide_grad(shape, kernel_device), hyper())
        assert_states_equal(state, ref, f"step {i}")


def test_direct_launch_passes_every_argument_where_the_jit_would(monkeypatch):
    """On CUDA, launches after the first call the compiled kernel directly
    with every argument positionally; here a stand-in records both calls:
    each of the kernel's parameters gets the same value both ways."""
    from adopt_triton.kernels import adopt as kernel
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("direct", grid, args, {}))

    class Jit:
        arg_names = kernel._adopt_kernel.arg_names

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("jit", grid, args, kwargs)) or Compiled()
    monkeypatch.setattr(kernel, "_adopt_kernel", Jit())
    monkeypatch.setattr(kernel, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(kernel, "_COMPILED", {})
    state = make_state((5000,), "cpu")
    state = state._replace(grads=[torch.randn(5000)])
    for _ in range(2):
        adopt(state, hyper(weight_decay=0.1), fused=True)
    (_, jit_grid, jit_args, jit_kwargs), (_, grid, args, _) = calls
    names = kernel._adopt_kernel.arg_names
    by_jit = dict(zip(names, jit_args), **{k: v for k, v in jit_kwargs.items() if k in names})
    by_direct = dict(zip(names, args))
    assert len(args) == len(names) and by_jit.keys() == by_direct.keys()
    for name in names:
        a, b = by_jit[name], by_direct[name]
        assert (a is b) or (torch.is_tensor(a) and torch.equal(a, b)) or a == b, name
    assert grid[0] == jit_grid[0] and jit_kwargs["num_warps"] == kernel.settings().num_warps
    f32 = kernel.f32  # every runtime argument where the kernel expects it, by name
    expected = dict(neg_lr=f32(-1e-2), weight_decay=f32(0.1), neg_lr_weight_decay=f32(-1e-3),
                    lerp_coeff=f32(0.1), beta2=f32(0.9999), one_minus_beta2=f32(1 - 0.9999),
                    eps=f32(1e-6), seed=0, lr_ptr=None, clip_ptr=None, grad_scale_ptr=None,
                    found_inf_ptr=None, WEIGHT_DECAY=kernel.COUPLED_WEIGHT_DECAY, CLIP=kernel.DEFAULT_CLIP,
                    MAXIMIZE=False, STOCHASTIC=False, BLOCK_SIZE=kernel.settings().block_size)
    for name, value in expected.items():
        assert by_direct[name] == value, name
    assert by_direct["meta_ptr"].dtype == torch.int64 and by_direct["block_tensor_ptr"].dtype == torch.int32


def test_tables_flag_a_row_aligned_only_when_every_operand_is():
    """The ALIGNED column lets the compiled kernel use 16-byte vector
    accesses: one misaligned operand (p, g, m, v or the remainder) clears
    it, and new gradient addresses recompute it."""
    from adopt_triton.kernels import adopt as kernel
    aligned = [4096 * (i + 1) for i in range(8)]  # p, g, m, v, step, scales, remainder
    rows = [list(aligned) for _ in range(7)]
    for row, column in enumerate([0, 1, 2, 3, 7]):  # rows 0-4: one operand 8 bytes off
        rows[row][column] += 8
    rows[5][4] += 4  # the step count and block maxima are read as scalars: no matter
    rows[6][5] += 4
    tables = kernel.make_tables([100] * 7, rows, torch.device("cpu"))
    flags = tables.meta_host[:, kernel.META_ALIGNED.value].tolist()
    assert flags == [0, 0, 0, 0, 0, 1, 1]
    moved = kernel.with_grad_addresses(tables, torch.tensor([0, 1, 5]), [4096, 4096, 4104])
    assert moved.meta_host[:, kernel.META_ALIGNED.value].tolist() == [0, 1, 0, 0, 0, 0, 1]
    assert moved.meta_host[:, kernel.META_GRAD.value].tolist()[:2] == [4096, 4096]
    assert tables.meta_host[:, kernel.META_ALIGNED.value].tolist() == flags  # the old tables untouched
