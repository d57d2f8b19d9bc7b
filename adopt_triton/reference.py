"""The eager reference: ADOPT in plain PyTorch ops, the executable spec.

``adopt`` updates lists of tensors in place, one tensor at a time, in exactly
the order of the algorithm (the order of torch-adopt 0.1.0's single-tensor
path). The Triton kernel is verified bit-exact against it.

Rounding, operation by operation (float32 tensors, CPU, ATen's AVX2/AVX-512
kernels, which every x86-64 CPU of the last decade selects):

* ``a.add(b, alpha=s)`` is one fused multiply-add: ``fma(b, s, a)``.
* ``a.addcmul(b, c, value=s)`` rounds ``s * b`` then fuses: ``fma(s * b, c, a)``.
* ``m.lerp_(u, w)`` is ``fma(w, u - m, m)`` for ``|w| < 0.5``, else
  ``fma(w - 1, u - m, u)``.
* ``mul``, ``div``, ``clamp`` round once; ``clamp`` propagates NaN.
* ``sqrt`` is taken in float64 and rounded once to the tensor's dtype (a
  correctly rounded sqrt; ATen's vectorised float32 ``sqrt`` is not always).
* bf16/fp16 params, gradients or states are upcast to float32, updated as
  above, and rounded once (to nearest even) when stored back.
* Python-float hyper-parameters (``-lr``, ``1 - beta1``, ``1 - beta2``,
  ``-lr * weight_decay``) are computed in float64 and rounded to float32 when
  they reach the op, as every ATen op does with a Python scalar.
* ``clip_lambda(n)`` is called with the step count as a Python float, as
  torch-adopt calls it, and its result is rounded to float32 by ``clamp``.
"""
import torch
from torch import Tensor

from adopt_triton.common import Hyper, Tensors, as_real, store_back, upcast


def _sqrt(t: Tensor) -> Tensor:
    """Correctly rounded sqrt in t's dtype (float64 computed, rounded once)."""
    return t.sqrt() if t.dtype == torch.float64 else t.double().sqrt().to(t.dtype)


def adopt(tensors: Tensors, hyper: Hyper) -> None:
    """One ADOPT step for each tensor; its step count n is incremented."""
    lr, beta1, beta2, eps, weight_decay, decouple, maximize, clip_lambda = hyper
    lr = float(lr)
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(*tensors):
        param, grad, exp_avg, exp_avg_sq = map(as_real, (param, grad, exp_avg, exp_avg_sq))
        stored = [param, exp_avg, exp_avg_sq]
        param, grad, exp_avg, exp_avg_sq = map(upcast, (param, grad, exp_avg, exp_avg_sq))
        n = float(step_t)
        if maximize:
            grad = -grad
        if weight_decay != 0 and not decouple:
            grad = grad.add(param, alpha=weight_decay)                 # fma
        if n == 0:
            exp_avg_sq.copy_(grad * grad)  # first call: v = g^2; p and m unchanged
        else:
            if weight_decay != 0 and decouple:
                param.add_(param, alpha=-lr * weight_decay)            # fma
            denom = _sqrt(exp_avg_sq).clamp(min=eps)                   # delayed v
            update = grad / denom
            if clip_lambda is not None:
                clip = clip_lambda(n)
                update = update.clamp(-clip, clip)
            exp_avg.lerp_(update, 1 - beta1)                           # fma
            param.add_(exp_avg, alpha=-lr)                             # fma
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # fma, after p
        store_back(stored, [param, exp_avg, exp_avg_sq])
        step_t += 1
