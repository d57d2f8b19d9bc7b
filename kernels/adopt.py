"""The fused ADOPT update: one Triton kernel, one memory pass, one launch for
any number of tensors.

Per element the update case reads p, g, m, v once and writes p, m, v once
(28 bytes per fp32 element); the first-step case writes v only. Variants are
``tl.constexpr`` flags on the one body in ``_adopt_elementwise``;
hyper-parameters are runtime arguments (or device tensors), so a
learning-rate schedule never recompiles.

One launch covers a list of tensors of one device, param dtype and state
dtype. Every tensor is cut into blocks of ``BLOCK_SIZE`` elements; program
``pid`` looks up its tensor in ``block_tensor`` and that tensor's row in
``meta`` (first block, numel, the addresses of p, g, m, v and its step count,
whether p, g, m, v are 16-byte aligned, for compact storage the addresses of
the block maxima and the remainder, and its random-stream key).
The program issues its data loads before it reads the step count: the count
(first step or update) and the clip value only matter once the data is in
registers. Each tensor's own count picks its case and clip value, so tensors
whose first gradient came late are right, and no host synchronisation is
needed (CUDA graphs).

Compact storage, as constexpr variants of the same body (helpers in
``compact.py``): 8-bit state (``STATE_DTYPE`` int8: m and sqrt(v) as codes
with float32 block maxima, handled as one tile row per 64-element block,
decoded, updated and re-encoded in registers) and master weights
(``REMAINDER_BITS``: bf16 param + remainder joined to float32 on load, split
on store). Their rounding uses Philox bits keyed like the bf16 stochastic
rounding, on the tensor's key (its index in the optimizer) in ``meta``.

Numerics follow ``adopt_triton.reference`` operation for operation: the same
fused multiply-adds (``tl.fma`` where ATen's vectorised CPU kernels use one),
correctly rounded ``sqrt_rn``/``div_rn``, NaN-propagating max/clamp, and
hyper-parameters pre-rounded to float32 on the host (``StepScalars``), so the
kernel is bit-exact to the reference on the CPU interpreter and on the GPU.
"""
import array
import os
from typing import Dict, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .scalars import StepScalars, beyond_float32, f32  # noqa: F401  (re-exported as kernel.*)
from .compact import (EXP_AVG_DIVISOR, EXP_AVG_SQ_LEVELS, QUANT_BLOCK, decode_exp_avg, load_master,
                      load_scales, random_words, store_exp_avg, store_master, store_sqrt_exp_avg_sq)

# Weight-decay modes (the WEIGHT_DECAY constexpr).
NO_WEIGHT_DECAY = tl.constexpr(0)
COUPLED_WEIGHT_DECAY = tl.constexpr(1)
DECOUPLED_WEIGHT_DECAY = tl.constexpr(2)
# Clip modes (the CLIP constexpr): none, the default n ** 0.25 computed in the
# kernel, or one value per step count from a device array.
NO_CLIP = tl.constexpr(0)
DEFAULT_CLIP = tl.constexpr(1)
CLIP_PER_TENSOR = tl.constexpr(2)
# Columns of a tensor's row in the metadata table (see Tables): the addresses
# of p, g, m, v, its step count, m's and v's block maxima (8-bit state) and
# the param's remainder (master weights), then its random-stream key.
(META_FIRST_BLOCK, META_NUMEL, META_PARAM, META_GRAD, META_EXP_AVG, META_EXP_AVG_SQ,
 META_STEP, META_ALIGNED, META_EXP_AVG_SCALE, META_EXP_AVG_SQ_SCALE, META_REMAINDER,
 META_KEY) = map(tl.constexpr, range(12))
META_COLUMNS = tl.constexpr(12)

