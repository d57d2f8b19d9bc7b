"""8-bit state and master weights through the public optimizer: what the
state holds and weighs, which path runs, checkpoints (round trip, torch-adopt
and float32 checkpoints in, 8-bit checkpoints out), master weights against a
float32 run, and bad input."""
import adopt
import pytest
import torch

from adopt_triton import ADOPT, ADOPT8bit, quantize
from harness import assert_bitwise_equal, through_disk

# 4099 and 64 x 100 are quantised (>= 4096 elements), the others keep float32 state.
SHAPES = [(64, 100), (4099,), (17,), (5, 7, 9)]
QUANTIZED = [True, True, False, False]


def make_params(dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in SHAPES]


def gradients(steps, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=gen, dtype=torch.float64) *
              torch.exp(torch.randn(s, generator=gen, dtype=torch.float64))).to(dtype) for s in SHAPES]
            for _ in range(steps)]


def train(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.device)
        opt.step()


def assert_same_state(opt_a, params_a, opt_b, params_b, what=""):
    for index, (a, b) in enumerate(zip(params_a, params_b)):
        assert_bitwise_equal(a, b, f"{what} param {index}")
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys(), (sorted(sa), sorted(sb))
        for key in sa:
            assert_bitwise_equal(sa[key], sb[key], f"{what} param {index} {key}")


def test_8bit_state_holds_codes_and_block_maxima_in_2_13_bytes_per_element():
    params = make_params()
    opt = ADOPT8bit(params, lr=1e-2)
    assert opt.state_dtype == torch.int8 and isinstance(opt, ADOPT)
    train(opt, params, gradients(3))
    for p, quantized in zip(params, QUANTIZED):
        state = opt.state[p]
        if quantized:
            assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
                "step": (torch.float32, ()), "exp_avg": (torch.int8, p.shape), "exp_avg_sq": (torch.uint8, p.shape),
                "exp_avg_scale": (torch.float32, (quantize.n_blocks(p.numel()),)),
                "exp_avg_sq_scale": (torch.float32, (quantize.n_blocks(p.numel()),))}
            per_element = sum(v.nbytes for k, v in state.items() if k != "step") / p.numel()
            assert per_element <= 2.15, per_element
            assert (state["exp_avg_sq"] != 0).any() and (state["exp_avg"] != 0).any()
        else:  # the small-tensor rule
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
            assert "exp_avg_scale" not in state


def test_fused_kernel_equals_the_eager_reference_through_the_optimizer(kernel_device, launches):
    """The same optimizer on the kernel and (CPU, fused=None) on the
    reference: bit-identical params and state, one launch per dtype pair and
    step, none on the CPU default path (foreach=False: the float32-state
    tensors take the reference too, bit-exact; foreach is not). A transposed
    param checks that both quantise in the param's memory order."""
    grads = gradients(12)
    runs = []
    for device, fused in ((kernel_device, True), ("cpu", None)):
        params = make_params(device=device)
        params[0] = torch.nn.Parameter(params[0].detach().t().contiguous().t())  # memory order != logical
        opt = ADOPT8bit(params, lr=1e-2, weight_decay=0.01, decouple=True, fused=fused, foreach=False,
                        stochastic_round_seed=3)
        before = len(launches)
        train(opt, params, grads)
        runs.append((opt, params, len(launches) - before))
    (fused_opt, fused_params, fused_launches), (eager_opt, eager_params, eager_launches) = runs
    assert fused_launches == 2 * 12 and eager_launches == 0  # int8 and float32 state: two launches a step
    assert_same_state(fused_opt, fused_params, eager_opt, eager_params)


@pytest.mark.parametrize("options", [
    dict(state_dtype=torch.int8),
    dict(state_dtype=torch.int8, master_weight_bits=24, bf16_stochastic_round=True),
    dict(state_dtype=torch.bfloat16, master_weight_bits=32, bf16_stochastic_round=True),
], ids=["8bit", "8bit-master24-sr", "bf16-master32-sr"])
def test_checkpoint_round_trip_continues_identically(kernel_device, options):
    def make(params, seed=11):
        return ADOPT(params, lr=1e-2, fused=True, stochastic_round_seed=seed, **options)

    def resume(opt, params):
        checkpoint = through_disk({"params": [p.detach() for p in params], "opt": opt.state_dict()})
        resumed = [torch.nn.Parameter(t.clone()) for t in checkpoint["params"]]
        opt = make(resumed, seed=99)  # the checkpoint's seed wins
        opt.load_state_dict(checkpoint["opt"])
        return opt, resumed
    interrupted_run_equals_straight(make, param_dtype(options), kernel_device, resume)


