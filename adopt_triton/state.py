"""A parameter's optimizer state as plain tensors in ``optimizer.state[p]``:
created in the format the optimizer was asked for, converted from whatever
format a checkpoint holds, and read back as float32 values.

Keys (besides ``step``):

| format | ``exp_avg`` | ``exp_avg_sq`` | more |
|---|---|---|---|
| float32 / bf16 / fp16 | m | v | |
| 8-bit (``state_dtype=torch.int8``) | int8 codes of m | uint8 codes of sqrt(v) | ``exp_avg_scale``, ``exp_avg_sq_scale``: float32 block maxima |
| master weights | | | ``param_remainder``: int16 (32 bits) or int8 (24 bits), the param's shape |

Codes and remainders are made with the param's shape and strides; blocks
run over the memory order of the ``exp_avg`` codes (``common.visited``), as
the kernel visits them, so codes whose layout no longer matches their param
(the param became channels_last, a contiguous checkpoint was loaded into a
channels_last model) are still read right, and kept as they are: the
kernel stages the param and gradient into the codes' layout instead.
"""
from typing import Dict, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from adopt_triton import quantize
from adopt_triton.common import memory_order, upcast, visited

EXP_AVG_SCALE, EXP_AVG_SQ_SCALE, REMAINDER = "exp_avg_scale", "exp_avg_sq_scale", "param_remainder"


def check_options(state_dtype: Optional[torch.dtype], master_weight_bits: Optional[int], group: dict,
                  param: Tensor) -> None:
    """``state_dtype`` and ``master_weight_bits`` against one parameter of a group."""
    compact = state_dtype == torch.int8 or master_weight_bits is not None
    if state_dtype is not None and param.is_complex():
        raise ValueError(f"state_dtype={state_dtype} needs real parameters, got {param.dtype}")
    if state_dtype == torch.int8 and param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"state_dtype=torch.int8 (8-bit state) takes float32, bf16 or fp16 parameters, "
                         f"got {param.dtype}")
    if master_weight_bits is not None and param.dtype != torch.bfloat16:
        raise ValueError(f"master_weight_bits={master_weight_bits} keeps the low bits of bf16 params "
                         f"beside them; got a {param.dtype} parameter of shape {tuple(param.shape)} "
                         "(a float32 param is its own master weight)")
    if compact and group["differentiable"]:
        raise ValueError("differentiable=True does not support state_dtype=torch.int8 or "
                         "master_weight_bits (their state is integer codes)")
    if compact and isinstance(param, DTensor):
        raise ValueError("state_dtype=torch.int8 and master_weight_bits do not support DTensor "
                         "parameters (FSDP2) yet")


def quantized(param: Tensor, state_dtype: torch.dtype) -> bool:
    """8-bit state for this param: asked for, and at least MIN_QUANT_NUMEL elements."""
    return state_dtype == torch.int8 and param.numel() >= quantize.MIN_QUANT_NUMEL


def new_state(param: Tensor, state_dtype: torch.dtype, master_weight_bits: Optional[int]) -> Dict[str, Tensor]:
    """Zero state for ``param`` (a zero remainder: the master is the param)."""
    def like(dtype):
        return torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
    if quantized(param, state_dtype):
        blocks = quantize.n_blocks(param.numel())
        state = {"exp_avg": like(torch.int8), "exp_avg_sq": like(torch.uint8),
                 EXP_AVG_SCALE: param.new_zeros(blocks, dtype=torch.float32),
                 EXP_AVG_SQ_SCALE: param.new_zeros(blocks, dtype=torch.float32)}
    else:
        dtype = torch.float32 if state_dtype == torch.int8 else state_dtype
        state = {"exp_avg": like(dtype), "exp_avg_sq": like(dtype)}
    if master_weight_bits is not None:
        state[REMAINDER] = like(quantize.remainder_dtype(master_weight_bits))
    return state


def _flat(t: Tensor, order) -> Tensor:
    return t.permute(order).reshape(-1)


