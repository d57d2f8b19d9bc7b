"""The CPU step: ADOPT's update as one loop over p, g, m, v (one memory pass),
compiled by torch.compile's inductor C++ backend, for CPU tensors (FSDP2's
CPU offload, ZeRO-Offload, CPU training).

``_update`` states the update for flat tensors in the reference's float32
operations and order; inductor turns it into one vectorised OpenMP loop.
Variants (dtypes, maximize, weight-decay mode, GradScaler, tensors per call)
are compiled once each, with symbolic sizes, on a probe of about
``PROBE_NUMEL`` elements, so no size, offset, step count or hyper-parameter
value recompiles: hyper-parameters arrive as one float32 tensor, step counts
and clip values as 0-d tensors. Compiled code is cached by torch (in
process, and inductor's on-disk caches).

Host work is per call (~20 us of it is torch.compile's frame), so tensors of
``DIRECT_MIN_NUMEL`` elements or more (whose p, g, m, v share one dense
layout) are updated ``SLOTS`` to a call (a second compiled variant, made
when a step has that many), the rest one to a call, on flat views of their
own memory; smaller ones are copied into one bucket per (dtypes, step
count), updated by one call and copied back (one C++ loop per operand).

Numerics: bit for bit the reference's, by construction and by test
(``tests/test_cpu.py``): the reference's fused multiply-adds are explicit
(``prims.fma``: ``at::vec::fmadd``/``std::fma``), inductor does not contract
any other multiply and add (``-ffp-contract=off``, set for the compilation),
and sqrt and division are the IEEE vector instructions (correctly rounded,
as the reference's sqrt). Clip values come in per tensor, computed on the
host, out of the loop: ``clip_lambda(n)`` as torch-adopt calls it. With
GradScaler the gradient is divided in float32 and not rounded to its dtype
in between, as in the kernel.

If torch.compile cannot build the step here (no C++ compiler, an unsupported
Python), one warning says so and the eager path runs instead.
"""
import importlib
import types
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from adopt_triton.common import Hyper, Scaling, Tensors, as_real, dense_strides, flat_views, local_shard
from adopt_triton.kernels.adopt import StepScalars

# Tensors below this many elements go through a bucket. Measured
# (bench/cpu_step.py --threshold, 64 tensors, 2 threads): 2^12 + 3 elements
# each, 0.50 ms through the bucket against 0.64 ms called directly; 2^13 + 3,
# 0.82 against 0.71 ms.
DIRECT_MIN_NUMEL = 1 << 13
# Large tensors per call in the variants compiled for many (and 1 in the others).
SLOTS = 8
# The size the variants are compiled on: large enough for inductor to emit
# the parallel loop (its choice is made on this size hint, for every size).
PROBE_NUMEL = 1 << 16
NO_WEIGHT_DECAY, COUPLED_WEIGHT_DECAY, DECOUPLED_WEIGHT_DECAY = range(3)


class Variant(NamedTuple):
    """What one compiled step is specialised on."""
    dtype: torch.dtype        # of params and gradients
    state_dtype: torch.dtype  # of exp_avg and exp_avg_sq
    maximize: bool
    weight_decay: int
    grad_scale: bool
    slots: int                # tensors per call


def _update(*operands, variant):
    """One step, in place, for ``variant.slots`` tensors: ``operands`` are
    (param, grad, exp_avg, exp_avg_sq, step, clip) for each, then grad_scale
    and scalars."""
    *tensors, grad_scale, scalars = operands
    for slot in range(variant.slots):
        _update_one(*tensors[6 * slot:6 * slot + 6], grad_scale, scalars, variant)


def _update_one(param, grad, exp_avg, exp_avg_sq, step, clip, grad_scale, scalars, variant):
    """One step, in place, for 1-D tensors of one size: the reference's
    operations, with its fused multiply-adds explicit. ``step``: the count
    before this step (0-d); ``clip``: its clip value (0-d; inf: no clip);
    ``scalars``: ``_scalars_tensor``'s values."""
    fma = torch.ops.prims.fma
    neg_lr, weight_decay, neg_lr_weight_decay, lerp_coeff, lerp_from_end, beta2, \
        one_minus_beta2, eps = scalars.unbind()
    p, g, m, v = param.float(), grad.float(), exp_avg.float(), exp_avg_sq.float()
    if variant.grad_scale:
        g = g / grad_scale
    if variant.maximize:
        g = -g
    if variant.weight_decay == COUPLED_WEIGHT_DECAY:
        g = fma(p, weight_decay, g)
    decayed = fma(p, neg_lr_weight_decay, p) if variant.weight_decay == DECOUPLED_WEIGHT_DECAY else p
    update = torch.clamp(g / torch.maximum(v.sqrt(), eps), -clip, clip)  # delayed v
    m_new = fma(lerp_coeff, update - m, torch.where(lerp_from_end != 0, update, m))  # torch.lerp
    p_new = fma(m_new, neg_lr, decayed)
    v_new = fma(one_minus_beta2 * g, g, v * beta2)
    first = step == 0  # first step: v = g * g; p and m keep their values
    param.copy_(torch.where(first, p, p_new))
    exp_avg.copy_(torch.where(first, m, m_new))
    exp_avg_sq.copy_(torch.where(first, g * g, v_new))


