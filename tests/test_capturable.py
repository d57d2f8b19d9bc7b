"""capturable=True: step and lr on the device, no host synchronisation,
CUDA graph capture and replay (on CUDA), clip decided on the device."""
import contextlib
import math

import numpy as np
import pytest
import torch

from adopt_triton import ADOPT
from adopt_triton.common import default_clip_lambda
from harness import ReferenceRun, assert_bitwise_equal, assert_same_run, assert_unchanged, snapshot, hyper, make_params as _make_params, wide_grad

SHAPES = [(1,), (17,), (33, 65), (4, 3, 5, 7)]


def make_params(device):
    return _make_params(SHAPES, device, seed=3)


@contextlib.contextmanager
def no_host_reads():
    """Inside, every Python-level read of a tensor's value is an error."""
    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value (a device synchronisation on CUDA)")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"):
            patch.setattr(torch.Tensor, name, forbidden)
        yield


@pytest.mark.parametrize("clip_lambda", [default_clip_lambda, lambda n: 0.5 * n**0.5, None],
                         ids=["default_clip", "custom_clip", "no_clip"])
def test_capturable_step_reads_no_tensor_on_the_host(kernel_device, clip_lambda):
    params = make_params(kernel_device)
    expected = ReferenceRun(params)
    lr = torch.tensor(2e-2, device=kernel_device)
    opt = ADOPT(params, lr=lr, capturable=True, fused=True, clip_lambda=clip_lambda)
    grads = [[wide_grad(p.shape) for p in params] for _ in range(12)]
    for p, g in zip(params, grads[0]):
        p.grad = g.to(kernel_device)
    opt.step()  # the first step allocates state
    expected.step(grads[0], hyper(lr=2e-2, clip_lambda=clip_lambda))
    for step, step_grads in enumerate(grads[1:], start=1):
        for p, g in zip(params, step_grads):
            p.grad.copy_(g)
        lr.mul_(0.9)  # an lr schedule on the device
        with no_host_reads():
            opt.step()
        expected.step(step_grads, hyper(lr=2e-2 * 0.9**step, clip_lambda=clip_lambda))
    # lr *= 0.9 in float32 on the device vs in float64 on the host: not bitwise.
    assert_same_run(params, [opt.state[p] for p in params], expected.tensors.params,
                    [expected.state_of(i) for i in range(len(params))], exact=False)


