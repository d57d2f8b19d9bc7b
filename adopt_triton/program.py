"""A param group's step, decided once and reused while nothing moves.

Built when a group first steps (and again whenever anything it depends on
changed): which path each tensor takes, the fused launches with their
tables and staging, where the step counts live, the float32 scalars of the
hyper-parameters. Each step then only checks, in a few C-level passes over
the group, which params have a gradient and whether any address, shape,
dtype or layout moved (``reuse``), and runs.
"""
from collections import defaultdict
from itertools import compress, repeat
from operator import attrgetter, is_not, itemgetter
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from adopt_triton import dispatch, reference
from adopt_triton.clip import ClipEvaluator
from adopt_triton.common import (Hyper, Scaling, Tensors, default_clip_lambda, fingerprint,
                                 flat_views, local_shard)
from adopt_triton.cpu import CpuStep
from adopt_triton.fused import FusedStep, advance_steps
from adopt_triton.kernels import adopt as kernel

_GRAD = attrgetter("grad")
_EXP_AVG, _EXP_AVG_SQ, _STEP = itemgetter("exp_avg"), itemgetter("exp_avg_sq"), itemgetter("step")
# State keys of compact storage (adopt_triton.quantize), in Tensors' column order.
COMPACT_KEYS = ("exp_avg_scale", "exp_avg_sq_scale", "param_remainder")
_NONE = repeat(None)


class OptimizerState(defaultdict):
    """``optimizer.state`` (a ``defaultdict(dict)`` as torch.optim's) that
    counts its changes, so a cached program can tell at no per-tensor cost
    that no param's state dict was replaced or removed. (Tensors replaced
    inside a state dict show in the program's fingerprint.)"""

    def __init__(self, *args):
        super().__init__(dict, *args)
        self.version = 0

    def __reduce__(self):  # pickles and deep-copies as the defaultdict it is
        return (defaultdict, (dict,), None, None, iter(self.items()))

    def _changed(method):
        def changed(self, *args, **kwargs):
            self.version += 1
            return method(self, *args, **kwargs)
        changed.__name__ = method.__name__
        return changed

    __setitem__ = _changed(defaultdict.__setitem__)
    __delitem__ = _changed(defaultdict.__delitem__)
    pop = _changed(defaultdict.pop)
    popitem = _changed(defaultdict.popitem)
    clear = _changed(defaultdict.clear)
    update = _changed(defaultdict.update)
    setdefault = _changed(defaultdict.setdefault)
    del _changed


def grads_of(params: List[Tensor]) -> List[Optional[Tensor]]:
    return list(map(_GRAD, params))


def has_grad(grads: List[Optional[Tensor]]) -> List[bool]:
    return list(map(is_not, grads, _NONE))


class Prepared(NamedTuple):
    """A step's values that may fail to compute: all of them are computed,
    for every group, before any group is updated."""
    scalars: kernel.StepScalars
    clips: Optional[List[Tensor]]  # a custom clip_lambda's values, one array per launch
    eager_hyper: Hyper             # its clip_lambda answers from values computed beforehand
    host_scalars: kernel.StepScalars  # with lr read on the host (the CPU step's)


def _flat_advance(steps: List[Tensor]) -> Optional[List[Tuple[Tensor, Optional[Tensor], Tensor]]]:
    """How to add one to these step counts in one op per flat array they are
    views of: (array, None or the index of the counts, ones); None if they
    are not all views of flat arrays."""
    views = flat_views(steps)
    if views is None:
        return None
    return [(base, None if indices == list(range(base.numel())) else torch.tensor(indices, device=base.device),
             torch.ones(len(indices), device=base.device)) for base, indices in views]


