"""quantmap.quantize: the formulas against hand-computed bytes, round trips, and ModelOpt 0.47.0's own FP8 export
of the fp8_kv_tp1 checkpoint (tests/data/dcp/fp8_kv_tp1/modelopt_export), reproduced byte for byte from the
checkpoint's fp32 weights and amax."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from quantmap import quantize as q

DCP = Path(__file__).parent / "data" / "dcp" / "fp8_kv_tp1"
E4M3 = torch.float8_e4m3fn


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal dtype, shape and bytes (so NaN payloads compare, and -0.0 differs from 0.0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{actual.dtype}{list(actual.shape)} != {expected.dtype}{list(expected.shape)}"
    differing = (actual.reshape(-1).view(torch.uint8) != expected.reshape(-1).view(torch.uint8)).sum().item()
    assert differing == 0, f"{differing} byte(s) differ"


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many float32 steps separate two positive float32 tensors, at most."""
    return (a.float().view(torch.int32).long() - b.float().view(torch.int32).long()).abs().max().item()


# --- E2M1 ---------------------------------------------------------------------------------------------------

# value -> FP4 code, by hand: codes 0..7 are 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign.
E2M1_BY_HAND = [
    (0.25, 0x0), (0.75, 0x2), (1.25, 0x2), (1.75, 0x4), (2.5, 0x4), (3.5, 0x6), (5.0, 0x6),  # ties to even
    (0.3, 0x1), (1.3, 0x3), (2.6, 0x5), (4.9, 0x6), (5.1, 0x7),                                # nearest
    (6.0, 0x7), (7.0, 0x7), (1e30, 0x7), (float("inf"), 0x7),                                 # saturation
    (-0.25, 0x8), (-0.75, 0xA), (-1.25, 0xA), (-1.75, 0xC), (-2.5, 0xC), (-3.5, 0xE), (-5.0, 0xE),
    (-7.0, 0xF), (-0.1, 0x8),                                # a negative rounding to 0 keeps its sign (ModelOpt)
    (0.0, 0x0), (-0.0, 0x0),                                 # -0.0 is not < 0: ModelOpt writes it as +0
]


@pytest.mark.parametrize("value, code", E2M1_BY_HAND)
def test_e2m1_rounds_to_nearest_with_ties_to_even_and_saturates(value, code):
    assert q.e2m1_codes(torch.tensor([value])).tolist() == [code]


def test_e2m1_values_by_hand():
    codes = torch.tensor([0x0, 0x1, 0x3, 0x5, 0x7, 0x9, 0xB, 0xF], dtype=torch.uint8)
    assert q.e2m1_values(codes).tolist() == [0.0, 0.5, 1.5, 3.0, 6.0, -0.5, -1.5, -6.0]
    assert_same_bytes(q.e2m1_values(torch.tensor([0x8], dtype=torch.uint8)), torch.tensor([0.0]))  # not -0.0


@given(st.lists(st.integers(0, 15).filter(lambda c: c != 0x8), min_size=1, max_size=64))
def test_e2m1_codes_of_grid_values_round_trip(codes):
    """Every code but 0x8 (-0.0, which ModelOpt's rounding never produces from -0.0) survives value → code."""
    codes = torch.tensor(codes, dtype=torch.uint8)
    assert torch.equal(q.e2m1_codes(q.e2m1_values(codes)), codes)


# --- packings ----------------------------------------------------------------------------------------------------

def test_fp4_packs_even_column_low_by_hand():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x8], [0x7, 0x0, 0x3, 0xC]], dtype=torch.uint8)
    assert q.pack_fp4_columns(codes).tolist() == [[0x21, 0x8F], [0x07, 0xC3]]


INT4 = torch.tensor([[1, -1, 7], [-8, 0, 2], [3, 4, -2], [5, -3, 6]], dtype=torch.int8)


def test_modelopt_int4_packs_two_output_rows_per_byte_by_hand():
    """Row 2r in the low nibble, row 2r+1 in the high one, two's complement (-1 → 0xF, -8 → 0x8)."""
    assert q.pack_int4_rows(INT4).tolist() == [[0x81, 0x0F, 0x27], [0x53, 0xD4, 0x6E]]