_PROPAGATE_NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _store(pointer, value, mask, random_bits, STOCHASTIC: tl.constexpr):
    """Store float32 ``value`` in the pointer's dtype with one rounding: to
    nearest even, or for bf16 with STOCHASTIC, up with probability equal to
    the discarded fraction (16 random bits). bf16 is rounded with integer
    ops, identically on the GPU and in the interpreter (which truncates)."""
    if pointer.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        # A NaN becomes the canonical 0x7FC0 (c10's scalar conversion's): adding the
        # rounding bits to a NaN with a full payload would carry into the sign (-0.0).
        bits = tl.where(value != value, tl.full(bits.shape, 0x7FC00000, tl.uint32), bits)
        if STOCHASTIC:
            bits = bits + (random_bits & 0xFFFF)
        else:
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(pointer, rounded, mask=mask)
    else:
        tl.store(pointer, value.to(pointer.dtype.element_ty), mask=mask)


@triton.jit
def _adopt_elementwise(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr,
                       exp_avg_sq_scale_ptr, remainder_ptr, offsets, mask, quads, scale_offsets,
                       scale_mask, neg_lr, weight_decay, neg_lr_weight_decay, lerp_coeff, beta2,
                       one_minus_beta2, eps, step_ptr, clip_ptr, grad_scale, seed, tensor, key,
                       MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, CLIP: tl.constexpr,
                       LERP_FROM_END: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                       STOCHASTIC: tl.constexpr, QUANTIZED: tl.constexpr,
                       REMAINDER_BITS: tl.constexpr):
    # The data first: nothing it needs depends on the step count.
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    param = load_master(param_ptr, remainder_ptr, offsets, mask, REMAINDER_BITS)
    if QUANTIZED:  # decoded in registers; the stored sqrt(v) is the denominator itself
        exp_avg = decode_exp_avg(tl.load(exp_avg_ptr + offsets, mask=mask),
                                 load_scales(exp_avg_scale_ptr, scale_offsets, scale_mask, EXP_AVG_DIVISOR))
        root = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32) * \
            load_scales(exp_avg_sq_scale_ptr, scale_offsets, scale_mask, EXP_AVG_SQ_LEVELS)
        exp_avg_sq = root * root
    else:
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
        root = exp_avg_sq
    step = tl.load(step_ptr)
    random_p = quads  # unused unless STOCHASTIC or QUANTIZED
    random_m = quads
    random_v = quads
    if STOCHASTIC or QUANTIZED:  # counter-based: the same bits for the same seed, step, key and element
        random_p, random_m, random_v = random_words(seed, offsets, quads, key, step, QUANTIZED)
    # All arithmetic in float32, whatever the storage dtypes.
    if HAS_GRAD_SCALE:  # GradScaler: unscale in registers, nothing written back
        grad = tl.div_rn(grad, grad_scale)
    if MAXIMIZE:
        grad = -grad
    if WEIGHT_DECAY == COUPLED_WEIGHT_DECAY:  # L2: g = g + wd * p, also on the first step
        grad = tl.fma(param, weight_decay, grad)
    if step == 0:
        # First step: v = g * g; p and m are not written.
        if QUANTIZED:
            store_sqrt_exp_avg_sq(exp_avg_sq_ptr, exp_avg_sq_scale_ptr, offsets, mask, scale_offsets,
                                  scale_mask, tl.sqrt_rn(grad * grad), random_v)
        else:
            _store(exp_avg_sq_ptr + offsets, grad * grad, mask, random_v, STOCHASTIC)
    else:
        if WEIGHT_DECAY == DECOUPLED_WEIGHT_DECAY:  # AdamW-style: p = p - lr * wd * p
            param = tl.fma(param, neg_lr_weight_decay, param)
        clip = 0.0
        if CLIP == DEFAULT_CLIP:  # n ** 0.25 in float64, rounded once, like the host's clip_lambda(n)
            clip = tl.sqrt(tl.sqrt(step.to(tl.float64))).to(tl.float32)
        if CLIP == CLIP_PER_TENSOR:
            clip = tl.load(clip_ptr + tensor).to(tl.float32)
        # Delayed v: normalise by the v of the previous step, then update v last.
        if not QUANTIZED:
            root = tl.sqrt_rn(exp_avg_sq)
        denom = tl.maximum(root, eps, propagate_nan=_PROPAGATE_NAN)
        update = tl.div_rn(grad, denom)
        if CLIP != NO_CLIP:
            update = tl.clamp(update, -clip, clip, propagate_nan=_PROPAGATE_NAN)
        # torch.lerp: m + w * (u - m) for w < 0.5, else u + (w - 1) * (u - m).
        if LERP_FROM_END:
            exp_avg = tl.fma(lerp_coeff, update - exp_avg, update)
        else:
            exp_avg = tl.fma(lerp_coeff, update - exp_avg, exp_avg)
        param = tl.fma(exp_avg, neg_lr, param)
        exp_avg_sq = tl.fma(one_minus_beta2 * grad, grad, exp_avg_sq * beta2)
        if REMAINDER_BITS == 0:
            _store(param_ptr + offsets, param, mask, random_p, STOCHASTIC)
        else:
            store_master(param_ptr, remainder_ptr, offsets, mask, param, random_p, REMAINDER_BITS,
                         STOCHASTIC)
        if QUANTIZED:
            store_exp_avg(exp_avg_ptr, exp_avg_scale_ptr, offsets, mask, scale_offsets, scale_mask,
                          exp_avg)
            store_sqrt_exp_avg_sq(exp_avg_sq_ptr, exp_avg_sq_scale_ptr, offsets, mask, scale_offsets,
                                  scale_mask, tl.sqrt_rn(exp_avg_sq), random_v)
        else:
            _store(exp_avg_ptr + offsets, exp_avg, mask, random_m, STOCHASTIC)
            _store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask, random_v, STOCHASTIC)