class GroupProgram:
    """The cached step of one param group for one set of params with gradients."""

    def __init__(self, group: dict, mask: List[bool], tensors: Tensors, *, fused: Optional[bool],
                 foreach: Optional[bool]):
        tensors = tensors.with_keys()
        self.group = group
        self.mask = mask
        self.all_active = all(mask)
        self.sharded = any(isinstance(p, DTensor) for p in tensors.params)
        self.fingerprint = self._fingerprint(tensors)
        self.tensors = tensors._replace(grads=[None] * len(tensors.grads))  # not kept alive
        self.grads = tensors.grads  # this step's, until it ran
        fused_positions = dispatch.fused_positions(fused, tensors.params)
        cpu_positions = [i for i in dispatch.cpu_positions(fused, tensors.params)
                         if not reference.compact(tensors, i)]  # compact storage: the reference
        taken = set(fused_positions + cpu_positions)
        self.fused_positions = None if len(fused_positions) == len(tensors.params) else fused_positions
        self.fused = FusedStep(tensors.pick(fused_positions)) if fused_positions else None
        self.advance = _flat_advance([tensors.steps[i] for i in fused_positions])
        self.cpu_positions = cpu_positions
        self.cpu = CpuStep(tensors.pick(cpu_positions)) if cpu_positions else None
        self.cpu_advance = _flat_advance([tensors.steps[i] for i in cpu_positions])
        self.eager_positions = [i for i in range(len(tensors.params)) if i not in taken]
        self.eager_implementation = dispatch.eager_implementation(foreach)
        self.state_of: tuple = (None, None, None, None)  # the state dicts looked up, and for what
        self._scalars_key: Optional[tuple] = None
        self._scalars: Optional[kernel.StepScalars] = None

    def _fingerprint(self, tensors: Tensors) -> tuple:
        return fingerprint(*(tensors.map_tensors(local_shard) if self.sharded else tensors))

    def reuse(self, params: List[Tensor], grads: List[Optional[Tensor]], state: dict) -> bool:
        """Whether this program still fits the group as it is now (then it
        takes the new gradients); False when anything moved."""
        if has_grad(grads) != self.mask:
            return False
        if not self.all_active:
            params, grads = list(compress(params, self.mask)), list(compress(grads, self.mask))
        try:
            if state is self.state_of[0] and getattr(state, "version", None) == self.state_of[1] \
                    and list(map(id, params)) == self.state_of[2]:
                states = self.state_of[3]  # the same params, whose state dicts were not replaced
            else:
                states = list(map(state.__getitem__, params))
                self.state_of = (state, getattr(state, "version", None), list(map(id, params)), states)
            current = self._fingerprint(Tensors(params, grads, list(map(_EXP_AVG, states)),
                                                list(map(_EXP_AVG_SQ, states)),
                                                list(map(_STEP, states)), *self._compact_columns(states)))
        except (KeyError, RuntimeError, AttributeError, TypeError):  # state gone, sparse, not tensors
            return False
        if current[:-1] != self.fingerprint[:-1]:
            return False
        if current[-1] != self.fingerprint[-1]:  # new gradient storage: new tables
            if self.fused is not None:
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    return False  # the rebuild raises the clear error
                self.fused.with_grad_addresses(self._fused_part(current[-1]))
            self.fingerprint = current
        self.grads = grads
        return True

    def _compact_columns(self, states: List[dict]) -> list:
        """The compact-storage columns of these states, where the program has them."""
        return [None if mine is None else [state.get(key) for state in states]
                for key, mine in zip(COMPACT_KEYS, self.tensors[5:8])]

    def _fused_part(self, column: list) -> list:
        return column if self.fused_positions is None else [column[i] for i in self.fused_positions]

    def prepare(self, hyper: Hyper, clip: Optional[ClipEvaluator], *, capturable: bool) -> Prepared:
        """The float32 scalars (cached while the hyper-parameters stay) and a
        custom clip_lambda's values: everything that can fail, computed
        before anything is updated."""
        lr = hyper.lr  # a tensor on the launches' device is read there (no host read)
        on_device = isinstance(lr, Tensor) and self.fused is not None and \
            all(launch.device == lr.device for launch in self.fused.launches)
        lr_value = None if on_device else float(lr)
        key = (lr_value, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay)
        if key != self._scalars_key:
            self._scalars = scalars_for(hyper, lr_value)
            self._scalars_key = key
        clips, eager_hyper = None, hyper
        if clip is not None:
            if self.fused is not None:
                clips = self.fused.clip_values(clip, capturable)
            host_positions = self.eager_positions + self.cpu_positions  # read their counts here
            if host_positions:
                counts = torch.stack([self.tensors.steps[i] for i in host_positions]).tolist()
                eager_hyper = hyper._replace(clip_lambda=clip.by_count(counts).__getitem__)
        host_scalars = self._scalars
        if lr_value is None and self.cpu is not None:  # an lr on another device, CPU params
            host_scalars = scalars_for(hyper, float(lr))
        return Prepared(self._scalars, clips, eager_hyper, host_scalars)

    def run(self, prepared: Prepared, hyper: Hyper, scaling: Scaling, seed: int = 0,
            stochastic: bool = False) -> None:
        """The step: the fused launches, the eager paths, the step counts.
        ``seed`` keys the random bits (8-bit state, and bf16 stores with
        ``stochastic``)."""
        grads = self.grads
        del self.grads  # not kept alive past the step
        if self.fused is not None:
            self.fused.run(self._fused_part(grads), hyper, prepared.scalars, scaling, seed, stochastic,
                           prepared.clips)
            _advance(self.advance, self._fused_part(self.tensors.steps), scaling.found_inf)
        eager_positions = self.eager_positions
        if self.cpu is None and not eager_positions:
            return  # all fused: found_inf stays on the device, never read here
        skipped = scaling.found_inf is not None and float(scaling.found_inf) != 0  # read on the host
        if self.cpu is not None and not skipped:
            cpu_grads = [grads[i] for i in self.cpu_positions]
            if not stochastic and self.cpu.run(cpu_grads, prepared.eager_hyper, prepared.host_scalars,
                                               scaling):
                _advance(self.cpu_advance, [self.tensors.steps[i] for i in self.cpu_positions], None)
            else:  # stochastic rounding, or no compiler here: the eager paths instead
                eager_positions = eager_positions + self.cpu_positions
        if eager_positions and not skipped:
            self._run_eager(grads, prepared.eager_hyper, scaling, eager_positions, seed, stochastic)

    def _run_eager(self, grads, hyper: Hyper, scaling: Scaling, positions: List[int], seed: int,
                   stochastic: bool) -> None:
        """GradScaler's unscale done eagerly (its skip was decided on the host,
        as GradScaler itself does for unfused optimizers). Compactly stored
        tensors, and stochastic rounding, take the reference."""
        tensors = self.tensors.pick(positions)
        grads = [grads[i] for i in positions]
        if scaling.grad_scale is not None:
            grads = [g / scaling.grad_scale.to(g.device) for g in grads]
        tensors = tensors._replace(grads=grads)
        compact = [i for i in range(len(grads)) if stochastic or reference.compact(tensors, i)]
        if compact:
            reference.adopt(tensors.pick(compact), hyper, seed=seed, stochastic=stochastic)
        if len(compact) < len(grads):
            plain = [i for i in range(len(grads)) if i not in set(compact)]
            self.eager_implementation(tensors.pick(plain)._replace(exp_avg_scales=None, exp_avg_sq_scales=None,
                                                                   remainders=None), hyper)