def test_compressed_tensors_int4_packs_eight_columns_per_word_by_hand():
    """Column 8j+i at bits 4i of word j, stored as value + 8; a partial last word is padded with zero nibbles."""
    values = torch.tensor([[1, -1, 7, -8, 0, 2, 3, -2, -8, 7],
                           [0, 0, 0, 0, 0, 0, 0, 7, 0, 0]], dtype=torch.int8)
    # row 0: nibbles 9 7 F 0 8 A B 6 -> 0x6BA80F79; then 0 F -> 0xF0.  row 1: 0xF8888888 as int32; then 0x88
    assert q.pack_int4_int32(values).tolist() == [[0x6BA80F79, 0xF0], [0xF8888888 - 2 ** 32, 0x88]]


int4_matrices = st.integers(1, 4).flatmap(lambda rows: st.integers(1, 20).flatmap(lambda cols: st.lists(
    st.integers(-8, 7), min_size=2 * rows * cols, max_size=2 * rows * cols).map(
    lambda v: torch.tensor(v, dtype=torch.int8).reshape(2 * rows, cols))))


@given(int4_matrices)
def test_int4_packings_round_trip(values):
    assert torch.equal(q.unpack_int4_rows(q.pack_int4_rows(values)), values)
    assert torch.equal(q.unpack_int4_int32(q.pack_int4_int32(values), values.shape[1]), values)


@given(st.integers(1, 4).flatmap(lambda rows: st.lists(st.integers(0, 15), min_size=rows * 6, max_size=rows * 6)
                                  .map(lambda v: torch.tensor(v, dtype=torch.uint8).reshape(rows, 6))))
def test_fp4_packing_round_trips(codes):
    assert torch.equal(q.unpack_fp4_columns(q.pack_fp4_columns(codes)), codes)


# --- scales ------------------------------------------------------------------------------------------------------

def test_sanitize_replaces_zero_and_nan_and_reports_them():
    amax = torch.tensor([0.0, float("nan"), 2.0, float("inf")])
    sane, replaced = q.sanitize_amax(amax, q.MAXBOUND["fp8"])
    assert sane.tolist() == [448.0, 448.0, 2.0, torch.finfo(torch.float32).max]
    assert replaced.tolist() == [True, True, False, False]
    assert q.scale_from_amax(sane, q.DIVISOR["fp8"])[:2].tolist() == [1.0, 1.0]  # uncalibrated FP8: scale 1
    nvfp4_input, _ = q.sanitize_amax(torch.tensor(0.0), q.MAXBOUND["nvfp4"])
    assert q.scale_from_amax(nvfp4_input, q.DIVISOR["nvfp4"]).item() == torch.tensor(1 / 448).item()  # 6 / 2688


def test_scale_shapes_and_dtypes():
    assert q.scale_from_amax(torch.tensor(448.0, dtype=torch.bfloat16), 448.0).dtype == torch.float32
    assert q.scale_from_amax(torch.tensor([7.0]), 7.0, ()).shape == ()
    assert q.scale_from_amax(torch.tensor(7.0), 7.0, (1,)).shape == (1,)
    assert q.scale_from_amax(torch.ones(6, 1), 7.0, (3, 2)).shape == (3, 2)   # INT4 state [rows*blocks, 1]
    assert q.DIVISOR["nvfp4"] == 2688.0


def test_kv_scale_clamps_to_one_unless_told_not_to():
    amax = torch.tensor([44.8, 896.0])
    assert q.kv_cache_scale(amax).tolist() == [1.0, 2.0]
    assert q.kv_cache_scale(amax, clamp_to_one=False).tolist() == pytest.approx([0.1, 2.0])
    assert q.kv_cache_scale(torch.tensor(2688.0), q.DIVISOR["nvfp4"], clamp_to_one=False).item() == 1.0


@settings(max_examples=300)
@given(st.floats(min_value=2.0 ** -100, max_value=2.0 ** 100, width=32), st.sampled_from(sorted(q.DIVISOR.values())))
def test_amax_to_scale_to_amax_is_within_one_ulp(amax, divisor):
    amax = torch.tensor(amax)
    assert ulps_apart(q.amax_from_scale(q.scale_from_amax(amax, divisor), divisor), amax) <= 1


