"""bf16/fp16 parameters, bf16 optimizer state and stochastic rounding, all in
the one-pass kernel: rounding, accuracy against float32, unbiasedness,
reproducibility, training, checkpoints, bad input."""
import itertools
import warnings

import pytest
import torch
import triton
import triton.language as tl

from adopt_triton import ADOPT, quantize
from adopt_triton.kernels.adopt import _store
from harness import ReferenceRun, assert_bitwise_equal, hyper as make_hyper, through_disk, wide_grad

# The bf16-state warning is asserted once, in its own test.
pytestmark = pytest.mark.filterwarnings("ignore:state_dtype=torch.bfloat16 with beta2")
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATE_DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1,), (17,), (4099,), (5, 7, 9)]
# Largest |ours - float32 run| / (|float32 run| + 1) after 12 steps, by storage dtype: a few
# roundings of the dtype's unit (bf16: 2**-8, fp16: 2**-11), measured then doubled.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# The float32 state run as the baseline; bf16 state adds its own rounding.
STATE_TOLERANCE = {torch.float32: 0.0, torch.bfloat16: 3e-2}


def run(param_dtype, state_dtype, stochastic, device, *, seed=1, steps=12, hyper=None):
    """Our fused optimizer on params of `param_dtype` and a float32 reference
    run (fp32 params and state) from the same (rounded) start and gradients."""
    torch.manual_seed(seed)  # the start and the gradients
    start = [torch.randn(s).to(param_dtype) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone().to(device)) for t in start]
    hyper = hyper or dict(lr=1e-2, weight_decay=0.05, decouple=True)
    opt = ADOPT(params, fused=True, state_dtype=state_dtype, bf16_stochastic_round=stochastic,
                stochastic_round_seed=7, **hyper)
    expected = ReferenceRun([t.float() for t in start])
    for _ in range(steps):
        grads = [wide_grad(s, spread=1.0).to(param_dtype) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
        expected.step([g.float() for g in grads], make_hyper(**hyper))
    t = expected.tensors
    return params, opt, t.params, [t.exp_avgs, t.exp_avg_sqs, t.steps]


def relative_error(actual, expected):
    return float(((actual.detach().cpu().float() - expected).abs() / (expected.abs() + 1)).max())


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
def test_low_precision_against_a_float32_run(kernel_device, param_dtype, state_dtype, stochastic):
    params, opt, master, state = run(param_dtype, state_dtype, stochastic, kernel_device)
    bound = max(TOLERANCE[param_dtype], STATE_TOLERANCE[state_dtype])
    for p, m in zip(params, master):
        assert p.dtype == param_dtype and opt.state[p]["exp_avg"].dtype == state_dtype
        assert relative_error(p, m) <= bound, (param_dtype, state_dtype)
    for p, m, v in zip(params, state[0], state[1]):
        assert relative_error(opt.state[p]["exp_avg"], m) <= max(bound, 1e-6)
        assert relative_error(opt.state[p]["exp_avg_sq"], v) <= max(bound, 1e-6)


@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
def test_round_to_nearest_even_matches_torch_bit_for_bit(kernel_device, param_dtype, state_dtype):
    """Without stochastic rounding, every stored value is the float32 result
    rounded as tensor.to(dtype) rounds it: the eager reference (float32 math,
    then .copy_()) and the kernel agree bit for bit, NaN and Inf included."""
    gen = torch.Generator().manual_seed(2)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).to(param_dtype).to(kernel_device)) for s in SHAPES]
    eager = [torch.nn.Parameter(p.detach().cpu().clone()) for p in ours]
    opts = [ADOPT(ours, lr=1e-2, weight_decay=0.05, fused=True, state_dtype=state_dtype),
            ADOPT(eager, lr=1e-2, weight_decay=0.05, fused=False, foreach=False, state_dtype=state_dtype)]
    for step in range(12):
        for a, b in zip(ours, eager):
            grad = wide_grad(a.shape).to(param_dtype)
            if step == 6:
                grad.view(-1)[0] = float("nan") if a.numel() > 1 else float("inf")
            a.grad, b.grad = grad.to(kernel_device), grad.clone()
        for opt in opts:
            opt.step()
        for a, b in zip(ours, eager):
            assert_bitwise_equal(a, b, f"step {step} param")
            for key in ("exp_avg", "exp_avg_sq"):
                assert_bitwise_equal(opts[0].state[a][key], opts[1].state[b][key], f"step {step} {key}")