def test_grad_scaler_scale_and_skip_read_nothing_on_the_host(kernel_device):
    """GradScaler hands the optimizer grad_scale and found_inf: on the fused
    path both stay on the device (no host read: a CUDA graph can hold the
    step), the gradient is unscaled in the kernel and an inf step skipped."""
    params = make_params(kernel_device)
    expected = ReferenceRun(params)
    opt = ADOPT(params, lr=torch.tensor(1e-2, device=kernel_device), capturable=True, fused=True)
    for step in range(10):
        grads = [wide_grad(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = (g * 8).to(kernel_device)  # scaled by 8, exactly
        opt.grad_scale = torch.tensor(8.0, device=kernel_device)
        opt.found_inf = torch.tensor(float(step % 4 == 3), device=kernel_device)
        before = snapshot(opt, params) if step else None
        with no_host_reads() if step else contextlib.nullcontext():  # the first step allocates state
            opt.step()
        if step % 4 == 3:
            assert_unchanged(opt, params, before)
        else:
            expected.step(grads, hyper(lr=1e-2))
    del opt.grad_scale, opt.found_inf
    assert_same_run(params, [opt.state[p] for p in params], expected.tensors.params,
                    [expected.state_of(i) for i in range(len(params))])


def test_capturable_matches_the_default_fused_path_bitwise_with_a_float_lr(kernel_device):
    runs = []
    for capturable in (False, True):
        params = make_params(kernel_device)
        opt = ADOPT(params, lr=1e-2, weight_decay=0.1, decouple=True, capturable=capturable,
                    fused=True)
        torch.manual_seed(5)
        for _ in range(12):
            for p in params:
                p.grad = wide_grad(p.shape, kernel_device)
            opt.step()
        runs.append((params, opt))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert_bitwise_equal(a, b, "param")
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(runs[0][1].state[a][key], runs[1][1].state[b][key], key)


def test_default_clip_on_the_device_equals_the_host_value():
    """The kernel computes n ** 0.25 as sqrt(sqrt(n)) in float64, rounded once
    to float32: equal to the host's float32(n ** 0.25) for every n < 2**22."""
    n = np.arange(1, 2**22, dtype=np.float64)
    on_device = np.sqrt(np.sqrt(n)).astype(np.float32)
    on_host = np.array([default_clip_lambda(float(k)) for k in n[::997]]).astype(np.float32)
    assert np.array_equal(on_device[::997], on_host)
    assert np.array_equal(on_device, (n ** 0.25).astype(np.float32))


def test_capturable_clip_lambda_that_cannot_take_a_tensor_is_a_clear_error(kernel_device):
    """A clip_lambda written for numbers works on every path (test_hostile),
    but capturable=True cannot read step counts on the host: refused at
    construction, and at the first step if it fails only on the device."""
    params = make_params(kernel_device)
    with pytest.raises(ValueError, match="capturable=True.*clip_lambda must compute element-wise"):
        ADOPT(params, fused=True, capturable=True, clip_lambda=lambda n: math.sqrt(n))
    numpy_only = lambda n: torch.as_tensor(np.asarray(n, dtype=np.float64) ** 0.5)  # noqa: E731
    opt = ADOPT(params, fused=True, capturable=True, clip_lambda=numpy_only)  # no CUDA tensors
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # first step: nothing clipped, nothing evaluated
    if kernel_device == "cuda":
        before = snapshot(opt, params)
        with pytest.raises(RuntimeError, match="clip_lambda must compute element-wise"):
            opt.step()
        assert_unchanged(opt, params, before)


def test_capturable_needs_the_fused_path_for_every_param():
    with pytest.raises(RuntimeError, match="capturable=True\\) needs the fused kernel"):
        ADOPT([torch.nn.Parameter(torch.randn(3))], capturable=True)  # fused=None: CPU is eager


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay_with_a_changing_lr(kernel_device):
    if kernel_device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device and compiled kernels")
    graph_params, eager_params = make_params("cuda"), make_params("cuda")
    graph_lr, eager_lr = torch.tensor(1e-2, device="cuda"), torch.tensor(1e-2, device="cuda")
    graph_opt = ADOPT(graph_params, lr=graph_lr, capturable=True, weight_decay=0.1, decouple=True)
    eager_opt = ADOPT(eager_params, lr=eager_lr, capturable=True, weight_decay=0.1, decouple=True)
    for p in graph_params + eager_params:
        p.grad = torch.zeros_like(p)
    grads = [[wide_grad(p.shape, "cuda") for p in graph_params] for _ in range(13)]

    def load(params, step):
        for p, g in zip(params, grads[step]):
            p.grad.copy_(g)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: state, compilation, launch tables
        for step in range(3):
            load(graph_params, step)
            graph_opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for step in range(3):
        load(eager_params, step)
        eager_opt.step()
    for step in range(3, 13):
        for lr in (graph_lr, eager_lr):
            lr.fill_(1e-2 * 0.8**step)
        load(graph_params, step)
        graph.replay()
        load(eager_params, step)
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(graph_params, eager_params):
        assert_bitwise_equal(a, b, "param")
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(graph_opt.state[a][key], eager_opt.state[b][key], key)
    assert float(graph_opt.state[graph_params[0]]["step"]) == 13


@pytest.mark.cuda
def test_capturable_step_does_not_synchronise_cuda(kernel_device):
    if kernel_device != "cuda":
        pytest.skip("needs a CUDA device and compiled kernels")
    params = make_params("cuda")
    opt = ADOPT(params, lr=torch.tensor(1e-2, device="cuda"), capturable=True,
                clip_lambda=lambda n: n**0.5)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
