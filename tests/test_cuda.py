"""The kernels on the device, through the public ``ADOPT`` class only,
against the eager single-tensor reference (``fused=False, foreach=False``)
run on CPU copies: bit for bit (0 ulp) for params, ``exp_avg``,
``exp_avg_sq`` and step counts, NaN where NaN.

Every test takes the ``kernel_device`` fixture. Those marked ``cuda`` (graph
replay, a tensor of more than 2**31 elements) skip unless it is "cuda"
(kernels compiled, TRITON_INTERPRET=0); the others also run on the CPU
through the interpreter, which keeps their logic tested without a GPU. On a
CUDA machine the interpreted session re-runs every ``kernel_device`` test
compiled (``test_compiled_kernels_on_cuda``); ``bench/run_gpu.sh`` runs these
first.
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from adopt_triton import ADOPT
from harness import assert_bitwise_equal, assert_same_run, wide_grad

ROOT = pathlib.Path(__file__).resolve().parent.parent



@pytest.fixture
def cuda(kernel_device):
    if kernel_device != "cuda":
        pytest.skip("needs a CUDA device and compiled kernels (TRITON_INTERPRET=0)")
    return kernel_device


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def assert_same_optimizers(fused_params, fused_opt, ref_params, ref_opt, what=""):
    assert_same_run(fused_params, [fused_opt.state[p] for p in fused_params], ref_params,
                    [ref_opt.state[p] for p in ref_params], what)


def lockstep(device, cpu_tensors, grads_per_step, **options):
    """ADOPT(fused=True) on copies on ``device`` and the eager reference on CPU
    copies of the same tensors, stepped with the same gradients (None: none)."""
    fused_params = [torch.nn.Parameter(t.to(device)) for t in cpu_tensors]
    ref_params = [torch.nn.Parameter(t.clone()) for t in cpu_tensors]
    fused_opt = ADOPT(fused_params, fused=True, **options)
    ref_opt = ADOPT(ref_params, fused=False, foreach=False, **options)
    for grads in grads_per_step:
        for a, b, g in zip(fused_params, ref_params, grads):
            a.grad = None if g is None else g.to(device)
            b.grad = None if g is None else g.clone()
        fused_opt.step()
        ref_opt.step()
    synchronize(device)
    return fused_params, fused_opt, ref_params, ref_opt


# Odd sizes, several blocks, one launch (on CUDA also one of 2**20 + 3).
SHAPES = [(1,), (17,), (4099,), (5, 7, 9), (3, 2049)]
OPTIONS = {
    "defaults": dict(lr=1e-2),
    "decoupled_decay": dict(lr=1e-2, weight_decay=0.1, decouple=True),
    "maximize_coupled_decay_no_clip": dict(lr=1e-2, weight_decay=0.05, maximize=True, clip_lambda=None),
    "betas_above_half": dict(lr=1e-2, betas=(0.3, 0.999), eps=1e-3),
}


@pytest.mark.filterwarnings("ignore:state_dtype=torch.bfloat16:UserWarning")  # v's bf16 rounding, by design
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.bfloat16, torch.bfloat16)], ids=["fp32", "bf16", "bf16_state"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_fused_matches_the_eager_reference_bitwise(kernel_device, dtype, state_dtype, options):
    gen = torch.Generator().manual_seed(12)
    shapes = SHAPES + ([((1 << 20) + 3,)] if kernel_device == "cuda" else [])
    tensors = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    # The last tensor gets its first gradient at step 3: its own step count
    # picks the first-step case inside a launch whose other tensors update.
    grads = [[None if (i == len(tensors) - 1 and step < 3) else wide_grad(t.shape, dtype=dtype)
              for i, t in enumerate(tensors)] for step in range(10)]
    if state_dtype is not None:
        options = dict(options, state_dtype=state_dtype)
    run = lockstep(kernel_device, tensors, grads, **options)
    assert_same_optimizers(*run)
    assert float(run[1].state[run[0][-1]]["step"]) == 7


@pytest.mark.parametrize("eps,clip_lambda", [(1e-6, "default"), (1e-6, None), (0.0, "default")],
                         ids=["eps1e-6", "eps1e-6-noclip", "eps0"])
def test_rows_with_exp_avg_sq_zero_or_subnormal(kernel_device, eps, clip_lambda):
    """An embedding whose rows see no gradient (v stays exactly 0, so
    max(sqrt(v), eps) takes eps), rows whose first gradient comes late (g / eps,
    then clipped), and rows of tiny gradients (subnormal v): the GPU's sqrt
    and division slow paths, and no flush to zero, against the reference."""
    vocab, width, steps = 300, 67, 8
    gen = torch.Generator().manual_seed(4)
    table = torch.randn(vocab, width, generator=gen)
    never = torch.arange(vocab) % 3 == 0                   # no gradient ever
    late = torch.arange(vocab) % 3 == 1                    # first gradient at step 4
    tiny = torch.arange(vocab) % 7 == 2                    # |g| ~ 1e-22: v subnormal
    grads = []
    for step in range(steps):
        g = wide_grad((vocab, width), spread=1.0)
        g[tiny] *= 1e-22
        g[never] = 0.0
        if step < 4:
            g[late] = 0.0
        grads.append([g])
    options = dict(lr=1e-2, eps=eps)
    if clip_lambda is None:
        options["clip_lambda"] = None
    run = lockstep(kernel_device, [table], grads, **options)
    assert_same_optimizers(*run)
    v = run[3].state[run[2][0]]["exp_avg_sq"]
    assert bool((v[never] == 0).all())
    subnormal = (v > 0) & (v < torch.finfo(torch.float32).tiny)
    assert int(subnormal.sum()) > 0  # the subnormal path was taken


@pytest.mark.cuda
def test_a_tensor_of_more_than_2_31_elements(cuda):
    """One fp32 tensor of 2**31 + 2**20 + 7 elements (4 of them: 34 GB): three
    steps, then every element checked for having been written, and ~90k
    elements (both ends, around element 2**31 and random ones) checked bit
    for bit against the reference on a CPU copy of those elements."""
    numel = 2**31 + 2**20 + 7
    if torch.cuda.get_device_properties(0).total_memory < 64 * 2**30:
        pytest.skip("needs 64 GiB of device memory (about 55 GB at the peak)")
    gen = torch.Generator(device="cuda").manual_seed(31)
    param = torch.nn.Parameter(torch.randn(numel, device="cuda", generator=gen))
    picked = torch.cat([torch.arange(4096), torch.arange(2**31 - 4096, 2**31 + 4096),
                        torch.arange(numel - 4096, numel),
                        torch.randint(0, numel, (65536,), generator=torch.Generator().manual_seed(1))])
    picked = picked.unique().to("cuda")
    ref_param = torch.nn.Parameter(param.detach()[picked].cpu())
    opt = ADOPT([param], fused=True, lr=1e-2, weight_decay=0.1, decouple=True)
    ref_opt = ADOPT([ref_param], fused=False, foreach=False, lr=1e-2, weight_decay=0.1, decouple=True)
    for step in range(3):
        # |g| in [0.5, 1.5), random signs: never zero, so every update is visible.
        grad = torch.empty(numel, device="cuda").uniform_(0.5, 1.5, generator=gen)
        grad.mul_(torch.empty(numel, device="cuda").bernoulli_(0.5, generator=gen).mul_(2).sub_(1))
        param.grad = grad
        ref_param.grad = grad[picked].cpu()
        opt.step()
        ref_opt.step()
        if step == 0:  # the first step writes v = g * g everywhere (one rounding, as torch's mul)
            assert bool((opt.state[param]["exp_avg_sq"] == grad * grad).all())
        del grad
    torch.cuda.synchronize()
    state, ref_state = opt.state[param], ref_opt.state[ref_param]
    assert int((state["exp_avg"] == 0).sum()) == 0  # the update case reached every element
    assert_bitwise_equal(param.detach()[picked], ref_param, "param")
    for key in ("exp_avg", "exp_avg_sq"):
        assert_bitwise_equal(state[key][picked], ref_state[key], key)
    assert float(state["step"]) == 3


@pytest.mark.cuda
def test_cuda_graph_replay_matches_the_reference_on_cpu(cuda):
    """A captured step (fp32 and bf16 groups, a device lr changed before each
    replay) against the eager reference on CPU copies with the same lr values."""
    gen = torch.Generator().manual_seed(9)
    shapes = [(4099,), (33, 65), (1,)]
    tensors = [torch.randn(s, generator=gen) for s in shapes] + \
              [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    params = [torch.nn.Parameter(t.to("cuda")) for t in tensors]
    ref_params = [torch.nn.Parameter(t.clone()) for t in tensors]
    lr = torch.tensor(1e-2, device="cuda")
    opt = ADOPT([{"params": params[:3]}, {"params": params[3:]}], lr=lr, capturable=True)
    ref_lr = torch.tensor(1e-2)
    ref_opt = ADOPT([{"params": ref_params[:3]}, {"params": ref_params[3:]}], lr=ref_lr,
                    fused=False, foreach=False)
    grads = [[wide_grad(t.shape, dtype=t.dtype) for t in tensors] for _ in range(12)]
    for p in params:
        p.grad = torch.zeros_like(p)

    def load(step):
        for p, q, g in zip(params, ref_params, grads[step]):
            p.grad.copy_(g)
            q.grad = g.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # state, compilation and launch tables before capture
        for step in range(2):
            load(step)
            opt.step()
            ref_opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(2, 12):
        value = 1e-2 * 0.7**step
        lr.fill_(value)
        ref_lr.fill_(value)  # the same float32 value on both sides
        load(step)
        graph.replay()
        ref_opt.step()
    torch.cuda.synchronize()
    assert_same_optimizers(params, opt, ref_params, ref_opt, "graph")
    assert float(opt.state[params[0]]["step"]) == 12


def collect(*args):
    """Node ids that pytest selects (collection only; tests/conftest.py marks
    the kernel_device fixture's users `kernel`). `python3 -P` keeps the
    repository root off sys.path."""
    result = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return {line.split("[")[0] for line in result.stdout.splitlines() if "::" in line}


def test_kernel_marker_selects_exactly_the_fixture_users():
    selected = collect("-m", "kernel or cuda", "tests/test_kernel.py", "tests/test_capturable.py",
                       "tests/test_cuda.py")
    assert "tests/test_kernel.py::test_kernel_matches_reference_bitwise" in selected
    assert "tests/test_capturable.py::test_cuda_graph_capture_and_replay_with_a_changing_lr" in selected
    assert "tests/test_cuda.py::test_a_tensor_of_more_than_2_31_elements" in selected
    # No kernel_device fixture, no cuda marker: CPU-only tests stay out.
    assert "tests/test_capturable.py::test_default_clip_on_the_device_equals_the_host_value" not in selected
    assert "tests/test_cuda.py::test_kernel_marker_selects_exactly_the_fixture_users" not in selected
    everything = collect("tests/test_kernel.py", "tests/test_capturable.py", "tests/test_cuda.py")
    assert selected < everything


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_on_cuda():
    """In an interpreted session on a CUDA machine: every kernel_device test
    again, compiled, on CUDA tensors (a compiled session has run them already)."""
    from adopt_triton.kernels.adopt import INTERPRETED
    if not INTERPRETED:
        pytest.skip("this session already runs the compiled kernels on CUDA")
    result = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "kernel or cuda",
         "tests"], cwd=ROOT, capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, TRITON_INTERPRET="0"))
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
