"""Shaped quantizer state of real Megatron-Core + ModelOpt runs (tests/data/megatron): per-channel
INT8, SmoothQuant and INT4 AWQ blocks, sharded over two tensor-parallel ranks, export like the
single-rank run of the same weights, split into HF names exactly as the weights' rows are, and
come back to every rank unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantmap
from quantmap.executor import ExecutorError, ParallelLayout, RunOptions, export_offline, import_offline
from quantmap.io.shards import LazyShard

DATA = Path(__file__).parent / "data"
MEGATRON = DATA / "megatron"
# The fixture model (tests/data/README.md): hidden 64, 4 heads in 2 query groups of head_dim 16, FFN 128.
SIZES = dict(num_attention_heads=4, num_query_groups=2, head_dim=16, hidden_size=64)
# stem -> (spec, weight_block_size: 0 per-channel; the AWQ run uses blocks of 32, so a TP=2 rank of
# linear_proj (input 32) holds exactly one block per row, the one shape that needs saying).
CASES = {
    "state_int8_default_moeseq": (DATA / "specs" / "moe_seq.yaml", 0),
    "state_int8_smoothquant": ("llama", 0),
    "state_int4_awq_bs32": ("llama", 32),
}


def _rules(stem: str, spec: str | Path | None = None):
    default, block = CASES[stem]
    return quantmap.compile(spec or default, **SIZES, weight_block_size=block)


def _layout(stem: str, tp: int) -> ParallelLayout:
    return ParallelLayout(tp=tp, num_layers=2, num_experts=4 if "moeseq" in stem else None)


def _single(stem: str) -> list[LazyShard]:
    return [LazyShard(MEGATRON / f"{stem}_tp1.safetensors")]


def _sharded(stem: str) -> list[LazyShard]:
    return [LazyShard(MEGATRON / f"{stem}_tp2pp1ep1_rank{rank}.safetensors") for rank in range(2)]


def _exports(stem: str, spec=None) -> tuple[dict, dict]:
    rules = _rules(stem, spec)
    single = export_offline(rules, _single(stem), _layout(stem, 1)).state_dict()
    sharded = export_offline(rules, _sharded(stem), _layout(stem, 2))
    assert sharded.report.disagreements == []
    return single, sharded.state_dict()


def test_tp2_per_channel_int8_exports_exactly_like_the_single_rank_run():
    single, sharded = _exports("state_int8_default_moeseq")
    assert sorted(sharded) == sorted(single)
    shaped = [name for name, tensor in single.items() if tensor.numel() > 1]
    assert len(shaped) == 2 * (3 + 1 + 4 * 3), "q, k, v, o and every expert's gate, up, down, per layer"
    for name in shaped:
        assert torch.equal(sharded[name], single[name]), name


def test_tp2_smoothquant_exports_like_the_single_rank_run_to_calibration_rounding():
    """SmoothQuant's scales come from activations calibrated on sharded inputs: the TP=2 run agrees
    with the single-rank run to float rounding (measured: at most 1e-6 relative), not bit for bit."""
    single, sharded = _exports("state_int8_smoothquant")
    assert sorted(sharded) == sorted(single)
    for name, tensor in single.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=2e-6, atol=0, msg=name)


def test_tp2_awq_blocks_export_in_the_single_rank_layout():
    """AWQ searches its pre-quant scales per rank, so the TP=2 values differ from the single-rank run
    (measured: at most 6% relative, amax and scales alike). What is compared: every HF tensor has the
    single-rank shape and its elements agree within 10%; the block amax of a row-parallel layer is
    put back row by row (cutting by ranks instead is off by far more, checked below)."""
    single, sharded = _exports("state_int4_awq_bs32")
    assert sorted(sharded) == sorted(single)
    for name, tensor in single.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=0.1, atol=0, msg=name)
    down = "model.layers.0.mlp.down_proj.weight_quantizer._amax"
    ranks = torch.cat([shard["decoder.layers.0.mlp.linear_fc2.weight_quantizer._amax"] for shard in _sharded(
        "state_int4_awq_bs32")])
    assert ranks.shape == single[down].shape and not torch.allclose(ranks, single[down], rtol=0.1, atol=0)


@pytest.mark.parametrize("stem", sorted(CASES))
def test_tp2_shaped_state_round_trips_through_hf_files_to_every_rank(stem, tmp_path):
    rules, layout = _rules(stem), _layout(stem, 2)
    export_offline(rules, _sharded(stem), layout, out=tmp_path / "hf")
    report = import_offline(rules, tmp_path / "hf", layout, tmp_path / "mg", options=RunOptions(strict=True))
    assert report.missing == [] and report.disagreements == []
    for rank, original in enumerate(_sharded(stem)):
        back = LazyShard(tmp_path / "mg" / f"rank_{rank:05d}.safetensors")
        assert sorted(back) == sorted(original)
        for name in original:
            assert torch.equal(back[name], original[name]), name


def test_single_rank_qkv_amax_splits_by_the_gqa_interleave():
    """Megatron's linear_qkv rows are, per query group, 2 query heads, 1 key head, 1 value head of 16
    rows each; HF's q/k/v hold their heads in order."""
    fused = LazyShard(MEGATRON / "state_int8_default_moeseq_tp1.safetensors")[
        "decoder.layers.1.self_attention.linear_qkv.weight_quantizer._amax"]
    single, _ = _exports("state_int8_default_moeseq")
    head = lambda group, slot: fused[(group * 4 + slot) * 16:(group * 4 + slot + 1) * 16]  # noqa: E731
    expected = {"q": torch.cat([head(g, s) for g in range(2) for s in (0, 1)]),
                "k": torch.cat([head(g, 2) for g in range(2)]), "v": torch.cat([head(g, 3) for g in range(2)])}
    for part, rows in expected.items():
        assert torch.equal(single[f"model.layers.1.self_attn.{part}_proj.weight_quantizer._amax"], rows), part