def _shaped(flat: Tensor, param: Tensor, order) -> Tensor:
    """``flat`` (param's memory order) as a tensor of param's shape and layout."""
    out = torch.empty_like(param, dtype=flat.dtype, memory_format=torch.preserve_format)
    out.permute(order).copy_(flat.view(out.permute(order).shape))
    return out


def moments(param: Tensor, saved: dict):
    """A saved state's exp_avg and exp_avg_sq as tensors of param's shape:
    as they are (bf16/fp16 upcast to float32; float64 and complex kept
    exactly), or decoded from 8-bit codes to float32 (v = sqrt(v) ** 2)."""
    if EXP_AVG_SCALE not in saved:
        return upcast(saved["exp_avg"]), upcast(saved["exp_avg_sq"])
    order = memory_order(visited(param, saved["exp_avg"]))
    exp_avg = quantize.decode_exp_avg(_flat(saved["exp_avg"], order), saved[EXP_AVG_SCALE])
    root = quantize.decode_sqrt_exp_avg_sq(_flat(saved["exp_avg_sq"], order), saved[EXP_AVG_SQ_SCALE])
    return _shaped(exp_avg, param, order), _shaped(root * root, param, order)


def converted(param: Tensor, saved: dict, state_dtype: torch.dtype,
              master_weight_bits: Optional[int]) -> Dict[str, Tensor]:
    """A checkpoint's state for ``param`` in this optimizer's format, on the
    param's device: kept where the formats agree (exactly), else decoded to
    float32 and re-encoded (float32 -> bf16 and 8-bit round to nearest;
    8-bit -> float32 decodes). ``step`` is not touched here."""
    state: Dict[str, Tensor] = {}
    if "exp_avg" in saved:
        saved = {key: value.detach().to(param.device) for key, value in saved.items()
                 if isinstance(value, Tensor)}
        was_quantized = EXP_AVG_SCALE in saved
        if quantized(param, state_dtype) and was_quantized:
            state.update((key, saved[key]) for key in ("exp_avg", "exp_avg_sq", EXP_AVG_SCALE, EXP_AVG_SQ_SCALE))
        elif quantized(param, state_dtype):
            order = memory_order(param)
            exp_avg, exp_avg_sq = (_flat(t.float(), order) for t in moments(param, saved))
            codes, state[EXP_AVG_SCALE] = quantize.encode_exp_avg(exp_avg)
            state["exp_avg"] = _shaped(codes, param, order)
            codes, state[EXP_AVG_SQ_SCALE] = quantize.encode_sqrt_exp_avg_sq(
                exp_avg_sq.double().sqrt().float())
            state["exp_avg_sq"] = _shaped(codes, param, order)
        else:
            dtype = torch.float32 if state_dtype == torch.int8 else state_dtype
            state.update(zip(("exp_avg", "exp_avg_sq"), (t.to(dtype) for t in moments(param, saved))))
    if master_weight_bits is not None:
        state[REMAINDER] = _remainder(param, saved.get(REMAINDER), master_weight_bits)
    return state


def _remainder(param: Tensor, saved: Optional[Tensor], bits: int) -> Tensor:
    """The remainder for ``bits`` below the current param: the saved one when
    its width matches, else from the master it implies (zero: none saved)."""
    dtype = quantize.remainder_dtype(bits)
    if saved is None:
        return torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
    saved = saved.to(param.device)
    if saved.dtype == dtype:
        return saved
    master = quantize.join_master(param.detach(), saved)
    return quantize.remainder_below(param.detach(), master, bits).reshape(param.shape)


def master_weight(param: Tensor, state: dict) -> Tensor:
    """The float32 master weight of ``param``: joined with its remainder, or
    the param upcast (a param without a remainder is its own master)."""
    remainder = state.get(REMAINDER)
    if remainder is None:
        return param.detach().float()
    return quantize.join_master(param.detach(), remainder)
