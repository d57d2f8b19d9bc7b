"""The host side of the fused path: group tensors by device and dtype, hand
the kernel dense operands, cache its launch tables, bump the step counts.

The launch itself is the custom op ``adopt_triton::fused_adopt_`` (declared
mutations, a fake implementation), so ``torch.compile`` traces the optimizer
step around it with ``fullgraph=True``: its launch tables hold raw
addresses, which only an opaque op can build (as ATen's own ``_fused_adam_``).
"""
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

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


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """GradScaler's scalars on the launch's device (a no-op where they are)."""
    return None if t is None else t.to(device)


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's local shard (sharing its storage); any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


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


_PLAN_CACHE: "OrderedDict[tuple, kernel.LaunchPlan]" = OrderedDict()
_PLAN_CACHE_SIZE = 64


def _launch_plan(key: tuple, device: torch.device) -> kernel.LaunchPlan:
    """The launch tables for ``key`` (addresses and sizes), built once and
    cached: a plan depends on nothing else, so it stays valid for as long as
    the same tensors (or any at the same addresses) are passed."""
    plan = _PLAN_CACHE.get((device, key))
    if plan is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "ADOPT: the tensors changed (new parameters, gradients or state) while a CUDA "
                "graph is being captured, and the kernel's launch tables cannot be rebuilt "
                "during capture: run step() once on these exact tensors before capturing")
        plan = _PLAN_CACHE[device, key] = kernel.make_plan(key, device)
        if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    _PLAN_CACHE.move_to_end((device, key))
    return plan


@torch.library.custom_op("adopt_triton::fused_adopt_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "state_steps"))
def _fused_adopt_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                    exp_avg_sqs: List[Tensor], state_steps: List[Tensor], lr_tensor: Optional[Tensor],
                    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    decouple: bool, maximize: bool, clip_mode: int, clip_values: Optional[Tensor],
                    grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                    stochastic_round_seed: Optional[int]) -> None:
    """One launch over real, dense tensors of one device, param dtype and state
    dtype, then one op bumping their step counts (not counted when found_inf
    is set)."""
    if weight_decay == 0:
        weight_decay_mode = kernel.NO_WEIGHT_DECAY
    else:
        weight_decay_mode = kernel.DECOUPLED_WEIGHT_DECAY if decouple else kernel.COUPLED_WEIGHT_DECAY
    plan = _launch_plan(kernel.plan_key(params, grads, exp_avgs, exp_avg_sqs, state_steps),
                        params[0].device)
    scalars = kernel.StepScalars.make(lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                      weight_decay=weight_decay)
    kernel.adopt_step_(plan, params[0].dtype, scalars, lr_tensor=lr_tensor, clip_mode=clip_mode,
                       clip_values=clip_values, grad_scale=grad_scale, found_inf=found_inf,
                       maximize=maximize, weight_decay_mode=weight_decay_mode,
                       state_dtype=exp_avgs[0].dtype, stochastic_round_seed=stochastic_round_seed)
    if found_inf is None:
        torch._foreach_add_(state_steps, 1)
    else:
        torch._foreach_add_(state_steps, 1 - found_inf.to(state_steps[0].device, torch.float32))


@_fused_adopt_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr_tensor, lr, beta1, beta2, eps,
      weight_decay, decouple, maximize, clip_mode, clip_values, grad_scale, found_inf,
      stochastic_round_seed) -> None:
    return None


def fused_adopt(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                exp_avg_sqs: List[Tensor], state_steps: List[Tensor], *, lr, beta1: float,
                beta2: float, eps: float, clip_lambda: Optional[Callable], weight_decay: float,
                decouple: bool, maximize: bool, grad_scale: Optional[Tensor] = None,
                found_inf: Optional[Tensor] = None,
                stochastic_round_seed: Optional[int] = None) -> None:
    """One ADOPT step for every tensor: one kernel launch per device, param
    dtype and state dtype, plus one op bumping the step counts (float32
    tensors on each param's device). A tensor lr on the params' device is
    read by the kernel. With a ``stochastic_round_seed``, bf16 stores round
    stochastically, with random bits keyed on the seed, the step, the tensor's
    place in its launch and the element."""
    if clip_lambda is None:
        clip_mode = kernel.NO_CLIP
    else:
        clip_mode = kernel.DEFAULT_CLIP if clip_lambda is reference.default_clip_lambda else kernel.CLIP_PER_TENSOR
    groups: Dict[tuple, list] = {}
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs,
                                                      state_steps):
        # DTensor shards (FSDP2): the update is element-wise, so each rank
        # updates its local shard in place, with no communication.
        operands, write_back = _kernel_operands(*map(local_shard, (param, grad, exp_avg, exp_avg_sq)))
        group = groups.setdefault((param.device, operands[0].dtype, operands[2].dtype),
                                  [[], [], [], [], [], []])
        for column, tensor in zip(group, operands + [step]):
            column.append(tensor)
        group[5].extend(write_back)
    for (device, _, _), (*tensors, write_back) in groups.items():
        lr_on_device = torch.is_tensor(lr) and lr.device == device
        clip_values = _clip_values(clip_lambda, tensors[4]) if clip_mode == kernel.CLIP_PER_TENSOR else None
        _fused_adopt_op(*tensors, lr_tensor=lr if lr_on_device else None,
                        lr=0.0 if lr_on_device else float(lr), beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=weight_decay, decouple=decouple, maximize=maximize,
                        clip_mode=clip_mode, clip_values=clip_values,
                        grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device),
                        stochastic_round_seed=stochastic_round_seed)
        for original, staged in write_back:
            original.copy_(staged)
