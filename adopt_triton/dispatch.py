"""Which implementation updates which tensor, and the checks before any update."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from adopt_triton import quantize, reference
from adopt_triton.common import Tensors, as_real, dense_strides, local_shard
from adopt_triton.foreach import foreach_adopt
from adopt_triton.kernels import adopt as kernel

FUSED_DTYPES = kernel.PARAM_DTYPES + (torch.complex64,)


def fused_unsupported_reason(param: Tensor) -> Optional[str]:
    """Why ``fused=True`` cannot update ``param`` (with the kernel, or on the
    CPU with the compiled CPU step), or None if it can."""
    if param.dtype not in FUSED_DTYPES:
        names = ", ".join(str(d) for d in FUSED_DTYPES)
        return f"the fused ADOPT kernel does not support dtype {param.dtype} (supported: {names})"
    if kernel.INTERPRETED and param.device.type != "cpu":
        return ("under TRITON_INTERPRET=1 the fused ADOPT kernel runs on CPU tensors only (its "
                "launch tables hold host addresses)")
    if param.device.type not in ("cpu", "cuda"):
        return f"the fused ADOPT kernel does not support device {param.device}"
    return None


def check_fused_supported(param: Tensor) -> None:
    reason = fused_unsupported_reason(param)
    if reason is not None:
        raise RuntimeError(f"ADOPT(fused=True): {reason}")


def use_fused(fused: Optional[bool], param: Tensor) -> bool:
    """The Triton kernel: for CUDA tensors it supports under fused=None or
    True, and for CPU tensors under fused=True through Triton's interpreter."""
    if fused is None or (fused and param.device.type == "cpu" and not kernel.INTERPRETED):
        return param.device.type == "cuda" and fused_unsupported_reason(param) is None
    return fused


def use_cpu_step(fused: Optional[bool], param: Tensor) -> bool:
    """The compiled CPU step (adopt_triton.cpu): CPU tensors of the kernel's
    dtypes that do not take the kernel, unless fused=False."""
    return fused is not False and param.device.type == "cpu" and param.dtype in FUSED_DTYPES \
        and not use_fused(fused, param)


def eager_reason(fused: Optional[bool], param: Tensor) -> Optional[str]:
    """Why ``param`` would not take the fused kernel under ``fused``, or None
    if it would (for options that only the kernel implements)."""
    if use_fused(fused, param):
        return None
    if fused is False:
        return "fused=False"
    return fused_unsupported_reason(param) or (
        "CPU tensors take the compiled CPU step, not the kernel (fused=True runs the kernel on "
        "them under TRITON_INTERPRET=1)")


def step_device(fused: Optional[bool], param: Tensor) -> torch.device:
    """Where ``param``'s step count lives: on its device when the fused
    kernel updates it (the kernel reads it there, no host sync), else on the
    CPU (the eager paths read it on the host)."""
    return param.device if use_fused(fused, param) else torch.device("cpu")


# foreach=None: CPU tensors of SINGLE_TENSOR_MIN_NUMEL elements or more take
# the single-tensor path, smaller ones (and other devices') foreach. Measured
# (bench/results/cpu-step-*.json, 2 threads): with 2^22 elements cut into
# tensors of 2^k + 3, single-tensor takes 0.75-0.87x foreach's time for
# k = 14..20, the same for k = 12, 1.27x for k = 10 and 1.47x for k = 8
# (per-op dispatch); on GPT-2 124M's tensors 0.44x (foreach's list-wide
# temporaries); but a lone tensor of 2^22 takes 1.4x (2^24: 1.8x), a case
# this rule leaves slower.
SINGLE_TENSOR_MIN_NUMEL = 1 << 13


def eager_implementation(foreach: Optional[bool]):
    """The eager path for ``foreach``: True foreach, False single-tensor,
    None by tensor size (``SINGLE_TENSOR_MIN_NUMEL``)."""
    if foreach is None:
        return _by_size
    return foreach_adopt if foreach else reference.adopt


def _by_size(tensors: Tensors, hyper) -> None:
    """foreach=None: large CPU tensors single-tensor, the others foreach."""
    single = {i for i, p in enumerate(tensors.params) if p.device.type == "cpu"
              and local_shard(p).numel() >= SINGLE_TENSOR_MIN_NUMEL}
    others = [i for i in range(len(tensors.params)) if i not in single]
    if single:
        reference.adopt(tensors.pick(sorted(single)), hyper)
    if others:
        foreach_adopt(tensors.pick(others), hyper)


def state_dtypes(param_dtype: torch.dtype) -> Tuple[torch.dtype, ...]:
    """The exp_avg/exp_avg_sq dtypes an update of a ``param_dtype`` param
    takes: the param's own, or float32/bf16 for bf16/fp16 params and bf16 for
    float32 params, or 8-bit codes (int8) for real params (``state_dtype``)."""
    if param_dtype in (torch.bfloat16, torch.float16):
        return (param_dtype, torch.float32, torch.bfloat16, torch.int8)
    if param_dtype == torch.float32:
        return (torch.float32, torch.bfloat16, torch.int8)
    return (param_dtype,)


