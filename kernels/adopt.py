"""The fused ADOPT update: one Triton kernel, one memory pass per tensor.

Per element the update case reads p, g, m, v once and writes p, m, v once
(28 bytes per fp32 element); the first-step case reads g (and p for coupled
weight decay) and writes v only (8 bytes). Variants are ``tl.constexpr`` flags
on the one body in ``_adopt_elementwise``; hyper-parameters are runtime
arguments, so a learning-rate schedule never recompiles.

Numerics follow ``adopt_triton.reference`` operation for operation: the same
fused multiply-adds (``tl.fma`` where ATen's vectorised CPU kernels use one),
correctly rounded ``sqrt_rn``/``div_rn``, NaN-propagating max/clamp, and
hyper-parameters pre-rounded to float32 on the host (``StepScalars``), so the
kernel is bit-exact to the reference on the CPU interpreter and on the GPU.
"""
import struct
from typing import NamedTuple

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Weight-decay modes (the WEIGHT_DECAY constexpr).
NO_WEIGHT_DECAY, COUPLED_WEIGHT_DECAY, DECOUPLED_WEIGHT_DECAY = 0, 1, 2

_PROPAGATE_NAN = tl.PropagateNan.ALL


@triton.jit
def _adopt_elementwise(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask,
                       neg_lr, weight_decay, neg_lr_weight_decay, lerp_coeff, lerp_from_end,
                       beta2, one_minus_beta2, eps, clip,
                       FIRST_STEP: tl.constexpr, MAXIMIZE: tl.constexpr,
                       WEIGHT_DECAY: tl.constexpr, CLIP: tl.constexpr):
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    if MAXIMIZE:
        grad = -grad
    if (not FIRST_STEP) or (WEIGHT_DECAY == 1):
        param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    if WEIGHT_DECAY == 1:  # L2: g = g + wd * p, also on the first step
        grad = tl.fma(param, weight_decay, grad)
    if FIRST_STEP:
        # v = g * g; p and m are neither read nor written.
        tl.store(exp_avg_sq_ptr + offsets, grad * grad, mask=mask)
    else:
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
        if WEIGHT_DECAY == 2:  # AdamW-style: p = p - lr * wd * p
            param = tl.fma(param, neg_lr_weight_decay, param)
        # Delayed v: normalise by the v of the previous step, then update v last.
        denom = tl.maximum(tl.sqrt_rn(exp_avg_sq), eps, propagate_nan=_PROPAGATE_NAN)
        update = tl.div_rn(grad, denom)
        if CLIP:
            update = tl.clamp(update, -clip, clip, propagate_nan=_PROPAGATE_NAN)
        # torch.lerp: m + w * (u - m) for w < 0.5, else u + (w - 1) * (u - m).
        exp_avg = tl.fma(lerp_coeff, update - exp_avg, tl.where(lerp_from_end != 0, update, exp_avg))
        param = tl.fma(exp_avg, neg_lr, param)
        exp_avg_sq = tl.fma(one_minus_beta2 * grad, grad, exp_avg_sq * beta2)
        tl.store(param_ptr + offsets, param, mask=mask)
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)


@triton.jit
def _adopt_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, n_elements,
                  neg_lr, weight_decay, neg_lr_weight_decay, lerp_coeff, lerp_from_end,
                  beta2, one_minus_beta2, eps, clip,
                  FIRST_STEP: tl.constexpr, MAXIMIZE: tl.constexpr,
                  WEIGHT_DECAY: tl.constexpr, CLIP: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # int64 before any offset arithmetic: tensors may exceed 2**31 elements.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    _adopt_elementwise(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, offsets < n_elements,
                       neg_lr, weight_decay, neg_lr_weight_decay, lerp_coeff, lerp_from_end,
                       beta2, one_minus_beta2, eps, clip,
                       FIRST_STEP, MAXIMIZE, WEIGHT_DECAY, CLIP)


INTERPRETED = isinstance(_adopt_kernel, InterpretedFunction)
"""True when Triton was imported with TRITON_INTERPRET=1: the kernels then run
on the CPU through Triton's interpreter (CPU tensors allowed)."""

# The interpreter pays ~1 ms per program, so it gets few, large blocks; the
# block size changes nothing in the arithmetic.
BLOCK_SIZE, NUM_WARPS = (1 << 15, 1) if INTERPRETED else (2048, 8)


def _f32(x: float) -> float:
    """Round a Python float (float64) to the nearest float32, kept as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


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
    clip: float

    @classmethod
    def make(cls, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
             clip: float) -> "StepScalars":
        weight = _f32(1.0 - beta1)  # torch.lerp's scalar weight
        from_end = not abs(weight) < 0.5
        return cls(neg_lr=_f32(-lr), weight_decay=_f32(weight_decay),
                   neg_lr_weight_decay=_f32(-lr * weight_decay),
                   lerp_coeff=weight - 1.0 if from_end else weight,  # exact in float32
                   lerp_from_end=int(from_end), beta2=_f32(beta2), one_minus_beta2=_f32(1.0 - beta2),
                   eps=_f32(eps), clip=_f32(clip))


def adopt_step_(param, grad, exp_avg, exp_avg_sq, scalars: StepScalars, *,
                first_step: bool, maximize: bool, weight_decay_mode: int, clip: bool) -> None:
    """Apply one ADOPT step in place with one kernel launch.

    All four tensors are real, float32, and share one dense memory layout
    (same shape and strides, non-overlapping): the kernel walks their storage
    as one flat array. ``adopt_triton.dispatch`` ensures this.
    """
    n_elements = param.numel()
    if n_elements == 0:
        return
    grid = (triton.cdiv(n_elements, BLOCK_SIZE),)
    _adopt_kernel[grid](param, grad, exp_avg, exp_avg_sq, n_elements, *scalars,
                        FIRST_STEP=first_step, MAXIMIZE=maximize, WEIGHT_DECAY=weight_decay_mode,
                        CLIP=clip, BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
