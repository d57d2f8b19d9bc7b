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


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("clip_lambda", [None, lambda n: 0.1 * n + 0.5], ids=["default_clip", "custom_clip"])
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


def test_fused_op_is_registered_with_its_mutations():
    op = torch.ops.adopt_triton.fused_adopt_.default
    mutated = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["params", "exp_avgs", "exp_avg_sqs", "state_steps"]
