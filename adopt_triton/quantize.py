"""Compact storage of optimizer state and master weights, in plain PyTorch:
the definition the Triton kernel reproduces bit for bit.

8-bit state (``state_dtype=torch.int8``). A tensor is cut, in the memory
order of its elements, into blocks of ``QUANT_BLOCK`` = 64 elements; each
block keeps its largest magnitude (``absmax``, float32) and one byte per
element:

* ``exp_avg`` (m): int8 code ``c = round(127 * sign(m) * sqrt(|m| / absmax))``,
  decoded as ``m = c * |c| * (absmax / 127**2)``. The square-root compander
  gives small values of a block finer steps than a linear code (the median
  relative error of m on real gradients fell from 6.2% to 4.1%,
  ``examples/results/state_error.csv``).
  m moves by a tenth of its distance to each new update, far more than one
  code step, so it rounds to nearest.
* ``exp_avg_sq`` (v): uint8 code of ``sqrt(v)``, ``c = 255 * sqrt(v) / absmax``
  rounded stochastically (up with probability equal to the fraction, from
  16 Philox bits), decoded as ``sqrt(v) = c * (absmax / 255)``. ADOPT divides
  by sqrt(v) of the previous step, so storing it saves the square root on
  load and halves the dynamic range. With beta2 = 0.9999, v moves by 1e-4
  of itself per step, far below one code step: rounded to nearest it would
  freeze; stochastic rounding keeps every step's change in expectation. A
  nonzero sqrt(v) never gets code 0 (it would turn the update into g/eps);
  it gets code 1 instead.
* The block maximum is recomputed every step, so a change shared by the
  whole block (v decaying by beta2, a shift in gradient scale) moves the
  scale and leaves the codes as they are: power-of-two scales, which stay
  put, doubled the median error of sqrt(v) (2.5% against 1.2%) and raised
  m's by 1.3x (``examples/results/state_error.csv``).
* A block whose maximum is not finite stores codes 0 and decodes as NaN
  throughout (a NaN or Inf spreads to its 64-element block). In a block
  whose maximum is below ~1e-36 (255 / absmax overflows float32) every
  nonzero value decodes as about the maximum.

Master weights (``master_weight_bits``, bf16 params): the float32 master's
high 16 bits are the bf16 param (rounded to nearest, ties away from zero:
within half a bf16 unit of the master) and its low bits, as the signed
difference, are the remainder: int16 for a 32-bit master (exact), int8 for
a 24-bit one (the master rounded to 24 bits first).

Random bits: Philox-4x32-10 (Triton's ``tl.philox``) keyed on the seed and
counting (element index, tensor key, step): one call per element for the
bf16 stochastic rounding of float or bf16 state (words: param, exp_avg,
exp_avg_sq), one call per four elements with 8-bit state (element j takes
word j % 4 of call j // 4: its low 16 bits round sqrt(v), its high 16 bits
round the param).
"""
import torch
from torch import Tensor

QUANT_BLOCK = 64
MIN_QUANT_NUMEL = 4096
"""Tensors of fewer elements keep float32 state (as bitsandbytes does):
biases and norm gains are sensitive and cost little memory."""
EXP_AVG_LEVELS = 127
EXP_AVG_SQ_LEVELS = 255
MASTER_WEIGHT_BITS = (24, 32)
_FLOAT32_MAX = 3.4028234663852886e38

_MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------- random bits
def _mul_hi_lo(a: int, b: Tensor):
    """(high, low) 32-bit words of the 64-bit product of the 32-bit constant
    ``a`` and 32-bit values ``b`` (int64 tensors): multiplied as uint64, whose
    overflow is defined (none here: the product is below 2**64)."""
    product = (b.view(torch.uint64) * a).view(torch.int64)
    return (product >> 32) & _MASK32, product & _MASK32


_PHILOX_CHUNK = 1 << 16  # counters per pass: the working set stays in cache


