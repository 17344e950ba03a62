"""Real Megatron-Core + ModelOpt quantizer state (tests/data/megatron): exporting the TP=2 FP8 shards
gives the same HF tensors as exporting the single-rank run of the same weights, through files and the
CLI too (shaped per-channel and block state: tests/test_shaped_fixtures.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import quantmap
from quantmap.cli import app
from quantmap.executor import ParallelLayout, export_offline, import_offline
from quantmap.io.shards import LazyShard

DATA = Path(__file__).parent / "data" / "megatron"
FP8 = ["state_fp8_default_kv", "state_fp8_default_kv_moeseq"]


def _spec(stem: str):
    return quantmap.compile(Path(__file__).parent / "data" / "specs" / "moe_seq.yaml") if "moeseq" in stem \
        else quantmap.compile("llama")


def _shards(stem: str) -> list[LazyShard]:
    return [LazyShard(DATA / f"{stem}_tp2pp1ep1_rank{rank}.safetensors") for rank in range(2)]


def _layout(stem: str, tp: int) -> ParallelLayout:
    return ParallelLayout(tp=tp, num_layers=2, num_experts=4 if "moeseq" in stem else None)


@pytest.mark.parametrize("stem", FP8)
def test_tp2_fp8_shards_export_like_the_single_rank_run(stem):
    rules = _spec(stem)
    single = export_offline(rules, [LazyShard(DATA / f"{stem}_tp1.safetensors")], _layout(stem, 1)).state_dict()
    sharded = export_offline(rules, _shards(stem), _layout(stem, 2))
    got = sharded.state_dict()
    assert sorted(got) == sorted(single) and len(got) >= 32
    assert any("k_bmm_quantizer" in name for name in got) and any("gate_proj" in name for name in got)
    for name, tensor in single.items():
        # The TP=2 run calibrated on sharded activations: amax agree to float rounding, not bit for bit.
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=0, msg=name)
    assert sharded.report.disagreements == [], "the TP ranks of one run hold identical scalar amax"


@pytest.mark.parametrize("stem", FP8)
def test_fp8_shards_round_trip_through_hf_files(stem, tmp_path):
    rules, layout = _spec(stem), _layout(stem, 2)
    export_offline(rules, _shards(stem), layout, out=tmp_path / "hf")
    report = import_offline(rules, tmp_path / "hf", layout, tmp_path / "mg")
    assert report.missing == [] and report.disagreements == []
    for rank, original in enumerate(_shards(stem)):
        back = LazyShard(tmp_path / "mg" / f"rank_{rank:05d}.safetensors")
        assert sorted(back) == sorted(original)
        for name in original:
            assert torch.equal(back[name], original[name]), name


@pytest.mark.slow
def test_cli_round_trips_real_tp2_shards_on_two_gloo_workers(tmp_path):
    shard_dir = tmp_path / "megatron"
    shard_dir.mkdir()
    _layout("state_fp8_default_kv", 2).write(shard_dir)
    for rank in range(2):
        shutil.copy(DATA / f"state_fp8_default_kv_tp2pp1ep1_rank{rank}.safetensors", shard_dir / f"rank_{rank:05d}.safetensors")
    result = CliRunner().invoke(app, ["export", "llama", "--megatron", str(shard_dir), "--out", str(tmp_path / "hf"),
                                      "--nproc", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    back = CliRunner().invoke(app, ["import", "llama", "--hf", str(tmp_path / "hf"), "--layout",
                                    str(shard_dir / "layout.json"), "--out", str(tmp_path / "mg"), "--quiet"])
    assert back.exit_code == 0, back.output
    for rank in range(2):
        original = LazyShard(shard_dir / f"rank_{rank:05d}.safetensors")
        again = LazyShard(tmp_path / "mg" / f"rank_{rank:05d}.safetensors")
        assert {n: again[n] for n in again}.keys() == {n: original[n] for n in original}.keys()
        assert all(torch.equal(again[n], original[n]) for n in original)
