"""What the optimizer accepts, checked before anything changes: the
constructor's and param groups' options, step counts from checkpoints,
parameter lists, and how a clip_lambda travels in pickles."""
import math
import numbers
import pickle
from typing import List

import torch
from torch import Tensor

from adopt_triton import dispatch
from adopt_triton.kernels import adopt as kernel

FLAG_DEFAULTS = dict(maximize=False, foreach=None, capturable=False, differentiable=False,
                      fused=None)
# How this process runs the update, as opposed to what is being trained.
EXECUTION_FLAGS = ("foreach", "fused", "capturable", "differentiable")
STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.int8)


def check_hyperparameters(group: dict) -> None:
    """The constructor's validation (torch-adopt's rules and messages), applied to every param group."""
    lr = group["lr"]
    for name in ("lr", "eps", "weight_decay"):
        if not isinstance(group[name], (numbers.Real, Tensor)):
            raise TypeError(f"Invalid {name}: {group[name]!r} (expected a number)")
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= group["eps"]:
        raise ValueError(f"Invalid epsilon value: {group['eps']}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or \
            not all(isinstance(beta, (numbers.Real, Tensor)) for beta in betas):
        raise ValueError(f"Invalid betas: {betas} (expected a pair (beta1, beta2))")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    # A tensor lr too (one host read, here only: the kernel reads it on the
    # device at each step, unchecked, so a value written into it later is not).
    beyond = kernel.beyond_float32(*(float(group[name]) for name in ("lr", "eps", "weight_decay")))
    if beyond is not None:
        raise ValueError(f"Invalid {beyond[0]}: {beyond[1]} (beyond float32, in which the update is computed)")
    if group["fused"]:
        if group["differentiable"]:
            raise RuntimeError("`fused` does not support `differentiable`")
        if group["foreach"]:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        for param in group["params"]:
            dispatch.check_fused_supported(param)
    if group["capturable"]:
        if group["differentiable"] or group["foreach"] or group["fused"] is False:
            raise ValueError("capturable=True runs on the fused kernel: it cannot be combined with "
                             "fused=False, foreach=True or differentiable=True")
        for param in group["params"]:
            reason = dispatch.eager_reason(group["fused"], param)
            if reason is not None:
                raise RuntimeError(f"ADOPT(capturable=True) needs the fused kernel for every "
                                   f"parameter: {reason}")


def step_count(value, what: str) -> Tensor:
    """A step count as the optimizer keeps it (a float32 scalar), from any
    dtype or one-element shape torch-adopt accepts; a count that is not a
    whole number >= 0 is refused (a step of -1 would turn every param NaN)."""
    step = torch.as_tensor(value).detach()
    if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
        raise ValueError(f"ADOPT: {what} must be one number, got {value!r}")
    number = float(step)
    if not (math.isfinite(number) and number >= 0 and number == int(number) and number < 2**24):
        raise ValueError(f"ADOPT: {what} is {number}; a step count is a whole number in "
                         "[0, 2**24) (float32 counts exactly up to there)")
    return step.reshape(()).to(torch.float32)


class PickledClip:
    """An optimizer's clip_lambda in its pickles: itself where it pickles,
    else (a lambda, a local function) a stand-in that refuses to be used,
    so that an unpickled optimizer never steps with another clip silently.
    Deep copies keep the callable itself."""

    def __init__(self, clip_lambda):
        self.clip_lambda = clip_lambda

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        try:
            pickle.dumps(self.clip_lambda)
        except Exception:
            return PickledClip, (_UnpickledClip(repr(self.clip_lambda)),)
        return PickledClip, (self.clip_lambda,)


class _UnpickledClip:
    def __init__(self, description: str):
        self.description = description

    def __call__(self, step):
        raise RuntimeError(f"ADOPT was unpickled without its clip_lambda ({self.description}), which "
                           "could not be pickled: set optimizer.clip_lambda before stepping")


def refuse_duplicates(groups: List[dict], params: List[Tensor]) -> None:
    """Each parameter once: a repeated one would be updated twice per step
    (in one launch, by two programs writing the same memory at once)."""
    seen = {id(p): (f"param_groups[{g}]['params'][{i}]") for g, group in enumerate(groups)
            for i, p in enumerate(group["params"])}
    for index, param in enumerate(params):
        where = f"param_groups[{len(groups)}]['params'][{index}]"
        if id(param) in seen:
            raise ValueError(f"ADOPT: {where} (shape {tuple(param.shape)}) is the same tensor as "
                             f"{seen[id(param)]}; each parameter may appear only once")
        seen[id(param)] = where