def philox(seed: int, c0: Tensor, c1: Tensor, c2, c3):
    """Philox-4x32-10 as ``tl.philox(seed, c0, c1, c2, c3)`` computes it
    (32-bit counters, a seed below 2**32): four int64 tensors of 32-bit words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=c0.device) & _MASK32
                      for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = (t.contiguous() for t in torch.broadcast_tensors(c0, c1, c2, c3))
    if c0.numel() > _PHILOX_CHUNK:
        parts = [philox(seed, *(t[i:i + _PHILOX_CHUNK] for t in (c0, c1, c2, c3)))
                 for i in range(0, c0.numel(), _PHILOX_CHUNK)]
        return tuple(torch.cat(words) for words in zip(*parts))
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(0xCD9E8D57, c2)
        hi_a, lo_a = _mul_hi_lo(0xD2511F53, c0)
        c0, c2, c1, c3 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0), hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_b, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def random_words(seed: int, key: int, step: int, numel: int, device, *, per_element: bool):
    """The kernel's random words for the elements 0..numel-1 of a tensor:
    ``per_element``: three words (param, exp_avg, exp_avg_sq) per element;
    else one word per element, four elements per Philox call."""
    index = torch.arange(numel if per_element else (numel + 3) // 4, device=device, dtype=torch.int64)
    words = philox(seed, index, index >> 32, key, step)
    if per_element:
        return words[:3]
    return torch.stack(words, dim=1).reshape(-1)[:numel]


# ------------------------------------------------------------- bf16 rounding
def round_to_bf16(value: Tensor, random16=None) -> Tensor:
    """float32 -> bf16 rounded to nearest even (as ``tensor.to(torch.bfloat16)``)
    or, given 16 random bits per element, up with probability equal to the
    discarded fraction; a NaN becomes the canonical 0x7FC0, as in c10's
    scalar conversion (the rounding bits added to a NaN with a full payload
    would carry into the sign: -0.0)."""
    bits = value.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    bits = torch.where(value.isnan(), 0x7FC00000, bits)
    if random16 is None:
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
    else:
        bits = bits + (random16 & 0xFFFF)
    return _bf16_of_high_half(bits >> 16)


def _bf16_of_high_half(high: Tensor) -> Tensor:
    high = high & 0xFFFF
    return torch.where(high >= 0x8000, high - 0x10000, high).to(torch.int16).view(torch.bfloat16)


# ------------------------------------------------------------- master weights
def _master_word(master: Tensor, bits: int, random8=None) -> Tensor:
    """The master's bits (int64 holding uint32), rounded to ``bits`` bits: to
    nearest even, or given 8 random bits up with probability equal to the
    discarded fraction. NaN becomes one NaN (its param NaN, remainder 0)."""
    word = master.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    word = torch.where(master.isnan(), 0x7FC00000, word)
    if bits == 24:
        word = word + (0x7F + ((word >> 8) & 1) if random8 is None else random8 & 0xFF)
        word = word & 0xFFFFFF00
    return word


def split_master(master: Tensor, bits: int, random8=None):
    """(bf16 param, remainder) of a float32 master: 32 bits exactly, 24 bits
    after rounding the master to 24 bits (see ``_master_word``). The param is
    the master's high half rounded to nearest, ties away from zero."""
    word = _master_word(master, bits, random8)
    high = (word + 0x8000) >> 16
    remainder = word - (high << 16)  # in [-2**15, 2**15)
    if bits == 24:
        return _bf16_of_high_half(high), (remainder >> 8).to(torch.int8)
    return _bf16_of_high_half(high), remainder.to(torch.int16)


