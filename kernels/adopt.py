"""The fused ADOPT update: one Triton kernel, one memory pass, one launch for
any number of tensors.

Per element the update case reads p, g, m, v once and writes p, m, v once
(28 bytes per fp32 element); the first-step case reads g (and p for coupled
weight decay) and writes v only (8 bytes). Variants are ``tl.constexpr`` flags
on the one body in ``_adopt_elementwise``; hyper-parameters are runtime
arguments (or device tensors), so a learning-rate schedule never recompiles.

One launch covers a list of tensors of one device and dtype. Every tensor is
cut into blocks of ``BLOCK_SIZE`` elements; program ``pid`` looks up its
tensor in ``block_tensor`` and that tensor's row in ``meta`` (first block,
numel, addresses of p, g, m, v and of its step count). Each tensor's own step
count n, read on the device, picks its first-step or update case and its clip
value, so tensors whose first gradient came late are right, and no host
synchronisation is needed (CUDA graphs).

Numerics follow ``adopt_triton.reference`` operation for operation: the same
fused multiply-adds (``tl.fma`` where ATen's vectorised CPU kernels use one),
correctly rounded ``sqrt_rn``/``div_rn``, NaN-propagating max/clamp, and
hyper-parameters pre-rounded to float32 on the host (``StepScalars``), so the
kernel is bit-exact to the reference on the CPU interpreter and on the GPU.
"""
import struct
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Weight-decay modes (the WEIGHT_DECAY constexpr).
NO_WEIGHT_DECAY, COUPLED_WEIGHT_DECAY, DECOUPLED_WEIGHT_DECAY = 0, 1, 2
# Clip modes (the CLIP constexpr): none, the default n ** 0.25 computed in the
# kernel, or one value per tensor from a device array.
NO_CLIP, DEFAULT_CLIP, CLIP_PER_TENSOR = 0, 1, 2
# Columns of a tensor's row in the metadata table (see make_plan).
(META_FIRST_BLOCK, META_NUMEL, META_PARAM, META_GRAD, META_EXP_AVG, META_EXP_AVG_SQ,
 META_STEP) = map(tl.constexpr, range(7))
META_COLUMNS = tl.constexpr(7)

_PROPAGATE_NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _store(pointer, value, mask, random_bits, STOCHASTIC: tl.constexpr):
    """Store float32 ``value`` in the pointer's dtype with one rounding: to
    nearest even, or for bf16 with STOCHASTIC, up with probability equal to
    the discarded fraction (16 random bits). bf16 is rounded with integer
    ops, identically on the GPU and in the interpreter (which truncates)."""
    if pointer.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = tl.where(value != value, bits | 0x400000, bits)  # keep NaNs NaN (quiet bit)
        if STOCHASTIC:
            bits = bits + (random_bits & 0xFFFF)
        else:
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(pointer, rounded, mask=mask)
    else:
        tl.store(pointer, value.to(pointer.dtype.element_ty), mask=mask)


@triton.jit
def _adopt_elementwise(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask,
                       neg_lr, weight_decay, neg_lr_weight_decay, lerp_coeff, lerp_from_end,
                       beta2, one_minus_beta2, eps, clip, grad_scale, seed, tensor, step,
                       MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, CLIP: tl.constexpr,
                       HAS_GRAD_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr):
    # All arithmetic in float32, whatever the storage dtypes.
    random_p = offsets  # unused unless STOCHASTIC
    random_m = offsets
    random_v = offsets
    if STOCHASTIC:  # counter-based: the same bits for the same seed, step, tensor and element
        random_p, random_m, random_v, _ = tl.philox(
            seed, offsets.to(tl.uint32), (offsets >> 32).to(tl.uint32),
            tl.zeros_like(offsets).to(tl.uint32) + tensor.to(tl.uint32),
            tl.zeros_like(offsets).to(tl.uint32) + step.to(tl.uint32))
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:  # GradScaler: unscale in registers, nothing written back
        grad = tl.div_rn(grad, grad_scale)
    if MAXIMIZE:
        grad = -grad
    if step == 0:
        # First step: v = g * g; p is read only for coupled weight decay, m not at all.
        if WEIGHT_DECAY == 1:
            grad = tl.fma(tl.load(param_ptr + offsets, mask=mask).to(tl.float32), weight_decay, grad)
        _store(exp_avg_sq_ptr + offsets, grad * grad, mask, random_v, STOCHASTIC)
    else:
        param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
        if WEIGHT_DECAY == 1:  # L2: g = g + wd * p
            grad = tl.fma(param, weight_decay, grad)
        if WEIGHT_DECAY == 2:  # AdamW-style: p = p - lr * wd * p
            param = tl.fma(param, neg_lr_weight_decay, param)
        # Delayed v: normalise by the v of the previous step, then update v last.
        denom = tl.maximum(tl.sqrt_rn(exp_avg_sq), eps, propagate_nan=_PROPAGATE_NAN)
        update = tl.div_rn(grad, denom)
        if CLIP != 0:
            update = tl.clamp(update, -clip, clip, propagate_nan=_PROPAGATE_NAN)
        # torch.lerp: m + w * (u - m) for w < 0.5, else u + (w - 1) * (u - m).
        exp_avg = tl.fma(lerp_coeff, update - exp_avg, tl.where(lerp_from_end != 0, update, exp_avg))
        param = tl.fma(exp_avg, neg_lr, param)
        exp_avg_sq = tl.fma(one_minus_beta2 * grad, grad, exp_avg_sq * beta2)
        _store(param_ptr + offsets, param, mask, random_p, STOCHASTIC)
        _store(exp_avg_ptr + offsets, exp_avg, mask, random_m, STOCHASTIC)
        _store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask, random_v, STOCHASTIC)