def param_dtype(options):
    return torch.bfloat16 if "master_weight_bits" in options else torch.float32


def interrupted_run_equals_straight(make, dtype, device, interrupt):
    """``make(params)`` trained 12 steps straight, and again with
    ``interrupt(opt, params) -> (opt, params)`` after 6 of them: the same
    params and state, bit for bit."""
    grads = gradients(12, dtype)
    straight = make_params(dtype, device)
    straight_opt = make(straight)
    train(straight_opt, straight, grads)
    params = make_params(dtype, device)
    opt = make(params)
    train(opt, params, grads[:6])
    opt, params = interrupt(opt, params)
    train(opt, params, grads[6:])
    assert_same_state(opt, params, straight_opt, straight)


@pytest.mark.parametrize("source", ["torch_adopt", "ours"])
def test_float32_checkpoint_loads_into_8bit_state_quantised(source):
    params = make_params()
    opt = adopt.ADOPT(params, lr=1e-2) if source == "torch_adopt" else ADOPT(params, lr=1e-2)
    train(opt, params, gradients(5))
    checkpoint = through_disk(opt.state_dict())
    eight = ADOPT8bit(params, lr=1e-2)
    eight.load_state_dict(checkpoint)
    for index, (p, quantized) in enumerate(zip(params, QUANTIZED)):
        saved, state = checkpoint["state"][index], eight.state[p]
        if not quantized:
            assert_bitwise_equal(state["exp_avg"], saved["exp_avg"])
            continue
        codes, absmax = quantize.encode_exp_avg(saved["exp_avg"].reshape(-1))
        assert_bitwise_equal(state["exp_avg"].reshape(-1), codes)
        assert_bitwise_equal(state["exp_avg_scale"], absmax)
        codes = state["exp_avg_sq"].reshape(-1)
        root = quantize.decode_sqrt_exp_avg_sq(codes, state["exp_avg_sq_scale"])
        step = state["exp_avg_sq_scale"].repeat_interleave(quantize.QUANT_BLOCK)[:p.numel()] / 255
        error = (root - saved["exp_avg_sq"].reshape(-1).double().sqrt().float()).abs()
        # to nearest: half a step; a value below half a step keeps code 1 (one step)
        assert (error <= torch.where(codes == 1, step, step / 2) * 1.001).all()
    train(eight, params, gradients(5, seed=4))  # and training goes on
    assert all(p.isfinite().all() for p in params)


def test_8bit_checkpoint_loads_into_float32_state_decoded():
    params = make_params()
    eight = ADOPT8bit(params, lr=1e-2)
    train(eight, params, gradients(5))
    checkpoint = through_disk(eight.state_dict())
    plain = ADOPT(params, lr=1e-2)
    plain.load_state_dict(checkpoint)
    for index, (p, quantized) in enumerate(zip(params, QUANTIZED)):
        saved, state = checkpoint["state"][index], plain.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["exp_avg"].dtype == torch.float32
        if quantized:
            exp_avg = quantize.decode_exp_avg(saved["exp_avg"].reshape(-1), saved["exp_avg_scale"])
            root = quantize.decode_sqrt_exp_avg_sq(saved["exp_avg_sq"].reshape(-1), saved["exp_avg_sq_scale"])
            assert_bitwise_equal(state["exp_avg"].reshape(-1), exp_avg)
            assert_bitwise_equal(state["exp_avg_sq"].reshape(-1), root * root)
    train(plain, params, gradients(3, seed=5))
    assert all(p.isfinite().all() for p in params)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_32_bit_master_weights_train_exactly_as_float32_params(kernel_device, state_dtype):
    """bf16 params + a 16-bit remainder follow a float32-param run fed the
    same (bf16) gradients bit for bit: the master equals its param, every
    state tensor its state; the bf16 param is the master rounded to nearest."""
    start = [p.detach() for p in make_params(torch.bfloat16)]
    grads = gradients(12, torch.bfloat16)
    options = dict(lr=1e-2, weight_decay=0.02, fused=True, state_dtype=state_dtype, stochastic_round_seed=5,
                   bf16_stochastic_round=state_dtype == torch.bfloat16)
    bf16 = [torch.nn.Parameter(t.clone().to(kernel_device)) for t in start]
    bf16_opt = ADOPT(bf16, master_weight_bits=32, **options)
    fp32 = [torch.nn.Parameter(t.float().to(kernel_device)) for t in start]
    fp32_opt = ADOPT(fp32, **options)
    for step_grads in grads:
        train(bf16_opt, bf16, [step_grads])
        train(fp32_opt, fp32, [[g.float() for g in step_grads]])
        for a, b in zip(bf16, fp32):
            master = bf16_opt.master_weight(a)
            assert master.dtype == torch.float32
            assert_bitwise_equal(master, b.detach(), "master")
            assert ((a.float() - master).abs() <= master.abs() * 2.0**-8).all()  # half a bf16 unit
            for key, value in fp32_opt.state[b].items():
                assert_bitwise_equal(bf16_opt.state[a][key], value, key)
    assert bf16_opt.state[bf16[0]]["param_remainder"].dtype == torch.int16