def remainder_below(param: Tensor, master: Tensor, bits: int) -> Tensor:
    """The remainder that joins a given bf16 ``param`` to ``master`` (rounded
    to ``bits``), clamped to what the remainder holds (for converting a
    checkpoint's remainder to another width without touching the param)."""
    high = param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    difference = _master_word(master, bits) - (high << 16)
    if bits == 24:
        return (difference.clamp(-0x8000, 0x7F00) >> 8).to(torch.int8)
    return difference.clamp(-0x8000, 0x7FFF).to(torch.int16)


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The float32 master of a bf16 param and its remainder (int16: 32 bits, int8: 24 bits)."""
    high = param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    low = remainder.to(torch.int64) << (8 if remainder.dtype == torch.int8 else 0)
    word = ((high << 16) + low) & _MASK32
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).view(torch.float32) \
        .reshape(param.shape)


def remainder_dtype(bits: int) -> torch.dtype:
    return torch.int16 if bits == 32 else torch.int8


# ----------------------------------------------------------------- 8-bit state
def n_blocks(numel: int) -> int:
    return (numel + QUANT_BLOCK - 1) // QUANT_BLOCK


def _blocked(flat: Tensor) -> Tensor:
    """[n_blocks, QUANT_BLOCK], zero-padded."""
    pad = n_blocks(flat.numel()) * QUANT_BLOCK - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, QUANT_BLOCK)


def _per_element(per_block: Tensor, numel: int) -> Tensor:
    return per_block.repeat_interleave(QUANT_BLOCK)[:numel]


def block_absmax(flat: Tensor) -> Tensor:
    """Each block's largest magnitude (float32), compared as integers: NaN
    above Inf above every finite value."""
    magnitude = _blocked(flat.float()).view(torch.int32) & 0x7FFFFFFF
    return magnitude.amax(dim=1).view(torch.float32)


def _finite_blocks(code: Tensor, absmax: Tensor) -> Tensor:
    """Codes 0 throughout a block whose maximum is not finite."""
    return torch.where(_per_element(absmax.abs() <= _FLOAT32_MAX, code.numel()), code, 0.0)


def encode_exp_avg(exp_avg: Tensor):
    """(int8 codes, float32 block maxima) of a flat float32 exp_avg."""
    absmax = block_absmax(exp_avg)
    inverse = _per_element(1.0 / absmax, exp_avg.numel())
    scaled = torch.sqrt((exp_avg.abs() * inverse).double()).float() * EXP_AVG_LEVELS
    scaled = torch.where(scaled == scaled, scaled, 0.0)  # 0 * inf in an all-zero block
    code = _finite_blocks(torch.floor(scaled + 0.5).clamp(max=EXP_AVG_LEVELS), absmax)
    return torch.where(exp_avg < 0, -code, code).to(torch.int8), absmax


def decode_exp_avg(codes: Tensor, absmax: Tensor) -> Tensor:
    step = _per_element(absmax / float(EXP_AVG_LEVELS**2), codes.numel())
    code = codes.to(torch.float32)
    return code * code.abs() * step


def encode_sqrt_exp_avg_sq(root: Tensor, random16=None):
    """(uint8 codes, float32 block maxima) of a flat float32 sqrt(exp_avg_sq):
    stochastically rounded given 16 random bits per element (else to
    nearest, for converting checkpoints); a nonzero value never gets code 0."""
    absmax = block_absmax(root)
    # a correctly rounded division, as the kernel's div_rn (255 / tensor is
    # torch's reciprocal times 255: two roundings)
    inverse = _per_element(torch.full_like(absmax, EXP_AVG_SQ_LEVELS) / absmax, root.numel())
    scaled = root * inverse
    scaled = torch.where(scaled == scaled, scaled, 0.0)  # 0 * inf in an all-zero block
    fraction = 0.5 if random16 is None else (random16 & 0xFFFF).to(torch.float32) * 2.0**-16
    code = torch.floor(scaled + fraction).clamp(max=EXP_AVG_SQ_LEVELS)
    code = torch.where((code == 0) & (root > 0), 1.0, code)
    return _finite_blocks(code, absmax).to(torch.uint8), absmax


def decode_sqrt_exp_avg_sq(codes: Tensor, absmax: Tensor) -> Tensor:
    step = _per_element(absmax / float(EXP_AVG_SQ_LEVELS), codes.numel())
    return codes.to(torch.float32) * step
