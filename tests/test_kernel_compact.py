"""The fused kernel against the eager reference, bit for bit, for compact
storage: 8-bit state (int8 m codes, uint8 sqrt(v) codes, float32 block
maxima), master weights (bf16 param + int16/int8 remainder) and stochastic
rounding (Philox bits, the same on both sides).

Tolerance: 0 ulp and equal codes, for params, codes, block maxima,
remainders and float states, every step. The reference decodes, updates and
encodes with the kernel's float32 operations in the kernel's order, and
draws the kernel's random bits (``adopt_triton.quantize.philox``), so any
difference is a bug. Tensors of odd sizes (one element, part of a block,
several programs) share one launch, each with its own random stream.
"""
import itertools

import pytest
import torch

from adopt_triton import Scaling, Tensors, adopt, quantize
from adopt_triton.common import default_clip_lambda
from harness import assert_bitwise_equal, clone_tensors, hyper, wide_grad

STEPS = 12
SHAPES = [(1,), (17,), (4099,), (5, 7, 9)]
CLIPS = {"default_clip": default_clip_lambda, "custom_clip": lambda n: n**0.25, "no_clip": None}
FLAGS = list(itertools.product([False, True], [(0.0, False), (0.05, False), (0.05, True)], CLIPS))
FLAG_IDS = [f"max{m}-wd{d[0]}{'dec' if d[1] else ''}-{c}" for m, d, c in FLAGS]
# (param dtype, state dtype, remainder bits, stochastic); int8 state: 8-bit
FORMATS = {
    "fp32-8bit": (torch.float32, torch.int8, 0, False),
    "bf16-8bit-master24-sr": (torch.bfloat16, torch.int8, 24, True),
    "bf16-8bit-master32": (torch.bfloat16, torch.int8, 32, False),
    "bf16-8bit-sr": (torch.bfloat16, torch.int8, 0, True),
    "fp16-8bit": (torch.float16, torch.int8, 0, False),
    "bf16-fp32-master24": (torch.bfloat16, torch.float32, 24, False),
    "bf16-bf16-master32-sr": (torch.bfloat16, torch.bfloat16, 32, True),
    "bf16-bf16-sr": (torch.bfloat16, torch.bfloat16, 0, True),
}
COLUMNS = ("params", "exp_avgs", "exp_avg_sqs", "steps", "exp_avg_scales", "exp_avg_sq_scales", "remainders")


def compact_tensors(fmt, device, shapes=SHAPES) -> Tensors:
    param_dtype, state_dtype, bits, _ = FORMATS[fmt]
    params = [torch.randn(s, device=device).to(param_dtype) for s in shapes]
    quantized = state_dtype == torch.int8

    def zeros(dtype):
        return [torch.zeros_like(p, dtype=dtype) for p in params]
    scales = [torch.zeros(quantize.n_blocks(p.numel()), device=device) for p in params]
    return Tensors(params, [None] * len(params), zeros(torch.int8 if quantized else state_dtype),
                   zeros(torch.uint8 if quantized else state_dtype),
                   [torch.tensor(0.0, device=device) for _ in params],
                   scales if quantized else None, [s.clone() for s in scales] if quantized else None,
                   zeros(quantize.remainder_dtype(bits)) if bits else None)


def step_both(ours, theirs, grads, h, fmt, scaling=Scaling()):
    stochastic = FORMATS[fmt][3]
    adopt(ours._replace(grads=grads), h, fused=True, scaling=scaling, bf16_stochastic_round=stochastic,
          stochastic_round_seed=1234)
    cpu_scaling = Scaling(*(None if t is None else t.cpu() for t in scaling))
    adopt(theirs._replace(grads=[g.cpu() for g in grads]), h, fused=False, foreach=False,
          scaling=cpu_scaling, bf16_stochastic_round=stochastic, stochastic_round_seed=1234)


def assert_same(ours, theirs, what):
    for name in COLUMNS:
        if getattr(theirs, name) is None:
            continue
        for index, (a, b) in enumerate(zip(getattr(ours, name), getattr(theirs, name))):
            assert_bitwise_equal(a, b, f"{what} {name}[{index}]")


