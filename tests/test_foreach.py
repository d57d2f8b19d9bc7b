"""The eager paths: foreach gives the reference's numbers (float32 tolerance:
ATen's sqrt), per-tensor step counts, NaN/Inf placement; the reference's own
sqrt is correctly rounded; which path foreach=None chooses."""
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


@pytest.mark.parametrize("foreach,expected", [(None, [("single", 1), ("foreach", 2)]),
                                              (True, [("foreach", 3)]), (False, [("single", 3)])])
def test_eager_path_choice(monkeypatch, foreach, expected):
    """foreach=None: CPU tensors of SINGLE_TENSOR_MIN_NUMEL elements or more
    take the single-tensor path, smaller ones foreach (dispatch.eager_implementation)."""
    used = []

    def recording(label, function):
        return lambda tensors, *args: (used.append((label, len(tensors.params))),
                                       function(tensors, *args))
    monkeypatch.setattr(dispatch, "foreach_adopt", recording("foreach", dispatch.foreach_adopt))
    monkeypatch.setattr(reference, "adopt", recording("single", reference.adopt))
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, dispatch.SINGLE_TENSOR_MIN_NUMEL, 17)]
    opt = ADOPT(params, fused=False, foreach=foreach)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert used == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_sqrt_is_correctly_rounded(dtype):
    """numpy's sqrt on CPU tensors (ATen's CPU sqrt is not always correctly
    rounded); against float32 via float64 (exact) and float64 via Python's
    math.sqrt (the IEEE operation), specials and a strided view included."""
    import math
    values = torch.rand(2**16, dtype=torch.float64) * torch.exp(torch.randn(2**16, dtype=torch.float64) * 30)
    values[:8] = torch.tensor([0.0, -0.0, 5e-324, 1e-310, float("inf"), float("nan"), -1.0, 1.0])
    x = values.to(dtype).view(256, 256).t()
    got = reference._sqrt(x)
    if dtype == torch.float32:
        expected = x.double().sqrt().float()
    else:
        expected = torch.tensor([math.sqrt(v) if v >= 0 else float("nan") for v in x.flatten().tolist()],
                                dtype=dtype).view(x.shape)
    assert torch.equal(got.isnan(), expected.isnan())
    numbers = ~got.isnan()  # (a NaN's sign is not specified)
    assert torch.equal(got[numbers], expected[numbers])
    assert torch.equal(torch.signbit(got[numbers]), torch.signbit(expected[numbers]))  # sqrt(-0) = -0
