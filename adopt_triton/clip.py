"""Evaluating a user's ``clip_lambda`` for tensors whose step counts live on
a device, before anything is updated.

torch-adopt calls ``clip_lambda(n)`` with a Python float, so callables
written for numbers (``lambda n: min(n ** 0.25, 3.0)``, ``math.sqrt``,
``if n < k``) must work here too. Where a callable computes element-wise on
a float64 tensor of step counts, it is evaluated that way, on the device
with no host synchronisation (as the kernel reads the values there);
otherwise once per distinct step count on the host, which reads the counts
(a synchronisation on CUDA, refused under ``capturable=True``). Which of the
two is decided once per device, by evaluating both on a probe of counts.
It is never called for a first step (n = 0), which clips nothing.
"""
import warnings
from typing import Callable, Dict

import torch
from torch import Tensor

# Step counts the probe evaluates both ways (float64, as the host's floats).
_PROBE = (1.0, 2.0, 3.0, 7.0, 10.0, 1000.0, 123457.0)


class ClipEvaluator:
    """One ``clip_lambda``; remembers per device type whether it takes tensors."""

    def __init__(self, clip_lambda: Callable):
        self.clip_lambda = clip_lambda
        self._takes_tensors: Dict[str, bool] = {}

    def takes_tensors(self, device: torch.device) -> bool:
        """Whether the callable computes element-wise on a float64 tensor of
        step counts on ``device``, giving what it gives for each count as a
        Python float (within a float32 unit: float64 tensor math is not
        always correctly rounded). Whatever fails on the probe means: on
        numbers (where the user's own exceptions then propagate, for the
        counts torch-adopt would call it with)."""
        known = self._takes_tensors.get(device.type)
        if known is None:
            try:
                expected = [self._number(n) for n in _PROBE]
                with warnings.catch_warnings():  # a callable for numbers may warn about tensors
                    warnings.simplefilter("ignore")
                    values = self._on_tensor(torch.tensor(_PROBE, dtype=torch.float64, device=device))
                known = torch.allclose(values.cpu().double(), torch.tensor(expected, dtype=torch.float32).double(),
                                       rtol=2**-23, atol=0, equal_nan=True)
            except Exception:  # any failure on a tensor means: evaluate on numbers
                known = False
            self._takes_tensors[device.type] = known
        return known

    def _number(self, n: float) -> float:
        value = self.clip_lambda(n)
        try:
            return float(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"clip_lambda({n}) returned {value!r}, which is not a number") from error

    def _on_tensor(self, counts: Tensor) -> Tensor:
        values = self.clip_lambda(counts)
        values = torch.as_tensor(values, dtype=torch.float32, device=counts.device)
        if values.shape not in ((), counts.shape):
            raise ValueError("clip_lambda is not element-wise")
        return values.expand(counts.shape).contiguous()

    def by_count(self, counts) -> Dict[float, float]:
        """The value for each distinct step count (floats), evaluated on the
        host as torch-adopt evaluates it; first steps are left out."""
        return {n: self._number(n) for n in set(counts) if n != 0}

    def on_device(self, counts: Tensor, *, capturable: bool) -> Tensor:
        """float32 clip values for a 1-D float32 tensor of step ``counts``,
        on its device. First steps (n = 0) get 0, a value the kernel never reads."""
        if self.takes_tensors(counts.device):
            clips = self._on_tensor(counts.double().clamp(min=1))
            return torch.where(counts == 0, 0.0, clips)
        if capturable:
            raise RuntimeError(
                "ADOPT(capturable=True): clip_lambda must compute element-wise on a tensor of step "
                "counts on the device (e.g. lambda n: n ** 0.25 or lambda n: n.clamp(max=3.0)); "
                "this one only works on Python numbers, which would need a host read of the counts")
        on_host = counts.tolist()
        values = self.by_count(on_host)
        return torch.tensor([values.get(n, 0.0) for n in on_host], dtype=torch.float32,
                            device=counts.device)
