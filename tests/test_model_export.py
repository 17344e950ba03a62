"""Whole models from real Megatron-Core torch_dist checkpoints: ``quantmap export --format hf`` writes a
directory that transformers loads with nothing missing and nothing unexpected, whose weights are the
Megatron weights converted by hand (from plain ``torch.distributed.checkpoint.load``, not quantmap's ops),
whose logits are Megatron-Core's own on the fixtures' token batch, and which is the same bytes from every
saving layout of the model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from typer.testing import CliRunner

from megatron_layout import llama_hf_by_hand
from quantmap.cli import app
from quantmap.io.hf import Checkpoint
from quantmap.io.torch_dist import locate, read_entries

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).parent / "data" / "dcp"
CONFIG = DATA / "reference" / "hf_config_dense.json"
HEADS, GROUPS, HEAD_DIM = 4, 2, 16  # hf_config_dense.json


def export(tmp_path: Path, fixture: str, *extra: str) -> Path:
    out = tmp_path / fixture
    run = CliRunner().invoke(app, ["export", "llama", "--megatron", str(DATA / fixture / "ckpt"), "--out", str(out),
                                   "--format", "hf", "--config", str(CONFIG), "--quiet", *extra])
    assert run.exit_code == 0, run.output
    return out


def megatron_by_hand(fixture: str) -> dict[str, torch.Tensor]:
    """The checkpoint's weights in LlamaForCausalLM's names, from plain ``dcp.load``: SwiGLU's saved halves
    joined into Megatron's ``[gate; up]``, then converted from the documented layout (tests/megatron_layout.py)."""
    directory = locate(DATA / fixture / "ckpt").path
    entries = read_entries(directory)
    raw = {key: torch.empty(entry.shape, dtype=getattr(torch, entry.dtype)) for key, entry in entries.items()
           if entry.dtype is not None and "quantizer" not in key}
    dcp.load(raw, storage_reader=dcp.FileSystemReader(directory), no_dist=True)
    for layer in range(2):
        fc1 = f"decoder.layers.{layer}.mlp.linear_fc1."
        raw[fc1 + "weight"] = torch.cat([raw.pop(fc1 + "weight_w"), raw.pop(fc1 + "weight_v")])
    return llama_hf_by_hand(raw, 2, HEADS, GROUPS, HEAD_DIM)


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("fixture", ["fp8_kv_tp1", "fp8_kv_tp2", "int8_tp2"])
def test_the_model_weights_are_the_megatron_weights_converted_by_hand(tmp_path, fixture):
    out = export(tmp_path, fixture)
    model = Checkpoint(out, nested=False)
    want = megatron_by_hand(fixture)
    assert sorted(model.names()) == sorted(want)
    for name, tensor in want.items():
        assert model.get(name).dtype == tensor.dtype == torch.float32 and bits(model.get(name)) == bits(tensor), name
    assert json.loads((out / "config.json").read_text()) == json.loads(CONFIG.read_text())
    assert sorted(Checkpoint(out / "quantizer_state").names())  # the quantizer state, beside the model


@pytest.mark.slow
def test_transformers_loads_it_whole_and_its_logits_are_megatron_cores(tmp_path):
    out = export(tmp_path, "fp8_kv_tp1")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                    dtype=torch.float32)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    reference = load_file(DATA / "reference" / "logits_fp8_kv_dense_L2.safetensors")
    with torch.no_grad():
        logits = model(reference["input_ids"]).logits
    unquantized = reference["logits_unquantized"]
    assert (logits - unquantized).abs().max() <= 1e-5
    # A scale or weight silently lost would move them: the fake-quantized model's logits are far away.
    assert (reference["logits"] - unquantized).abs().max() > 1e-3


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def test_every_saving_layout_of_the_model_exports_the_same_bytes(tmp_path):
    """fp8_kv_tp1 and fp8_kv_tp2 are one model saved at TP=1 and TP=2 (its quantizer state differs by layout)."""
    tp1, tp2 = export(tmp_path, "fp8_kv_tp1"), export(tmp_path, "fp8_kv_tp2")
    assert _digests(tp1) == _digests(tp2) and _digests(tp1)


def test_dtype_casts_the_weights_and_leaves_the_quantizer_state(tmp_path):
    out = export(tmp_path, "fp8_kv_tp1", "--dtype", "bf16")
    model, state = Checkpoint(out, nested=False), Checkpoint(out / "quantizer_state")
    want = megatron_by_hand("fp8_kv_tp1")
    for name in model.names():
        assert torch.equal(model.get(name), want[name].to(torch.bfloat16)), name
    assert {state.get(name).dtype for name in state.names()} == {torch.float32}


def test_a_megatron_core_0_19_save_exports_the_same_model(tmp_path):
    """Megatron-Core 0.19 writes no common.pt: its common state is a bytes entry of the checkpoint itself
    (``common_state/shard_0_1``), and its metadata.json names the sharded backend only. The same model saved
    that way (every tensor, quantizer state included, with plain ``dcp.save``) exports the same files."""
    import io

    directory = locate(DATA / "fp8_kv_tp1" / "ckpt").path
    entries = read_entries(directory)
    state = {key: torch.empty(entry.shape, dtype=getattr(torch, entry.dtype)) for key, entry in entries.items()
             if entry.dtype is not None}
    dcp.load(state, storage_reader=dcp.FileSystemReader(directory), no_dist=True)
    saved = tmp_path / "v019" / "iter_0000001"
    dcp.save({**state, "common_state/shard_0_1": io.BytesIO(b"\x80\x04N.")},
             storage_writer=dcp.FileSystemWriter(saved), no_dist=True)
    (saved / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    (tmp_path / "v019" / "latest_checkpointed_iteration.txt").write_text("1")
    assert not (saved / "common.pt").exists()
    reference = export(tmp_path, "fp8_kv_tp1")
    out = tmp_path / "from_019"
    run = CliRunner().invoke(app, ["export", "llama", "--megatron", str(tmp_path / "v019"), "--out", str(out),
                                   "--format", "hf", "--config", str(CONFIG), "--quiet"])
    assert run.exit_code == 0, run.output
    assert _digests(out) == _digests(reference)
    assert _digests(out / "quantizer_state") == _digests(reference / "quantizer_state")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"tp": 1, "pp": 2, "dp": 1}, {"tp": 2, "pp": 2, "dp": 1}, {"tp": 2, "pp": 1, "dp": 2}])
def test_the_model_laid_out_as_shard_directories_exports_the_same_bytes(tmp_path, layout):
    """The fixture's model laid out as Megatron ranks (PP, TP×PP, DP replicas) by quantmap's import, then
    exported from that shard directory: the same model files as the torch_dist checkpoint's own export."""
    reference = export(tmp_path, "fp8_kv_tp1")
    (tmp_path / "layout.json").write_text(json.dumps({**layout, "num_layers": 2}))
    for args in (["import", "llama", "--hf", str(reference), "--layout", str(tmp_path / "layout.json"),
                  "--out", str(tmp_path / "shards"), "--format", "hf"],
                 ["export", "llama", "--megatron", str(tmp_path / "shards"), "--out", str(tmp_path / "again"),
                  "--format", "hf", "--config", str(CONFIG)]):
        run = CliRunner().invoke(app, [*args, "--quiet"])
        assert run.exit_code == 0, run.output
    assert _digests(tmp_path / "again") == _digests(reference)
