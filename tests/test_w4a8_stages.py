"""W4A8 AWQ's sequential weight quantizer (quantmap/stages.py): every stage of every weight quantizer maps
both ways in every shipped spec, and the real W4A8 checkpoint (tests/data/dcp/w4a8_awq_bs32_tp2, ModelOpt
0.47 ``W4A8_AWQ_BETA_CFG`` at TP=2) exports every name, stage 0's INT4 blocks split by the weight's rows
and stage 1's FP8 scalar copied, and imports back to each rank bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import quantmap
from quantmap.cli import app
from quantmap.executor import ParallelLayout, RunOptions, export_offline, import_offline
from quantmap.io.hf import Checkpoint
from quantmap.io.shards import LazyShard
from quantmap.io.torch_dist import locate, read_entries
from quantmap.io.torch_dist.read import read_tensors
from quantmap.model_names import MEGATRON, ModelSize, model_names
from quantmap.patterns import ANY
from quantmap.rules import FAN_IN, MOE_FANOUT
from quantmap.spec import shipped_specs

W4A8 = Path(__file__).parent / "data" / "dcp" / "w4a8_awq_bs32_tp2"
# The fixture model (tests/data/README.md): hidden 64, 4 heads in 2 query groups of head_dim 16, INT4 blocks of 32.
SIZES = dict(num_attention_heads=4, num_query_groups=2, head_dim=16, hidden_size=64, weight_block_size=32)
CLI_SIZES = [arg for name, value in SIZES.items() for arg in ("-p", f"{name}={value}")]
WEIGHT_AMAX = "weight_quantizer._amax"


def _stage(name: str, stage: int | str) -> str:
    """ModelOpt's name of a stage of the weight quantizer whose single-quantizer buffer is ``name``: the
    SequentialQuantizer's index is the last one, after any expert's."""
    return f"{name.removesuffix('._amax')}.{stage}._amax"


def _single_quantizer_names(rules):
    """One concrete Megatron name per single weight quantizer rule (captures 1, the expert 7), except a grouped
    block's shared quantizer, whose staged name would be ModelOpt 0.47's per-expert name (quantmap/stages.py)."""
    for rule in rules:
        shared_block = rule.kind == MOE_FANOUT or (rule.kind == FAN_IN and rule.expert_capture is None)
        if rule.buffer != WEIGHT_AMAX or shared_block or any(c.kind == ANY for c in rule.megatron.captures):
            continue
        values = ["7" if i == rule.expert_capture or rule.megatron.literals[i].endswith("weight_quantizer.") else "1"
                  for i in range(rule.megatron.arity)]
        yield rule.megatron.fill(values)


@pytest.mark.slow
@pytest.mark.parametrize("naming", ["on-disk", "in-memory"])
@pytest.mark.parametrize("spec", sorted(shipped_specs()))
def test_every_stage_of_every_weight_quantizer_maps_both_ways_in_every_spec(spec, naming):
    """Stage S of a weight quantizer goes where the single quantizer goes, with S in each name, and comes
    back to the same Megatron name (a fan-in's to the same sources)."""
    declared = quantmap.load_spec(spec).params
    rules = quantmap.compile(spec, naming, **{k: v for k, v in {"num_experts": 8, "num_layers": 4}.items()
                                              if k in declared})
    names = list(_single_quantizer_names(rules))
    assert names, spec
    for name in names:
        single = rules.to_hf(name)
        assert single is not None, name
        for stage in (0, 1):
            staged = rules.to_hf(_stage(name, stage))
            assert staged is not None and staged.rule.staged, (name, stage)
            assert staged.hf == tuple(_stage(hf, stage) for hf in single.hf), (name, stage)
            assert (staged.kind, staged.expert) == (single.kind, single.expert)
            for hf in staged.hf:
                back = rules.to_megatron(hf)
                assert back is not None and back.megatron in (_stage(name, stage), _stage(
                    rules.to_megatron(hf.removesuffix(f".{stage}._amax") + "._amax").megatron, stage)), (hf, back)


def test_the_issues_names_resolve_and_an_index_after_a_grouped_weight_quantizer_stays_an_expert():
    llama = quantmap.compile("llama")
    assert llama.to_hf("decoder.layers.0.mlp.linear_fc1.weight_quantizer.0._amax").hf == (
        "model.layers.0.mlp.gate_proj.weight_quantizer.0._amax", "model.layers.0.mlp.up_proj.weight_quantizer.0._amax")
    assert llama.to_megatron("model.layers.0.self_attn.o_proj.weight_quantizer.1._amax").megatron == \
        "decoder.layers.0.self_attention.linear_proj.weight_quantizer.1._amax"
    qwen3_moe = quantmap.compile("qwen3_moe", "in-memory", num_experts=4)
    assert qwen3_moe.to_megatron("model.layers.0.mlp.experts.down_proj_weight_quantizers.0.0._amax").megatron == \
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight_quantizer.0._amax"
    prefix = "decoder.layers.0.mlp.experts.linear_fc2.weight_quantizer"
    # ModelOpt 0.47's TE grouped linear: weight_quantizer.{E}, and with W4A8 weight_quantizer.{E}.{S}.
    assert qwen3_moe.to_hf(f"{prefix}.3._amax").hf == (
        "model.layers.0.mlp.experts.down_proj_weight_quantizers.3._amax",)
    assert qwen3_moe.to_hf(f"{prefix}.3.1._amax").hf == (
        "model.layers.0.mlp.experts.down_proj_weight_quantizers.3.1._amax",)
    gpt_oss = quantmap.compile("gpt_oss", "in-memory", num_experts=4)  # one shared quantizer: a fan-in per stage
    back = gpt_oss.to_megatron("model.layers.0.mlp.experts.gate_up_proj_weight_quantizer.1._amax")
    assert back.kind == FAN_IN and back.expanded[3] == \
        "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight_quantizer.1._amax"


def test_names_lists_the_real_w4a8_state_dict():
    reference = load_file(W4A8 / "reference_tp1.safetensors")
    buffers = ["weight_quantizer.*._amax", "input_quantizer._amax", "input_quantizer._pre_quant_scale"]
    generated = model_names(quantmap.compile("llama"), MEGATRON, ModelSize(2, te=False), buffers)
    assert sorted(n for n in generated if "quantizer" in n and not n.startswith("output_layer.")) == sorted(reference)


def _rank_shards() -> list[LazyShard]:
    return [LazyShard(W4A8 / "ranks" / f"rank{rank}.safetensors") for rank in range(2)]


def _hf(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(directory)
    return {name: checkpoint.get(name) for name in checkpoint.names()}


@pytest.mark.slow
def test_real_w4a8_checkpoint_exports_every_name_and_both_stages_in_the_single_rank_layout(tmp_path):
    result = CliRunner().invoke(app, ["export", "llama", "--megatron", str(W4A8 / "ckpt"), "--out",
                                      str(tmp_path / "hf"), "--strict", *CLI_SIZES])
    assert result.exit_code == 0, result.output
    got = _hf(tmp_path / "hf")
    rules = quantmap.compile("llama", **SIZES)
    from_ranks = export_offline(rules, _rank_shards(), ParallelLayout(tp=2, num_layers=2))
    assert from_ranks.report.unclaimed == [] and from_ranks.report.disagreements == []
    ranks = from_ranks.state_dict()
    single = export_offline(rules, [load_file(W4A8 / "reference_tp1.safetensors")], ParallelLayout(num_layers=2)).state_dict()
    assert sorted(got) == sorted(ranks) == sorted(single) and len(got) == 2 * 7 * 4  # 7 linears, 4 buffers each
    for name, tensor in got.items():
        assert torch.equal(tensor, ranks[name]), name
        # AWQ searches per rank: the TP=2 run differs from the single-rank one (measured: under 6%).
        torch.testing.assert_close(tensor, single[name], rtol=0.1, atol=0, msg=name)
    # Stage 0 (INT4 blocks of 32, hidden 64: 2 per row): each rank's linear_fc1 holds [gate_r; up_r], 64 + 64
    # rows flattened to [256, 1], and the checkpoint stores them TP-interleaved; gate is both ranks' gate rows.
    shards = _rank_shards()
    fc1 = [shard["decoder.layers.1.mlp.linear_fc1.weight_quantizer.0._amax"] for shard in shards]
    assert torch.equal(got["model.layers.1.mlp.gate_proj.weight_quantizer.0._amax"], torch.cat([t[:128] for t in fc1]))
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight_quantizer.0._amax"], torch.cat([t[128:] for t in fc1]))
    # Stage 1 (FP8 per tensor): a scalar, the same on both ranks, copied to every part.
    scale, other = (shard["decoder.layers.1.mlp.linear_fc1.weight_quantizer.1._amax"] for shard in shards)
    assert scale.shape == () and torch.equal(scale, other)
    for part in ("gate", "up"):
        assert torch.equal(got[f"model.layers.1.mlp.{part}_proj.weight_quantizer.1._amax"], scale)


def test_w4a8_round_trips_to_every_rank_and_into_its_checkpoint_bit_for_bit(tmp_path):
    rules, layout = quantmap.compile("llama", **SIZES), ParallelLayout(tp=2, num_layers=2)
    export_offline(rules, _rank_shards(), layout, out=tmp_path / "hf")
    report = import_offline(rules, tmp_path / "hf", layout, tmp_path / "mg", options=RunOptions(strict=True))
    assert report.missing == [] and report.disagreements == [] and report.unclaimed == []
    for rank, original in enumerate(_rank_shards()):
        back = LazyShard(tmp_path / "mg" / f"rank_{rank:05d}.safetensors")
        assert sorted(back) == sorted(original)
        for name in original:
            assert torch.equal(back[name].view(torch.int32), original[name].view(torch.int32)), name
    # Into the torch_dist checkpoint: stage 0 of linear_fc1 is written TP-interleaved again, as ModelOpt saved it.
    result = CliRunner().invoke(app, ["import", "llama", "--hf", str(tmp_path / "hf"), "--into", str(W4A8 / "ckpt"),
                                      "--out", str(tmp_path / "new"), "--strict", *CLI_SIZES])
    assert result.exit_code == 0, result.output
    old, new = locate(W4A8 / "ckpt").path, locate(tmp_path / "new").path
    keys = [key for key, entry in read_entries(old).items() if entry.dtype and "quantizer" in key]
    before, after = read_tensors(old, read_entries(old), keys), read_tensors(new, read_entries(new), keys)
    assert len(keys) == 2 * 4 * 4  # qkv, proj, fc1, fc2: 4 buffers each
    for key in keys:
        assert torch.equal(after[key].view(torch.int32), before[key].view(torch.int32)), key
