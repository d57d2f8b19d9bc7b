"""The eager foreach path: the reference's numbers (float32 tolerance: ATen's
sqrt), per-tensor step counts, NaN/Inf placement, and when it is chosen."""
import pytest
import torch

from adopt_triton import ADOPT, dispatch, reference
from adopt_triton import foreach as foreach_module
from harness import SIZES, wide_grad

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, clip_lambda=reference.default_clip_lambda,
             weight_decay=0.05, decouple=False, maximize=True)


def fresh(shapes):
    params = [torch.randn(s) for s in shapes]
    return [params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.tensor(0.0) for _ in params]]


@pytest.mark.parametrize("decouple", [False, True])
def test_foreach_matches_the_reference(decouple):
    ours, ref = fresh(SIZES), fresh(SIZES)
    for column in range(4):
        ref[column] = [t.clone() for t in ours[column]]
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for step in range(12):
        grads = [wide_grad(s) for s in SIZES]
        grads[2][torch.randint(0, 4099, (6,))] = specials[torch.randint(0, 3, (6,))]
        active = range(4) if step >= 3 else [0, 2]  # tensors 1 and 3 start late
        pick = lambda column: [column[i] for i in active]  # noqa: E731
        foreach_module.foreach_adopt(pick(ours[0]), pick(grads), pick(ours[1]), pick(ours[2]),
                                     pick(ours[3]), **dict(HYPER, decouple=decouple))
        reference.adopt(pick(ref[0]), pick(grads), pick(ref[1]), pick(ref[2]), pick(ref[3]),
                        **dict(HYPER, decouple=decouple))
        for column in range(4):
            for a, b in zip(ours[column], ref[column]):
                torch.testing.assert_close(a, b, equal_nan=True)
    assert ours[0][2].isnan().any()  # the specials did reach the params


@pytest.mark.parametrize("foreach,expected", [(None, "foreach"), (True, "foreach"), (False, "single")])
def test_eager_path_choice(monkeypatch, foreach, expected):
    """foreach=None picks foreach on the eager path (faster in bench/eager_cpu.py)."""
    used = []

    def recording(label, function):
        return lambda *args, **kwargs: (used.append(label), function(*args, **kwargs))
    monkeypatch.setattr(dispatch, "foreach_adopt", recording("foreach", dispatch.foreach_adopt))
    monkeypatch.setattr(dispatch.reference, "adopt", recording("single", dispatch.reference.adopt))
    param = torch.nn.Parameter(torch.randn(5))
    opt = ADOPT([param], fused=False, foreach=foreach)
    param.grad = torch.randn(5)
    opt.step()
    assert used == [expected]
