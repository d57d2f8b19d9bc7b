"""Choosing between the fused Triton kernel and the eager reference, and
feeding the kernel tensors it can update in place."""
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from adopt_triton import reference
from adopt_triton.kernels import adopt as kernel

FUSED_DTYPES = (torch.float32, torch.complex64)


def fused_unsupported_reason(param: Tensor) -> Optional[str]:
    """Why the fused kernel cannot update ``param``, or None if it can."""
    if param.dtype not in FUSED_DTYPES:
        names = ", ".join(str(d) for d in FUSED_DTYPES)
        return f"the fused ADOPT kernel does not support dtype {param.dtype} (supported: {names})"
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


def _dense_strides(t: Tensor) -> Optional[Tuple[int, ...]]:
    """The strides of ``t``'s non-singleton dims if ``t`` covers its memory
    span exactly once (non-overlapping and dense, any dim order), else None.
    Two tensors of one shape with equal results have the same memory layout."""
    strides = tuple(st for size, st in zip(t.shape, t.stride()) if size != 1)
    expected = 1
    for stride, size in sorted((st, size) for size, st in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return None
        expected *= size
    return strides


def _kernel_operands(param: Tensor, grad: Tensor, exp_avg: Tensor,
                     exp_avg_sq: Tensor) -> Tuple[List[Tensor], List[Tuple[Tensor, Tensor]]]:
    """Real tensors sharing one dense layout for the kernel, and the
    (original, staged) pairs to copy back after it ran.

    Tensors whose layout already matches a dense ``param`` (the usual case,
    channels_last included) are passed as they are and updated in place.
    Any other tensor (a non-dense view, a gradient or state with other
    strides) is staged into a dense copy, and mutated ones are copied back.
    """
    tensors = [torch.view_as_real(t) if t.is_complex() else t
               for t in (param, grad, exp_avg, exp_avg_sq)]
    layout = tensors[0]
    if _dense_strides(layout) is None:
        layout = torch.empty_like(layout, memory_format=torch.contiguous_format)
    layout_strides = _dense_strides(layout)
    operands, write_back = [], []
    for i, t in enumerate(tensors):
        if _dense_strides(t) == layout_strides:
            operands.append(t)
        else:
            staged = torch.empty_like(layout).copy_(t)
            operands.append(staged)
            if i != 1:  # the gradient is only read
                write_back.append((t, staged))
    return operands, write_back


def _check_operands(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape or t.dtype != param.dtype or t.device != param.device:
            raise RuntimeError(
                f"ADOPT: {name} ({tuple(t.shape)}, {t.dtype}, {t.device}) does not match its "
                f"parameter ({tuple(param.shape)}, {param.dtype}, {param.device})")


def _fused_adopt(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                 exp_avg_sqs: List[Tensor], state_steps: List[Tensor], *, lr: float,
                 beta1: float, beta2: float, eps: float,
                 clip_lambda: Optional[Callable[[float], float]], weight_decay: float,
                 decouple: bool, maximize: bool) -> None:
    if weight_decay == 0:
        weight_decay_mode = kernel.NO_WEIGHT_DECAY
    else:
        weight_decay_mode = kernel.DECOUPLED_WEIGHT_DECAY if decouple else kernel.COUPLED_WEIGHT_DECAY
    lr = float(lr)
    scalars_by_step = {}
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs,
                                                        state_steps):
        n = float(step_t)  # a CPU tensor: no device synchronisation
        if n not in scalars_by_step:  # the clip value depends on each tensor's own step
            clip = clip_lambda(n) if clip_lambda is not None and n != 0 else 0.0
            scalars_by_step[n] = kernel.StepScalars.make(
                lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, clip=clip)
        operands, write_back = _kernel_operands(param, grad, exp_avg, exp_avg_sq)
        kernel.adopt_step_(*operands, scalars_by_step[n], first_step=n == 0, maximize=maximize,
                           weight_decay_mode=weight_decay_mode, clip=clip_lambda is not None)
        for original, staged in write_back:
            original.copy_(staged)
        step_t += 1


def check(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
          exp_avg_sqs: List[Tensor], fused: Optional[bool]) -> None:
    """Raise before any update if a tensor cannot be updated as asked."""
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        _check_operands(param, grad, exp_avg, exp_avg_sq)
        if fused:
            check_fused_supported(param)


def apply(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
          exp_avg_sqs: List[Tensor], state_steps: List[Tensor], *, fused: Optional[bool],
          **hyperparameters) -> None:
    """One ADOPT step over checked lists of tensors: each tensor goes to the
    fused kernel or to the eager reference as ``use_fused`` decides."""
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    fused_mask = [use_fused(fused, p) for p in params]
    for implementation, wanted in ((_fused_adopt, True), (reference.adopt, False)):
        selected = [[t for t, f in zip(lst, fused_mask) if f == wanted] for lst in lists]
        if selected[0]:
            implementation(*selected, **hyperparameters)


def adopt(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
          exp_avg_sqs: List[Tensor], state_steps: List[Tensor], *, fused: Optional[bool] = None,
          lr: float, beta1: float, beta2: float, eps: float,
          clip_lambda: Optional[Callable[[float], float]], weight_decay: float, decouple: bool,
          maximize: bool) -> None:
    """Functional ADOPT: ``check`` then ``apply``."""
    check(params, grads, exp_avgs, exp_avg_sqs, fused)
    apply(params, grads, exp_avgs, exp_avg_sqs, state_steps, fused=fused, lr=lr, beta1=beta1,
          beta2=beta2, eps=eps, clip_lambda=clip_lambda, weight_decay=weight_decay,
          decouple=decouple, maximize=maximize)
