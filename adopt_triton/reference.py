"""The eager reference: ADOPT in plain PyTorch ops, the executable spec.

``adopt`` updates lists of tensors in place, one tensor at a time, in exactly
the order of the algorithm (the order of torch-adopt 0.1.0's single-tensor
path). The Triton kernel is verified bit-exact against it.

Rounding, operation by operation (float32 tensors, CPU, ATen's AVX2/AVX-512
kernels, which every x86-64 CPU of the last decade selects):

* ``a.add(b, alpha=s)`` is one fused multiply-add: ``fma(b, s, a)``.
* ``a.addcmul(b, c, value=s)`` rounds ``s * b`` then fuses: ``fma(s * b, c, a)``.
* ``m.lerp(u, w)`` is ``fma(w, u - m, m)`` for ``|w| < 0.5``, else
  ``fma(w - 1, u - m, u)``.
* ``mul``, ``div``, ``clamp`` round once; ``clamp`` propagates NaN.
* ``sqrt`` is correctly rounded (``_sqrt``; ATen's CPU ``sqrt`` is not always).
* bf16/fp16 params, gradients or states are upcast to float32, updated as
  above, and rounded once (to nearest even) when stored back.
* Python-float hyper-parameters (``-lr``, ``1 - beta1``, ``1 - beta2``,
  ``-lr * weight_decay``) are computed in float64 and rounded to float32 when
  they reach the op, as every ATen op does with a Python scalar.
* ``clip_lambda(n)`` is called with the step count as a Python float, as
  torch-adopt calls it, and its result is rounded to float32 by ``clamp``.

Compact storage (8-bit state, master weights, stochastic rounding; formats
in ``adopt_triton.quantize``) goes through ``adopt`` too: each tensor is
decoded to float32 in its memory order, updated by the same ``update``, and
encoded again. With 8-bit state, the stored sqrt(v) is the denominator
itself (no square root of its square) and ``v = sqrt(v) * sqrt(v)``.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from adopt_triton import quantize
from adopt_triton.common import (Hyper, Tensors, as_real, clip_for, local_shard, memory_order, store_back,
                                 upcast, visited)

try:
    import numpy
except ImportError:  # _sqrt's float64 route needs nothing else
    numpy = None


def _sqrt(t: Tensor) -> Tensor:
    """Correctly rounded sqrt in t's dtype. ATen's CPU sqrt goes through MKL's
    VML, within 1 ulp but off by one for ~17% of float32 inputs on this
    project's machine; numpy's is the IEEE instruction, one pass with no
    float64 copies. Under autograd or off the CPU: taken in float64 and
    rounded once (correct for float32: a float64 sqrt within 1 ulp cannot
    cross a float32 rounding boundary)."""
    if numpy is not None and t.device.type == "cpu" and not t.requires_grad \
            and t.dtype in (torch.float32, torch.float64) and not isinstance(t, DTensor):
        out = torch.empty_like(t)
        with numpy.errstate(invalid="ignore"):  # NaN for negatives, as ATen's
            numpy.sqrt(t.numpy(), out=out.numpy())
        return out
    return t.sqrt() if t.dtype == torch.float64 else t.double().sqrt().to(t.dtype)


def update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, n: float,
           hyper: Hyper, *, root: Optional[Tensor] = None):
    """One step's arithmetic on float32 values: the new (param, exp_avg,
    exp_avg_sq). On the first step (n == 0) only exp_avg_sq is new (g * g).
    ``root``: sqrt(exp_avg_sq) when the state stores it (8-bit state)."""
    lr, beta1, beta2, eps, weight_decay, decouple, maximize, clip_lambda = hyper
    lr = float(lr)
    if maximize:
        grad = -grad
    if weight_decay != 0 and not decouple:
        grad = grad.add(param, alpha=weight_decay)                     # fma
    if n == 0:
        return param, exp_avg, grad * grad  # first call: v = g^2; p and m unchanged
    if weight_decay != 0 and decouple:
        param = param.add(param, alpha=-lr * weight_decay)             # fma
    denom = (_sqrt(exp_avg_sq) if root is None else root).clamp(min=eps)  # delayed v
    normalized = grad / denom
    if clip_lambda is not None:
        clip = clip_for(clip_lambda(n), normalized.dtype)
        normalized = normalized.clamp(-clip, clip)
    exp_avg = exp_avg.lerp(normalized, 1 - beta1)                      # fma
    param = param.add(exp_avg, alpha=-lr)                              # fma
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul(grad, grad, value=1 - beta2)  # fma, after p
    return param, exp_avg, exp_avg_sq


def adopt(tensors: Tensors, hyper: Hyper, *, seed: Optional[int] = None,
          stochastic: bool = False) -> None:
    """One ADOPT step for each tensor; its step count n is incremented.
    ``seed`` keys the random bits of 8-bit state and, with ``stochastic``,
    of stochastically rounded bf16 stores."""
    for index in range(len(tensors.params)):
        if stochastic or compact(tensors, index):
            _compact_step(tensors, index, hyper, seed or 0, stochastic)
            continue
        param, grad, exp_avg, exp_avg_sq = (_operand(column[index]) for column in tensors[:4])
        step_t = tensors.steps[index]
        stored = [param, exp_avg, exp_avg_sq]
        computed = update(*map(upcast, (param, grad, exp_avg, exp_avg_sq)), float(step_t), hyper)
        store_back(stored, list(computed))
        step_t += 1


def _operand(t: Tensor) -> Tensor:
    """A tensor as the update reads and writes it: complex as pairs of reals,
    a DTensor (FSDP2) as its local shard, the update being element-wise;
    under autograd (differentiable=True) the DTensor itself, whose local
    view could not be written in place."""
    return as_real(t if torch.is_grad_enabled() else local_shard(t))


def _column(tensors: Tensors, name: str, index: int):
    column = getattr(tensors, name)
    return None if column is None else column[index]


def compact(tensors: Tensors, index: int) -> bool:
    """Whether tensor ``index`` is stored compactly (8-bit state or master weights)."""
    return _column(tensors, "exp_avg_scales", index) is not None or \
        _column(tensors, "remainders", index) is not None


def _compact_step(tensors: Tensors, index: int, hyper: Hyper, seed: int, stochastic: bool) -> None:
    """One step of one tensor stored compactly, in the memory order of
    ``common.visited`` (the kernel's): decode,
    ``update``, encode (rounding as the kernel does, with its random bits)."""
    param, grad, exp_avg, exp_avg_sq = (_operand(column[index]) for column in tensors[:4])
    step_t = tensors.steps[index]
    exp_avg_scale = _column(tensors, "exp_avg_scales", index)
    exp_avg_sq_scale = _column(tensors, "exp_avg_sq_scales", index)
    remainder = _column(tensors, "remainders", index)
    key = index if tensors.keys is None else tensors.keys[index]
    order = memory_order(visited(param, exp_avg))
    flat = lambda t: t.permute(order).reshape(-1)  # noqa: E731
    n = float(step_t)
    master = upcast(flat(param)) if remainder is None else quantize.join_master(flat(param), flat(remainder))
    quantized = exp_avg_scale is not None
    if quantized:
        exp_avg_f = quantize.decode_exp_avg(flat(exp_avg), exp_avg_scale)
        root = quantize.decode_sqrt_exp_avg_sq(flat(exp_avg_sq), exp_avg_sq_scale)
        exp_avg_sq_f = root * root
    else:
        exp_avg_f, exp_avg_sq_f, root = upcast(flat(exp_avg)), upcast(flat(exp_avg_sq)), None
    new_param, new_exp_avg, new_exp_avg_sq = update(master, upcast(flat(grad)), exp_avg_f, exp_avg_sq_f,
                                                    n, hyper, root=root)
    numel = master.numel()
    if quantized:  # one word per element: low half rounds sqrt(v), high half the param
        words = quantize.random_words(seed, key, int(n), numel, master.device, per_element=False)
        param_bits, exp_avg_bits, exp_avg_sq_bits = words >> 16, None, words & 0xFFFF
        codes, absmax = quantize.encode_sqrt_exp_avg_sq(_sqrt(new_exp_avg_sq), exp_avg_sq_bits)
        _write(exp_avg_sq, order, codes)
        exp_avg_sq_scale.copy_(absmax)
    else:
        param_bits, exp_avg_bits, exp_avg_sq_bits = quantize.random_words(
            seed, key, int(n), numel, master.device, per_element=True) if stochastic else (None,) * 3
        _write(exp_avg_sq, order, _rounded(new_exp_avg_sq, exp_avg_sq.dtype, exp_avg_sq_bits))
    if n != 0:
        if remainder is not None:
            random8 = param_bits if stochastic else None
            new_param, new_remainder = quantize.split_master(new_param, 24 if remainder.dtype == torch.int8 else 32,
                                                             random8)
            _write(remainder, order, new_remainder)
        _write(param, order, _rounded(new_param, param.dtype, param_bits if stochastic else None))
        if quantized:
            codes, absmax = quantize.encode_exp_avg(new_exp_avg)
            _write(exp_avg, order, codes)
            exp_avg_scale.copy_(absmax)
        else:
            _write(exp_avg, order, _rounded(new_exp_avg, exp_avg.dtype, exp_avg_bits))
    step_t += 1


def _rounded(value: Tensor, dtype: torch.dtype, random_bits) -> Tensor:
    """float32 values as stored in ``dtype``: bf16 to nearest even, or
    stochastically given random bits; any other dtype as ``.to`` rounds."""
    if dtype == torch.bfloat16 and value.dtype == torch.float32:
        return quantize.round_to_bf16(value, random_bits)
    return value.to(dtype)


def _write(target: Tensor, order, flat_values: Tensor) -> None:
    permuted = target.permute(order)
    permuted.copy_(flat_values.view(permuted.shape))