def test_24_bit_master_weights_stay_within_their_rounding_of_a_float32_run(kernel_device):
    """With 8-bit state (the memory-saving combination): each step rounds the
    master to 16 significant bits once, so after 12 steps it is within 12
    half-units of the float32-param run's param, 100x closer than bf16 alone."""
    start = [p.detach() for p in make_params(torch.bfloat16)]
    grads = gradients(12, torch.bfloat16)
    runs = {}
    for name, dtype, bits in (("master24", torch.bfloat16, 24), ("plain", torch.bfloat16, None),
                              ("fp32", torch.float32, None)):
        params = [torch.nn.Parameter(t.to(dtype).to(kernel_device, copy=True)) for t in start]
        opt = ADOPT8bit(params, lr=1e-3, fused=True, master_weight_bits=bits, stochastic_round_seed=5)
        train(opt, params, [[g.to(dtype) for g in step] for step in grads])
        runs[name] = [opt.master_weight(p).cpu() for p in params]
    for index, (m24, plain, fp32) in enumerate(zip(runs["master24"], runs["plain"], runs["fp32"])):
        # m and v do not depend on p (no weight decay): the runs differ only by the roundings
        # of p, each at most half a unit of 16 significant bits (2**-16 |p|), |p| <= |p0| + 12 lr.
        bound = 12 * 2.0**-16 * (fp32.abs() + 12e-3)
        assert ((m24 - fp32).abs() <= bound).all(), index
        assert (m24 - fp32).abs().mean() < (plain - fp32).abs().mean() / 10, index  # bf16 alone: 8 bits


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(state_dtype=torch.int16), ValueError, r"Invalid state_dtype: torch.int16 \(supported: None, "
                                                r"torch.float32, torch.bfloat16, torch.int8"),
    (dict(state_dtype=torch.uint8), ValueError, "Invalid state_dtype: torch.uint8"),
    (dict(state_dtype=torch.int8, dtype=torch.complex64), ValueError, "state_dtype=torch.int8 needs real parameters"),
    (dict(state_dtype=torch.int8, dtype=torch.float64), ValueError, "takes float32, bf16 or fp16 parameters"),
    (dict(master_weight_bits=32), ValueError, "master_weight_bits=32 keeps the low bits of bf16 params"),
    (dict(master_weight_bits=24, dtype=torch.float16), ValueError, "master_weight_bits=24 .* torch.float16"),
    (dict(master_weight_bits=16, dtype=torch.bfloat16), ValueError, "Invalid master_weight_bits: 16"),
    (dict(state_dtype=torch.int8, differentiable=True), ValueError, "differentiable=True does not support"),
])
def test_bad_options_are_refused_clearly(kwargs, error, message):
    dtype = kwargs.pop("dtype", torch.float32)
    with pytest.raises(error, match=message):
        ADOPT([torch.nn.Parameter(torch.randn(3, 4).to(dtype))], **kwargs)


def test_fp16_params_take_8bit_state(kernel_device):
    """Documented behaviour: fp16 params work with 8-bit state like bf16
    params (float32 arithmetic, the param rounded to nearest when stored)."""
    params = [torch.nn.Parameter(torch.randn(4099).half().to(kernel_device))]
    opt = ADOPT8bit(params, lr=1e-2, fused=True)
    eager = [torch.nn.Parameter(params[0].detach().cpu().clone())]
    eager_opt = ADOPT8bit(eager, lr=1e-2, fused=False, stochastic_round_seed=opt.stochastic_round_seed)
    for step_grads in gradients(10, torch.float16):
        train(opt, params, [[step_grads[1]]])
        train(eager_opt, eager, [[step_grads[1]]])
    assert opt.state[params[0]]["exp_avg"].dtype == torch.int8
    assert_same_state(opt, params, eager_opt, eager)