_COMPILED: Dict[Variant, object] = {}
_UNAVAILABLE: List[str] = []  # why the compiler failed, once known


def compiled_step(variant: Variant):
    """The compiled step of ``variant`` (compiled now on a probe if new), or
    None if torch.compile cannot build it here (warned about once)."""
    step = _COMPILED.get(variant)
    if step is not None or _UNAVAILABLE:
        return step
    # A code object per variant: dynamo keeps compiled entries, and counts
    # recompilations against its limit, per code object.
    code = _update.__code__.replace(co_name=f"_adopt_update_{len(_COMPILED)}")
    update = types.FunctionType(code, _update.__globals__, code.co_name)
    update.__kwdefaults__ = {"variant": variant}
    try:
        # No contraction and no unsafe math, whatever the environment asks, for
        # this compilation and any later one (a recompile after a guard failure).
        step = torch.compile(update, dynamic=True, fullgraph=True,
                             options={"cpp.enable_floating_point_contract_flag": "off",
                                      "cpp.enable_unsafe_math_opt_flag": False})
        importlib.import_module("torch._inductor.inductor_prims")  # registers prims.fma
        probe = []  # distinct tensors (an input passed twice would be compiled apart)
        for slot in range(variant.slots):  # of different sizes: none is assumed equal to another
            probe += [torch.zeros(PROBE_NUMEL + slot, dtype=dtype) for dtype in
                      (variant.dtype,) * 2 + (variant.state_dtype,) * 2]
            probe += [torch.ones(()), torch.ones(())]
        with torch.no_grad():  # grad mode as in every call (it is part of the compiled entry)
            step(*probe, torch.ones(()) if variant.grad_scale else None, _scalars_tensor(
                StepScalars.make(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)))
    except Exception as error:  # noqa: BLE001  (any failure: the eager path still works)
        _UNAVAILABLE.append(f"{type(error).__name__}: {error}".splitlines()[0])
        warnings.warn("ADOPT: torch.compile could not build the CPU step here "
                      f"({_UNAVAILABLE[0]}); CPU tensors use the eager path instead", stacklevel=4)
        return None
    _COMPILED[variant] = step
    return step


def _scalars_tensor(scalars: StepScalars) -> Tensor:
    return torch.tensor([scalars.neg_lr, scalars.weight_decay, scalars.neg_lr_weight_decay,
                         scalars.lerp_coeff, float(scalars.lerp_from_end), scalars.beta2,
                         scalars.one_minus_beta2, scalars.eps], dtype=torch.float32)


