"""The eager foreach path: the reference's numbers (float32 tolerance: ATen's
sqrt), per-tensor step counts, NaN/Inf placement, and when it is chosen."""
import pytest
import torch

from adopt_triton import ADOPT, Tensors, dispatch, reference
from adopt_triton import foreach as foreach_module
from harness import SIZES, clone_tensors, hyper, wide_grad

HYPER = hyper(betas=(0.9, 0.999), weight_decay=0.05, maximize=True)


def fresh(shapes):
    params = [torch.randn(s) for s in shapes]
    return Tensors(params, [None] * len(params), [torch.zeros_like(p) for p in params],
                   [torch.zeros_like(p) for p in params], [torch.tensor(0.0) for _ in params])


@pytest.mark.parametrize("decouple", [False, True])
def test_foreach_matches_the_reference(decouple):
    ours = fresh(SIZES)
    ref = clone_tensors(ours)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for step in range(12):
        grads = [wide_grad(s) for s in SIZES]
        grads[2][torch.randint(0, 4099, (6,))] = specials[torch.randint(0, 3, (6,))]
        active = list(range(4)) if step >= 3 else [0, 2]  # tensors 1 and 3 start late
        h = HYPER._replace(decouple=decouple)
        step_grads = [grads[i] for i in active]
        foreach_module.foreach_adopt(ours.pick(active)._replace(grads=step_grads), h)
        reference.adopt(ref.pick(active)._replace(grads=step_grads), h)
        for column in (0, 2, 3, 4):
            for a, b in zip(ours[column], ref[column]):
                torch.testing.assert_close(a, b, equal_nan=True)
    assert ours.params[2].isnan().any()  # the specials did reach the params


@pytest.mark.parametrize("foreach,expected", [(None, "foreach"), (True, "foreach"), (False, "single")])
def test_eager_path_choice(monkeypatch, foreach, expected):
    """foreach=None picks foreach on the eager path (see dispatch.eager_implementation)."""
    used = []

    def recording(label, function):
        return lambda *args, **kwargs: (used.append(label), function(*args, **kwargs))
    monkeypatch.setattr(dispatch, "foreach_adopt", recording("foreach", dispatch.foreach_adopt))
    monkeypatch.setattr(reference, "adopt", recording("single", reference.adopt))
    param = torch.nn.Parameter(torch.randn(5))
    opt = ADOPT([param], fused=False, foreach=foreach)
    param.grad = torch.randn(5)
    opt.step()
    assert used == [expected]
