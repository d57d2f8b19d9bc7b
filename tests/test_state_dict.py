"""state_dict: save, reload and continue exactly; cross-load with torch-adopt both ways."""

import adopt
import pytest
import torch

from adopt_triton import ADOPT
from harness import assert_bitwise_equal, make_params, through_disk

SHAPES = [(1,), (17,), (6, 11), (2, 3, 5, 4)]
SAVE_AT, TOTAL = 6, 12
OPTIONS = dict(lr=1e-2, weight_decay=0.02, decouple=True)


def fresh_params(device):
    return make_params(SHAPES, device, seed=1)


def gradient_stream(device):
    gen = torch.Generator().manual_seed(2)
    return [[(torch.randn(s, generator=gen, dtype=torch.float64)
              * torch.exp(3 * torch.randn(s, generator=gen, dtype=torch.float64))).float().to(device)
             for s in SHAPES] for _ in range(TOTAL)]


def train(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def make(kind, params, device):
    if kind == "ours":
        return ADOPT(params, fused=True, **OPTIONS)
    return adopt.ADOPT(params, foreach=False, **OPTIONS)


def resumed_run(first, second, device):
    """Train with `first` for SAVE_AT steps, checkpoint (params + optimizer)
    through torch.save/torch.load(weights_only=True), rebuild with `second`
    from scratch, load, and train on to TOTAL steps."""
    grads = gradient_stream(device)
    params = fresh_params(device)
    opt = make(first, params, device)
    train(opt, params, grads[:SAVE_AT])
    checkpoint = through_disk({"params": [p.detach() for p in params], "optimizer": opt.state_dict()})
    params = fresh_params(device)
    with torch.no_grad():
        for p, saved in zip(params, checkpoint["params"]):
            p.copy_(saved)
    opt = make(second, params, device)
    opt.load_state_dict(checkpoint["optimizer"])
    train(opt, params, grads[SAVE_AT:])
    return params, opt


def uninterrupted_run(kind, device):
    params = fresh_params(device)
    opt = make(kind, params, device)
    train(opt, params, gradient_stream(device))
    return params, opt


def test_resume_from_checkpoint_is_identical_to_the_uninterrupted_run(kernel_device):
    resumed, resumed_opt = resumed_run("ours", "ours", kernel_device)
    straight, straight_opt = uninterrupted_run("ours", kernel_device)
    for a, b in zip(resumed, straight):
        assert_bitwise_equal(a, b, "param")
        sa, sb = resumed_opt.state[a], straight_opt.state[b]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(sa[key], sb[key], key)
        assert sa["step"].device.type == "cpu" and sa["step"].dtype == torch.float32
    assert resumed_opt.param_groups[0]["fused"] is True


@pytest.mark.parametrize("first,second", [("torch_adopt", "ours"), ("ours", "torch_adopt")])
def test_cross_load_with_torch_adopt_continues_identically(kernel_device, first, second):
    """A checkpoint moves between torch-adopt and adopt_triton and training
    goes on as if it had never moved (float32 tolerance: the two differ by
    torch-adopt's CPU sqrt rounding)."""
    resumed, resumed_opt = resumed_run(first, second, kernel_device)
    straight, straight_opt = uninterrupted_run(first, kernel_device)
    if second == "ours":  # the loader's own flags survive the load: the kernel ran
        assert resumed_opt.param_groups[0]["fused"] is True
    for a, b in zip(resumed, straight):
        torch.testing.assert_close(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(resumed_opt.state[a][key], straight_opt.state[b][key])


def test_state_dict_layout_is_torch_adopts():
    ours_params, theirs_params = fresh_params("cpu"), fresh_params("cpu")
    ours, theirs = ADOPT(ours_params, **OPTIONS), adopt.ADOPT(theirs_params, **OPTIONS)
    grads = gradient_stream("cpu")[:2]
    train(ours, ours_params, grads)
    train(theirs, theirs_params, grads)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in b["state"]:
        assert a["state"][index].keys() == b["state"][index].keys()
        for key, value in b["state"][index].items():
            assert (a["state"][index][key].dtype, a["state"][index][key].shape) == (value.dtype, value.shape)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64], ids=str)
@pytest.mark.parametrize("flags", [dict(fused=False, foreach=False), dict(fused=False, foreach=True),
                                   dict(fused=None), "torch_adopt"],
                         ids=["single_tensor", "foreach", "default", "from_torch_adopt"])
def test_complex_and_float64_state_loads_exactly_and_training_goes_on(dtype, flags):
    """The loaded state keeps its dtype's every bit (a complex state keeps its
    imaginary part, a float64 state its precision), whoever saved it."""
    params = make_params(SHAPES, dtype=dtype, seed=5)
    saver = adopt.ADOPT(params, **OPTIONS) if flags == "torch_adopt" else ADOPT(params, **flags, **OPTIONS)
    options = dict(fused=False, foreach=False) if flags == "torch_adopt" else flags
    gen = torch.Generator().manual_seed(6)
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(TOTAL)]
    train(saver, params, grads[:SAVE_AT])
    checkpoint = through_disk(saver.state_dict())
    loaded_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loader = ADOPT(loaded_params, **options, **OPTIONS)
    loader.load_state_dict(checkpoint)
    for index, p in enumerate(loaded_params):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(loader.state[p][key], checkpoint["state"][index][key], f"{index} {key}")
    train(saver, params, grads[SAVE_AT:])  # the uninterrupted run
    train(loader, loaded_params, grads[SAVE_AT:])
    for index, (a, b) in enumerate(zip(loaded_params, params)):
        if flags == "torch_adopt":  # its numerics: float32 tolerance
            torch.testing.assert_close(a, b, msg=f"param {index}")
        else:
            assert_bitwise_equal(a, b, f"param {index}")


def test_a_capturable_fused_checkpoint_loads_into_torch_adopt_on_the_cpu(kernel_device):
    """Saved with portable execution flags (fused=None, capturable=False):
    torch-adopt loads it and steps on the CPU, as after its own checkpoint."""
    params = fresh_params(kernel_device)
    ours = ADOPT(params, lr=torch.tensor(1e-2, device=kernel_device), fused=True, capturable=True)
    train(ours, params, gradient_stream(kernel_device)[:SAVE_AT])
    checkpoint = through_disk(ours.state_dict())
    assert checkpoint["param_groups"][0]["fused"] is None and checkpoint["param_groups"][0]["capturable"] is False
    assert ours.param_groups[0]["capturable"] and ours.param_groups[0]["fused"]  # the optimizer keeps its own
    theirs_params = [torch.nn.Parameter(p.detach().cpu().clone()) for p in params]
    theirs = adopt.ADOPT(theirs_params, lr=1e-2)
    theirs.load_state_dict(checkpoint)
    train(theirs, theirs_params, [[g.cpu() for g in step] for step in gradient_stream(kernel_device)[SAVE_AT:]])
    assert all(float(theirs.state[p]["step"]) == TOTAL for p in theirs_params)
