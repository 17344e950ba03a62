"""``quantmap export`` / ``quantmap import`` on shard directories: offline and with --nproc gloo workers."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from executor_support import SPECS, global_state, quantizers, shard
from quantmap.cli import app
from quantmap.executor import ParallelLayout
from quantmap.io.hf import Checkpoint
from quantmap.io.shards import LazyShard, save_shard

SPEC = str(SPECS / "moe_seq.yaml")
LAYOUT = ParallelLayout(pp=2, dp=2, ep=2, num_layers=4, num_experts=4)


def _shard_dir(tmp_path):
    directory = tmp_path / "megatron"
    ranks = shard(global_state("seq", 4, 4), LAYOUT)
    for rank, state in enumerate(ranks):
        save_shard(state, LAYOUT, directory, rank=rank)
    return directory, ranks


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_nproc_export_equals_offline_export_and_import_round_trips(tmp_path):
    directory, ranks = _shard_dir(tmp_path)
    assert json.loads((directory / "layout.json").read_text())["ep"] == 2
    offline = _invoke("export", SPEC, "--megatron", directory, "--out", tmp_path / "offline")
    assert offline.exit_code == 0, offline.output
    assert "136 tensor(s) written" in offline.output  # 4 layers x (10 attention + 4 experts x 6)
    spawned = _invoke("export", SPEC, "--megatron", directory, "--out", tmp_path / "spawned", "--nproc", 4, "--quiet")
    assert spawned.exit_code == 0, spawned.output
    assert spawned.output == ""
    a, b = Checkpoint(tmp_path / "offline"), Checkpoint(tmp_path / "spawned")
    assert a.weight_map == b.weight_map and len(a.names()) == 136
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())
    back = _invoke("import", SPEC, "--hf", tmp_path / "spawned", "--layout", directory / "layout.json",
                   "--out", tmp_path / "back", "--nproc", 4, "--quiet")
    assert back.exit_code == 0, back.output
    for rank, original in enumerate(ranks):
        again = LazyShard(tmp_path / "back" / f"rank_{rank:05d}.safetensors")
        assert sorted(again) == sorted(quantizers(original))
        assert all(torch.equal(again[n], t) for n, t in quantizers(original).items())


def test_strict_import_refuses_missing_names_and_writes_nothing(tmp_path):
    directory, _ = _shard_dir(tmp_path)
    assert _invoke("export", SPEC, "--megatron", directory, "--out", tmp_path / "hf", "--quiet").exit_code == 0
    index = tmp_path / "hf" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.1.self_attn.k_proj.input_quantizer._amax"]
    index.write_text(json.dumps(data))
    loose = _invoke("import", SPEC, "--hf", tmp_path / "hf", "--layout", directory, "--out", tmp_path / "loose")
    assert loose.exit_code == 0 and "1 name(s) missing" in loose.output
    strict = _invoke("import", SPEC, "--hf", tmp_path / "hf", "--layout", directory, "--out", tmp_path / "strict", "--strict")
    assert strict.exit_code == 1
    assert "import refused (--strict)" in strict.output and "self_attn.k_proj.input_quantizer._amax" in strict.output
    assert not (tmp_path / "strict").exists()


@pytest.mark.slow
def test_a_layout_that_does_not_match_nproc_fails_before_any_process_starts(tmp_path):
    directory, _ = _shard_dir(tmp_path)
    result = _invoke("export", SPEC, "--megatron", directory, "--out", tmp_path / "hf", "--nproc", 2)
    assert result.exit_code == 1
    assert "the world has 2 ranks but the layout needs tp*cp*dp*pp = 1*1*2*2 = 4" in result.output
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_under_torchrun_each_process_is_one_rank_and_the_export_matches_offline(tmp_path):
    import subprocess
    import sys

    layout = ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4)
    directory = tmp_path / "megatron"
    for rank, state in enumerate(shard(global_state("seq", 2, 4), layout)):
        save_shard(state, layout, directory, rank=rank)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "quantmap", "export",
               SPEC, "--megatron", str(directory), "--out", str(tmp_path / "torchrun")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("tensor(s) written") == 1, "only rank 0 reports"
    assert _invoke("export", SPEC, "--megatron", directory, "--out", tmp_path / "offline", "--quiet").exit_code == 0
    for name in ("model.safetensors.index.json", "model-00001-of-00001.safetensors"):
        assert (tmp_path / "torchrun" / name).read_bytes() == (tmp_path / "offline" / name).read_bytes()


@pytest.mark.slow
def test_hf_naming_in_memory_exports_fused_expert_names_and_imports_them_into_every_source(tmp_path):
    directory, ranks = _shard_dir(tmp_path)
    naming = ("--hf-naming", "in-memory", "--param", "num_experts=4")
    exported = _invoke("export", "qwen3_moe", "--megatron", directory, "--out", tmp_path / "hf", *naming)
    assert exported.exit_code == 0, exported.output
    assert "80 tensor(s) written" in exported.output  # 4 layers x (10 attention + 2 x (4 experts + 1 input))
    hf = Checkpoint(tmp_path / "hf")
    state = global_state("seq", 4, 4)
    for layer in range(4):
        inputs = [state[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc1.input_quantizer._amax"]
                  for e in range(4)]
        assert torch.equal(hf.get(f"model.layers.{layer}.mlp.experts.gate_up_proj_input_quantizer._amax"),
                           torch.stack(inputs).amax())
    assert not any(".experts.0." in name for name in hf.names())  # no on-disk per-expert names
    back = _invoke("import", "qwen3_moe", "--hf", tmp_path / "hf", "--layout", directory, "--out", tmp_path / "back",
                   "--nproc", 4, "--quiet", *naming)
    assert back.exit_code == 0, back.output
    for rank, original in enumerate(ranks):
        again = LazyShard(tmp_path / "back" / f"rank_{rank:05d}.safetensors")
        assert sorted(again) == sorted(quantizers(original))
        for name, tensor in quantizers(original).items():
            if name.endswith("input_quantizer._amax") and ".local_experts." in name:  # a fan-in source: the max
                layer, fc = name.split(".")[2], name.split(".")[-3]
                hf_name = f"{'gate_up_proj' if fc == 'linear_fc1' else 'down_proj'}_input_quantizer._amax"
                layer_global = int(layer) + 2 * LAYOUT.coords(rank).pp
                assert torch.equal(again[name], hf.get(f"model.layers.{layer_global}.mlp.experts.{hf_name}"))
            else:
                assert torch.equal(again[name], tensor), name