@triton.jit(do_not_specialize=["meta_ptr", "block_tensor_ptr", "lr_ptr", "clip_ptr",
                               "grad_scale_ptr", "found_inf_ptr", "seed"],
            do_not_specialize_on_alignment=["meta_ptr", "block_tensor_ptr", "lr_ptr",
                                            "clip_ptr", "grad_scale_ptr", "found_inf_ptr"])
def _adopt_kernel(meta_ptr, block_tensor_ptr, lr_ptr, clip_ptr, grad_scale_ptr,
                  found_inf_ptr, neg_lr, weight_decay, neg_lr_weight_decay, lerp_coeff, beta2,
                  one_minus_beta2, eps, seed,
                  DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
                  WEIGHT_DECAY: tl.constexpr, CLIP: tl.constexpr, LERP_FROM_END: tl.constexpr,
                  LR_ON_DEVICE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr,
                  REMAINDER_BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    QUANTIZED: tl.constexpr = STATE_DTYPE == tl.int8  # 8-bit state: int8 m, uint8 sqrt(v), block maxima
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensor_ptr + pid).to(tl.int64)
    row = meta_ptr + tensor * META_COLUMNS
    # int64 offsets: a tensor may exceed 2**31 elements.
    block_start = (pid - tl.load(row + META_FIRST_BLOCK)) * BLOCK_SIZE
    numel = tl.load(row + META_NUMEL)
    if QUANTIZED:  # one row per quantisation block
        rows = tl.arange(0, BLOCK_SIZE // QUANT_BLOCK).to(tl.int64)
        offsets = block_start + rows[:, None] * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)[None, :]
        quads = block_start // 4 + rows[:, None] * (QUANT_BLOCK // 4) + tl.arange(0, QUANT_BLOCK // 4)[None, :]
        scale_offsets = block_start // QUANT_BLOCK + rows
        exp_avg_sq_dtype: tl.constexpr = tl.uint8
    else:
        offsets = block_start + tl.arange(0, BLOCK_SIZE)
        quads = offsets
        scale_offsets = offsets
        exp_avg_sq_dtype: tl.constexpr = STATE_DTYPE
    param_ptr = tl.load(row + META_PARAM).to(tl.pointer_type(DTYPE))
    grad_ptr = tl.load(row + META_GRAD).to(tl.pointer_type(DTYPE))
    exp_avg_ptr = tl.load(row + META_EXP_AVG).to(tl.pointer_type(STATE_DTYPE))
    exp_avg_sq_ptr = tl.load(row + META_EXP_AVG_SQ).to(tl.pointer_type(exp_avg_sq_dtype))
    exp_avg_scale_ptr = tl.load(row + META_EXP_AVG_SCALE).to(tl.pointer_type(tl.float32))
    exp_avg_sq_scale_ptr = tl.load(row + META_EXP_AVG_SQ_SCALE).to(tl.pointer_type(tl.float32))
    remainder_ptr = tl.load(row + META_REMAINDER).to(tl.pointer_type(tl.int8 if REMAINDER_BITS == 8 else tl.int16))
    step_ptr = tl.load(row + META_STEP).to(tl.pointer_type(tl.float32))
    key = tl.load(row + META_KEY)
    aligned = tl.load(row + META_ALIGNED)
    if LR_ON_DEVICE:  # as torch-adopt computes with a tensor lr: -(lr * wd) in float32
        lr = tl.load(lr_ptr).to(tl.float32)
        neg_lr = -lr
        neg_lr_weight_decay = -(lr * weight_decay)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    found_inf = 0.0
    if HAS_FOUND_INF:  # GradScaler saw an inf/NaN: leave everything untouched
        found_inf = tl.load(found_inf_ptr).to(tl.float32)
    if found_inf == 0:
        if (aligned != 0) & (block_start + BLOCK_SIZE <= numel):
            # 16-byte aligned tensor, full block: no mask, vector loads and stores.
            _adopt_elementwise(tl.multiple_of(param_ptr, 16), tl.multiple_of(grad_ptr, 16),
                               tl.multiple_of(exp_avg_ptr, 16), tl.multiple_of(exp_avg_sq_ptr, 16),
                               exp_avg_scale_ptr, exp_avg_sq_scale_ptr,
                               tl.multiple_of(remainder_ptr, 16), offsets, None, quads, scale_offsets,
                               None, neg_lr, weight_decay, neg_lr_weight_decay,
                               lerp_coeff, beta2, one_minus_beta2, eps, step_ptr, clip_ptr,
                               grad_scale, seed, tensor, key,
                               MAXIMIZE, WEIGHT_DECAY, CLIP, LERP_FROM_END, HAS_GRAD_SCALE,
                               STOCHASTIC, QUANTIZED, REMAINDER_BITS)
        else:
            _adopt_elementwise(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr,
                               exp_avg_sq_scale_ptr, remainder_ptr, offsets, offsets < numel, quads,
                               scale_offsets, scale_offsets < (numel + QUANT_BLOCK - 1) // QUANT_BLOCK,
                               neg_lr, weight_decay, neg_lr_weight_decay,
                               lerp_coeff, beta2, one_minus_beta2, eps, step_ptr, clip_ptr,
                               grad_scale, seed, tensor, key,
                               MAXIMIZE, WEIGHT_DECAY, CLIP, LERP_FROM_END, HAS_GRAD_SCALE,
                               STOCHASTIC, QUANTIZED, REMAINDER_BITS)