def _advance(plan, steps: List[Tensor], found_inf: Optional[Tensor]) -> None:
    """n += 1 for each step count unless found_inf is set (read where the
    counts are), in one op per flat array when ``plan`` (``_flat_advance``) has one."""
    if plan is None:
        advance_steps(steps, found_inf)
        return
    for flat, index, ones in plan:
        increment = ones if found_inf is None else \
            ones * (1 - found_inf.to(flat.device, torch.float32))
        if index is None:
            flat.add_(increment)
        else:  # only the counts of params that had a gradient
            flat.index_add_(0, index, increment)


def scalars_for(hyper: Hyper, lr: Optional[float]) -> kernel.StepScalars:
    """The float32 scalars, refusing values float32 cannot hold (an update
    with inf would turn every param NaN or inf)."""
    beyond = kernel.beyond_float32(lr, hyper.eps, hyper.weight_decay)
    if beyond is not None:
        raise ValueError(f"ADOPT: {beyond[0]}={beyond[1]} is beyond the float32 range the update is "
                         "computed in")
    return kernel.StepScalars.make(lr=0.0 if lr is None else lr, beta1=hyper.beta1,
                                   beta2=hyper.beta2, eps=hyper.eps, weight_decay=hyper.weight_decay)


def custom_clip(clip_lambda: Optional[Callable]) -> bool:
    """A clip_lambda other than the default (which the kernel computes itself)."""
    return clip_lambda is not None and clip_lambda is not default_clip_lambda


def adopt(tensors: Tensors, hyper: Hyper, *, fused: Optional[bool] = None,
          foreach: Optional[bool] = None, scaling: Scaling = Scaling(),
          bf16_stochastic_round: bool = False, stochastic_round_seed: int = 0,
          capturable: bool = False) -> None:
    """Functional ADOPT over lists of tensors, as ``torch.optim.adam.adam``:
    each tensor goes to the fused kernel (as ``fused`` decides, see
    ``dispatch.use_fused``), to the compiled CPU step (CPU tensors, see
    ``dispatch.use_cpu_step``) or to an eager path (``foreach``; the
    reference for compact storage or stochastic rounding), and its step
    count is incremented. The step counts of tensors on the kernel or the
    CPU step must be float32 scalars on their parameter's device. ``stochastic_round_seed``
    keys the random bits of 8-bit state and of bf16 stores rounded
    stochastically (``bf16_stochastic_round``). Everything is checked before
    anything is updated."""
    dispatch.check(tensors, fused)
    program = GroupProgram(None, [True] * len(tensors.params), tensors, fused=fused, foreach=foreach)
    clip = ClipEvaluator(hyper.clip_lambda) if custom_clip(hyper.clip_lambda) else None
    prepared = program.prepare(hyper, clip, capturable=capturable)
    program.run(prepared, hyper, scaling, stochastic_round_seed, bf16_stochastic_round)
