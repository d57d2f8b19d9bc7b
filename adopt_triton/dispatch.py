"""Which implementation updates which tensor, and the checks before any update."""
from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from adopt_triton import reference
from adopt_triton.foreach import foreach_adopt
from adopt_triton.fused import fused_adopt
from adopt_triton.kernels import adopt as kernel

FUSED_DTYPES = kernel.PARAM_DTYPES + (torch.complex64,)


def fused_unsupported_reason(param: Tensor) -> Optional[str]:
    """Why the fused kernel cannot update ``param``, or None if it can."""
    if param.dtype not in FUSED_DTYPES:
        names = ", ".join(str(d) for d in FUSED_DTYPES)
        return f"the fused ADOPT kernel does not support dtype {param.dtype} (supported: {names})"
    if kernel.INTERPRETED and param.device.type != "cpu":
        return ("under TRITON_INTERPRET=1 the fused ADOPT kernel runs on CPU tensors only (its "
                "launch tables hold host addresses)")
    if param.device.type == "cpu" and not kernel.INTERPRETED:
        return ("the fused ADOPT kernel needs a CUDA tensor; CPU tensors run it only through "
                "Triton's interpreter (set TRITON_INTERPRET=1 before importing adopt_triton), "
                "otherwise use fused=False or fused=None on CPU")
    if param.device.type not in ("cpu", "cuda"):
        return f"the fused ADOPT kernel does not support device {param.device}"
    return None


def check_fused_supported(param: Tensor) -> None:
    reason = fused_unsupported_reason(param)
    if reason is not None:
        raise RuntimeError(f"ADOPT(fused=True): {reason}")


def use_fused(fused: Optional[bool], param: Tensor) -> bool:
    """fused=None picks the kernel for CUDA tensors it supports, eager otherwise."""
    if fused is None:
        return param.device.type == "cuda" and fused_unsupported_reason(param) is None
    return fused


def eager_reason(fused: Optional[bool], param: Tensor) -> Optional[str]:
    """Why ``param`` would not take the fused kernel under ``fused``, or None
    if it would (for options that only the kernel implements)."""
    if use_fused(fused, param):
        return None
    if fused is False:
        return "fused=False"
    return fused_unsupported_reason(param) or (
        "fused=None updates CPU tensors eagerly (fused=True runs the kernel on them under "
        "TRITON_INTERPRET=1)")


def _check_operands(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    """Same shape and device for all four; the gradient has the param's dtype,
    the two states share one (the param's, or another ``state_dtype``)."""
    for name, t, dtype in (("grad", grad, param.dtype), ("exp_avg", exp_avg, exp_avg.dtype),
                           ("exp_avg_sq", exp_avg_sq, exp_avg.dtype)):
        if t.shape != param.shape or t.dtype != dtype or t.device != param.device:
            raise RuntimeError(
                f"ADOPT: {name} ({tuple(t.shape)}, {t.dtype}, {t.device}) does not match its "
                f"parameter ({tuple(param.shape)}, {param.dtype}, {param.device})")


def _check_sharding(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                    exp_avg_sqs: List[Tensor]) -> None:
    """DTensor parameters (FSDP2): all of a group or none, each with its
    gradient and state sharded like it, and one device for the group."""
    sharded = [isinstance(p, DTensor) for p in params]
    if any(sharded) and not all(sharded):
        raise RuntimeError(
            "ADOPT: a param group mixes DTensor parameters (indices "
            f"{[i for i, s in enumerate(sharded) if s]}) with plain tensors (indices "
            f"{[i for i, s in enumerate(sharded) if not s]}); put them in separate param groups")
    if not any(sharded):
        return
    if len({p.device for p in params}) > 1:
        raise RuntimeError("ADOPT: the DTensor shards of one param group are on different devices "
                           f"({sorted({str(p.device) for p in params})})")
    for index, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs,
                                                                   exp_avg_sqs)):
        for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if not isinstance(t, DTensor) or t.placements != param.placements \
                    or t.device_mesh != param.device_mesh:
                raise RuntimeError(f"ADOPT: the {name} of DTensor parameter {index} is not sharded "
                                   f"like it ({getattr(t, 'placements', 'a plain tensor')} vs "
                                   f"{param.placements})")


def check(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
          exp_avg_sqs: List[Tensor], fused: Optional[bool]) -> None:
    """Raise before any update if a tensor cannot be updated as asked."""
    _check_sharding(params, grads, exp_avgs, exp_avg_sqs)
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        _check_operands(param, grad, exp_avg, exp_avg_sq)
        if fused:
            check_fused_supported(param)
            if exp_avg.dtype != param.dtype and exp_avg.dtype not in kernel.STATE_DTYPES:
                raise RuntimeError(f"ADOPT(fused=True): state dtype {exp_avg.dtype} is not supported "
                                   f"(supported: the param's dtype, {kernel.STATE_DTYPES})")


def _eager_adopt(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, foreach: Optional[bool],
                 grad_scale=None, found_inf=None, stochastic_round_seed=None,
                 **hyperparameters) -> None:
    """The eager paths: ``foreach_adopt`` unless ``foreach=False`` (then the
    single-tensor reference). foreach=None picks foreach: on the CPU
    (bench/results/cpu-smoke-2026-11-29.json) it took 2.0-2.3x less time per
    step for 100-148 tensors and the same within noise for one tensor.
    GradScaler's unscale-and-skip is done eagerly here (reading found_inf on
    the host, as GradScaler itself does for unfused optimizers)."""
    if stochastic_round_seed is not None:
        raise RuntimeError("ADOPT: stochastic rounding runs in the fused kernel only")
    if found_inf is not None and float(found_inf) != 0:
        return
    if grad_scale is not None:
        grads = [g / grad_scale.to(g.device) for g in grads]
    implementation = reference.adopt if foreach is False else foreach_adopt
    implementation(params, grads, exp_avgs, exp_avg_sqs, state_steps, **hyperparameters)


def apply(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
          exp_avg_sqs: List[Tensor], state_steps: List[Tensor], *, fused: Optional[bool],
          foreach: Optional[bool] = None, **options) -> None:
    """One ADOPT step over checked lists of tensors: each tensor goes to the
    fused kernel (as ``use_fused`` decides) or to an eager path."""
    fused_mask = [use_fused(fused, p) for p in params]

    def select(wanted):
        return [[t for t, f in zip(column, fused_mask) if f == wanted]
                for column in (params, grads, exp_avgs, exp_avg_sqs, state_steps)]
    if any(fused_mask):
        fused_adopt(*select(True), **options)
    if not all(fused_mask):
        _eager_adopt(*select(False), foreach=foreach, **options)


def adopt(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
          exp_avg_sqs: List[Tensor], state_steps: List[Tensor], *, fused: Optional[bool] = None,
          foreach: Optional[bool] = None, lr, beta1: float, beta2: float, eps: float,
          clip_lambda: Optional[Callable], weight_decay: float, decouple: bool, maximize: bool,
          grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
          stochastic_round_seed: Optional[int] = None) -> None:
    """Functional ADOPT: ``check`` then ``apply``. Step counts of tensors on
    the fused path must be float32 tensors on their parameter's device."""
    check(params, grads, exp_avgs, exp_avg_sqs, fused)
    apply(params, grads, exp_avgs, exp_avg_sqs, state_steps, fused=fused, foreach=foreach, lr=lr,
          beta1=beta1, beta2=beta2, eps=eps, clip_lambda=clip_lambda, weight_decay=weight_decay,
          decouple=decouple, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
          stochastic_round_seed=stochastic_round_seed)