@triton.jit
def _adopt_kernel(meta_ptr, block_tensor_ptr, lr_ptr, clip_ptr, grad_scale_ptr, found_inf_ptr,
                  neg_lr, weight_decay, neg_lr_weight_decay, lerp_coeff, lerp_from_end,
                  beta2, one_minus_beta2, eps, seed,
                  DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
                  WEIGHT_DECAY: tl.constexpr, CLIP: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
                  HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                  STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensor_ptr + pid).to(tl.int64)
    row = meta_ptr + tensor * META_COLUMNS
    # int64 offsets: a tensor may exceed 2**31 elements.
    block_start = (pid - tl.load(row + META_FIRST_BLOCK)) * BLOCK_SIZE
    offsets = block_start + tl.arange(0, BLOCK_SIZE)
    numel = tl.load(row + META_NUMEL)
    param_ptr = tl.load(row + META_PARAM).to(tl.pointer_type(DTYPE))
    grad_ptr = tl.load(row + META_GRAD).to(tl.pointer_type(DTYPE))
    exp_avg_ptr = tl.load(row + META_EXP_AVG).to(tl.pointer_type(STATE_DTYPE))
    exp_avg_sq_ptr = tl.load(row + META_EXP_AVG_SQ).to(tl.pointer_type(STATE_DTYPE))
    if ALIGNED:  # every address 16-byte aligned (checked on the host): vector loads
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        exp_avg_ptr = tl.multiple_of(exp_avg_ptr, 16)
        exp_avg_sq_ptr = tl.multiple_of(exp_avg_sq_ptr, 16)
    step = tl.load(tl.load(row + META_STEP).to(tl.pointer_type(tl.float32)))
    if LR_ON_DEVICE:  # as torch-adopt computes with a tensor lr: -(lr * wd) in float32
        lr = tl.load(lr_ptr).to(tl.float32)
        neg_lr = -lr
        neg_lr_weight_decay = -(lr * weight_decay)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    clip = 0.0
    if CLIP == 1:  # n ** 0.25 in float64, rounded once, like the host's clip_lambda(n)
        clip = tl.sqrt(tl.sqrt(step.to(tl.float64))).to(tl.float32)
    if CLIP == 2:
        clip = tl.load(clip_ptr + tensor).to(tl.float32)
    found_inf = 0.0
    if HAS_FOUND_INF:  # GradScaler saw an inf/NaN: leave everything untouched
        found_inf = tl.load(found_inf_ptr).to(tl.float32)
    if found_inf == 0:
        # A full block needs no mask, so its accesses can be vectorised.
        if block_start + BLOCK_SIZE <= numel:
            _adopt_elementwise(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, None,
                               neg_lr, weight_decay, neg_lr_weight_decay, lerp_coeff, lerp_from_end,
                               beta2, one_minus_beta2, eps, clip, grad_scale, seed, tensor, step,
                               MAXIMIZE, WEIGHT_DECAY, CLIP, HAS_GRAD_SCALE, STOCHASTIC)
        else:
            _adopt_elementwise(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, offsets < numel,
                               neg_lr, weight_decay, neg_lr_weight_decay, lerp_coeff, lerp_from_end,
                               beta2, one_minus_beta2, eps, clip, grad_scale, seed, tensor, step,
                               MAXIMIZE, WEIGHT_DECAY, CLIP, HAS_GRAD_SCALE, STOCHASTIC)


INTERPRETED = isinstance(_adopt_kernel, InterpretedFunction)
"""True when Triton was imported with TRITON_INTERPRET=1: the kernels then run
on the CPU through Triton's interpreter (CPU tensors allowed)."""

# The interpreter pays ~1 ms per program, so it gets few, large blocks; the
# block size changes nothing in the arithmetic.
BLOCK_SIZE, NUM_WARPS = (1 << 12, 1) if INTERPRETED else (2048, 8)