def run(kernel_device, fmt, make_hyper, grads_of=None, steps=STEPS, scaling=Scaling()):
    ours = compact_tensors(fmt, kernel_device)
    theirs = clone_tensors(ours, "cpu")
    dtype = FORMATS[fmt][0]
    for i in range(steps):
        grads = grads_of(i) if grads_of else [wide_grad(s, kernel_device).to(dtype) for s in SHAPES]
        step_both(ours, theirs, grads, make_hyper(i), fmt, scaling)
        assert_same(ours, theirs, f"step {i}")
    return ours


@pytest.mark.parametrize("fmt", ["fp32-8bit", "bf16-8bit-master24-sr"])
@pytest.mark.parametrize("maximize,decay,clip", FLAGS, ids=FLAG_IDS)
def test_every_flag_combination_bit_exact(kernel_device, fmt, maximize, decay, clip):
    ours = run(kernel_device, fmt, lambda i: hyper(lr=1e-2 * 0.8**i, clip_lambda=CLIPS[clip],
                                                   weight_decay=decay[0], decouple=decay[1], maximize=maximize))
    if FORMATS[fmt][1] == torch.int8:  # the codes carry information: not all zero, both signs
        assert all(int((c != 0).sum()) > 0 for c in ours.exp_avg_sqs)
        assert (ours.exp_avgs[2] < 0).any() and (ours.exp_avgs[2] > 0).any()


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f not in ("fp32-8bit", "bf16-8bit-master24-sr")])
def test_every_format_bit_exact(kernel_device, fmt):
    run(kernel_device, fmt, lambda i: hyper(lr=1e-2, weight_decay=0.05, decouple=i % 2 == 0))


@pytest.mark.parametrize("fmt", ["fp32-8bit", "bf16-8bit-master32"])
def test_grad_scaler_and_tensor_lr_bit_exact(kernel_device, fmt):
    """GradScaler's scale divided in registers, a tensor lr read on the device."""
    scaling = Scaling(torch.tensor(1024.0, device=kernel_device), torch.tensor(0.0, device=kernel_device))
    dtype = FORMATS[fmt][0]
    run(kernel_device, fmt, lambda i: hyper(lr=torch.tensor(1e-2 * 0.9**i, device=kernel_device)),
        grads_of=lambda i: [(1024 * wide_grad(s, kernel_device)).to(dtype) for s in SHAPES], scaling=scaling)


@pytest.mark.parametrize("betas", [(0.0, 0.5), (0.6, 0.999)], ids=str)
def test_both_lerp_formulas_bit_exact(kernel_device, betas):
    run(kernel_device, "bf16-8bit-master24-sr", lambda i: hyper(betas=betas, eps=1e-3))


def test_nan_and_inf_poison_their_block_as_in_the_reference(kernel_device):
    """A NaN or Inf reaching 8-bit state turns its 64-element block NaN (the
    block maximum is not finite, codes 0): the same in kernel and reference."""
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")])

    def grads_of(i):
        grads = [wide_grad(s) for s in SHAPES]
        if i == 5:
            grads[2][[0, 700, 4098]] = specials
        return [g.to(kernel_device) for g in grads]
    ours = run(kernel_device, "fp32-8bit", lambda i: hyper(eps=0.0 if i % 2 else 1e-6), grads_of=grads_of)
    param = ours.params[2].cpu()
    for start in (0, 640, 4096):  # the blocks that held a special value
        assert param[start:start + 3].isnan().all()
    assert param[64:640].isfinite().all()  # the others did not
    assert ours.exp_avg_sq_scales[2].cpu().isnan().any()


def test_several_programs_and_a_partial_last_block(kernel_device):
    """Full blocks (the unmasked, vectorised path) and a masked tail."""
    from adopt_triton.kernels.adopt import settings
    shapes = [(2 * settings().block_size + 65,), (settings().block_size,)]
    ours = compact_tensors("bf16-8bit-master24-sr", kernel_device, shapes)
    theirs = clone_tensors(ours, "cpu")
    for i in range(STEPS):
        grads = [wide_grad(s, kernel_device).to(torch.bfloat16) for s in shapes]
        step_both(ours, theirs, grads, hyper(), "bf16-8bit-master24-sr")
        assert_same(ours, theirs, f"step {i}")