INTERPRETED = isinstance(_adopt_kernel, InterpretedFunction)
"""True when Triton was imported with TRITON_INTERPRET=1: the kernels then run
on the CPU through Triton's interpreter (CPU tensors allowed)."""

# No contraction of a multiply and an add into an fma the reference does not
# have: the GPU then rounds exactly as written (the interpreter never fuses).
COMPILE_OPTIONS = {} if INTERPRETED else {"enable_fp_fusion": False}

_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
PARAM_DTYPES = tuple(_TRITON_DTYPES)  # of real params and gradients
# of exp_avg and exp_avg_sq; int8 stands for 8-bit state (int8 m codes, uint8 sqrt(v) codes)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
_STATE_TRITON_DTYPES = {**_TRITON_DTYPES, torch.int8: tl.int8}
REMAINDER_BITS = {torch.int16: 16, torch.int8: 8}  # of a master weight's remainder, by its dtype
SEED_LIMIT = 2**31  # seeds are 32-bit kernel arguments


class Settings(NamedTuple):
    block_size: int
    num_warps: int


_SETTINGS_OVERRIDE: Optional[Settings] = None
"""Set by the block-size sweep in bench/ only."""


def settings() -> Settings:
    """Elements per program and warps per program. The interpreter pays ~1 ms
    per program, so it gets few, large blocks; the block size changes nothing
    in the arithmetic."""
    if _SETTINGS_OVERRIDE is not None:
        return _SETTINGS_OVERRIDE
    return Settings(1 << 12, 1) if INTERPRETED else Settings(2048, 8)


