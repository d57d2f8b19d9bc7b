"""What every path shares: the small named types passed between the optimizer
and the implementations, and helpers used by both the eager and fused paths."""
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union
from operator import attrgetter

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from adopt_triton.kernels.scalars import f32


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
    """Parallel lists, one entry per parameter: what one step updates. The
    last four columns are None unless some tensor is stored compactly (see
    ``adopt_triton.quantize``); then they hold None for the others."""
    params: List[Tensor]
    grads: List[Tensor]
    exp_avgs: List[Tensor]       # with 8-bit state: int8 codes of exp_avg
    exp_avg_sqs: List[Tensor]    # with 8-bit state: uint8 codes of sqrt(exp_avg_sq)
    steps: List[Tensor]
    exp_avg_scales: Optional[List[Optional[Tensor]]] = None     # 8-bit state: block maxima
    exp_avg_sq_scales: Optional[List[Optional[Tensor]]] = None
    remainders: Optional[List[Optional[Tensor]]] = None  # master weights: below each bf16 param
    keys: Optional[List[int]] = None  # each tensor's random stream (default: its position)

    def pick(self, indices: Sequence[int]) -> "Tensors":
        return Tensors(*(None if column is None else [column[i] for i in indices] for column in self))

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> "Tensors":
        """``fn`` applied to every tensor (absent columns and entries, and keys, kept)."""
        return Tensors(*(column if column is None or name == "keys" else
                         [None if t is None else fn(t) for t in column]
                         for name, column in zip(self._fields, self)))

    def with_keys(self) -> "Tensors":
        """Keys given explicitly (positions), so that picking keeps them."""
        return self if self.keys is not None else self._replace(keys=list(range(len(self.params))))


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


def clip_for(clip: float, dtype: torch.dtype) -> float:
    """A clip value as a clamp in ``dtype`` takes it: rounded to float32 for
    float32 math, as the kernel does (a value beyond float32 is inf: no
    clip, where ATen's clamp would raise), as it is for float64."""
    return f32(clip) if dtype == torch.float32 else clip


def upcast(t: Tensor) -> Tensor:
    """float32 copy of a bf16/fp16 tensor; any other tensor itself."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def memory_order(t: Tensor) -> Tuple[int, ...]:
    """The dim order in which ``t.permute(order)`` is contiguous for a dense
    tensor: the order the fused kernel visits its elements in (a tensor that
    is not dense is visited through a contiguous copy: logical order)."""
    if dense_strides(t) is None:
        return tuple(range(t.dim()))
    return tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def visited(param: Tensor, exp_avg: Tensor) -> Tensor:
    """The tensor in whose memory order the update visits a parameter's
    elements: its 8-bit ``exp_avg`` codes where it has them (their blocks,
    and ``exp_avg_sq``'s, run over the codes' own memory order, so that a
    param whose layout changed after its state was made, e.g. a
    channels_last model resumed from a contiguous checkpoint, still reads
    its blocks right), else the param."""
    return exp_avg if exp_avg.dtype == torch.int8 else param


def store_back(stored: List[Tensor], computed: List[Tensor]) -> None:
    """Copy upcast results back into their storage (one rounding each)."""
    for original, result in zip(stored, computed):
        if result is not original:
            original.copy_(result)


_address, _size, _stride, _numel = Tensor.data_ptr, Tensor.size, Tensor.stride, Tensor.numel
_dtype = attrgetter("dtype")


def _addresses(column: Optional[List[Optional[Tensor]]]) -> Optional[list]:
    return None if column is None else [0 if t is None else t.data_ptr() for t in column]


def fingerprint(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                exp_avg_sqs: List[Tensor], steps: List[Tensor],
                exp_avg_scales: Optional[list] = None, exp_avg_sq_scales: Optional[list] = None,
                remainders: Optional[list] = None, keys: Optional[list] = None) -> tuple:
    """Everything a cached step's checks and launch tables depend on, for
    local (not DTensor) tensors, in a few C-level passes: every address;
    the params' shapes, strides and dtypes; the gradients' sizes, strides
    and dtypes (``p.grad.data = ...`` can change any of them). States and
    steps are kept alive by whoever caches, so their addresses cannot be
    reused by new tensors. The gradients' addresses
    come last: they alone may change with no rebuild
    (``FusedStep.with_grad_addresses``).
    (``keys`` are fixed when the cache is built.)"""
    return (list(map(_address, params)), list(map(_size, params)), list(map(_stride, params)),
            list(map(_dtype, params)), list(map(_address, exp_avgs)),
            list(map(_address, exp_avg_sqs)), list(map(_address, steps)),
            _addresses(exp_avg_scales), _addresses(exp_avg_sq_scales), _addresses(remainders),
            list(map(_numel, grads)), list(map(_stride, grads)), list(map(_dtype, grads)),
            list(map(_address, grads)))


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


def flat_views(steps: List[Tensor]) -> Optional[List[Tuple[Tensor, List[int]]]]:
    """(array, the counts' indices in it) for each flat array the step counts
    are 0-d views of (as the optimizer keeps them), in order of first use;
    None if any count is not such a view (or not a tensor)."""
    by_base: dict = {}
    for step in steps:
        base = getattr(step, "_base", None)
        if base is None or base.dim() != 1 or base.stride(0) != 1 or step.dim() != 0:
            return None
        by_base.setdefault(id(base), (base, []))[1].append(step.storage_offset() - base.storage_offset())
    return list(by_base.values())