def test_amax_to_scale_to_amax_is_not_always_exact():
    """(a / 448) * 448 in float32 for a = 0x1.fc2ab0p-2 comes back one ulp up, 0x1.fc2ab2p-2: so import
    recovers amax to within one ulp, not exactly."""
    amax = torch.tensor(float.fromhex("0x1.fc2ab0p-2"))
    back = q.amax_from_scale(q.scale_from_amax(amax, 448.0), 448.0)
    assert back.item() == float.fromhex("0x1.fc2ab2p-2")


@given(st.floats(min_value=2.0 ** -100, max_value=2.0 ** 100, width=32))
def test_compressed_tensors_global_scale_round_trip_within_two_ulps(amax):
    """Two roundings (2688 / a, then 2688 / that), so up to two ulps."""
    amax = torch.tensor(amax)
    assert ulps_apart(q.amax_from_nvfp4_global_scale(q.nvfp4_global_scale(amax)), amax) <= 2


# --- payloads ----------------------------------------------------------------------------------------------------

def test_fp8_saturates_beyond_448_and_keeps_nan():
    """ModelOpt casts without clamping; torch 2.13's cast saturates to ±448 (0x7E / 0xFE); NaN stays 0x7F."""
    weight = torch.tensor([[1000.0, -1000.0, float("nan"), 448.0]])
    payload = q.fp8_quantize(weight, torch.tensor(1.0))
    assert payload.view(torch.uint8).tolist() == [[0x7E, 0xFE, 0x7F, 0x7E]]


def test_fp8_per_tensor_divides_in_the_weight_dtype():
    """1.06640625 = 1 + 2^-4 + 2^-8. In bf16 (7 mantissa bits) it is a tie, kept even: 1.0625, which E4M3 (3 bits)
    ties to even again: 1.0, code 0x38. Divided in fp32 it stays above E4M3's midpoint 1.0625: 1.125, 0x39."""
    weight = torch.tensor([[1.06640625]])
    assert q.fp8_quantize(weight, torch.tensor(1.0)).view(torch.uint8).item() == 0x38
    assert q.fp8_quantize(weight, torch.tensor(1.0), weight_dtype=torch.float32).view(torch.uint8).item() == 0x39


def test_fp8_refuses_a_one_element_per_tensor_scale():
    """ModelOpt's per-tensor FP8 scale is 0-d; a [1] scale would divide in fp32 and change the bytes."""
    with pytest.raises(ValueError, match="0-d"):
        q.fp8_quantize(torch.ones(2, 4), torch.tensor([1.0]))


def test_int8_and_int4_by_hand():
    weight = torch.tensor([[1.0, -2.5, 3.0, 0.49], [10.0, -10.0, 0.5, 1.5]])
    assert q.int8_quantize(weight, torch.tensor([1.0, 0.05])).tolist() == [[1, -2, 3, 0], [127, -128, 10, 30]]
    block_scale = torch.tensor([[1.0, 0.5], [0.25, 2.0]])  # block size 2
    assert q.int4_quantize(weight, block_scale).tolist() == [[1, -2, 6, 1], [7, -8, 0, 1]]


