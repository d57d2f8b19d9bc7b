"""The host side of the fused path: what a step over a list of parameters
needs that does not change between steps (which launch each tensor joins,
its dense operands and any staging, the launch tables), built once and run
every step with the step's gradients.

Eager ``step()`` runs a ``FusedStep`` directly. Under ``torch.compile`` the
optimizer step is traced around the custom op ``adopt_triton::fused_adopt_``
(declared mutations, a fake implementation), which finds the same cached
``FusedStep`` inside; its launch tables hold raw addresses, which only an
opaque op can build (as ATen's own ``_fused_adam_``).
"""
import weakref
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from adopt_triton.clip import ClipEvaluator
from adopt_triton.common import (Hyper, Scaling, Tensors, as_real, default_clip_lambda,
                                 dense_strides, fingerprint, flat_views, local_shard, visited)
from adopt_triton.kernels import adopt as kernel


# The tensors of a param's shape, which the kernel addresses with the param's
# layout (through a staging copy where theirs differs).
_OPERANDS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "remainders")
_GRAD = 1


class _Staged(NamedTuple):
    """A tensor the kernel reads (and, unless it is the gradient, writes)
    through a dense copy with its parameter's layout."""
    position: int   # in the FusedStep's tensor list
    column: int     # in _OPERANDS
    buffer: Tensor


class _Launch(NamedTuple):
    device: torch.device
    dtype: torch.dtype
    state_dtype: torch.dtype         # int8: 8-bit state
    remainder_bits: int              # master weights' remainder: 16, 8 or 0 (none)
    positions: List[int]             # of its tensors in the FusedStep's list
    position_index: Optional[Tensor]  # the same on the device, None if it is 0..n-1
    grad_rows: Optional[Tensor]      # rows whose gradient the table addresses (None: all)
    grad_positions: List[int]        # the positions of those rows
    staged: List[_Staged]
    tables: kernel.Tables
    steps: List[Tensor]              # the step count of each row
    steps_in_flat: Optional[Tuple[Tensor, Tensor]]  # (flat array, index) when all are views of one


def _real_local(t: Tensor) -> Tensor:
    return as_real(local_shard(t))


def _entry(tensors: Tensors, name: str, position: int) -> Optional[Tensor]:
    """tensors.<name>[position], None where the column or the entry is absent."""
    column = getattr(tensors, name)
    return None if column is None or column[position] is None else _real_local(column[position])


