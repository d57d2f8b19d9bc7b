"""Shared helpers of the test suite: inputs, bit comparisons, lock-step runs."""
import torch

SIZES = [(1,), (17,), (4099,), (5, 7, 9)]


def wide_grad(shape, device="cpu", dtype=torch.float32, spread=3.0):
    """Gradients whose magnitudes span ~8 orders of magnitude (spread=3), both signs."""
    shape = tuple(shape) + ((2,) if dtype.is_complex else ())
    g = torch.randn(shape, dtype=torch.float64) * torch.exp(torch.randn(shape, dtype=torch.float64) * spread)
    if dtype.is_complex:
        return torch.view_as_complex(g).to(device=device, dtype=dtype)
    return g.to(device=device, dtype=dtype)


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
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    a, b = actual.detach().cpu(), expected.detach().cpu()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()), f"{what}: NaNs in different places"
    a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    same = a.view(as_int) == b.view(as_int)
    assert bool(same.all()), (f"{what}: {int((~same).sum())} of {a.numel()} elements differ, "
                              f"up to {ulp_diff(a.float(), b.float())} float32 ulp")
