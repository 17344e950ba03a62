"""The quantization formulas deployable checkpoints need: a weight and its calibration state (amax) in,
stored payloads and scales out, and back again.

Pure functions over torch tensors; they know no tensor names and touch no files. Each reproduces ModelOpt
0.47.0's export bit for bit (``modelopt/torch/export/quant_utils.py``, ``quantization/qtensor/nvfp4_tensor.py``,
``quantization/nn/modules/tensor_quantizer.py``), or packs the same values the way compressed-tensors 0.20.1
stores them, so that a checkpoint quantmap writes is the one ModelOpt would have written. Where ModelOpt's result
depends on an order of operations or on a dtype (where a division happens, what is cast to E4M3 when), that
order is kept and the docstring says so. Weights are 2-D ``[out, in]``; per-expert stacks are the caller's loop.

Scales: ``scale = amax / divisor`` in float32 (:data:`DIVISOR` per element format). The stored shapes differ by
exporter, so :func:`scale_from_amax` takes the shape: FP8/INT8 per-tensor ``weight_scale`` and every HF-path
scale are 0-d ``[]``; ModelOpt's Megatron path writes ``input_scale`` and KV scales as ``[1]``; per-channel
scales are ``[out]`` (compressed-tensors: ``[out, 1]``); per-block scales ``[out, in / block]``.

Payloads (``weight`` tensors): the weight is first cast to the export dtype (``weight_dtype``, ModelOpt's
``dtype``: bf16 by default on the Megatron path, the model's dtype on the HF path), then divided by its scale
with torch's type promotion, which decides where the division happens: by a 0-d fp32 scale the quotient stays in
the weight dtype (FP8 per-tensor: bf16), by any other fp32 scale it is fp32 (per-channel, per-block, NVFP4).

* FP8 per-tensor and FP8_PER_CHANNEL_PER_TOKEN: :func:`fp8_quantize`, scale 0-d or ``[out]``.
* INT8 SmoothQuant: :func:`int8_quantize`, scale ``[out]``.
* INT4 AWQ and W4A8 AWQ: :func:`int4_quantize` with the INT4 block scale (W4A8: stage 0's amax / 7; its
  ``weight_scale_2`` = stage 1's amax / 448 is not applied to the payload), then :func:`pack_int4_rows`
  (ModelOpt, two output rows per byte) or :func:`pack_int4_int32` (compressed-tensors ``pack-quantized``).
* NVFP4: :func:`nvfp4_block_scale` from the fp32 weight, then :func:`nvfp4_quantize`; compressed-tensors
  ``nvfp4-pack-quantized`` stores the same bytes plus :func:`nvfp4_global_scale`.

Import runs the other way: :func:`amax_from_scale`, the unpackers and :func:`dequantize`.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
INT8_MAX = 127.0
INT4_MAX = 7.0

#: ``amax / DIVISOR[format]`` is the stored scale (NVFP4: ``weight_scale_2`` and ``input_scale``, 6·448).
DIVISOR = {"fp8": FP8_E4M3_MAX, "int8": INT8_MAX, "int4": INT4_MAX, "nvfp4": E2M1_MAX * FP8_E4M3_MAX}
#: ModelOpt's ``TensorQuantizer.maxbound``: what its export substitutes for a zero or NaN amax. It differs from
#: the divisor for NVFP4 (6, so an uncalibrated NVFP4 ``input_scale`` is 6 / 2688 = 1 / 448).
MAXBOUND = {"fp8": FP8_E4M3_MAX, "int8": INT8_MAX, "int4": INT4_MAX, "nvfp4": E2M1_MAX}

NVFP4_BLOCK_SIZE = 16
#: The smallest NVFP4 block scale ModelOpt stores: below it E4M3 would round to 0 (``_cast_per_block_scale_to_fp8``).
NVFP4_MIN_BLOCK_SCALE = 2.0 ** -9

_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_VALUES = _E2M1_GRID + tuple(0.0 - v for v in _E2M1_GRID)  # by code; 0x8 (negative zero) reads as +0.0
_E2M1_SIGN = 0x8
_INT4_OFFSET = 8


def sanitize_amax(amax: torch.Tensor, maxbound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amax as ModelOpt's export_amax makes it, which entries were replaced)``.

    ModelOpt replaces a zero or NaN amax by ``maxbound`` (``_sanitize_export_amax``: a layer calibration never
    reached exports with scale 1 for FP8), then clamps to the dtype's finite positive range. It only warns;
    returning the mask lets quantmap report or refuse uncalibrated quantizers instead. ModelOpt does not
    sanitise everything: the NVFP4 ``weight_scale_2`` and the HF path's KV scales divide the raw amax, so
    whether to call this is the caller's decision."""
    replaced = (amax == 0) | amax.isnan()
    sane = torch.where(replaced, torch.full_like(amax, maxbound), amax)
    finfo = torch.finfo(amax.dtype)
    return sane.clamp(finfo.tiny, finfo.max), replaced