def _address(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _in_flat(steps: List[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
    """(flat array, index) if every step count is a view of one flat array, else None."""
    views = flat_views(steps)
    if views is None or len(views) != 1:
        return None
    base, indices = views[0]
    return base, torch.tensor(indices, device=base.device)


def _layout(param: Tensor) -> Tensor:
    """A tensor with the layout the kernel will see for ``param`` (the
    tensor ``common.visited`` names): itself if it is dense, else a
    contiguous one. Operands of other layouts are staged."""
    return param if dense_strides(param) is not None else torch.empty_like(
        param, memory_format=torch.contiguous_format)


class FusedStep:
    """One step's fused work over a fixed list of parameters: one launch per
    device, param dtype and state dtype. Tensors whose layout already matches
    a dense parameter (the usual case, channels_last included) are addressed
    in place; any other (a non-dense view, a gradient or state with other
    strides) goes through a staging buffer kept for the next steps.

    The tables address the gradients of the step it was built for:
    ``with_grad_addresses`` gives one for new gradient tensors of the same layout."""

    def __init__(self, tensors: Tensors, *, fingerprint_: Optional[tuple] = None):
        self.tensors = tensors._replace(grads=[None] * len(tensors.grads))  # not kept alive
        self.fingerprint = fingerprint_  # of the tensors it was built for (traced path)
        by_kind: Dict[tuple, List[int]] = {}
        for position, (param, exp_avg) in enumerate(zip(tensors.params, tensors.exp_avgs)):
            param, exp_avg = _real_local(param), _real_local(exp_avg)
            remainder = _entry(tensors, "remainders", position)
            bits = 0 if remainder is None else kernel.REMAINDER_BITS[remainder.dtype]
            by_kind.setdefault((param.device, param.dtype, exp_avg.dtype, bits), []).append(position)
        self.launches = [self._launch(kind, positions, tensors) for kind, positions in by_kind.items()]

    @staticmethod
    def _launch(kind, positions: List[int], tensors: Tensors) -> _Launch:
        device = kind[0]
        numels, addresses, grad_rows, grad_positions, staged = [], [], [], [], []
        for row_index, position in enumerate(positions):
            operands = [_entry(tensors, name, position) for name in _OPERANDS]
            layout = _layout(visited(operands[0], operands[2]))
            strides = dense_strides(layout)
            row = []
            for column, operand in enumerate(operands):
                if operand is None or dense_strides(operand) == strides:
                    row.append(_address(operand))
                    if column == _GRAD:
                        grad_rows.append(row_index)
                        grad_positions.append(position)
                else:
                    buffer = torch.empty_like(layout, dtype=operand.dtype)
                    staged.append(_Staged(position, column, buffer))
                    row.append(buffer.data_ptr())
            numels.append(layout.numel())
            scales = [_address(_entry(tensors, name, position)) for name in ("exp_avg_scales", "exp_avg_sq_scales")]
            addresses.append(row[:4] + [tensors.steps[position].data_ptr()] + scales + row[4:])
        index = None if positions == list(range(len(positions))) else torch.tensor(positions, device=device)
        steps = [tensors.steps[p] for p in positions]
        rows = None if len(grad_rows) == len(positions) else torch.tensor(grad_rows, dtype=torch.int64)
        keys = positions if tensors.keys is None else [tensors.keys[p] for p in positions]
        return _Launch(device, *kind[1:], positions, index, rows, grad_positions, staged,
                       kernel.make_tables(numels, addresses, device, keys), steps, _in_flat(steps))

    def clip_values(self, evaluator: ClipEvaluator, capturable: bool) -> List[Tensor]:
        """A custom clip_lambda's value for every tensor, one array per launch,
        evaluated before anything is launched."""
        values = []
        for launch in self.launches:
            counts = launch.steps_in_flat[0].index_select(0, launch.steps_in_flat[1]) \
                if launch.steps_in_flat else torch.stack(launch.steps)
            values.append(evaluator.on_device(counts, capturable=capturable))
        return values

    def split(self, per_tensor: Tensor) -> List[Tensor]:
        """Values given one per tensor of the list, as one array per launch."""
        return [per_tensor.to(launch.device) if launch.position_index is None else
                per_tensor.to(launch.device).index_select(0, launch.position_index)
                for launch in self.launches]

    def with_grad_addresses(self, addresses: Sequence[int]) -> None:
        """Address new gradient tensors (same shapes and layouts as before),
        given the address of each position's gradient."""
        for i, launch in enumerate(self.launches):
            if launch.grad_positions:
                picked = addresses if len(launch.grad_positions) == len(addresses) else \
                    [addresses[p] for p in launch.grad_positions]
                self.launches[i] = launch._replace(
                    tables=kernel.with_grad_addresses(launch.tables, launch.grad_rows, picked))

    def run(self, grads: Sequence[Tensor], hyper: Hyper, scalars: kernel.StepScalars,
            scaling: Scaling, seed: int, stochastic: bool, clips: Optional[List[Tensor]]) -> None:
        """One launch per device, param dtype, state dtype and remainder, in
        place; step counts are read, not incremented. ``seed`` keys the random
        bits (8-bit state; bf16 stores when ``stochastic``). ``clips``: a
        custom clip_lambda's values (``clip_values``); otherwise
        ``hyper.clip_lambda`` is the default clip (computed in the kernel) or None."""
        lr = hyper.lr
        clip_mode = kernel.CLIP_PER_TENSOR if clips is not None else (
            kernel.NO_CLIP if hyper.clip_lambda is None else kernel.DEFAULT_CLIP)
        for index, launch in enumerate(self.launches):
            for staged in launch.staged:
                source = grads[staged.position] if staged.column == _GRAD else \
                    _entry(self.tensors, _OPERANDS[staged.column], staged.position)
                staged.buffer.copy_(_real_local(source))
            lr_on_device = isinstance(lr, Tensor) and lr.device == launch.device
            grad_scale, found_inf = (None if t is None else t.to(launch.device) for t in scaling)
            variant = kernel.Variant(
                launch.dtype, launch.state_dtype, hyper.maximize, _weight_decay_mode(hyper),
                clip_mode, scalars.lerp_from_end, lr_on_device,
                grad_scale is not None, found_inf is not None, stochastic, launch.remainder_bits)
            kernel.launch(launch.tables, variant, scalars, lr=lr if lr_on_device else None,
                          clip=None if clips is None else clips[index], grad_scale=grad_scale, found_inf=found_inf,
                          seed=seed)
            for staged in launch.staged:
                if staged.column != _GRAD:  # the gradient is only read
                    _entry(self.tensors, _OPERANDS[staged.column], staged.position).copy_(staged.buffer)


def _weight_decay_mode(hyper: Hyper):
    if hyper.weight_decay == 0:
        return kernel.NO_WEIGHT_DECAY
    return kernel.DECOUPLED_WEIGHT_DECAY if hyper.decouple else kernel.COUPLED_WEIGHT_DECAY


def advance_steps(steps: List[Tensor], found_inf: Optional[Tensor]) -> None:
    """n += 1 for each step count, unless found_inf is set (on any device)."""
    by_device: Dict[torch.device, List[Tensor]] = {}
    for step in steps:
        by_device.setdefault(step.device, []).append(step)
    for device, on_device in by_device.items():
        torch._foreach_add_(on_device, 1 if found_inf is None else
                            1 - found_inf.to(device, torch.float32))


class FusedSteps(dict):
    """An optimizer's cached ``FusedStep``s for the traced (torch.compile)
    path, one per param group; the launch tables live as long as it does."""


_OWNERS: "weakref.WeakValueDictionary[int, FusedSteps]" = weakref.WeakValueDictionary()


def register(cache: FusedSteps) -> int:
    """An id under which the custom op finds ``cache`` (held weakly)."""
    _OWNERS[id(cache)] = cache
    return id(cache)


def _cached_step(owner: int, slot: int, tensors: Tensors) -> FusedStep:
    current = fingerprint(*tensors.map_tensors(local_shard))
    cache = _OWNERS[owner]
    fused = cache.get(slot)
    if fused is None or fused.fingerprint[:-1] != current[:-1]:
        fused = cache[slot] = FusedStep(tensors, fingerprint_=current)
    elif fused.fingerprint[-1] != current[-1]:
        fused.with_grad_addresses(current[-1])
        fused.fingerprint = current
    return fused


def _spread(values: List[Tensor], positions: List[int], n: int) -> Optional[List[Optional[Tensor]]]:
    """A column of n entries holding ``values`` at ``positions`` (None: no values)."""
    if not values:
        return None
    column: List[Optional[Tensor]] = [None] * n
    for position, value in zip(positions, values):
        column[position] = value
    return column


@torch.library.custom_op("adopt_triton::fused_adopt_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "state_steps",
                                       "exp_avg_scales", "exp_avg_sq_scales", "remainders"))
def _fused_adopt_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                    exp_avg_sqs: List[Tensor], state_steps: List[Tensor], exp_avg_scales: List[Tensor],
                    exp_avg_sq_scales: List[Tensor], quantized: List[int], remainders: List[Tensor],
                    keys: List[int], lr_tensor: Optional[Tensor],
                    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    decouple: bool, maximize: bool, default_clip: bool, clip_values: Optional[Tensor],
                    grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                    seed: int, stochastic: bool, owner: int, slot: int) -> None:
    """A traced step's fused part: the launches of the owner's cached
    ``FusedStep`` for these tensors, then one op bumping their step counts
    (not counted when found_inf is set). ``clip_values``: one per tensor.
    Block maxima are given for the ``quantized`` positions only; remainders
    for every param or none."""
    n = len(params)
    tensors = Tensors(params, grads, exp_avgs, exp_avg_sqs, state_steps,
                      _spread(exp_avg_scales, quantized, n), _spread(exp_avg_sq_scales, quantized, n),
                      _spread(remainders, list(range(n)), n), keys)
    fused = _cached_step(owner, slot, tensors)
    hyper = Hyper(lr if lr_tensor is None else lr_tensor, beta1, beta2, eps, weight_decay, decouple,
                  maximize, default_clip_lambda if default_clip else None)
    scalars = kernel.StepScalars.make(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    fused.run(grads, hyper, scalars, Scaling(grad_scale, found_inf), seed, stochastic,
              None if clip_values is None else fused.split(clip_values))
    advance_steps(state_steps, found_inf)


@_fused_adopt_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales, quantized,
      remainders, keys, lr_tensor, lr, beta1, beta2, eps, weight_decay, decouple, maximize, default_clip,
      clip_values, grad_scale, found_inf, seed, stochastic, owner, slot) -> None:
    return None


def _present(column: Optional[list]) -> Tuple[List[Tensor], List[int]]:
    """The entries of a column that are not None, and their positions."""
    pairs = [(t, i) for i, t in enumerate(column or []) if t is not None]
    return [t for t, _ in pairs], [i for _, i in pairs]


def traced_fused_adopt(tensors: Tensors, hyper: Hyper, scaling: Scaling, seed: int, stochastic: bool,
                       owner: int, slot: int) -> None:
    """The fused part of a step under torch.compile: a custom clip_lambda is
    traced on a tensor of the step counts (it must take tensors there), the
    launches are the opaque op."""
    clip_values = None
    custom_clip = hyper.clip_lambda not in (None, default_clip_lambda)
    if custom_clip:
        counts = torch.stack(tensors.steps)
        clip_values = torch.as_tensor(hyper.clip_lambda(counts.double().clamp(min=1)),
                                      dtype=torch.float32, device=counts.device).expand(counts.shape)
    lr = hyper.lr
    on_device = isinstance(lr, Tensor) and all(p.device == lr.device for p in tensors.params)
    lr_tensor = lr if on_device else None
    exp_avg_scales, quantized = _present(tensors.exp_avg_scales)
    exp_avg_sq_scales, _ = _present(tensors.exp_avg_sq_scales)
    remainders, _ = _present(tensors.remainders)
    keys = list(range(len(tensors.params))) if tensors.keys is None else tensors.keys
    # Inductor cannot functionalize a custom op taking complex tensors, nor
    # one mutating views of them: complex gradients (only read) go in as real
    # views, complex params and states as real copies, copied back after.
    real = [[as_real(t) if column is tensors.grads else as_real(t).clone() if t.is_complex() else t
             for t in column] for column in tensors[:4]]
    _fused_adopt_op(*real, tensors.steps, exp_avg_scales, exp_avg_sq_scales, quantized, remainders, keys,
                    lr_tensor=lr_tensor, lr=0.0 if lr_tensor is not None else float(lr),
                    beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps,
                    weight_decay=hyper.weight_decay, decouple=hyper.decouple,
                    maximize=hyper.maximize, default_clip=hyper.clip_lambda is not None,
                    clip_values=clip_values, grad_scale=scaling.grad_scale,
                    found_inf=scaling.found_inf, seed=seed, stochastic=stochastic, owner=owner, slot=slot)
    with torch.no_grad():
        for column, copies in zip((tensors.params, tensors.exp_avgs, tensors.exp_avg_sqs), real[:1] + real[2:]):
            for t, copy in zip(column, copies):
                if t.is_complex():
                    as_real(t).copy_(copy)
