"""The optimizer class: validation, dispatch, layouts, state_dict."""
import inspect

import adopt
import pytest
import torch

from adopt_triton import ADOPT
from adopt_triton.kernels import adopt as kernel
from harness import ReferenceRun, assert_bitwise_equal, assert_same_run, hyper, make_params, wide_grad


def params_of(*shapes, device="cpu", dtype=torch.float32):
    return make_params(shapes, device, dtype)


# --- constructor -------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    (dict(lr=float("nan")), "Invalid learning rate: nan"),
    (dict(lr=torch.tensor([1e-3, 2e-3])), r"Tensor lr must be 1-element, got shape \(2,\)"),
    (dict(lr=torch.tensor(-1.0)), "Invalid learning rate: -1"),
    (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(-0.1, 0.9)), "Invalid beta parameter at index 0: -0.1"),
    (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    (dict(betas=(0.9,)), r"Invalid betas: \(0.9,\)"),
    (dict(weight_decay=-0.5), "Invalid weight_decay value: -0.5"),
    (dict(clip_lambda=0.25), "clip_lambda must be None or callable, got 0.25"),
    (dict(capturable=True, fused=False), "capturable=True runs on the fused kernel"),
    (dict(capturable=True, foreach=True), "capturable=True runs on the fused kernel"),
])
def test_constructor_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ADOPT(params_of(3), **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(fused=True, differentiable=True), "`fused` does not support `differentiable`"),
    (dict(fused=True, foreach=True), "`fused` and `foreach` cannot be `True` together"),
])
def test_constructor_rejects_conflicting_flags(kwargs, message):
    with pytest.raises(RuntimeError, match=message):
        ADOPT(params_of(3), **kwargs)


def test_bad_param_group_is_rejected_and_not_added():
    opt = ADOPT(params_of(3))
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        opt.add_param_group({"params": params_of(4), "lr": -1})
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 2"):
        ADOPT([{"params": params_of(4), "betas": (0.9, 2)}])
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("tensor", [torch.randn(5, dtype=torch.float64), torch.arange(5),
                                    torch.randn(5, dtype=torch.complex128)],
                         ids=["float64", "int64", "complex128"])
def test_fused_rejects_unsupported_dtypes_naming_them(tensor):
    supported = "torch.float32, torch.bfloat16, torch.float16, torch.complex64"
    before = tensor.clone()
    with pytest.raises(RuntimeError, match=rf"dtype {tensor.dtype} \(supported: {supported}\)"):
        ADOPT([tensor], fused=True)
    assert torch.equal(tensor, before)


def test_unsupported_dtype_under_fused_none_runs_eager(launches):
    param = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    theirs = torch.nn.Parameter(param.detach().clone())
    ours_opt, theirs_opt = ADOPT([param], lr=0.1), adopt.ADOPT([theirs], lr=0.1, foreach=False)
    for _ in range(10):
        param.grad = wide_grad((7,), dtype=torch.float64)
        theirs.grad = param.grad.clone()
        ours_opt.step()
        theirs_opt.step()
    torch.testing.assert_close(param, theirs)
    assert launches == []


@pytest.mark.skipif(not torch.cuda.is_available() or not kernel.INTERPRETED,
                    reason="needs a CUDA tensor while the kernels are interpreted")
def test_interpreted_kernel_refuses_cuda_tensors():
    """The interpreter reads launch tables as host addresses: CUDA tensors are
    refused under TRITON_INTERPRET=1 (fused=None sends them to the eager path)."""
    with pytest.raises(RuntimeError, match="runs on CPU tensors only"):
        ADOPT([torch.nn.Parameter(torch.randn(3, device="cuda"))], fused=True)


def test_signature_matches_torch_adopt():
    """torch-adopt's parameters first, identical; then ours, keyword-only,
    whose defaults change nothing for torch-adopt's dtypes."""
    ours = inspect.signature(ADOPT.__init__).parameters
    theirs = inspect.signature(adopt.ADOPT.__init__).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    extra = {name: ours[name] for name in list(ours)[len(theirs):]}
    assert {name: p.default for name, p in extra.items()} == dict(
        state_dtype=None, master_weight_bits=None, bf16_stochastic_round=False, stochastic_round_seed=None)
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in extra.values())
    for name in theirs:
        assert ours[name].kind == theirs[name].kind, name
        if name != "clip_lambda":
            assert ours[name].default == theirs[name].default, name
    for n in (1.0, 2.0, 17.0, 1e6):
        assert ours["clip_lambda"].default(n) == theirs["clip_lambda"].default(n)


# --- step ---------------------------------------------------------------------

def test_sparse_gradient_raises_naming_the_param_and_changes_nothing(kernel_device):
    params = params_of(4, (5, 3), device=kernel_device)
    before = [p.detach().clone() for p in params]
    opt = ADOPT(params, fused=True)
    params[0].grad = torch.randn(4, device=kernel_device)
    params[1].grad = torch.randn(5, 3, device=kernel_device).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    for p, b in zip(params, before):
        assert_bitwise_equal(p, b)
    assert all(float(s["step"]) == 0 for s in opt.state.values())