def test_nvfp4_block_scale_and_payload_by_hand():
    """weight_scale_2 = 1/448: block scale = max|w| / (6/448), E4M3; an all-zero block gets 1, a tiny one 2^-9."""
    scale_2 = torch.tensor(1 / 448)
    weight = torch.zeros(2, 32)
    weight[0, :16] = torch.linspace(-6 / 448, 3 / 448, 16)  # max 6/448 -> block scale 1
    weight[0, 16] = 12 / 448                                 # max 12/448 -> block scale 2
    weight[1, 0] = 1e-9                                      # underflows E4M3 -> clamped to 2^-9
    block_scale = q.nvfp4_block_scale(weight, scale_2)
    assert block_scale.dtype == E4M3 and block_scale.float().tolist() == [[1.0, 2.0], [2.0 ** -9, 1.0]]
    packed = q.nvfp4_quantize(weight, block_scale, scale_2)
    assert packed.shape == (2, 16) and packed.dtype == torch.uint8
    assert packed[0, 0].item() == 0xFF  # -6 and -5.4 (> 5 in magnitude): both -6, 0xF
    assert packed[0, 8].item() == 0x07  # 12/448 / (2/448) = 6 in the low nibble, 0 in the high one
    assert packed[1].tolist() == [0] * 16  # 1e-9 / 2^-9 / (1/448) and zeros: all 0


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([1e-3, 0.02, 1.0, 30.0]))
def test_quantize_then_dequantize_is_within_one_step(seed, spread):
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed)) * spread
    rounding = weight.abs() * 2.0 ** -8  # the bf16 copy the payload is quantized from
    amax = weight.abs().amax()

    scale = q.scale_from_amax(amax, 448.0)
    back = q.dequantize(q.fp8_quantize(weight, scale), scale)
    assert ((back - weight).abs() <= weight.abs() * 2.0 ** -3 + scale * 2.0 ** -9 + rounding).all()

    scale = q.scale_from_amax(weight.abs().amax(dim=1), 127.0)
    back = q.dequantize(q.int8_quantize(weight, scale), scale)
    assert ((back - weight).abs() <= scale[:, None] + rounding).all()

    scale = q.scale_from_amax(weight.abs().reshape(8, 4, 16).amax(dim=-1), 7.0)
    values = q.unpack_int4_rows(q.pack_int4_rows(q.int4_quantize(weight, scale)))
    assert ((q.dequantize(values, scale) - weight).abs() <= scale.repeat_interleave(16, 1) + rounding).all()

    scale_2 = q.scale_from_amax(amax, q.DIVISOR["nvfp4"])
    block_scale = q.nvfp4_block_scale(weight, scale_2)
    back = q.nvfp4_dequantize(q.nvfp4_quantize(weight, block_scale, scale_2), block_scale, scale_2)
    unit = (block_scale.float() * scale_2).repeat_interleave(16, 1)
    step = torch.where(weight.abs() < 2 * unit, 0.5, torch.where(weight.abs() < 4 * unit, 1.0, 2.0)) * unit
    assert ((back - weight).abs() <= step + rounding).all()


# --- against ModelOpt's own export ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def modelopt_export() -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((DCP / "modelopt_export").glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def megatron() -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 weights and quantizer amax, whole, read in one process."""
    from torch.distributed.checkpoint import FileSystemReader, load
    directory = DCP / "ckpt" / "iter_0000001"
    reader = FileSystemReader(directory)
    wanted = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
              for key, meta in reader.read_metadata().state_dict_metadata.items()
              if hasattr(meta, "size") and (key.endswith("weight") or key.endswith("weight_w") or "_amax" in key)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming ... a single process"
        load(wanted, storage_reader=FileSystemReader(directory), no_dist=True)
    return wanted


def _hf_weights(megatron: dict, layer: int) -> dict[str, tuple[torch.Tensor, str]]:
    """HF projection → (its rows of the Megatron weight, its Megatron module), for those checked here. The qkv
    weight is interleaved by query group: per group 2 query heads, then k, then v, 16 rows each."""
    prefix = f"decoder.layers.{layer}."
    qkv = megatron[prefix + "self_attention.linear_qkv.weight"].view(2, 64, 64)
    return {"self_attn.k_proj": (qkv[:, 32:48].reshape(32, 64), "self_attention.linear_qkv"),
            "self_attn.o_proj": (megatron[prefix + "self_attention.linear_proj.weight"], "self_attention.linear_proj"),
            "mlp.gate_proj": (megatron[prefix + "mlp.linear_fc1.weight_w"], "mlp.linear_fc1"),
            "mlp.down_proj": (megatron[prefix + "mlp.linear_fc2.weight"], "mlp.linear_fc2")}


@pytest.mark.parametrize("layer", [0, 1])
def test_fp8_reproduces_modelopt_export_bytes(megatron, modelopt_export, layer):
    for hf, (weight, module) in _hf_weights(megatron, layer).items():
        name, source = f"model.layers.{layer}.{hf}", f"decoder.layers.{layer}.{module}"
        amax, replaced = q.sanitize_amax(megatron[f"{source}.weight_quantizer._amax"], q.MAXBOUND["fp8"])
        assert not replaced.any()
        weight_scale = q.scale_from_amax(amax, q.DIVISOR["fp8"], ())
        assert_same_bytes(weight_scale, modelopt_export[f"{name}.weight_scale"])
        assert_same_bytes(q.fp8_quantize(weight, weight_scale), modelopt_export[f"{name}.weight"])
        input_amax, _ = q.sanitize_amax(megatron[f"{source}.input_quantizer._amax"], q.MAXBOUND["fp8"])
        assert_same_bytes(q.scale_from_amax(input_amax, q.DIVISOR["fp8"], (1,)), modelopt_export[f"{name}.input_scale"])
    for kv in "kv":
        amax, _ = q.sanitize_amax(
            megatron[f"decoder.layers.{layer}.self_attention.core_attention.{kv}_bmm_quantizer._amax"], 448.0)
        assert_same_bytes(q.kv_cache_scale(amax, shape=(1,)),
                          modelopt_export[f"model.layers.{layer}.self_attn.{kv}_scale"])