def _flat(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor's memory, in memory order."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))


def _real_local(t: Tensor) -> Tensor:
    return as_real(local_shard(t)).detach()


class _Bucket(NamedTuple):
    """Flat p, g, m, v buffers for a set of small tensors, one view per tensor
    shaped like it, and the tensors' own p, m, v."""
    flat: List[Tensor]
    views: List[List[Tensor]]
    members: List[List[Tensor]]


def _bucket(members: List[List[Tensor]], grads: List[Tensor]) -> _Bucket:
    """Buffers for tensors whose p, m, v are ``members`` (three lists)."""
    operands = [members[0], grads, members[1], members[2]]
    numels = [t.numel() for t in members[0]]
    total = max(sum(numels), 2)  # sizes 0 and 1 would be compiled apart
    flat = [torch.empty(total, dtype=column[0].dtype) for column in operands]
    views = [[view.view(t.shape) for view, t in zip(buffer.split(numels), column)]
             for buffer, column in zip(flat, operands)]
    return _Bucket(flat, views, members)


class CpuStep:
    """The compiled step over a fixed list of CPU tensors (local shards of
    DTensors, complex ones as real views). Step counts are read, not advanced."""

    def __init__(self, tensors: Tensors):
        self.steps = tensors.steps
        self.operands = [[_real_local(t) for t in column]  # p, m, v
                         for column in (tensors.params, tensors.exp_avgs, tensors.exp_avg_sqs)]
        self.kinds = [(p.dtype, m.dtype) for p, m in zip(self.operands[0], self.operands[1])]
        self.plain_grads = all(t is local_shard(t) and not t.is_complex() for t in tensors.params)
        direct: Dict[tuple, list] = {}  # by dtypes: (position, flat p, m, v)
        self.bucketed: List[int] = []
        for position, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(*tensors[:4])):
            operands = [_real_local(t) for t in (param, grad, exp_avg, exp_avg_sq)]
            layouts = {dense_strides(t) for t in operands}
            if operands[0].numel() >= DIRECT_MIN_NUMEL and len(layouts) == 1 and None not in layouts:
                direct.setdefault(self.kinds[position], []).append(
                    (position, *(_flat(operands[i]) for i in (0, 2, 3))))
            elif operands[0].numel() > 0:  # an empty shard has nothing to update
                self.bucketed.append(position)
        self.calls = []  # (dtypes, the direct tensors of one call): SLOTS of them, or 1
        for kind, entries in direct.items():
            whole = len(entries) - len(entries) % SLOTS
            self.calls += [(kind, entries[i:i + SLOTS]) for i in range(0, whole, SLOTS)]
            self.calls += [(kind, [entry]) for entry in entries[whole:]]
        self.buckets: Dict[Tuple[int, ...], _Bucket] = {}
        self._counts = _count_reader(self.steps)
        self._scalars: Tuple[Optional[StepScalars], Optional[Tensor]] = (None, None)
        self._compiled_for: Tuple[Optional[tuple], Optional[dict]] = (None, None)

    def run(self, grads: List[Tensor], hyper: Hyper, scalars: StepScalars,
            scaling: Scaling) -> bool:
        """One step for every tensor (``hyper.clip_lambda`` answers for each
        step count, or is the default or None); False, with nothing
        changed, if the compiler is not available. Call only when GradScaler
        found no inf (read on the host)."""
        compiled = self._compiled(hyper, scaling.grad_scale is not None)
        if compiled is None:
            return False
        if self._scalars[0] != scalars:
            self._scalars = (scalars, _scalars_tensor(scalars))
        scalars_t = self._scalars[1]
        grad_scale = None if scaling.grad_scale is None else scaling.grad_scale.to("cpu", torch.float32)
        counts = self._counts()
        values = {n: float("inf") if hyper.clip_lambda is None or n == 0 else hyper.clip_lambda(n)
                  for n in set(counts)}  # clip_lambda(n) as torch-adopt calls it; inf: no clip
        # One clip tensor per slot of a call: one tensor in two slots would be compiled apart.
        clips = [{n: torch.tensor(value, dtype=torch.float32) for n, value in values.items()}
                 for _ in range(SLOTS if self.calls else 1)]
        with torch.no_grad():
            for kind, entries in self.calls:
                operands = []
                for slot, (position, param, exp_avg, exp_avg_sq) in enumerate(entries):
                    # detached: a gradient that requires grad (create_graph=True) would be
                    # another guard of the compiled step, and a recompile mid-step
                    grad = _real_local(grads[position])
                    operands += (param, _flat(grad), exp_avg, exp_avg_sq, self.steps[position],
                                 clips[slot][counts[position]])
                compiled[kind, len(entries)](*operands, grad_scale, scalars_t)
            groups: Dict[tuple, List[int]] = {}  # the bucketed tensors by dtypes and step count
            for position in self.bucketed:
                groups.setdefault((self.kinds[position], counts[position]), []).append(position)
            for (kind, count), positions in groups.items():
                bucket = self._bucket(positions, grads)
                compiled[kind, 1](*bucket.flat, self.steps[positions[0]], clips[0][count], grad_scale,
                                  scalars_t)
                for column, views in zip(bucket.members, bucket.views[:1] + bucket.views[2:]):
                    torch._foreach_copy_(column, views)  # back into p, m, v
        return True

    def _compiled(self, hyper: Hyper, grad_scale: bool) -> Optional[Dict[tuple, object]]:
        """The compiled steps this step needs, by (dtypes, tensors per call);
        None if the compiler is not available."""
        key = (hyper.maximize, hyper.weight_decay != 0, hyper.decouple, grad_scale)
        if self._compiled_for[0] != key:
            weight_decay = NO_WEIGHT_DECAY if hyper.weight_decay == 0 else (
                DECOUPLED_WEIGHT_DECAY if hyper.decouple else COUPLED_WEIGHT_DECAY)
            arities = {(kind, len(entries)) for kind, entries in self.calls} | \
                {(self.kinds[position], 1) for position in self.bucketed}
            compiled = {(kind, slots): compiled_step(Variant(*kind, hyper.maximize, weight_decay,
                                                             grad_scale, slots))
                        for kind, slots in arities}
            self._compiled_for = (key, None if None in compiled.values() else compiled)
        return self._compiled_for[1]

    def _bucket(self, positions: List[int], grads: List[Tensor]) -> _Bucket:
        """The bucket of these tensors (made the first time), filled. Only
        copied from, so plain gradients need no real view, no detach (small
        tensors: per-tensor work counts)."""
        step_grads = [grads[i] for i in positions]
        if not self.plain_grads:
            step_grads = [_real_local(g) for g in step_grads]
        bucket = self.buckets.get(tuple(positions))
        if bucket is None:
            members = [[column[i] for i in positions] for column in self.operands]
            bucket = self.buckets[tuple(positions)] = _bucket(members, step_grads)
        sources = [bucket.members[0], step_grads, bucket.members[1], bucket.members[2]]
        for views, column in zip(bucket.views, sources):
            torch._foreach_copy_(views, column)
        return bucket



def _count_reader(steps: List[Tensor]):
    """A function returning the step counts as floats: one read of the flat
    array they are views of (as the optimizer keeps them), else of a stack."""
    views = flat_views(steps)
    if views is None or len(views) != 1:
        return lambda: torch.stack(steps).tolist()
    base, index = views[0]

    def read():
        values = base.tolist()
        return [values[i] for i in index]
    return read