def scale_from_amax(amax: torch.Tensor, divisor: float, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``amax / divisor`` in float32, reshaped to ``shape`` when given (``()``, ``(1,)``, ``(out,)`` from a
    ``[out, 1]`` amax, ``(out, in // block)`` from a ``[out * blocks, 1]`` one): ModelOpt's
    ``get_scaling_factor``. The divisor is a Python float, as in ModelOpt, and the quotient is rounded once to
    float32 (checked on CPU; a CUDA kernel may multiply by the reciprocal instead, as it would in ModelOpt)."""
    scale = amax.float() / divisor
    return scale if shape is None else scale.reshape(shape)


def kv_cache_scale(amax: torch.Tensor, divisor: float = FP8_E4M3_MAX, clamp_to_one: bool = True,
                   shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A ``k_scale`` / ``v_scale``: ``amax / divisor``, raised to at least 1 when ``clamp_to_one``.

    ModelOpt's Megatron exporter clamps FP8 KV scales (``clamp_kv_cache_scales=True``, its default: engines
    treat 1 as the safe default scale) and divides NVFP4 KV amax by 6·448 without a clamp; its HF exporter
    divides both by 448 and never clamps. The clamp makes the scale lossy: the amax cannot be recovered."""
    scale = scale_from_amax(amax, divisor, shape)
    return scale.clamp(min=1.0) if clamp_to_one else scale


def amax_from_scale(scale: torch.Tensor, divisor: float) -> torch.Tensor:
    """The amax a stored scale came from, ``scale * divisor`` in float32: the import direction of
    :func:`scale_from_amax`. Not always the exact original: ``(a / d) * d`` can be one ulp off ``a``."""
    return scale.float() * divisor


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``weight_global_scale`` / ``input_global_scale``, float32: ``6·448 / amax``, the
    reciprocal of ModelOpt's ``weight_scale_2`` / ``input_scale`` (compressed-tensors multiplies by it where
    ModelOpt divides by the scale, so the two are not bitwise inverses of each other)."""
    return DIVISOR["nvfp4"] / amax.float()


def amax_from_nvfp4_global_scale(global_scale: torch.Tensor) -> torch.Tensor:
    """The amax behind a compressed-tensors NVFP4 global scale, ``6·448 / global_scale``."""
    return DIVISOR["nvfp4"] / global_scale.float()


def _per_row(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A 0-d scale as is, an ``[out]`` scale as a column, for dividing an ``[out, in]`` weight: ModelOpt's
    per-tensor scale is 0-d, and that is what keeps the FP8 division in the weight's dtype."""
    if scale.dim() == 0:
        return scale
    if scale.dim() == 1 and scale.shape[0] == rows:
        return scale[:, None]
    raise ValueError(f"a scale of shape {list(scale.shape)} for a weight of {rows} rows: give a per-tensor "
                     f"scale as a 0-d tensor and a per-channel one as [{rows}]")


def _per_element(scale: torch.Tensor, columns: int) -> torch.Tensor:
    """An ``[out, in / block]`` block scale repeated along the input dimension to ``[out, in]``."""
    _check_blocks(scale, columns)
    return scale.repeat_interleave(columns // scale.shape[1], dim=1)


def _check_blocks(scale: torch.Tensor, columns: int) -> None:
    if scale.dim() != 2 or columns % scale.shape[1]:
        raise ValueError(f"a block scale of shape {list(scale.shape)} does not divide {columns} input columns "
                         "into whole blocks")


def _over_blocks(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight / scale`` for an ``[rows, in / block]`` block scale, each block's elements divided by its
    scale (the quotients :func:`_per_element` would give, without repeating the scale to every element)."""
    rows, columns = weight.shape
    return (weight.reshape(rows, scale.shape[1], -1) / scale[..., None]).reshape(rows, columns)


def _rows_of(scale: torch.Tensor, rows: slice) -> torch.Tensor:
    """The part of a 0-d or ``[out, 1]`` divisor that applies to ``rows``."""
    return scale if scale.dim() == 0 else scale[rows]


#: Elements of a weight computed on at once: the temporaries of a quantization (a float32 copy, quotients,
#: codes) are a few times this many bytes, however large the weight; fewer passes over cache-cold memory.
_CHUNK = 1 << 21


def _by_rows(weight: torch.Tensor, dtype: torch.dtype, compute, columns: int | None = None) -> torch.Tensor:
    """``compute(rows, weight[rows])`` for consecutive row slices of ``weight``, written into one ``dtype``
    tensor of ``columns`` columns (default: the weight's)."""
    out = torch.empty(weight.shape[0], weight.shape[1] if columns is None else columns, dtype=dtype,
                      device=weight.device)
    step = max(1, _CHUNK // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = compute(rows, weight[rows])
    return out


def fp8_quantize(weight: torch.Tensor, scale: torch.Tensor,
                 weight_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The E4M3 payload ``weight.to(weight_dtype) / scale`` (``to_quantized_weight``, FP8 and FP8_PC_PT).

    ``scale`` 0-d (per tensor): the quotient is rounded to ``weight_dtype`` before E4M3, a double rounding that
    ModelOpt's bytes depend on; ``[out]`` (per channel): the quotient is fp32. Values beyond ±448 saturate,
    which is what torch ≥ 2.13's E4M3 cast (used by ModelOpt, which does not clamp) does; older torch casts
    them to NaN, so the clamp is explicit here. NaN stays NaN."""
    scale = _per_row(scale, weight.shape[0])
    return _by_rows(weight, torch.float8_e4m3fn, lambda rows, w: (w.to(weight_dtype) / _rows_of(scale, rows)).clamp_(
        -FP8_E4M3_MAX, FP8_E4M3_MAX))


def int8_quantize(weight: torch.Tensor, scale: torch.Tensor,
                  weight_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The INT8 payload ``round(weight / scale[:, None]).clamp(-128, 127)`` for a per-channel ``[out]``
    scale (SmoothQuant); the division is fp32, rounding half to even."""
    scale = _per_row(scale, weight.shape[0])
    return _by_rows(weight, torch.int8, lambda rows, w: (w.to(weight_dtype) / _rows_of(scale, rows)).round_().clamp_(
        -128, 127))


def int4_quantize(weight: torch.Tensor, block_scale: torch.Tensor,
                  weight_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Signed INT4 values in int8, ``round(weight / block_scale).clamp(-8, 7)``, for an ``[out, in / block]``
    fp32 scale (``pack_int4_in_uint8``'s arithmetic; the division is fp32). For W4A8 AWQ ModelOpt divides by
    the INT4 stage's scale only, not by ``weight_scale_2``."""
    _check_blocks(block_scale, weight.shape[1])
    return _by_rows(weight, torch.int8, lambda rows, w: _over_blocks(w.to(weight_dtype), block_scale[rows])
                    .round_().clamp_(-8, 7))


def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """ModelOpt's INT4 layout: ``[out, in]`` int8 values in -8..7 → ``[out / 2, in]`` uint8, row ``2r`` in the
    low nibble and row ``2r + 1`` in the high one, each as its two's-complement nibble (-1 → 0xF)."""
    if values.shape[0] % 2:
        raise ValueError(f"ModelOpt packs two output rows per byte: {values.shape[0]} rows is odd")
    nibbles = values.view(torch.uint8) & 0xF
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4_rows`: ``[out / 2, in]`` uint8 → ``[out, in]`` int8 values."""
    low, high = _signed_int4(packed & 0xF), _signed_int4(packed >> 4)
    return torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])


def _signed_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """Two's-complement nibbles (0..15, uint8) as int8 -8..7."""
    return (nibbles.to(torch.int8) ^ 8) - 8


def pack_int4_int32(values: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``pack-quantized`` 4-bit layout: ``[out, in]`` int8 values in -8..7 →
    ``weight_packed`` int32 ``[out, ceil(in / 8)]``, column ``8j + i`` at bits ``4i`` of word ``j``, stored
    as ``value + 8`` (unsigned); a last partial word is padded with zero nibbles (``pack_to_int32``)."""
    rows, columns = values.shape
    offset = values.to(torch.int64) + _INT4_OFFSET
    offset = torch.nn.functional.pad(offset, (0, -columns % 8)).reshape(rows, -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=values.device)
    words = (offset << shifts).sum(dim=-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_int4_int32(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4_int32`: ``[out, ceil(in / 8)]`` int32 → ``[out, columns]`` int8."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    nibbles = ((packed.to(torch.int64) & 0xFFFFFFFF)[..., None] >> shifts) & 0xF
    return (nibbles.reshape(packed.shape[0], -1)[:, :columns] - _INT4_OFFSET).to(torch.int8)


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """FP4 (E2M1) codes, uint8 0..15: the magnitude rounded to the nearest of 0, .5, 1, 1.5, 2, 3, 4, 6 (ties
    to the even code, beyond 6 saturating) in bits 0-2, the sign in bit 3 — set for every negative value,
    also one that rounds to 0, never for -0.0 (ModelOpt's ``_cast_fp4``; NaN codes as 6).

    On the float32 bits, a few integer passes, in bytes as soon as the code fits one (a search over the grid
    is 5x slower): from 1 up, the E2M1 code is the float's exponent and its mantissa rounded to one bit, half
    to even (``(bits >> 22) - 252``, saturating at 7); below 1 it is 0, 1 or 2 by the ties at 0.25 (down, to
    0) and 0.75 (up, to 1.0), and the larger of the two is the code everywhere."""
    floats = values.float()
    magnitude = floats.view(torch.int32) & 0x7FFFFFFF
    rounded = (magnitude >> 22).bitwise_and_(1).add_(magnitude).add_(_HALF_BELOW_ONE_BIT)
    code = rounded.bitwise_right_shift_(22).sub_(_CODE_OF_ONE_BITS).clamp_(0, 7).to(torch.uint8)
    below_one = (magnitude > _QUARTER_BITS).view(torch.uint8) + (magnitude >= _THREE_QUARTERS_BITS).view(
        torch.uint8)  # 2 from 0.75 up, where the code above is at least 2 from 1 up and at most 2 below
    return torch.maximum(code, below_one).bitwise_or_((floats < 0).view(torch.uint8) << 3)


_QUARTER_BITS, _THREE_QUARTERS_BITS = 0x3E800000, 0x3F400000  # 0.25 and 0.75 in float32
_HALF_BELOW_ONE_BIT = (1 << 21) - 1  # added with the kept bit: rounds the 22 dropped mantissa bits half to even
_CODE_OF_ONE_BITS = (127 << 1) - 2  # (1.0's bits >> 22) - this = 2, the code of 1.0


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of FP4 (E2M1) codes; code 0x8 is +0.0, as in ModelOpt's ``NVFP4QTensor.dequantize``
    (compressed-tensors would give -0.0: equal values, different bytes)."""
    return torch.tensor(_E2M1_VALUES, device=codes.device)[codes.long()]


def pack_fp4_columns(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` FP4 codes → ``[out, in / 2]`` uint8, column ``2c`` in the low nibble and ``2c + 1`` in the
    high one: ModelOpt's NVFP4 ``weight`` and compressed-tensors' ``weight_packed`` alike."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packs two input columns per byte: {codes.shape[-1]} columns is odd")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4_columns(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_fp4_columns`: ``[out, in / 2]`` uint8 → ``[out, in]`` FP4 codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


def nvfp4_block_scale(weight: torch.Tensor, weight_scale_2: torch.Tensor,
                      block_size: int = NVFP4_BLOCK_SIZE) -> torch.Tensor:
    """The NVFP4 per-block ``weight_scale``, E4M3 ``[out, in / block_size]``, of a dynamic NVFP4 quantizer.

    Give the weight as calibrated (ModelOpt reads the fp32 module weight, not the export copy): per block
    ``max|w| / (6 · weight_scale_2)`` in fp32, with the product ``6 · weight_scale_2`` rounded first; an
    exact 0 (an all-zero block) becomes 1; then clamped to [2^-9, 448] and cast to E4M3
    (``get_weights_scaling_factor``)."""
    rows, columns = weight.shape
    if columns % block_size:
        raise ValueError(f"NVFP4 needs whole blocks: {columns} input columns are not a multiple of {block_size}")
    divisor = E2M1_MAX * weight_scale_2.float()
    return _by_rows(weight, torch.float8_e4m3fn, lambda _, w: _block_scale(w, block_size, divisor),
                    columns=columns // block_size)


def _block_scale(weight: torch.Tensor, block_size: int, divisor: torch.Tensor) -> torch.Tensor:
    rows, columns = weight.shape
    scale = weight.abs().reshape(rows, columns // block_size, block_size).amax(dim=-1).float() / divisor  # exact
    return scale.masked_fill_(scale == 0, 1.0).clamp_(NVFP4_MIN_BLOCK_SCALE, FP8_E4M3_MAX)


def nvfp4_quantize(weight: torch.Tensor, block_scale: torch.Tensor, weight_scale_2: torch.Tensor,
                   weight_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The packed NVFP4 payload, uint8 ``[out, in / 2]``: the E2M1 codes of
    ``weight.to(weight_dtype) / (block_scale.float() · weight_scale_2)``, the product rounded to fp32 first and
    the division fp32 (``NVFP4QTensor.quantize``), packed by :func:`pack_fp4_columns`."""
    denominator = block_scale.float() * weight_scale_2.float()
    _check_blocks(denominator, weight.shape[1])
    return _by_rows(weight, torch.uint8, lambda rows, w: pack_fp4_columns(e2m1_codes(
        _over_blocks(w.to(weight_dtype), denominator[rows]))), columns=weight.shape[1] // 2)


def dequantize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``values · scale`` in float32, for a payload already unpacked to its element values (E4M3 or integer
    tensors as they are, INT4 via the unpackers, FP4 via :func:`e2m1_values`). ``scale`` is 0-d or ``[1]``
    (per tensor), ``[out]`` (per channel), or 2-D ``[out, in / block]`` (per block, ``[out, 1]`` included).
    NVFP4's scale is ``block_scale.float() * weight_scale_2`` (:func:`nvfp4_dequantize`)."""
    values, scale = values.float(), scale.float()
    if scale.dim() == 2:
        return values * _per_element(scale, values.shape[1])
    return values * (scale[:, None] if scale.dim() == 1 else scale)


def nvfp4_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """The float32 weight an NVFP4 payload stands for: FP4 value · (block scale · ``weight_scale_2``), the
    scale product rounded first as in ModelOpt's ``NVFP4QTensor.dequantize``."""
    return dequantize(e2m1_values(unpack_fp4_columns(packed)), block_scale.float() * weight_scale_2.float())