class Tables(NamedTuple):
    """The device-side tables of one launch over a list of tensors. They hold
    raw addresses: whoever launches must keep the tensors alive and unmoved."""
    meta: torch.Tensor          # int64 [n_tensors, META_COLUMNS], on the device
    block_tensor: torch.Tensor  # int32 [n_blocks]: the tensor each program updates
    block_size: int
    meta_host: torch.Tensor     # the same rows, on the host (new tables never read the device)


def _aligned(meta: torch.Tensor) -> torch.Tensor:
    """1 where all of p, g, m, v and the remainder (if any) of a row sit on
    16-byte boundaries (a few whole-column ops: this runs whenever new
    gradient storage arrives)."""
    low = meta[:, META_REMAINDER.value]
    for column in (META_PARAM, META_GRAD, META_EXP_AVG, META_EXP_AVG_SQ):
        low = low | meta[:, column.value]
    return ((low & 15) == 0).long()


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host table on the device; from pinned memory on CUDA, so that the
    copy does not wait for the kernels already queued."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


_ADDRESS_COLUMNS = [META_PARAM.value, META_GRAD.value, META_EXP_AVG.value, META_EXP_AVG_SQ.value,
                    META_STEP.value, META_EXP_AVG_SCALE.value, META_EXP_AVG_SQ_SCALE.value,
                    META_REMAINDER.value]


def make_tables(numels: Sequence[int], addresses: Sequence[Sequence[int]],
                device: torch.device, keys: Optional[Sequence[int]] = None) -> Tables:
    """Tables for tensors of ``numels`` elements whose p, g, m, v and step
    count live at ``addresses`` (five per tensor), followed for compact
    storage by those of m's and v's block maxima and the param's remainder
    (eight per tensor, 0 where absent). ``keys``: each tensor's random
    stream (default: its row)."""
    block_size = settings().block_size
    numel = torch.tensor(numels, dtype=torch.int64)
    n_blocks = (numel + block_size - 1) // block_size
    first_block = torch.cumsum(n_blocks, 0) - n_blocks
    meta = torch.zeros(len(numels), META_COLUMNS.value, dtype=torch.int64)
    meta[:, META_FIRST_BLOCK.value] = first_block
    meta[:, META_NUMEL.value] = numel
    rows = torch.tensor(addresses, dtype=torch.int64).reshape(len(numels), -1)
    meta[:, _ADDRESS_COLUMNS[:rows.shape[1]]] = rows
    meta[:, META_KEY.value] = torch.arange(len(numels)) if keys is None else torch.tensor(keys, dtype=torch.int64)
    meta[:, META_ALIGNED.value] = _aligned(meta)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), n_blocks)
    return Tables(_to_device(meta, device), _to_device(block_tensor, device), block_size, meta)


