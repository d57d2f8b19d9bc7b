"""Property-based runs (hypothesis): drawn shapes (0, 1, odd, multi-dim),
layouts (transposed, channels_last, sliced), dtypes, flags,
hyper-parameters, param groups, late and missing gradients, NaN/Inf
sprinkles and hostile events, on every path. Each run must equal its
oracle after every step (the fused kernel: the single-tensor reference bit
for bit; foreach: the reference within tolerance; the single-tensor path:
torch-adopt within tolerance), and every hostile event must raise with
nothing changed.

CI runs a fixed, derandomised profile; ``HYPOTHESIS_PROFILE=long`` runs
many more examples by hand."""
import math
import os

import adopt
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from adopt_triton import ADOPT
from harness import assert_same_run, assert_unchanged, snapshot, wide_grad

settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = {"fused": [torch.float32, torch.bfloat16, torch.float16, torch.complex64],
          "foreach": [torch.float32, torch.bfloat16, torch.float64, torch.complex64],
          "single_tensor": [torch.float32, torch.float64, torch.complex64]}
HOSTILE = ["lr_beyond_float32", "negative_step", "sparse_grad", "expanded_state"]
CLIPS = {"default": None, "none": "none", "custom": lambda n: 0.5 + n**0.5}

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple) | st.sampled_from([(4099,), (3, 1, 7)])


@st.composite
def scenarios(draw, path):
    count = draw(st.integers(1, 4))
    steps = draw(st.integers(3, 7))
    return dict(
        shapes=[draw(shapes) for _ in range(count)],
        layouts=[draw(st.sampled_from(["contiguous", "transposed", "channels_last", "sliced"]))
                 for _ in range(count)],
        dtype=draw(st.sampled_from(DTYPES[path])),
        split=draw(st.integers(0, count)),  # params[:split] and params[split:] in two groups
        options=dict(lr=draw(st.sampled_from([1e-3, 1e-2, 0.1])),
                     betas=(draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.1, 0.99, 0.9999]))),
                     eps=draw(st.sampled_from([0.0, 1e-6, 1e-2])),
                     weight_decay=draw(st.sampled_from([0.0, 0.05])), decouple=draw(st.booleans()),
                     maximize=draw(st.booleans())),
        clip=draw(st.sampled_from(list(CLIPS))),
        has_grad=[[draw(st.booleans()) or step == 0 for _ in range(count)] for step in range(steps)],
        specials=draw(st.booleans()),
        hostile=draw(st.none() | st.tuples(st.integers(1, steps - 1), st.sampled_from(HOSTILE))),
        seed=draw(st.integers(0, 2**16)))


def make_param(shape, layout, dtype, device, gen):
    real = torch.complex128 if dtype.is_complex else torch.float64
    if layout == "transposed" and len(shape) >= 2:
        t = torch.randn(shape[::-1], generator=gen, dtype=real).permute(*reversed(range(len(shape))))
    elif layout == "channels_last" and len(shape) == 4:
        t = torch.randn(shape, generator=gen, dtype=real).contiguous(memory_format=torch.channels_last)
    elif layout == "sliced" and len(shape) >= 1:
        t = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen, dtype=real)[..., ::2]
    else:
        t = torch.randn(shape, generator=gen, dtype=real)
    return torch.nn.Parameter(t.to(dtype).to(device))


def make_optimizer(cls, params, split, options, clip, flags):
    groups = [g for g in ({"params": params[:split]}, {"params": params[split:], "lr": options["lr"] / 2})
              if g["params"]]
    clip_option = {} if CLIPS[clip] is None else {"clip_lambda": None if clip == "none" else CLIPS[clip]}
    return cls(groups, **options, **clip_option, **flags)


def hostile_event(kind, opt, params):
    """Make the next step invalid; return (error, undo)."""
    with_state = [p for p in params if p in opt.state and p.grad is not None and p.numel() > 1]
    if kind == "lr_beyond_float32":
        old = opt.param_groups[0]["lr"]
        opt.param_groups[0]["lr"] = 1e39
        return ValueError, lambda: opt.param_groups[0].update(lr=old)
    if kind == "negative_step" and with_state:
        state = opt.state[with_state[0]]
        old = state["step"]
        state["step"] = torch.tensor(-1.0)
        return ValueError, lambda: state.update(step=old)
    if kind == "expanded_state" and with_state:
        state = opt.state[with_state[0]]
        old = state["exp_avg"]
        state["exp_avg"] = torch.zeros(1, dtype=old.dtype, device=old.device).expand(old.shape)
        return RuntimeError, lambda: state.update(exp_avg=old)
    target = next((p for p in params if p.grad is not None and p.numel() > 0 and not p.is_complex()), None)
    if target is None:
        return None, None
    old = target.grad
    target.grad = old.to_sparse()
    return RuntimeError, lambda: setattr(target, "grad", old)