def test_stochastic_rounding_runs_the_same_on_every_path(kernel_device):
    """bf16_stochastic_round on the eager path (the reference) draws the
    kernel's bits: the two runs are bit-identical."""
    runs = []
    for device, fused in ((kernel_device, True), ("cpu", False)):
        params = make_params(torch.bfloat16, device)
        opt = ADOPT(params, lr=1e-2, fused=fused, state_dtype=torch.bfloat16, bf16_stochastic_round=True,
                    stochastic_round_seed=21)
        train(opt, params, gradients(10, torch.bfloat16))
        runs.append((opt, params))
    assert_same_state(*runs[0], *runs[1])


def test_tiny_sqrt_v_beside_a_large_one_does_not_blow_up_the_update():
    """Unclipped ADOPT divides by the stored sqrt(v) itself. In a block where
    one element's gradient is 1e8 times the others', their sqrt(v) is far
    below one code step; code 1 (never 0) keeps their update below lr, where
    dividing by eps = 1e-10 would move them by lr * 1e6."""
    param = torch.nn.Parameter(torch.zeros(4096))
    opt = ADOPT8bit([param], lr=1e-3, eps=1e-10, clip_lambda=None)
    grad = torch.full((4096,), 1e-4)
    grad[::64] = 1e4
    for _ in range(10):
        param.grad = grad.clone()
        opt.step()
    codes = opt.state[param]["exp_avg_sq"]
    assert (codes[1:64] == 1).all() and (codes[::64] == 255).all()
    assert float(param.detach().abs().max()) <= 10 * 1e-3


def test_a_deep_copy_keeps_the_formats_and_steps_like_the_original():
    import copy
    params = make_params(torch.bfloat16)
    opt = ADOPT8bit(params, lr=1e-2, master_weight_bits=24)
    train(opt, params, gradients(3, torch.bfloat16))
    twin_params, twin = copy.deepcopy((params, opt))
    assert (twin.state_dtype, twin.master_weight_bits, twin.stochastic_round_seed) == \
        (torch.int8, 24, opt.stochastic_round_seed)
    more = gradients(3, torch.bfloat16, seed=8)
    train(opt, params, more)
    train(twin, twin_params, more)
    assert_same_state(opt, params, twin, twin_params)


def column_major(t):
    """The same values, the other memory order (as a channels_last model has)."""
    return t.detach().t().contiguous().t()


@pytest.mark.parametrize("change", ["param_data", "checkpoint"])
@pytest.mark.parametrize("options", [
    dict(state_dtype=torch.int8),
    dict(state_dtype=torch.int8, master_weight_bits=24, bf16_stochastic_round=True),
], ids=["8bit", "8bit-master24-sr"])
@pytest.mark.parametrize("path", ["kernel", "cpu_default", "eager"])
def test_a_param_whose_layout_changes_under_its_8bit_state_trains_on_identically(
        kernel_device, path, options, change):
    """8-bit blocks run over the codes' own memory order: a param that
    changes memory order mid-run (``p.data = ...``) or is resumed from a
    checkpoint made in the other order keeps reading its blocks right (the
    kernel stages the param instead), and the run equals an unchanged one."""
    device, fused = {"kernel": (kernel_device, True), "cpu_default": ("cpu", None), "eager": ("cpu", False)}[path]

    def make(params):
        return ADOPT(params, lr=1e-2, weight_decay=0.01, fused=fused, stochastic_round_seed=5, **options)

    def relayout(opt, params):
        if change == "param_data":
            params[0].data = column_major(params[0])
        else:
            checkpoint = through_disk(opt.state_dict())
            params = [torch.nn.Parameter(column_major(p) if i == 0 else p.detach().clone())
                      for i, p in enumerate(params)]
            opt = make(params)
            opt.load_state_dict(checkpoint)
        assert params[0].stride() != opt.state[params[0]]["exp_avg"].stride()
        return opt, params
    interrupted_run_equals_straight(make, param_dtype(options), device, relayout)


def test_8bit_codes_in_another_layout_than_their_param_decode_right():
    """An 8-bit checkpoint loaded into a float32-state optimizer whose param
    has the other memory order: the moments decode to the same values."""
    params = make_params()
    eight = ADOPT8bit(params, lr=1e-2)
    train(eight, params, gradients(5))
    checkpoint = through_disk(eight.state_dict())
    relaid = [torch.nn.Parameter(column_major(p) if i == 0 else p.detach().clone()) for i, p in enumerate(params)]
    plain, same = ADOPT(relaid, lr=1e-2), ADOPT([p.detach().clone() for p in params], lr=1e-2)
    plain.load_state_dict(checkpoint)
    same.load_state_dict(checkpoint)
    for key in ("exp_avg", "exp_avg_sq"):
        assert_bitwise_equal(plain.state[relaid[0]][key], same.state[same.param_groups[0]["params"][0]][key], key)
