"""The compact formats of adopt_triton.quantize on their own: Philox equal to
Triton's, 8-bit codes within their step, stochastic rounding unbiased (and
why it is needed: round-to-nearest freezes v), no nonzero sqrt(v) decoded as
zero, non-finite blocks, master weights split and joined exactly."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from adopt_triton import quantize
from harness import assert_bitwise_equal, wide_grad


@triton.jit
def _philox_kernel(out_ptr, seed, key, step, start, N: tl.constexpr):
    offsets = start + tl.arange(0, N).to(tl.int64)
    zero = tl.zeros_like(offsets).to(tl.uint32)
    words = tl.philox(seed, offsets.to(tl.uint32), (offsets >> 32).to(tl.uint32), zero + key, zero + step)
    for i in tl.static_range(4):
        tl.store(out_ptr + i * N + tl.arange(0, N), words[i])


@pytest.mark.parametrize("start", [0, 2**32 - 37], ids=["low", "across_2**32"])
def test_philox_in_torch_equals_triton(kernel_device, start):
    n = 256
    out = torch.empty(4 * n, dtype=torch.int32, device=kernel_device)
    seed, key, step = int(torch.randint(2**31 - 1, ())), 91, 123457
    _philox_kernel[(1,)](out, seed, key, step, start, N=n)
    index = torch.arange(start, start + n, dtype=torch.int64)
    expected = torch.cat(quantize.philox(seed, index, index >> 32, key, step))
    assert torch.equal(out.cpu().to(torch.int64) & 0xFFFFFFFF, expected)


def blocks_of(values):
    """Random magnitudes spanning decades, blocks with a few large values."""
    return values.reshape(-1, quantize.QUANT_BLOCK)


def test_sqrt_v_codes_use_a_correctly_rounded_inverse_scale():
    """code = floor(f32(f32(root * f32(255 / max)) + fraction)), each step
    rounded once, as the kernel computes it (div_rn): numpy's float32 ops
    as the oracle. ``255 / tensor`` in torch is a reciprocal times 255, two
    roundings, which moved a code by one where the sum lands on an integer."""
    gen = torch.Generator().manual_seed(11)
    root = (torch.rand(64 * 4000, generator=gen) * torch.exp(torch.randn(64 * 4000, generator=gen))).float()
    random16 = torch.randint(0, 2**16, root.shape, generator=gen)
    codes, absmax = quantize.encode_sqrt_exp_avg_sq(root, random16)
    inverse = np.float32(255) / absmax.numpy().astype(np.float32)
    scaled = root.numpy().reshape(-1, 64) * inverse[:, None]
    total = scaled + (random16.numpy() & 0xFFFF).astype(np.float32).reshape(-1, 64) * np.float32(2.0**-16)
    expected = np.minimum(np.floor(total), 255)
    expected = np.where((expected == 0) & (root.numpy().reshape(-1, 64) > 0), 1, expected)
    assert (codes.numpy().reshape(-1, 64) == expected.astype(np.uint8)).all()


def test_exp_avg_codes_round_to_nearest_within_half_a_code():
    """m = absmax * (c / 127)**2 * sign: the code c is within half a step of
    z = 127 * sqrt(|m| / absmax)."""
    exp_avg = wide_grad((64 * 50 + 13,), spread=1.5)
    codes, absmax = quantize.encode_exp_avg(exp_avg)
    decoded = quantize.decode_exp_avg(codes, absmax)
    per_element = absmax.repeat_interleave(quantize.QUANT_BLOCK)[:exp_avg.numel()]
    z = (exp_avg.abs() / per_element).sqrt() * 127  # |c - z| <= 1/2, so |c**2 - z**2| <= z + 1/4
    bound = (z + 0.25) / 127**2 * per_element * (1 + 1e-5)
    assert ((decoded - exp_avg).abs() <= bound).all()
    assert torch.equal(decoded.sign(), exp_avg.sign() * (codes != 0))
    # the block maximum itself is kept to float32 rounding
    top = blocks_of(exp_avg[:3200].abs()).argmax(1) + torch.arange(50) * 64
    torch.testing.assert_close(decoded[top].abs(), exp_avg[top].abs(), rtol=2**-22, atol=0)


def test_stochastic_sqrt_codes_are_unbiased():
    """Rounded 4096 times with fresh bits, a block's mean decoded sqrt(v) is
    its value within 5 standard errors; each draw is a neighbouring code."""
    root = torch.rand(64) * 3 + torch.linspace(0.0, 1.0, 64)  # block maximum kept fixed below
    root[0] = 4.5
    draws = []
    for i in range(4096):
        words = quantize.random_words(7, 0, i, 64, "cpu", per_element=False)
        codes, absmax = quantize.encode_sqrt_exp_avg_sq(root, words & 0xFFFF)
        draws.append(quantize.decode_sqrt_exp_avg_sq(codes, absmax))
    draws = torch.stack(draws)
    step = float(absmax[0]) / 255
    assert ((draws - root).abs() <= step * (1 + 1e-5)).all()
    assert ((draws.mean(0) - root).abs() <= 5 * step / 2 / 4096**0.5 + 1e-7).all()


def test_round_to_nearest_freezes_v_and_stochastic_rounding_does_not():
    """The beta2 = 0.9999 trap: v decaying by 1e-4 per step never leaves its
    code when rounded to nearest; stochastic rounding follows it (within 2%
    after 3000 steps), next to a larger value that fixes the block maximum."""
    beta2, steps = 0.9999, 3000
    nearest = stochastic = torch.tensor([1.0] + [0.3] * 63).sqrt()
    first = None
    for step in range(steps):
        for kind in ("nearest", "stochastic"):
            root = nearest if kind == "nearest" else stochastic
            v = (root * root) * beta2
            v[0] = 1.0  # a neighbour holding the block maximum still
            bits = None if kind == "nearest" else \
                quantize.random_words(3, 0, step, 64, "cpu", per_element=False) & 0xFFFF
            codes, absmax = quantize.encode_sqrt_exp_avg_sq(v.double().sqrt().float(), bits)
            decoded = quantize.decode_sqrt_exp_avg_sq(codes, absmax)
            if kind == "nearest":
                nearest = decoded
                first = decoded if first is None else first
            else:
                stochastic = decoded
    expected = (0.3 * beta2**steps) ** 0.5
    assert torch.equal(nearest, first)  # frozen where it was first rounded
    assert float(((stochastic[1:].mean() - expected) / expected).abs()) < 0.02


def test_a_nonzero_sqrt_v_never_decodes_to_zero():
    """A value far below its block's step keeps code 1 (decoding to a larger
    denominator, never 0, which would make the update g / eps)."""
    root = torch.zeros(64)
    root[0], root[1], root[2] = 1e3, 1e-9, 0.0
    for bits in (None, torch.zeros(64, dtype=torch.int64)):
        codes, absmax = quantize.encode_sqrt_exp_avg_sq(root, bits)
        decoded = quantize.decode_sqrt_exp_avg_sq(codes, absmax)
        assert decoded[1] > 0 and decoded[2] == 0 and codes[1] == 1


def test_non_finite_blocks_decode_as_nan_and_zero_blocks_as_zero():
    values = torch.randn(64 * 3)
    values[70] = float("inf")
    values[150] = float("nan")
    values[:64] = 0.0
    codes, absmax = quantize.encode_exp_avg(values)
    decoded = quantize.decode_exp_avg(codes, absmax)
    assert (decoded[:64] == 0).all() and decoded[64:].isnan().all()
    codes, absmax = quantize.encode_sqrt_exp_avg_sq(values.abs())
    assert quantize.decode_sqrt_exp_avg_sq(codes, absmax)[64:].isnan().all()


def special_floats():
    values = torch.randn(10000) * torch.exp(torch.randn(10000) * 20).clamp(max=1e30)
    return torch.cat([values, torch.tensor([0.0, -0.0, 1e-45, -3e-39, 3.3e38, -3.3e38,
                                            float("inf"), -float("inf")])])


def test_master_weight_of_32_bits_is_exact_and_its_param_the_nearest_bf16():
    master = special_floats()
    param, remainder = quantize.split_master(master, 32)
    assert param.dtype == torch.bfloat16 and remainder.dtype == torch.int16
    assert_bitwise_equal(quantize.join_master(param, remainder), master)
    finite = master.abs() < 3e38
    error = (param.double() - master.double()).abs()[finite]
    ulp = (param.double().abs() * 2.0**-7).clamp(min=2.0**-133)[finite]  # one bf16 unit (an upper bound)
    assert (error <= ulp / 2 * (1 + 1e-9)).all()
    nan_param, nan_remainder = quantize.split_master(torch.tensor([float("nan")]), 32)
    assert nan_param.isnan().all() and nan_remainder.item() == 0


def test_master_weight_of_24_bits_rounds_to_nearest_even_then_splits():
    master = special_floats()
    param, remainder = quantize.split_master(master, 24)
    assert remainder.dtype == torch.int8
    joined = quantize.join_master(param, remainder)
    # to nearest even at 16 significant bits: compare with float64 arithmetic on the bit patterns
    bits = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low, high = bits & 0xFF, bits >> 8
    up = (low > 0x80) | ((low == 0x80) & (high & 1 == 1))
    expected = ((high + up.long()) << 8) & 0xFFFFFFFF
    expected = torch.where(expected >= 2**31, expected - 2**32, expected).to(torch.int32).view(torch.float32)
    assert_bitwise_equal(joined, expected)


def test_remainder_below_converts_widths_without_moving_the_param():
    master = torch.randn(4096) * 3
    param, remainder32 = quantize.split_master(master, 32)
    remainder24 = quantize.remainder_below(param, master, 24)
    joined = quantize.join_master(param, remainder24)
    assert ((joined - master).abs() <= master.abs() * 2.0**-15).all()  # a 24-bit unit, or two at the clamp
    back = quantize.remainder_below(param, joined, 32)
    assert_bitwise_equal(quantize.join_master(param, back), joined)