@triton.jit
def _stochastic_store_kernel(source_ptr, out_ptr, n, seed, BLOCK: tl.constexpr, STOCHASTIC: tl.constexpr = True):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    bits, _, _, _ = tl.philox(seed, offsets.to(tl.uint32), (offsets >> 32).to(tl.uint32),
                              tl.zeros_like(offsets).to(tl.uint32), tl.zeros_like(offsets).to(tl.uint32))
    _store(out_ptr + offsets, tl.load(source_ptr + offsets, mask=mask), mask, bits, STOCHASTIC)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_a_nan_of_any_payload_stores_as_the_canonical_bf16_nan(kernel_device, stochastic):
    """NaNs whose payload fills the mantissa (an fp16 NaN upcast is
    0x7FFFFFFF) must not carry into the sign when the rounding bits are
    added: kernel and reference store 0x7FC0 (c10's scalar conversion's NaN;
    ATen's vectorised CPU one stores 0xFFFF, also a NaN)."""
    payloads = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FBFFFFF]
    source = torch.tensor([p - 2**32 if p >= 2**31 else p for p in payloads] * 512,
                          dtype=torch.int32).view(torch.float32)
    out = torch.empty(source.numel(), dtype=torch.bfloat16, device=kernel_device)
    _stochastic_store_kernel[(1,)](source.to(kernel_device), out, source.numel(), 99, BLOCK=4096,
                                   STOCHASTIC=stochastic)
    random16 = torch.randint(0, 2**16, source.shape) if stochastic else None
    for stored in (out.cpu(), quantize.round_to_bf16(source, random16)):
        assert stored.view(torch.int16).eq(0x7FC0).all(), stored.view(torch.int16)[:len(payloads)]


@pytest.mark.parametrize("value", [1.0 + 2**-10, -3.0 - 5 * 2**-9, 7e-3 + 2**-17, 0.1])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(kernel_device, value):
    """The kernel's own store helper over N = 2**17 draws: each result is one
    of the two bf16 neighbours of x, and the mean is x within 5 standard errors
    (a draw is lo or hi, so its standard deviation is at most (hi - lo) / 2)."""
    n = 2**17
    source = torch.full((n,), value, dtype=torch.float32, device=kernel_device)
    out = torch.empty(n, dtype=torch.bfloat16, device=kernel_device)
    _stochastic_store_kernel[(triton.cdiv(n, 2**14),)](source, out, n, 1234, BLOCK=2**14)
    bits = torch.tensor(value, dtype=torch.float32).view(torch.int32) & ~0xFFFF
    toward_zero, away = bits.view(torch.float32), (bits + 0x10000).view(torch.float32)  # the neighbours
    values = out.float().cpu()
    assert bool(((values == toward_zero) | (values == away)).all())
    standard_error = float((away - toward_zero).abs()) / 2 / n**0.5
    assert abs(float(values.double().mean()) - value) <= 5 * standard_error
    assert 0 < float((values == away).double().mean()) < 1  # both neighbours occur


def test_stochastic_rounding_is_reproducible_from_its_seed(kernel_device):
    first, _, _, _ = run(torch.bfloat16, torch.bfloat16, True, kernel_device)
    again, _, _, _ = run(torch.bfloat16, torch.bfloat16, True, kernel_device)
    for a, b in zip(first, again):
        assert_bitwise_equal(a, b)
    torch.manual_seed(1)  # as run(): the same start and gradients, another seed
    params = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16).to(kernel_device)) for s in SHAPES]
    other = ADOPT(params, fused=True, lr=1e-2, weight_decay=0.05, decouple=True,
                  bf16_stochastic_round=True, stochastic_round_seed=8)
    for _ in range(12):
        for p in params:
            p.grad = wide_grad(p.shape, spread=1.0).to(torch.bfloat16).to(kernel_device)
        other.step()
    assert any(not torch.equal(a, b) for a, b in zip(first, params))  # another seed, other bits