def test_fused_true_launches_the_kernel_once_per_step(kernel_device, launches):
    """(fused=None on CPU tensors runs the compiled CPU step: tests/test_cpu.py.)"""
    params = params_of(5, 9, device=kernel_device)
    opt = ADOPT(params, fused=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert launches == [(5, 9), (5, 9)]  # one launch per step for both tensors


def test_differentiable_runs_the_eager_reference_under_autograd(launches):
    """differentiable=True takes non-leaf params, as torch.optim does, and
    records the update in the autograd graph."""
    leaf = torch.randn(6, requires_grad=True)
    param = leaf * 1.0  # non-leaf
    expected = ReferenceRun([leaf])
    opt = ADOPT([param], lr=0.05, differentiable=True)
    for _ in range(10):
        grad = wide_grad((6,))
        param.grad = grad
        opt.step()
        expected.step([grad], hyper(lr=0.05))
    assert_bitwise_equal(param, expected.tensors.params[0])
    param.sum().backward()
    assert leaf.grad is not None and leaf.grad.isfinite().all()
    assert launches == []


def test_closure_is_evaluated_with_grad_and_its_loss_returned(kernel_device):
    param = params_of(8, device=kernel_device)[0]
    opt = ADOPT([param], fused=True)

    def closure():
        opt.zero_grad()
        loss = (param ** 2).sum()
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and float(opt.state[param]["step"]) == 1


def test_zero_sized_and_single_element_params(kernel_device):
    params = params_of((0, 3), 1, device=kernel_device)
    opt = ADOPT(params, fused=True)
    for _ in range(10):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [10, 10]
    assert params[1].isfinite().all()


@pytest.mark.parametrize("fused", [True, False])
def test_step_is_a_float32_scalar_where_its_path_reads_it(kernel_device, fused):
    """The fused path keeps step on the param's device (read by the kernel,
    no host sync); the eager path keeps it on the CPU (read by the host)."""
    param = params_of(3, device=kernel_device)[0]
    opt = ADOPT([param], fused=fused)
    param.grad = torch.randn_like(param)
    opt.step()
    step = opt.state[param]["step"]
    assert step.dtype == torch.float32 and step.dim() == 0 and float(step) == 1
    assert step.device.type == (kernel_device if fused else "cpu")
    assert opt.state[param]["exp_avg"].device == param.device


# --- memory layouts -----------------------------------------------------------

def run_layout_case(param, grads, *, exp_avg=None, exp_avg_sq=None, steps=10):
    """Run the fused optimizer on ``param`` (any layout), and the reference on
    plain contiguous copies; return both for comparison."""
    expected = ReferenceRun([param.detach().clone(memory_format=torch.contiguous_format)])
    opt = ADOPT([param], lr=0.05, weight_decay=0.1, decouple=True, fused=True)
    if exp_avg is not None:  # state with its own layout, as a checkpoint may bring
        opt.state[param].update(step=torch.tensor(0.0), exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    pointer = param.data_ptr()
    for grad in grads[:steps]:
        param.grad = grad
        opt.step()
        expected.step([grad.contiguous()], hyper(lr=0.05, weight_decay=0.1, decouple=True))
    assert param.data_ptr() == pointer  # updated in place
    state = {key: t.contiguous() for key, t in opt.state[param].items()}
    assert_same_run([param.contiguous()], [state], expected.tensors.params, [expected.state_of(0)])


def test_channels_last_params_are_updated_in_place(kernel_device, launches):
    conv = torch.nn.Conv2d(3, 6, 3).to(kernel_device).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 9, 9, device=kernel_device).to(memory_format=torch.channels_last)
    grads = []
    for _ in range(10):
        conv.zero_grad()
        conv(x).square().mean().backward()
        grads.append(conv.weight.grad.clone(memory_format=torch.preserve_format))
    assert not conv.weight.is_contiguous() and not grads[0].is_contiguous()
    run_layout_case(conv.weight, grads)
    assert len(launches) == 10


def test_transposed_param_with_contiguous_grad(kernel_device):
    param = torch.nn.Parameter(torch.randn(33, 17, device=kernel_device).t())  # dense, permuted
    run_layout_case(param, [wide_grad((17, 33), kernel_device) for _ in range(10)])


def test_state_with_another_layout_is_updated_correctly(kernel_device):
    param = torch.nn.Parameter(torch.randn(2, 5, 3, 4, device=kernel_device)
                               .to(memory_format=torch.channels_last))
    exp_avg = torch.zeros(2, 5, 3, 4, device=kernel_device)  # contiguous, unlike param
    exp_avg_sq = torch.zeros(2, 5, 3, 4, device=kernel_device)
    run_layout_case(param, [wide_grad((2, 5, 3, 4), kernel_device) for _ in range(10)],
                    exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


def test_non_dense_param_view_is_updated_and_its_gaps_untouched(kernel_device):
    base = torch.randn(9, 20, device=kernel_device)
    untouched = base[:, 1::2].clone()
    param = torch.nn.Parameter(base[:, ::2])  # shares base's storage, every other column
    assert param.data_ptr() == base.data_ptr() and not param.is_contiguous()
    run_layout_case(param, [wide_grad((9, 10), kernel_device) for _ in range(10)])
    assert_bitwise_equal(base[:, 1::2], untouched, "gap columns")
    assert_bitwise_equal(base[:, ::2], param.detach(), "param columns")
