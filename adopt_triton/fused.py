"""The host side of the fused path: group tensors by device and dtype, hand
the kernel dense operands, cache its launch tables, bump the step counts."""
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from adopt_triton import reference
from adopt_triton.kernels import adopt as kernel


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


def _clip_values(clip_lambda: Callable, steps: List[Tensor]) -> Tensor:
    """clip_lambda evaluated on the device, on a tensor of the step counts
    (as torch-adopt's foreach path passes a step tensor): no host sync."""
    counts = torch.stack(steps)
    try:
        values = clip_lambda(counts)
    except Exception as error:
        raise TypeError(
            "ADOPT's fused path evaluates clip_lambda on the device, on a float32 tensor of "
            "step counts, and this clip_lambda cannot take a tensor "
            f"({type(error).__name__}: {error}). Write it with tensor operations "
            "(e.g. lambda n: n ** 0.5), or use fused=False.") from error
    values = torch.as_tensor(values, dtype=torch.float32, device=counts.device)
    if values.shape not in ((), counts.shape):
        raise TypeError(f"clip_lambda returned shape {tuple(values.shape)} for step counts of "
                        f"shape {tuple(counts.shape)}; it must act element-wise")
    return values.expand(counts.shape).contiguous()


def _bump_steps(steps: List[Tensor], found_inf: Optional[Tensor]) -> None:
    """step += 1 in one fused op; a step skipped by GradScaler is not counted."""
    if found_inf is None:
        torch._foreach_add_(steps, 1)
    else:
        torch._foreach_add_(steps, 1 - found_inf.to(steps[0].device, torch.float32))


def fused_adopt(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                exp_avg_sqs: List[Tensor], state_steps: List[Tensor], *, lr, beta1: float,
                beta2: float, eps: float, clip_lambda: Optional[Callable], weight_decay: float,
                decouple: bool, maximize: bool, grad_scale: Optional[Tensor] = None,
                found_inf: Optional[Tensor] = None,
                plans: Optional[Dict[tuple, kernel.LaunchPlan]] = None) -> None:
    """One ADOPT step for every tensor: one kernel launch per device and dtype,
    plus one op bumping the step counts (float32 tensors on each param's
    device). ``plans`` caches the launch tables between calls."""
    plans = {} if plans is None else plans
    if weight_decay == 0:
        weight_decay_mode = kernel.NO_WEIGHT_DECAY
    else:
        weight_decay_mode = kernel.DECOUPLED_WEIGHT_DECAY if decouple else kernel.COUPLED_WEIGHT_DECAY
    if clip_lambda is None:
        clip_mode = kernel.NO_CLIP
    else:
        clip_mode = kernel.DEFAULT_CLIP if clip_lambda is reference.default_clip_lambda else kernel.CLIP_PER_TENSOR
    groups: Dict[tuple, list] = {}
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs,
                                                      state_steps):
        operands, write_back = _kernel_operands(param, grad, exp_avg, exp_avg_sq)
        group = groups.setdefault((param.device, operands[0].dtype), [[], [], [], [], [], []])
        for column, tensor in zip(group, operands + [step]):
            column.append(tensor)
        group[5].extend(write_back)
    for (device, dtype), (*tensors, write_back) in groups.items():
        key = kernel.plan_key(*tensors)
        plan = plans.get((device, dtype))
        if plan is None or plan.key != key:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "ADOPT: the tensors changed (new parameters, gradients or state) while a CUDA "
                    "graph is being captured, and the kernel's launch tables cannot be rebuilt "
                    "during capture: run step() once on these exact tensors before capturing")
            plan = plans[device, dtype] = kernel.make_plan(key, device)
        lr_tensor = lr if torch.is_tensor(lr) and lr.device == device else None  # read in the kernel
        scalars = kernel.StepScalars.make(lr=0.0 if lr_tensor is not None else float(lr), beta1=beta1,
                                          beta2=beta2, eps=eps, weight_decay=weight_decay)
        clip_values = _clip_values(clip_lambda, tensors[4]) if clip_mode == kernel.CLIP_PER_TENSOR else None
        kernel.adopt_step_(plan, dtype, scalars, lr_tensor=lr_tensor, clip_mode=clip_mode,
                           clip_values=clip_values, grad_scale=grad_scale, found_inf=found_inf,
                           maximize=maximize, weight_decay_mode=weight_decay_mode)
        for original, staged in write_back:
            original.copy_(staged)
        _bump_steps(tensors[4], found_inf)