def _check_operands(index: int, param: Tensor, grad: Tensor, exp_avg: Tensor,
                    exp_avg_sq: Tensor) -> None:
    """Same shape and device for all four; the gradient has the param's dtype,
    the two states one the param's dtype allows (int8 stands for 8-bit
    codes: int8 exp_avg, uint8 exp_avg_sq); nothing written twice."""
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        allowed = (param.dtype,) if name == "grad" else state_dtypes(param.dtype)
        if name == "exp_avg_sq":
            allowed = (torch.uint8 if exp_avg.dtype == torch.int8 else exp_avg.dtype,)
        if t.shape != param.shape or t.dtype not in allowed or t.device != param.device:
            fix = "a gradient has its parameter's shape, dtype and device" if name == "grad" else \
                "a state made for another dtype or shape must be converted or dropped (opt.state.pop(p))"
            raise RuntimeError(
                f"ADOPT: the {name} of parameter {index} ({tuple(t.shape)}, {t.dtype}, {t.device}) "
                f"does not match it ({tuple(param.shape)}, {param.dtype}, {param.device}); {fix}")
    for name, t in (("parameter", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if torch._debug_has_internal_overlap(local_shard(t)) == 1:
            raise RuntimeError(
                f"ADOPT: the {name} of parameter {index} (shape {tuple(t.shape)}, strides "
                f"{t.stride()}) has elements that share memory (an expanded or self-overlapping "
                "view); every element is written, so each must have its own memory")


def _check_disjoint(params: List[Tensor]) -> None:
    """No two dense params share memory (two programs would write it at once)."""
    spans = []
    for index, param in enumerate(params):
        local = as_real(local_shard(param))
        if local.numel() and dense_strides(local) is not None:
            start = local.data_ptr()
            spans.append((start, start + local.numel() * local.element_size(), index))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise RuntimeError(f"ADOPT: parameters {min(first, second)} and {max(first, second)} of a "
                               "param group share memory; each element may be updated once per step")


def _check_steps(tensors: Tensors, fused: Optional[bool]) -> None:
    """The step count of a tensor on the kernel or the CPU step is read by
    compiled code: a float32 scalar on the parameter's device (the optimizer
    keeps them so)."""
    for index, (param, step) in enumerate(zip(tensors.params, tensors.steps)):
        if (use_fused(fused, param) or use_cpu_step(fused, param)) and (
                step.dtype != torch.float32 or step.numel() != 1 or step.device != param.device):
            raise RuntimeError(f"ADOPT: the step count of parameter {index} must be a float32 "
                               f"scalar on {param.device} for the fused step, got "
                               f"{step.dtype} of shape {tuple(step.shape)} on {step.device}")


def _check_compact(tensors: Tensors, index: int) -> None:
    """8-bit codes come with float32 block maxima (one per QUANT_BLOCK
    elements, contiguous); a remainder has its bf16 param's shape."""
    param, exp_avg = tensors.params[index], tensors.exp_avgs[index]
    scales = [None if column is None else column[index]
              for column in (tensors.exp_avg_scales, tensors.exp_avg_sq_scales)]
    if (exp_avg.dtype == torch.int8) != (scales[0] is not None) or (scales[0] is None) != (scales[1] is None):
        raise RuntimeError(f"ADOPT: parameter {index} has 8-bit state without its block maxima "
                           "(exp_avg_scale, exp_avg_sq_scale), or block maxima without 8-bit state")
    for name, scale in zip(("exp_avg_scale", "exp_avg_sq_scale"), scales):
        if scale is not None and (scale.dtype != torch.float32 or scale.device != param.device or
                                  scale.shape != (quantize.n_blocks(param.numel()),) or
                                  not scale.is_contiguous()):
            raise RuntimeError(f"ADOPT: {name} of parameter {index} ({tuple(scale.shape)}, {scale.dtype}, "
                               f"{scale.device}) is not a contiguous float32 tensor of "
                               f"{quantize.n_blocks(param.numel())} block maxima on {param.device}")
    remainder = None if tensors.remainders is None else tensors.remainders[index]
    if remainder is not None and (param.dtype != torch.bfloat16 or remainder.shape != param.shape or
                                  remainder.dtype not in kernel.REMAINDER_BITS or
                                  remainder.device != param.device):
        raise RuntimeError(f"ADOPT: param_remainder of parameter {index} ({tuple(remainder.shape)}, "
                           f"{remainder.dtype}) does not fit its parameter ({tuple(param.shape)}, "
                           f"{param.dtype}): expected int16 or int8 beside a bf16 param")


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
    if any(column is not None and any(t is not None for t in column) for column in tensors[5:8]):
        raise RuntimeError("ADOPT: 8-bit state and master weights do not support DTensor parameters "
                           "(FSDP2) yet: their block maxima follow the local shard's memory")
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
    _check_disjoint(tensors.params)
    _check_steps(tensors, fused)
    for index, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(*tensors[:4])):
        _check_operands(index, param, grad, exp_avg, exp_avg_sq)
        _check_compact(tensors, index)
        if use_fused(fused, param) or use_cpu_step(fused, param):
            check_fused_supported(param)
            if exp_avg.dtype != param.dtype and exp_avg.dtype not in kernel.STATE_DTYPES:
                raise RuntimeError(f"ADOPT(fused=True): state dtype {exp_avg.dtype} is not supported "
                                   f"(supported: the param's dtype, {kernel.STATE_DTYPES})")


def fused_positions(fused: Optional[bool], params: List[Tensor]) -> List[int]:
    return [i for i, p in enumerate(params) if use_fused(fused, p)]


def cpu_positions(fused: Optional[bool], params: List[Tensor]) -> List[int]:
    return [i for i, p in enumerate(params) if use_cpu_step(fused, p)]
