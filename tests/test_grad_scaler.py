"""GradScaler: the kernel unscales in registers and skips a step with an
inf/NaN on the device; results equal scaler.unscale_ followed by the step."""
import adopt
import pytest
import torch

from adopt_triton import ADOPT
from harness import assert_unchanged, snapshot


def model(device):
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 3)).to(device).requires_grad_()


def backward(net, scaler, step, device):
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 13, generator=gen).to(device), torch.randn(8, 3, generator=gen).to(device)
    loss = torch.nn.functional.mse_loss(net(x), y)
    scaler.scale(loss).backward()


@pytest.mark.parametrize("inf_at", [None, 0, 4], ids=["finite", "inf_first_step", "inf_step_4"])
def test_fused_grad_scaler_step_equals_unscale_then_step(kernel_device, inf_at):
    """Fused: GradScaler passes grad_scale and found_inf to the kernel.
    Reference: scaler.unscale_ first (GradScaler's own unscale), then the step."""
    torch.manual_seed(0)
    nets = [model(kernel_device), model(kernel_device)]
    nets[1].load_state_dict(nets[0].state_dict())
    fused_opt = ADOPT(nets[0].parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    unscaled_opt = ADOPT(nets[1].parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    scalers = [torch.amp.GradScaler(kernel_device, init_scale=2.0**12, growth_interval=3)
               for _ in nets]
    for step in range(10):
        for net, opt, scaler in zip(nets, (fused_opt, unscaled_opt), scalers):
            opt.zero_grad()
            backward(net, scaler, step, kernel_device)
            if step == inf_at:
                next(net.parameters()).grad.view(-1)[5] = float("inf")
            if opt is unscaled_opt:
                scaler.unscale_(opt)  # gradients unscaled in place: the kernel gets grad_scale=None
            before = snapshot(opt, list(net.parameters()))
            scaler.step(opt)
            scaler.update()
            if step == inf_at:  # skipped: everything bit-identical, step counts included
                assert_unchanged(opt, list(net.parameters()), before)
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_unchanged(fused_opt, list(nets[0].parameters()),
                         snapshot(unscaled_opt, list(nets[1].parameters())), f"step {step}")
    if inf_at is not None:
        assert scalers[0].get_scale() < 2.0**12 * 2**3
        assert float(fused_opt.state[next(nets[0].parameters())]["step"]) == 9


def test_grad_scaler_against_torch_adopt(kernel_device):
    """torch-adopt (no amp support: GradScaler unscales for it) and ours agree."""
    torch.manual_seed(0)
    nets = [model(kernel_device), model(kernel_device)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [ADOPT(nets[0].parameters(), lr=1e-2, fused=True),
            adopt.ADOPT(nets[1].parameters(), lr=1e-2, foreach=False)]
    scalers = [torch.amp.GradScaler(kernel_device, init_scale=2.0**10) for _ in nets]
    for step in range(10):
        for net, opt, scaler in zip(nets, opts, scalers):
            opt.zero_grad()
            backward(net, scaler, step, kernel_device)
            scaler.step(opt)
            scaler.update()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fused", [False, None], ids=["eager", "cpu_step"])
def test_eager_path_and_cpu_step_honour_grad_scaler_too(fused):
    """fused=False and CPU tensors under fused=None (the compiled CPU step)
    get the same contract."""
    torch.manual_seed(0)
    nets = [model("cpu"), model("cpu")]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [ADOPT(nets[0].parameters(), lr=1e-2, fused=fused),
            adopt.ADOPT(nets[1].parameters(), lr=1e-2, foreach=False)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in nets]
    for step in range(10):
        for net, opt, scaler in zip(nets, opts, scalers):
            opt.zero_grad()
            backward(net, scaler, step, "cpu")
            if step == 3:
                next(net.parameters()).grad.view(-1)[0] = float("nan")
            scaler.step(opt)
            scaler.update()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b)
    assert float(opts[0].state[next(nets[0].parameters())]["step"]) == 9