def run(path, scenario, device):
    formats = scenario.get("formats", {})  # compact storage: the same on both sides
    flags = {"fused": dict(fused=True), "foreach": dict(fused=False, foreach=True),
             "single_tensor": dict(fused=False, foreach=False)}[path]
    flags = dict(flags, **formats)
    dtype = scenario["dtype"]
    gen = torch.Generator().manual_seed(scenario["seed"])
    params = [make_param(s, layout, dtype, device, gen) for s, layout in zip(scenario["shapes"], scenario["layouts"])]
    oracle_params = [torch.nn.Parameter(p.detach().cpu().clone()) for p in params]
    args = (scenario["split"], scenario["options"], scenario["clip"])
    ours = make_optimizer(ADOPT, params, *args, flags)
    if path == "single_tensor":
        oracle = make_optimizer(adopt.ADOPT, oracle_params, *args, dict(foreach=False))
    else:
        oracle = make_optimizer(ADOPT, oracle_params, *args, dict(fused=False, foreach=False, **formats))
    beta1 = scenario["options"]["betas"][0]
    # Unclipped, torch-adopt's CPU sqrt (1 ulp off on ~17% of inputs) is
    # amplified by g / sqrt(v): a looser tolerance for that comparison only.
    tolerance = dict(rtol=1e-4, atol=1e-5) if path == "single_tensor" and scenario["clip"] == "none" else {}
    for step, has_grad in enumerate(scenario["has_grad"]):
        for p, q, active in zip(params, oracle_params, has_grad):
            grad = None
            if active:
                grad = wide_grad(p.shape, dtype=dtype, spread=1.0)
                if scenario["specials"] and grad.numel():
                    grad.view(-1)[torch.randint(grad.numel(), (1,), generator=gen)] = float("nan")
            p.grad, q.grad = (None, None) if grad is None else (grad.to(device), grad.clone())
        if scenario["hostile"] and scenario["hostile"][0] == step:
            before = snapshot(ours, params)
            error, undo = hostile_event(scenario["hostile"][1], ours, params)
            if error is not None:
                with pytest.raises(error):
                    ours.step()
                undo()
                assert_unchanged(ours, params, before, f"{scenario['hostile'][1]} at step {step}")
        ours.step()
        oracle.step()
        assert_same_run(params, states(ours, params, beta1), oracle_params,
                        states(oracle, oracle_params, beta1), f"step {step}", exact=path == "fused",
                        **tolerance)


def states(optimizer, params, beta1):
    """The state of each param; with beta1 = 0 the sign of a zero exp_avg is
    left out (ATen's lerp gives either, see test_hostile)."""
    out = [dict(optimizer.state.get(p, {})) for p in params]
    if beta1 == 0:
        for state in out:
            if "exp_avg" in state:
                state["exp_avg"] = state["exp_avg"] + 0.0  # -0.0 + 0.0 == +0.0
    return out


FORMATS = [dict(state_dtype=torch.int8), dict(state_dtype=torch.bfloat16), dict(master_weight_bits=24),
           dict(master_weight_bits=32), dict(state_dtype=torch.int8, master_weight_bits=24)]
# 8-bit state quantises tensors of 4096 elements or more: some are drawn, in
# other memory orders too (transposed, channels_last, sliced).
compact_shapes = shapes | st.sampled_from([(4099,), (64, 65), (2, 33, 8, 8)])


@st.composite
def compact_scenarios(draw):
    """A fused scenario with compact storage (8-bit state, bf16 state,
    master weights), stochastic rounding or not, one seed on both sides."""
    scenario = draw(scenarios("fused"))
    formats = dict(draw(st.sampled_from(FORMATS)), bf16_stochastic_round=draw(st.booleans()),
                   stochastic_round_seed=draw(st.integers(0, 2**31 - 1)))
    dtype = torch.bfloat16 if "master_weight_bits" in formats else \
        draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return dict(scenario, formats=formats, dtype=dtype,
                shapes=[draw(compact_shapes) for _ in scenario["shapes"]])


@given(data=st.data())
def test_fused_kernel_equals_the_reference_bit_for_bit(kernel_device, data):
    run("fused", data.draw(scenarios("fused")), kernel_device)


@given(data=st.data())
def test_foreach_equals_the_reference(data):
    run("foreach", data.draw(scenarios("foreach")), "cpu")


@given(data=st.data())
def test_single_tensor_path_equals_torch_adopt(data):
    run("single_tensor", data.draw(scenarios("single_tensor")), "cpu")


@given(data=st.data())
def test_fused_kernel_with_compact_storage_equals_the_reference_bit_for_bit(kernel_device, data):
    scenario = data.draw(compact_scenarios())
    quantised = scenario["formats"].get("state_dtype") == torch.int8 and \
        any(math.prod(shape) >= 4096 for shape in scenario["shapes"])
    event(f"8-bit blocks: {quantised}")
    run("fused", scenario, kernel_device)