def test_single_rank_fc1_amax_splits_into_gate_and_up_halves():
    fused = LazyShard(MEGATRON / "state_int8_default_moeseq_tp1.safetensors")[
        "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight_quantizer._amax"]
    single, _ = _exports("state_int8_default_moeseq")
    assert torch.equal(single["model.layers.0.mlp.experts.2.gate_proj.weight_quantizer._amax"], fused[:128])
    assert torch.equal(single["model.layers.0.mlp.experts.2.up_proj.weight_quantizer._amax"], fused[128:])


def test_phi3_tp2_export_writes_fused_hf_tensors_in_hf_order():
    """Phi-3 keeps qkv_proj = [Q; K; V] and gate_up_proj = [gate; up]: a TP=2 export must write the
    single-rank tensors cut as Llama's q/k/v and gate/up are, then joined in HF order (the TP=2
    SmoothQuant run agrees with the single-rank one to 2e-6; the naive rank order is far off)."""
    llama, _ = _exports("state_int8_smoothquant")
    rules = _rules("state_int8_smoothquant", "phi3")
    phi3 = export_offline(rules, _sharded("state_int8_smoothquant"), _layout("state_int8_smoothquant", 2)).state_dict()
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        qkv = torch.cat([llama[f"{prefix}.self_attn.{p}_proj.weight_quantizer._amax"] for p in "qkv"])
        gate_up = torch.cat([llama[f"{prefix}.mlp.{p}_proj.weight_quantizer._amax"] for p in ("gate", "up")])
        torch.testing.assert_close(phi3[f"{prefix}.self_attn.qkv_proj.weight_quantizer._amax"], qkv, rtol=2e-6, atol=0)
        torch.testing.assert_close(phi3[f"{prefix}.mlp.gate_up_proj.weight_quantizer._amax"], gate_up, rtol=2e-6, atol=0)
        naive = torch.cat([shard[f"decoder.layers.{layer}.mlp.linear_fc1.weight_quantizer._amax"]
                           for shard in _sharded("state_int8_smoothquant")])
        assert not torch.allclose(naive, gate_up, rtol=1e-3, atol=0)
        for buffer in ("input_quantizer._pre_quant_scale", "input_quantizer._amax"):
            torch.testing.assert_close(phi3[f"{prefix}.self_attn.qkv_proj.{buffer}"],
                                       llama[f"{prefix}.self_attn.q_proj.{buffer}"], rtol=2e-6, atol=0)


def test_phi3_tp2_qkv_proj_is_the_single_rank_qkv_in_hf_head_order_exactly():
    fused = LazyShard(MEGATRON / "state_int8_default_moeseq_tp1.safetensors")[
        "decoder.layers.0.self_attention.linear_qkv.weight_quantizer._amax"].view(2, 4, 16, 1)  # group, head slot
    rules = _rules("state_int8_default_moeseq", "phi3")
    phi3 = export_offline(rules, _sharded("state_int8_default_moeseq"), _layout("state_int8_default_moeseq", 2))
    expected = torch.cat([fused[:, :2].reshape(-1, 1), fused[:, 2].reshape(-1, 1), fused[:, 3].reshape(-1, 1)])
    assert torch.equal(phi3.state_dict()["model.layers.0.self_attn.qkv_proj.weight_quantizer._amax"], expected)


@pytest.mark.parametrize("missing, needs", [("num_query_groups", "num_attention_heads and num_query_groups"),
                                            ("hidden_size", "--param hidden_size"),
                                            ("weight_block_size", "--param weight_block_size")])
def test_a_shape_the_rule_cannot_place_stops_the_export_naming_the_tensor_and_the_fix(missing, needs, tmp_path):
    params = {**SIZES, "weight_block_size": 0}
    del params[missing]
    rules = quantmap.compile(DATA / "specs" / "moe_seq.yaml", **params)
    with pytest.raises(ExecutorError) as raised:
        export_offline(rules, _sharded("state_int8_default_moeseq"), _layout("state_int8_default_moeseq", 2),
                       out=tmp_path / "hf")
    message = str(raised.value)
    assert needs in message and "weight_quantizer._amax has shape [" in message and "Nothing was written" in message
    assert list(tmp_path.iterdir()) == []


def test_grouped_moe_block_quantizer_with_per_channel_state_is_refused():
    """One quantizer shared by a TE grouped block says nothing about which expert owns which row."""
    rules = quantmap.compile(DATA / "specs" / "moe_grouped.yaml", **SIZES, num_experts=4)
    state = {"decoder.layers.0.mlp.experts.linear_fc1.weight_quantizer._amax": torch.ones(256, 1)}
    with pytest.raises(ExecutorError, match="covers a whole block of experts"):
        export_offline(rules, [state], ParallelLayout(num_layers=1, num_experts=4))