def with_grad_addresses(tables: Tables, rows: Optional[torch.Tensor], addresses: Sequence[int]) -> Tables:
    """The same tables with new gradient addresses in ``rows`` (None: all),
    as new tensors: a table that a captured CUDA graph reads is never written."""
    meta = tables.meta_host.clone()
    column = META_GRAD.value
    new = torch.frombuffer(array.array("q", addresses), dtype=torch.int64)  # 4x torch.tensor's speed
    if rows is None:
        meta[:, column] = new
    else:
        meta[rows, column] = new
    meta[:, META_ALIGNED.value] = _aligned(meta)
    return tables._replace(meta=_to_device(meta, tables.meta.device), meta_host=meta)


class Variant(NamedTuple):
    """The constexpr flags of one compiled kernel (besides the block size)."""
    dtype: torch.dtype
    state_dtype: torch.dtype
    maximize: bool
    weight_decay: int
    clip: int
    lerp_from_end: bool
    lr_on_device: bool
    grad_scale: bool
    found_inf: bool
    stochastic: bool          # bf16 stores (param, bf16 state, 24-bit master) round stochastically
    remainder_bits: int = 0   # master weights: 16 (32-bit master) or 8 (24-bit) bits beside the param

    def constexprs(self, block_size: int) -> Dict[str, object]:
        values = (_TRITON_DTYPES[self.dtype], _STATE_TRITON_DTYPES[self.state_dtype], *self[2:], block_size)
        return dict(zip(_CONSTEXPRS, values))


# The kernel's arguments: its runtime arguments, then these constexprs in this
# order (the direct launch below passes them all positionally).
_CONSTEXPRS = ("DTYPE", "STATE_DTYPE", "MAXIMIZE", "WEIGHT_DECAY", "CLIP", "LERP_FROM_END",
               "LR_ON_DEVICE", "HAS_GRAD_SCALE", "HAS_FOUND_INF", "STOCHASTIC", "REMAINDER_BITS",
               "BLOCK_SIZE")
assert tuple(_adopt_kernel.arg_names[-len(_CONSTEXPRS):]) == _CONSTEXPRS, "kernel and Variant disagree"

# One compiled kernel per (device, variant, block size, warps): later launches
# go straight to it, skipping the JIT's argument binding and cache lookup.
# ADOPT_TRITON_DIRECT_LAUNCH=0 sends every launch through the JIT.
_COMPILED: Dict[tuple, object] = {}
DIRECT_LAUNCH = not INTERPRETED and os.environ.get("ADOPT_TRITON_DIRECT_LAUNCH", "1") != "0"


def launch(tables: Tables, variant: Variant, scalars: StepScalars, *,
           lr: Optional[torch.Tensor] = None, clip: Optional[torch.Tensor] = None,
           grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
           seed: int = 0) -> None:
    """One ADOPT step, in place, for every tensor of ``tables``: one launch.

    Step counts are read, not incremented. ``lr``, ``clip`` (one value per
    tensor), ``grad_scale`` and ``found_inf`` are device tensors, present
    exactly when ``variant`` says so.
    """
    n_blocks = tables.block_tensor.numel()
    if n_blocks == 0:
        return
    block_size, num_warps = tables.block_size, settings().num_warps
    arguments = (tables.meta, tables.block_tensor, lr, clip, grad_scale, found_inf,
                 *scalars.arguments, seed)
    constexprs = variant.constexprs(block_size)
    if DIRECT_LAUNCH:
        key = (tables.meta.device, variant, block_size, num_warps)
        compiled = _COMPILED.get(key)
        if compiled is not None:
            compiled[(n_blocks, 1, 1)](*arguments, *constexprs.values())
            return
    compiled = _adopt_kernel[(n_blocks,)](*arguments, **constexprs, num_warps=num_warps,
                                          **COMPILE_OPTIONS)
    if DIRECT_LAUNCH:
        _COMPILED[key] = compiled
