"""Which implementation updates which tensor, and the checks before any update."""
from typing import List, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from adopt_triton import reference
from adopt_triton.common import Tensors
from adopt_triton.foreach import foreach_adopt
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


def step_device(fused: Optional[bool], param: Tensor) -> torch.device:
    """Where ``param``'s step count lives: on its device when the fused
    kernel updates it (the kernel reads it there, no host sync), else on the
    CPU (the eager paths read it on the host)."""
    return param.device if use_fused(fused, param) else torch.device("cpu")


def eager_implementation(foreach: Optional[bool]):
    """foreach=None picks foreach: on the CPU (bench/results/cpu-smoke-2026-11-29.json)
    it took 2.0-2.3x less time per step for 100-148 tensors and the same
    within noise for one tensor."""
    return reference.adopt if foreach is False else foreach_adopt


def _check_operands(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    """Same shape and device for all four; the gradient has the param's dtype,
    the two states share one (the param's, or another ``state_dtype``)."""
    for name, t, dtype in (("grad", grad, param.dtype), ("exp_avg", exp_avg, exp_avg.dtype),
                           ("exp_avg_sq", exp_avg_sq, exp_avg.dtype)):
        if t.shape != param.shape or t.dtype != dtype or t.device != param.device:
            raise RuntimeError(
                f"ADOPT: {name} ({tuple(t.shape)}, {t.dtype}, {t.device}) does not match its "
                f"parameter ({tuple(param.shape)}, {param.dtype}, {param.device})")


def _check_sharding(tensors: Tensors) -> None:
    """DTensor parameters (FSDP2): all of a group or none, each with its
    gradient and state sharded like it, and one device for the group."""
    params = tensors.params
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
    for index, (param, *others) in enumerate(zip(*tensors[:4])):
        for name, t in zip(("grad", "exp_avg", "exp_avg_sq"), others):
            if not isinstance(t, DTensor) or t.placements != param.placements \
                    or t.device_mesh != param.device_mesh:
                raise RuntimeError(f"ADOPT: the {name} of DTensor parameter {index} is not sharded "
                                   f"like it ({getattr(t, 'placements', 'a plain tensor')} vs "
                                   f"{param.placements})")


def check(tensors: Tensors, fused: Optional[bool]) -> None:
    """Raise before any update if a tensor cannot be updated as asked."""
    _check_sharding(tensors)
    for param, grad, exp_avg, exp_avg_sq in zip(*tensors[:4]):
        _check_operands(param, grad, exp_avg, exp_avg_sq)
        if use_fused(fused, param):
            check_fused_supported(param)
            if exp_avg.dtype != param.dtype and exp_avg.dtype not in kernel.STATE_DTYPES:
                raise RuntimeError(f"ADOPT(fused=True): state dtype {exp_avg.dtype} is not supported "
                                   f"(supported: the param's dtype, {kernel.STATE_DTYPES})")


def fused_positions(fused: Optional[bool], params: List[Tensor]) -> List[int]:
    return [i for i, p in enumerate(params) if use_fused(fused, p)]
