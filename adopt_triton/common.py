"""What every path shares: the small named types passed between the optimizer
and the implementations, and helpers used by both the eager and fused paths."""
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union
from operator import attrgetter

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


def default_clip_lambda(step):
    """The clip schedule of torch-adopt and of the paper's Algorithm 2: n ** 0.25."""
    return step**0.25


class Hyper(NamedTuple):
    """One param group's hyper-parameters, as the update reads them."""
    lr: Union[float, Tensor]
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decouple: bool
    maximize: bool
    clip_lambda: Optional[Callable] = default_clip_lambda

    @classmethod
    def of_group(cls, group: dict, clip_lambda: Optional[Callable]) -> "Hyper":
        beta1, beta2 = group["betas"]
        return cls(group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                   group["decouple"], group["maximize"], clip_lambda)


class Tensors(NamedTuple):
    """Parallel lists, one entry per parameter: what one step updates."""
    params: List[Tensor]
    grads: List[Tensor]
    exp_avgs: List[Tensor]
    exp_avg_sqs: List[Tensor]
    steps: List[Tensor]

    def pick(self, indices: Sequence[int]) -> "Tensors":
        return Tensors(*([column[i] for i in indices] for column in self))


class Scaling(NamedTuple):
    """What torch.amp.GradScaler hands the optimizer instead of unscaling the
    gradients itself: the scale to divide them by, and a flag that skips the
    step when it is not zero."""
    grad_scale: Optional[Tensor] = None
    found_inf: Optional[Tensor] = None


NO_SCALING = Scaling()


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's local shard (sharing its storage); any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def as_real(t: Tensor) -> Tensor:
    """Complex numbers are updated as pairs of reals (torch.view_as_real)."""
    return torch.view_as_real(t) if t.is_complex() else t


def upcast(t: Tensor) -> Tensor:
    """float32 copy of a bf16/fp16 tensor; any other tensor itself."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def store_back(stored: List[Tensor], computed: List[Tensor]) -> None:
    """Copy upcast results back into their storage (one rounding each)."""
    for original, result in zip(stored, computed):
        if result is not original:
            original.copy_(result)


_address, _size, _stride, _numel = Tensor.data_ptr, Tensor.size, Tensor.stride, Tensor.numel
_dtype = attrgetter("dtype")


def fingerprint(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                exp_avg_sqs: List[Tensor], steps: List[Tensor]) -> tuple:
    """Everything a cached step's checks and launch tables depend on, for
    local (not DTensor) tensors, in a few C-level passes: every address;
    the params' shapes, strides and dtypes; the gradients' sizes and strides
    (autograd and the ``.grad`` setter keep their dtype and shape those of
    the param). States and steps are kept alive by whoever caches, so their
    addresses cannot be reused by new tensors. The gradients' addresses
    come last: they alone may change with no rebuild (``FusedStep.with_grads``)."""
    return (list(map(_address, params)), list(map(_size, params)), list(map(_stride, params)),
            list(map(_dtype, params)), list(map(_address, exp_avgs)),
            list(map(_address, exp_avg_sqs)), list(map(_address, steps)),
            list(map(_numel, grads)), list(map(_stride, grads)), list(map(_address, grads)))


def dense_strides(t: Tensor) -> Optional[Tuple[int, ...]]:
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