def test_fp8_payload_of_the_export_dequantizes_back_to_the_weight(megatron, modelopt_export):
    """Import direction: ModelOpt's bytes and scale give the fp32 weight back within one E4M3 step."""
    weight = megatron["decoder.layers.0.mlp.linear_fc2.weight"]
    scale = modelopt_export["model.layers.0.mlp.down_proj.weight_scale"]
    back = q.dequantize(modelopt_export["model.layers.0.mlp.down_proj.weight"], scale)
    assert ((back - weight).abs() <= weight.abs() * 2.0 ** -3 + scale * 2.0 ** -9).all()
    amax = megatron["decoder.layers.0.mlp.linear_fc2.weight_quantizer._amax"]
    assert ulps_apart(q.amax_from_scale(scale, 448.0), amax) <= 1


def test_byte_comparison_fails_on_a_scale_one_ulp_off(megatron, modelopt_export):
    """The negative control: the helper the fixture test relies on notices a scale one ulp off. The payload
    alone would not: a one-ulp change of this scale changes no E4M3 byte (the bf16 rounding of the quotient
    absorbs it), which is why the fixture test compares every scale's bytes too."""
    weight = megatron["decoder.layers.0.mlp.linear_fc2.weight"]
    scale = modelopt_export["model.layers.0.mlp.down_proj.weight_scale"]
    off = torch.nextafter(scale, torch.tensor(math.inf))
    with pytest.raises(AssertionError, match="1 byte"):
        assert_same_bytes(off, scale)
    assert_same_bytes(q.fp8_quantize(weight, off), modelopt_export["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_in_row_chunks_gives_the_same_bytes_and_leaves_the_weight_alone(monkeypatch, dtype):
    """Large weights are quantized a few rows at a time (bounded temporaries): the bytes are those of one pass,
    and the caller's weight is never written to (a float32 weight is not copied before its ``abs``)."""
    weight = (torch.randn(37, 64, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    before = weight.clone()
    scale_2 = q.scale_from_amax(weight.abs().amax(), q.DIVISOR["nvfp4"], ())

    def every(weight):
        blocks = q.nvfp4_block_scale(weight, scale_2)
        rows = q.scale_from_amax(weight.abs().amax(dim=1).float(), 127.0)
        int4 = q.scale_from_amax(weight.abs().float().reshape(37, 2, 32).amax(dim=-1), 7.0)
        return [blocks, q.nvfp4_quantize(weight, blocks, scale_2), q.int8_quantize(weight, rows),
                q.int4_quantize(weight, int4), q.fp8_quantize(weight, q.scale_from_amax(weight.abs().amax(), 448.0))]

    whole = every(weight)
    monkeypatch.setattr(q, "_CHUNK", 64 * 5)  # five rows at a time: 8 chunks, the last one short
    chunked = every(weight)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(whole, chunked))
    assert torch.equal(weight, before)


def test_e2m1_codes_on_a_sweep_of_float32_bit_patterns():
    """Every 7th float32 in [0.125, 8) (7 M values: every rounding boundary region, both signs) against the
    nearest grid value found by distance in float64, ties to the even code, beyond 6 saturating."""
    bits = torch.arange(0x3E000000, 0x41000000, 7, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    distance = (values.double().clamp(max=6.0)[:, None] - grid).abs()
    nearest = distance.argmin(dim=1)
    tie = (distance == distance.min(dim=1, keepdim=True).values).sum(dim=1) == 2
    expected = torch.where(tie & (nearest % 2 == 1), nearest + 1, nearest).to(torch.uint8)
    assert torch.equal(q.e2m1_codes(values), expected)
    assert torch.equal(q.e2m1_codes(-values), expected | 0x8)