# No contraction of a multiply and an add into an fma the reference does not
# have: the GPU then rounds exactly as written (the interpreter never fuses).
COMPILE_OPTIONS = {} if INTERPRETED else {"enable_fp_fusion": False}

_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
PARAM_DTYPES = tuple(_TRITON_DTYPES)  # of real params and gradients
STATE_DTYPES = (torch.float32, torch.bfloat16)  # of exp_avg and exp_avg_sq


def _f32(x: float) -> float:
    """Round a Python float (float64) to the nearest float32, kept as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # rounds beyond the largest float32
        return float("inf") if x > 0 else float("-inf")


class StepScalars(NamedTuple):
    """The kernel's runtime hyper-parameters, each pre-rounded to float32 the
    way ATen rounds the corresponding Python scalar in the reference."""
    neg_lr: float
    weight_decay: float
    neg_lr_weight_decay: float
    lerp_coeff: float
    lerp_from_end: int
    beta2: float
    one_minus_beta2: float
    eps: float

    @classmethod
    def make(cls, *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float) -> "StepScalars":
        weight = _f32(1.0 - beta1)  # torch.lerp's scalar weight
        from_end = not abs(weight) < 0.5
        return cls(neg_lr=_f32(-lr), weight_decay=_f32(weight_decay),
                   neg_lr_weight_decay=_f32(-lr * weight_decay),
                   lerp_coeff=weight - 1.0 if from_end else weight,  # exact in float32
                   lerp_from_end=int(from_end), beta2=_f32(beta2), one_minus_beta2=_f32(1.0 - beta2),
                   eps=_f32(eps))


class LaunchPlan(NamedTuple):
    """The device-side tables of one launch over a list of tensors. They hold
    raw addresses: the tensors must stay alive while a launch uses them."""
    key: tuple
    meta: torch.Tensor          # int64 [n_tensors, META_COLUMNS]
    block_tensor: torch.Tensor  # int32 [n_blocks]: the tensor each program updates
    aligned: bool               # every p, g, m, v address is a multiple of 16 bytes


def plan_key(params, grads, exp_avgs, exp_avg_sqs, steps) -> tuple:
    """What a plan depends on: every address and size. Equal keys, same plan."""
    return tuple((p.numel(), p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), s.data_ptr())
                 for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps))


def make_plan(key: tuple, device: torch.device) -> LaunchPlan:
    """Build the tables for ``key`` (from ``plan_key``); two host-to-device copies."""
    numels = torch.tensor([row[0] for row in key], dtype=torch.int64)
    n_blocks = (numels + BLOCK_SIZE - 1) // BLOCK_SIZE
    first_block = torch.cumsum(n_blocks, 0) - n_blocks
    addresses = torch.tensor([row[1:] for row in key], dtype=torch.int64).reshape(-1, 5)
    meta = torch.cat([first_block[:, None], numels[:, None], addresses], dim=1)
    block_tensor = torch.repeat_interleave(torch.arange(len(key), dtype=torch.int32), n_blocks)
    aligned = all(address % 16 == 0 for row in key for address in row[1:5])
    return LaunchPlan(key, meta.to(device), block_tensor.to(device), aligned)


def adopt_step_(plan: LaunchPlan, dtype: torch.dtype, scalars: StepScalars, *, lr_tensor=None,
                clip_mode: int, clip_values=None, grad_scale=None, found_inf=None,
                maximize: bool, weight_decay_mode: int, state_dtype: torch.dtype = torch.float32,
                stochastic_round_seed: Optional[int] = None) -> None:
    """One ADOPT step, in place, for every tensor of ``plan``: one launch.

    The params and gradients of a plan are real, of ``dtype``, their states
    of ``state_dtype``, each a dense array (all four of a parameter with one
    layout); step counts are float32 on the device; ``adopt_triton.fused``
    ensures this. ``lr_tensor``, ``clip_values`` (one per tensor),
    ``grad_scale`` and ``found_inf`` are optional device tensors. With a
    ``stochastic_round_seed``, bf16 stores round stochastically. Step counts
    are not incremented here.
    """
    n_blocks = plan.block_tensor.numel()
    if n_blocks == 0:
        return
    _adopt_kernel[(n_blocks,)](
        plan.meta, plan.block_tensor, lr_tensor, clip_values, grad_scale, found_inf, *scalars,
        stochastic_round_seed or 0, DTYPE=_TRITON_DTYPES[dtype],
        STATE_DTYPE=_TRITON_DTYPES[state_dtype], MAXIMIZE=maximize, WEIGHT_DECAY=weight_decay_mode,
        CLIP=clip_mode, LR_ON_DEVICE=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, STOCHASTIC=stochastic_round_seed is not None,
        ALIGNED=plan.aligned, BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS, **COMPILE_OPTIONS)
