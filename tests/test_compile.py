"""torch.compile: the optimizer step compiles with fullgraph=True around the
fused custom op, and a changing tensor lr does not recompile."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from adopt_triton import ADOPT
from harness import assert_bitwise_equal, wide_grad

SHAPES = [(17,), (33, 65), (4, 3, 5, 7)]


def make_params(device):
    gen = torch.Generator().manual_seed(6)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]


# The custom clip is evaluated on a tensor of step counts, traced and compiled
# by the backend; inductor may contract a multiply and an add into an fma on
# CUDA, so its float32 arithmetic must be exact for the compiled and the eager
# step to agree bit for bit: 0.25 * n and + 0.5 are exact for n < 2**22
# (0.1 * n + 0.5 was not, for n in {9, 18, 36, 37, 77, 79, 158, 159}).
EXACT_CUSTOM_CLIP = lambda n: 0.25 * n + 0.5  # noqa: E731


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("clip_lambda", [None, EXACT_CUSTOM_CLIP], ids=["default_clip", "custom_clip"])
def test_compiled_step_fullgraph_matches_eager_and_lr_changes_do_not_recompile(
        kernel_device, backend, clip_lambda):
    torch._dynamo.reset()
    options = dict(weight_decay=0.1, decouple=True, fused=True)
    if clip_lambda is not None:
        options["clip_lambda"] = clip_lambda
    compiled_params, eager_params = make_params(kernel_device), make_params(kernel_device)
    compiled_lr, eager_lr = (torch.tensor(1e-2, device=kernel_device) for _ in range(2))
    compiled_opt = ADOPT(compiled_params, lr=compiled_lr, **options)
    eager_opt = ADOPT(eager_params, lr=eager_lr, **options)
    counter = CompileCounterWithBackend(backend)

    @torch.compile(backend=counter, fullgraph=True)
    def compiled_step():
        compiled_opt.step()

    frames_after_warmup = None
    for step in range(10):
        for a, b in zip(compiled_params, eager_params):
            a.grad = wide_grad(a.shape, kernel_device)
            b.grad = a.grad.clone()
        for lr in (compiled_lr, eager_lr):
            lr.fill_(1e-2 * 0.8**step)
        compiled_step()
        eager_opt.step()
        if step == 2:
            frames_after_warmup = counter.frame_count
    assert counter.frame_count == frames_after_warmup  # lr changed 7 more times: no recompile
    assert counter.frame_count <= 2  # the first step (state creation) and the steady state
    for a, b in zip(compiled_params, eager_params):
        assert_bitwise_equal(a, b, "param")
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(compiled_opt.state[a][key], eager_opt.state[b][key], key)


def compiled_and_eager_agree(start, device, backend, make_grad, **options):
    """The same optimizer, its step compiled (fullgraph) and eager, on copies
    of ``start`` fed the same gradients for 10 steps: bit for bit the same
    params and state, at most two frames compiled. The compiled run."""
    torch._dynamo.reset()
    compiled_params, eager_params = ([torch.nn.Parameter(t.clone().to(device)) for t in start] for _ in range(2))
    compiled_opt, eager_opt = ADOPT(compiled_params, **options), ADOPT(eager_params, **options)
    counter = CompileCounterWithBackend(backend)

    @torch.compile(backend=counter, fullgraph=True)
    def compiled_step():
        compiled_opt.step()
    for _ in range(10):
        for a, b in zip(compiled_params, eager_params):
            a.grad = make_grad(a).to(device)
            b.grad = a.grad.clone()
        compiled_step()
        eager_opt.step()
    assert counter.frame_count <= 2
    for a, b in zip(compiled_params, eager_params):
        assert_bitwise_equal(a, b, "param")
        assert compiled_opt.state[a].keys() == eager_opt.state[b].keys()
        for key, value in eager_opt.state[b].items():
            assert_bitwise_equal(compiled_opt.state[a][key], value, key)
    return compiled_opt, compiled_params


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_with_8bit_state_and_master_weights_matches_eager(kernel_device, backend):
    """The compact columns (block maxima of the quantised tensors only,
    remainders, random-stream keys) go through the traced step and the op."""
    shapes = [(17,), (64, 65), (4099,)]  # the first keeps float32 state
    gen = torch.Generator().manual_seed(7)
    start = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    opt, params = compiled_and_eager_agree(
        start, kernel_device, backend, lambda p: wide_grad(p.shape).to(torch.bfloat16), lr=1e-2, fused=True,
        state_dtype=torch.int8, master_weight_bits=24, bf16_stochastic_round=True, stochastic_round_seed=9)
    assert opt.state[params[1]]["exp_avg"].dtype == torch.int8


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_with_complex_params_matches_eager(kernel_device, backend):
    """Complex params beside real ones: inductor cannot functionalize an op
    taking complex tensors, so they go through it as real views and copies."""
    gen = torch.Generator().manual_seed(8)
    start = [torch.randn(s, generator=gen, dtype=dtype) for s, dtype in
             (((9,), torch.complex64), ((5, 7), torch.float32), ((3, 4), torch.complex64))]
    compiled_and_eager_agree(start, kernel_device, backend,
                             lambda p: torch.randn(p.shape, generator=gen, dtype=p.dtype),
                             lr=torch.tensor(1e-2, device=kernel_device), weight_decay=0.1, fused=True)


def test_fused_op_is_registered_with_its_mutations():
    op = torch.ops.adopt_triton.fused_adopt_.default
    mutated = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["params", "exp_avgs", "exp_avg_sqs", "state_steps", "exp_avg_scales",
                       "exp_avg_sq_scales", "remainders"]


def test_the_custom_clip_rounds_the_same_with_or_without_an_fma():
    """Why EXACT_CUSTOM_CLIP: rounded once (an fma, as inductor may emit on
    CUDA) or twice (eager), it gives the same float32 for every n < 2**22;
    0.1 * n + 0.5 does not."""
    n = torch.arange(1, 2**22, dtype=torch.float32)

    def once_and_twice(coefficient):
        c = torch.tensor(coefficient, dtype=torch.float32)  # the scalar as ATen rounds it
        twice = (c * n) + 0.5
        once = (c.double() * n.double() + 0.5).float()  # exact in float64, then one rounding
        return once, twice
    once, twice = once_and_twice(0.25)
    assert torch.equal(once, twice) and torch.equal(EXACT_CUSTOM_CLIP(n), twice)
    once, twice = once_and_twice(0.1)
    differ = (once != twice).nonzero().flatten() + 1
    assert {9, 18, 36, 37, 77, 79, 158, 159} <= set(differ[:8].tolist())
