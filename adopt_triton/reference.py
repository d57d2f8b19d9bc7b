"""The eager reference: ADOPT in plain PyTorch ops, the executable spec.

``adopt`` updates lists of tensors in place, one tensor at a time, in exactly
the order of SPEC.md (the order of torch-adopt 0.1.0's single-tensor path).
The Triton kernel is verified bit-exact against it.

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
"""
from typing import Callable, List, Optional

import torch
from torch import Tensor


def _sqrt(t: Tensor) -> Tensor:
    """Correctly rounded sqrt in t's dtype (float64 computed, rounded once)."""
    return t.sqrt() if t.dtype == torch.float64 else t.double().sqrt().to(t.dtype)


def upcast(t: Tensor) -> Tensor:
    """float32 copy of a bf16/fp16 tensor; any other tensor itself."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def default_clip_lambda(step):
    """The clip schedule of torch-adopt and of the paper's Algorithm 2: n ** 0.25."""
    return step**0.25


def adopt(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
          exp_avg_sqs: List[Tensor], state_steps: List[Tensor], *, lr: float, beta1: float,
          beta2: float, eps: float, clip_lambda: Optional[Callable[[float], float]],
          weight_decay: float, decouple: bool, maximize: bool) -> None:
    """One ADOPT step for each tensor; ``state_steps[i]`` (n) is incremented."""
    lr = float(lr)
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs,
                                                        state_steps):
        if torch.is_complex(param):  # complex numbers are updated as pairs of reals
            param, grad, exp_avg, exp_avg_sq = map(torch.view_as_real,
                                                   (param, grad, exp_avg, exp_avg_sq))
        stored = (param, exp_avg, exp_avg_sq)
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
        for original, computed in zip(stored, (param, exp_avg, exp_avg_sq)):
            if computed is not original:
                original.copy_(computed)  # one rounding to the stored dtype
        step_t += 1
