"""Eager multi-tensor ADOPT on ``torch._foreach_*`` ops (``foreach=True``).

The same operations as ``adopt_triton.reference``, each applied to a whole
list of tensors at once, so the Python cost is per list, not per tensor.
Tensors are grouped by their step count, so each gets its own first-step case
and clip value (torch-adopt's foreach path takes both from the first tensor).
Numerics: as the reference, except that the square root is ATen's float32
``sqrt`` (the reference's is correctly rounded: numpy's on CPU tensors, a
float64 one rounded once elsewhere): within float32 tolerance.
"""
from typing import Dict, List

import torch

from adopt_triton.common import Hyper, Tensors, as_real, clip_for, local_shard, store_back, upcast


def foreach_adopt(tensors: Tensors, hyper: Hyper) -> None:
    lr, beta1, beta2, eps, weight_decay, decouple, maximize, clip_lambda = hyper
    lr = float(lr)
    # Element-wise, so DTensor shards (FSDP2) are updated as their local tensors.
    stored = [[as_real(local_shard(t)) for t in column] for column in tensors[:4]]
    computed = [[upcast(t) for t in column] for column in stored]  # float32 math, as the reference
    by_step: Dict[tuple, List[int]] = {}  # and computed dtype: a clip value is taken as a clamp in it
    for index, step in enumerate(torch.stack(tensors.steps).tolist()):  # one host read, not one per tensor
        by_step.setdefault((step, computed[0][index].dtype), []).append(index)
    for (n, dtype), indices in by_step.items():
        param, grad, exp_avg, exp_avg_sq = ([column[i] for i in indices] for column in computed)
        if maximize:
            grad = torch._foreach_neg(grad)
        if weight_decay != 0 and not decouple:
            grad = torch._foreach_add(grad, param, alpha=weight_decay)
        if n == 0:
            for target, square in zip(exp_avg_sq, torch._foreach_mul(grad, grad)):
                target.copy_(square)
            continue
        if weight_decay != 0 and decouple:
            torch._foreach_add_(param, param, alpha=-lr * weight_decay)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_maximum_(denom, eps)
        update = torch._foreach_div(grad, denom)
        if clip_lambda is not None:
            clip = clip_for(clip_lambda(n), dtype)
            torch._foreach_maximum_(update, -clip)
            torch._foreach_minimum_(update, clip)
        torch._foreach_lerp_(exp_avg, update, 1 - beta1)
        torch._foreach_add_(param, exp_avg, alpha=-lr)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grad, grad, value=1 - beta2)
    for column in (0, 2, 3):  # round upcast params and states back, once
        store_back(stored[column], computed[column])
    torch._foreach_add_(tensors.steps, 1)