def test_bf16_training_loss_stays_close_to_float32(kernel_device):
    """The digits MLP, 150 steps: bf16 params (fp32 state), bf16 params and
    state with stochastic rounding, and float32 reach nearly the same loss."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data[:512], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:512])
    losses = {}
    for name, dtype, options in (("fp32", torch.float32, {}), ("bf16", torch.bfloat16, {}),
                                 ("bf16_state_sr", torch.bfloat16,
                                  dict(state_dtype=torch.bfloat16, bf16_stochastic_round=True))):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        model = model.to(kernel_device, dtype)
        opt = ADOPT(model.parameters(), lr=3e-3, fused=True, **options)
        for step in range(150):
            batch = torch.arange(step * 32, step * 32 + 32) % 512
            loss = torch.nn.functional.cross_entropy(model(x[batch].to(kernel_device, dtype)).float(),
                                                     y[batch].to(kernel_device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[name] = float(torch.nn.functional.cross_entropy(
                model(x.to(kernel_device, dtype)).float(), y.to(kernel_device)))
    assert losses["fp32"] < 0.5  # it learned
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05, losses
    assert abs(losses["bf16_state_sr"] - losses["fp32"]) < 0.05, losses


@pytest.mark.parametrize("state_dtype,stochastic", list(itertools.product(STATE_DTYPES, [False, True])))
def test_state_dict_round_trip_in_every_state_dtype(kernel_device, state_dtype, stochastic):
    def make(params, seed=5):
        return ADOPT(params, lr=1e-2, fused=True, state_dtype=state_dtype, bf16_stochastic_round=stochastic,
                     stochastic_round_seed=seed)
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in SHAPES]
    grads = [[wide_grad(s, spread=1.0).to(torch.bfloat16) for s in SHAPES] for _ in range(12)]
    straight = [torch.nn.Parameter(t.clone().to(kernel_device)) for t in start]
    straight_opt = make(straight)
    resumed = [torch.nn.Parameter(t.clone().to(kernel_device)) for t in start]
    resumed_opt = make(resumed)
    for step, step_grads in enumerate(grads):
        if step == 6:  # checkpoint, rebuild from scratch (another seed: the checkpoint's wins), load
            checkpoint = through_disk({"params": [p.detach() for p in resumed], "opt": resumed_opt.state_dict()})
            resumed = [torch.nn.Parameter(t.clone()) for t in checkpoint["params"]]
            resumed_opt = make(resumed, seed=99)
            resumed_opt.load_state_dict(checkpoint["opt"])
        for params, opt in ((straight, straight_opt), (resumed, resumed_opt)):
            for p, g in zip(params, step_grads):
                p.grad = g.to(kernel_device)
            opt.step()
    for a, b in zip(straight, resumed):
        assert_bitwise_equal(a, b, "param")
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(straight_opt.state[a][key], resumed_opt.state[b][key], key)
            assert resumed_opt.state[b][key].dtype == (torch.float32 if key == "step" else state_dtype)


def test_checkpoint_state_converts_to_the_loading_optimizers_state_dtype(kernel_device):
    """Rule: exp_avg/exp_avg_sq take the loading optimizer's state dtype;
    float32 -> bf16 rounds to nearest even, bf16 -> float32 is exact."""
    params = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16).to(kernel_device)) for s in SHAPES]
    fp32_opt = ADOPT(params, fused=True)
    for _ in range(3):
        for p in params:
            p.grad = wide_grad(p.shape, spread=1.0).to(torch.bfloat16).to(kernel_device)
        fp32_opt.step()
    fp32_state = through_disk(fp32_opt.state_dict())
    bf16_opt = ADOPT(params, fused=True, state_dtype=torch.bfloat16)
    bf16_opt.load_state_dict(fp32_state)
    for index, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            converted = bf16_opt.state[p][key]
            assert converted.dtype == torch.bfloat16
            assert_bitwise_equal(converted.cpu(), fp32_state["state"][index][key].to(torch.bfloat16))
    back = ADOPT(params, fused=True)
    back.load_state_dict(through_disk(bf16_opt.state_dict()))
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert back.state[p][key].dtype == torch.float32
            assert_bitwise_equal(back.state[p][key], bf16_opt.state[p][key].float())


def test_bf16_state_with_a_beta2_near_one_warns_unless_stochastic():
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.warns(UserWarning, match="exp_avg_sq \\* beta2 rounds back"):
        ADOPT(params, state_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ADOPT(params, state_dtype=torch.bfloat16, betas=(0.9, 0.99))
        ADOPT(params, state_dtype=torch.bfloat16, bf16_stochastic_round=True, fused=True)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(state_dtype=torch.float16), ValueError, "Invalid state_dtype: torch.float16"),
    (dict(state_dtype=torch.bfloat16, params=lambda: [torch.randn(3, dtype=torch.complex64)]),
     ValueError, "state_dtype=torch.bfloat16 needs real parameters"),
])
def test_precision_options_reject_bad_combinations(kwargs, error, message):
    params = kwargs.pop("params", lambda: [torch.nn.Parameter(torch.randn(3).to(torch.bfloat16))])()
    with pytest.raises(error, match=message):
        ADOPT(params, **kwargs)
