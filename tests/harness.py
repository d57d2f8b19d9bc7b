"""Shared helpers of the test suite: inputs, bit comparisons, reference runs,
checkpoints through disk."""
import io
from typing import Callable, List, Optional, Sequence

import adopt
import torch

from adopt_triton import ADOPT, Hyper, Tensors, reference
from adopt_triton.common import default_clip_lambda

SIZES = [(1,), (17,), (4099,), (5, 7, 9)]


def wide_grad(shape, device="cpu", dtype=torch.float32, spread=3.0):
    """Gradients whose magnitudes span ~8 orders of magnitude (spread=3), both signs."""
    shape = tuple(shape) + ((2,) if dtype.is_complex else ())
    g = torch.randn(shape, dtype=torch.float64) * torch.exp(torch.randn(shape, dtype=torch.float64) * spread)
    if dtype.is_complex:
        return torch.view_as_complex(g).to(device=device, dtype=dtype)
    return g.to(device=device, dtype=dtype)


def make_params(shapes: Sequence, device="cpu", dtype=torch.float32, seed=0) -> List[torch.nn.Parameter]:
    """Fresh random parameters (never zeros), the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    real = torch.float64 if not dtype.is_complex else torch.complex128
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=real).to(dtype).to(device))
            for s in shapes]


def hyper(lr=1e-2, betas=(0.9, 0.9999), eps=1e-6, clip_lambda: Optional[Callable] = default_clip_lambda,
          weight_decay=0.0, decouple=False, maximize=False) -> Hyper:
    return Hyper(lr, betas[0], betas[1], eps, weight_decay, decouple, maximize, clip_lambda)


def fresh_state(params: Sequence[torch.Tensor], dtype=None) -> Tensors:
    """Copies of ``params`` with zero state and step 0 (grads to be filled in)."""
    params = [p.detach().clone() for p in params]
    return Tensors(params, [None] * len(params),
                   [torch.zeros_like(p, dtype=dtype or p.dtype) for p in params],
                   [torch.zeros_like(p, dtype=dtype or p.dtype) for p in params],
                   [torch.tensor(0.0, device=p.device) for p in params])


def clone_tensors(tensors: Tensors, device=None) -> Tensors:
    """Detached copies of every tensor of ``tensors`` (on ``device`` if given)."""
    return tensors.map_tensors(lambda t: t.detach().to(device or t.device).clone())


class ReferenceRun:
    """The eager reference stepping CPU copies of some params: the expected
    values of a run. ``step(grads, hyper, active)`` steps the tensors listed
    in ``active`` (all by default) with the given gradients."""

    def __init__(self, params: Sequence[torch.Tensor], state_dtype=None):
        self.tensors = fresh_state([p.detach().cpu() for p in params], state_dtype)

    def step(self, grads: Sequence[torch.Tensor], hyper_: Hyper, active: Optional[Sequence[int]] = None):
        active = range(len(self.tensors.params)) if active is None else active
        picked = self.tensors.pick(active)
        reference.adopt(picked._replace(grads=[g.detach().cpu() for g in grads]), hyper_)

    def state_of(self, index: int) -> dict:
        t = self.tensors
        return dict(step=t.steps[index], exp_avg=t.exp_avgs[index], exp_avg_sq=t.exp_avg_sqs[index])


STEPS = 12
TORCH_ADOPT_SHAPES = [(1,), (17,), (33, 65), (4, 3, 5, 7)]


def against_torch_adopt(device, options=None, *, groups=None, dtype=torch.float32, shapes=TORCH_ADOPT_SHAPES,
                            has_grad=lambda step, index: True, lr_factory=None, scheduler=None,
                            steps=STEPS, grad_spread=3.0, flags=None):
    """Train the same params with ours (``flags``: fused=True by default) and
    torch-adopt 0.1.0's single-tensor path on the same gradients, checking
    params and every state tensor after every step (float32 tolerance).

    groups(params) -> param groups; lr_factory() -> a fresh lr (for tensor lrs);
    scheduler(optimizer) -> an lr scheduler stepped after every step.
    """
    options = dict(options or {})
    flags = dict(fused=True) if flags is None else flags
    ours_params, theirs_params = make_params(shapes, device, dtype), make_params(shapes, "cpu", dtype)
    groups = groups or (lambda params: params)
    if lr_factory is not None:
        ours = ADOPT(groups(ours_params), lr=lr_factory(), **flags, **options)
        theirs = adopt.ADOPT(groups(theirs_params), lr=lr_factory(), foreach=False, **options)
    else:
        ours = ADOPT(groups(ours_params), **flags, **options)
        theirs = adopt.ADOPT(groups(theirs_params), foreach=False, **options)
    schedulers = [scheduler(ours), scheduler(theirs)] if scheduler else []
    for step in range(steps):
        for index, (a, b) in enumerate(zip(ours_params, theirs_params)):
            if has_grad(step, index):
                grad = wide_grad(a.shape, dtype=dtype, spread=grad_spread)
                a.grad, b.grad = grad.to(device), grad.clone()
            else:
                a.grad = b.grad = None
        ours.step()
        theirs.step()
        for s in schedulers:
            s.step()
        assert_same_run(ours_params, [ours.state.get(p, {}) for p in ours_params], theirs_params,
                        [theirs.state.get(p, {}) for p in theirs_params], f"step {step}", exact=False)
    return ours, theirs


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance, in float32 ulps, between two float32 tensors
    (NaNs must sit in the same places; equal infinities count as 0)."""
    a, b = a.detach().cpu().float().flatten(), b.detach().cpu().float().flatten()
    assert torch.equal(a.isnan(), b.isnan()), "NaNs in different places"
    keep = ~a.isnan()
    ia = a[keep].view(torch.int32).long()
    ib = b[keep].view(torch.int32).long()
    # Map the sign-magnitude bit patterns onto a monotonic integer line.
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if ia.numel() else 0


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same bits everywhere (signed zeros and infinities included), NaN where NaN."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{what}: {actual.shape}/{actual.dtype} vs {expected.shape}/{expected.dtype}"
    a, b = actual.detach().cpu(), expected.detach().cpu()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()), f"{what}: NaNs in different places"
    a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    same = a.view(as_int) == b.view(as_int)
    assert bool(same.all()), (f"{what}: {int((~same).sum())} of {a.numel()} elements differ, "
                              f"up to {ulp_diff(a.float(), b.float())} float32 ulp")


STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def assert_same_run(params, states, expected_params, expected_states, what="", exact=True,
                    **tolerance):
    """Params and every state tensor equal: bit for bit (``exact``) or
    within torch.testing's tolerance for the dtype (or ``rtol``/``atol``).
    ``states``: one dict per param (an optimizer's ``state[p]``, or
    ``ReferenceRun.state_of``)."""
    for index, (a, b, sa, sb) in enumerate(zip(params, expected_params, states, expected_states)):
        label = f"{what} param {index}"
        assert sa.keys() == sb.keys() or set(sb) == set(STATE_KEYS) <= set(sa), \
            f"{label}: state keys {sorted(sa)} vs {sorted(sb)}"
        pairs = [("param", a, b)] + [(key, sa[key], sb[key]) for key in sb]
        for name, x, y in pairs:
            if exact:
                assert_bitwise_equal(x.detach().cpu(), y.detach().cpu(), f"{label} {name}")
            else:
                assert x.dtype == y.dtype and x.shape == y.shape, f"{label} {name}"
                torch.testing.assert_close(x.detach().cpu(), y.detach().cpu(), equal_nan=True,
                                           msg=lambda m: f"{label} {name}: {m}", **tolerance)


def assert_matches_reference(optimizer, params, ref: ReferenceRun, what="", exact=True):
    assert_same_run(params, [optimizer.state[p] for p in params], ref.tensors.params,
                    [ref.state_of(i) for i in range(len(params))], what, exact)


def snapshot(optimizer, params) -> List[torch.Tensor]:
    """Copies of params and their state (zeros where no state exists yet)."""
    out = []
    for p in params:
        state = optimizer.state.get(p) or {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                           "exp_avg_sq": torch.zeros_like(p)}
        out += [p.detach().cpu().clone()] + [state[k].detach().cpu().clone() for k in STATE_KEYS]
    return out


def assert_unchanged(optimizer, params, before: List[torch.Tensor], what="") -> None:
    """Nothing of ``snapshot`` changed (an error must leave everything as it was)."""
    for index, (a, b) in enumerate(zip(snapshot(optimizer, params), before)):
        assert_bitwise_equal(a, b, f"{what} item {index}")


def through_disk(state_dict):
    """A state dict saved with torch.save and loaded with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
