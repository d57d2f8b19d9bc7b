"""Triton helpers of the fused kernel for compact storage: 8-bit state with
block maxima, master weights as bf16 param + remainder, and the random bits
that round them. Each mirrors a function of ``adopt_triton.quantize`` (the
definition) with the same float32 operations, so that the kernel stays
bit-exact to the eager reference.

8-bit tensors are handled as ``[BLOCK_SIZE // QUANT_BLOCK, QUANT_BLOCK]``
tiles, one row per quantisation block: a block's maximum is a reduction
along a row, its scale a column broadcast.
"""
import triton
import triton.language as tl

QUANT_BLOCK = tl.constexpr(64)  # adopt_triton.quantize.QUANT_BLOCK
EXP_AVG_LEVELS = tl.constexpr(127.0)
EXP_AVG_DIVISOR = tl.constexpr(16129.0)  # 127**2: m = code * |code| * absmax / 127**2
EXP_AVG_SQ_LEVELS = tl.constexpr(255.0)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def random_words(seed, offsets, quads, key, step, QUANTIZED: tl.constexpr):
    """(param, exp_avg, exp_avg_sq) random words per element: with 8-bit
    state one Philox call per four elements (``quads`` counts them) gives
    each element one word, whose high half rounds the param and low half
    sqrt(v); otherwise one call per element gives three words."""
    key = tl.zeros_like(quads).to(tl.uint32) + key.to(tl.uint32)
    step = tl.zeros_like(quads).to(tl.uint32) + step.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, quads.to(tl.uint32), (quads >> 32).to(tl.uint32), key, step)
    if QUANTIZED:
        words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))  # w0 w1 w2 w3 of each quad
        return words >> 16, words, words & 0xFFFF
    else:
        return w0, w1, w2


@triton.jit
def load_master(param_ptr, remainder_ptr, offsets, mask, REMAINDER_BITS: tl.constexpr):
    """The param as float32: upcast, or joined with its remainder."""
    param = tl.load(param_ptr + offsets, mask=mask)
    if REMAINDER_BITS == 0:
        return param.to(tl.float32)
    else:
        high = param.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        low = tl.load(remainder_ptr + offsets, mask=mask).to(tl.int32)
        if REMAINDER_BITS == 8:
            low = low << 8
        return (high + low.to(tl.uint32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def store_master(param_ptr, remainder_ptr, offsets, mask, value, random_bits,
                 REMAINDER_BITS: tl.constexpr, STOCHASTIC: tl.constexpr):
    """quantize.split_master: the bf16 param (nearest, ties away from zero)
    and the signed remainder below it; a 24-bit master is rounded first."""
    word = value.to(tl.uint32, bitcast=True)
    word = tl.where(value != value, tl.full(word.shape, 0x7FC00000, tl.uint32), word)
    if REMAINDER_BITS == 8:
        if STOCHASTIC:
            word = word + (random_bits & 0xFF)
        else:
            word = word + 0x7F + ((word >> 8) & 1)
        word = word & 0xFFFFFF00
    high = (word + 0x8000) >> 16
    remainder = (word - (high << 16)).to(tl.int32, bitcast=True)
    if REMAINDER_BITS == 8:
        remainder = remainder >> 8
    tl.store(remainder_ptr + offsets, remainder.to(remainder_ptr.dtype.element_ty), mask=mask)
    tl.store(param_ptr + offsets, high.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)


@triton.jit
def load_scales(scale_ptr, scale_offsets, scale_mask, DIVISOR: tl.constexpr):
    """Each block's maximum / DIVISOR (a column to broadcast over its row)."""
    absmax = tl.load(scale_ptr + scale_offsets, mask=scale_mask)
    return tl.div_rn(absmax, tl.full(absmax.shape, DIVISOR, tl.float32))[:, None]


@triton.jit
def decode_exp_avg(codes, step):
    code = codes.to(tl.float32)
    return code * tl.abs(code) * step


@triton.jit
def block_absmax(values, mask):
    """Each row's largest magnitude, compared as integers (NaN > Inf > finite);
    elements outside the tensor count as 0."""
    if mask is not None:
        values = tl.where(mask, values, 0.0)
    magnitude = values.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(magnitude, axis=1).to(tl.float32, bitcast=True)


@triton.jit
def store_exp_avg(codes_ptr, scale_ptr, offsets, mask, scale_offsets, scale_mask, exp_avg):
    """quantize.encode_exp_avg: int8 sqrt-companded codes, to nearest."""
    absmax = block_absmax(exp_avg, mask)
    inverse = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax)[:, None]
    scaled = tl.sqrt_rn(tl.abs(exp_avg) * inverse) * EXP_AVG_LEVELS
    scaled = tl.where(scaled == scaled, scaled, 0.0)  # 0 * inf in an all-zero block
    code = tl.minimum(tl.floor(scaled + 0.5), EXP_AVG_LEVELS)
    code = tl.where(absmax[:, None] <= FLOAT32_MAX, code, 0.0)  # a non-finite block: codes 0
    code = tl.where(exp_avg < 0, -code, code)
    tl.store(codes_ptr + offsets, code.to(tl.int8), mask=mask)
    tl.store(scale_ptr + scale_offsets, absmax, mask=scale_mask)


@triton.jit
def store_sqrt_exp_avg_sq(codes_ptr, scale_ptr, offsets, mask, scale_offsets, scale_mask, root,
                          random16):
    """quantize.encode_sqrt_exp_avg_sq: uint8 codes of sqrt(v), rounded
    stochastically; a nonzero value never gets code 0."""
    absmax = block_absmax(root, mask)
    inverse = tl.div_rn(tl.full(absmax.shape, EXP_AVG_SQ_LEVELS, tl.float32), absmax)[:, None]
    scaled = root * inverse
    scaled = tl.where(scaled == scaled, scaled, 0.0)  # 0 * inf in an all-zero block
    fraction = random16.to(tl.float32) * 0.0000152587890625  # 2**-16
    code = tl.minimum(tl.floor(scaled + fraction), EXP_AVG_SQ_LEVELS)
    code = tl.where((code == 0) & (root > 0), 1.0, code)
    code = tl.where(absmax[:, None] <= FLOAT32_MAX, code, 0.0)  # a non-finite block: codes 0
    tl.store(codes_ptr + offsets, code.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + scale_offsets, absmax, mask=scale_mask)
