"""The fused kernel's runtime hyper-parameters, rounded to float32 on the
host as ATen rounds the reference's Python scalars."""
import struct
from typing import NamedTuple, Optional, Tuple


def f32(x: float) -> float:
    """Round a Python float (float64) to the nearest float32, kept as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # rounds beyond the largest float32
        return float("inf") if x > 0 else float("-inf")


def beyond_float32(lr: Optional[float], eps: float, weight_decay: float) -> Optional[Tuple[str, float]]:
    """The first of lr, eps, weight_decay and lr * weight_decay (lr None:
    read elsewhere, not checked) that float32 cannot hold, as (name, value),
    else None: an update with inf would turn every param NaN or inf."""
    values = (("lr", lr), ("eps", eps), ("weight_decay", weight_decay),
              ("lr * weight_decay", None if lr is None else lr * weight_decay))
    return next(((name, value) for name, value in values
                 if value is not None and abs(f32(value)) == float("inf")), None)


class StepScalars(NamedTuple):
    """The kernel's runtime hyper-parameters, each pre-rounded to float32 the
    way ATen rounds the corresponding Python scalar in the reference, and
    which lerp formula torch uses for this beta1."""
    neg_lr: float
    weight_decay: float
    neg_lr_weight_decay: float
    lerp_coeff: float
    beta2: float
    one_minus_beta2: float
    eps: float
    lerp_from_end: bool  # a constexpr of the kernel, not an argument

    @property
    def arguments(self) -> tuple:
        return self[:7]

    @classmethod
    def make(cls, *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float) -> "StepScalars":
        weight = f32(1.0 - beta1)  # torch.lerp's scalar weight
        from_end = not abs(weight) < 0.5
        return cls(neg_lr=f32(-lr), weight_decay=f32(weight_decay),
                   neg_lr_weight_decay=f32(-lr * weight_decay),
                   lerp_coeff=weight - 1.0 if from_end else weight,  # exact in float32
                   beta2=f32(beta2), one_minus_beta2=f32(1.0 - beta2), eps=f32(eps),
                   lerp_from_end=from_end)
