"""``quantmap export --format modelopt``: ModelOpt's deployable checkpoint, bit for bit what ModelOpt 0.47.0's own
Megatron exporter wrote for the same torch_dist checkpoint (``tests/data/dcp/fp8_kv_tp1/modelopt_export``), from
every saving layout and process count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from quantmap.cli import app

DATA = Path(__file__).parent / "data" / "dcp"
MODELOPT = DATA / "fp8_kv_tp1" / "modelopt_export"


def config_without_quantization(tmp_path: Path) -> Path:
    """ModelOpt's config.json less the block it adds: the model's own config, as ``--config`` takes it."""
    config = json.loads((MODELOPT / "config.json").read_text())
    del config["quantization_config"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def export(tmp_path: Path, checkpoint: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    run = CliRunner().invoke(app, ["export", "llama", "--megatron", str(checkpoint), "--out", str(out), "--format",
                                   "modelopt", "--config", str(config_without_quantization(tmp_path)), "--dtype",
                                   "bf16", "--quiet", *extra])
    assert run.exit_code == 0, run.output
    return out


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def differing(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    """The names whose dtype, shape or bytes differ; a name on one side only is a difference too."""
    assert sorted(got) == sorted(expected)
    return sorted(name for name, tensor in expected.items()
                  if (got[name].dtype, got[name].shape, bits(got[name])) != (tensor.dtype, tensor.shape, bits(tensor)))


def test_fp8_with_kv_is_modelopts_own_export_bit_for_bit(tmp_path):
    out = export(tmp_path, DATA / "fp8_kv_tp1" / "ckpt", "fp8")
    expected = tensors(MODELOPT)
    assert len(expected) == 53 and differing(expected, tensors(out)) == []
    for name in ("hf_quant_config.json", "config.json"):
        assert json.loads((out / name).read_text()) == json.loads((MODELOPT / name).read_text()), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(expected)


def test_a_scale_one_ulp_off_is_a_difference():
    """The comparison above notices the smallest change: one weight_scale moved by one ulp."""
    expected = tensors(MODELOPT)
    name = "model.layers.1.mlp.down_proj.weight_scale"
    nudged = dict(expected, **{name: torch.nextafter(expected[name], torch.tensor(float("inf")))})
    assert differing(expected, nudged) == [name]


def test_every_layout_and_process_count_writes_the_same_bytes(tmp_path):
    """TP2 saves of the same model differ only where calibration itself differed: a row-parallel layer's input
    amax is the max over its TP ranks' shards of the activations, which rounds differently from TP1's; those
    scales are each the formula applied to the TP2 checkpoint's own amax."""
    tp1 = tensors(export(tmp_path, DATA / "fp8_kv_tp1" / "ckpt", "tp1"))
    spread = tensors(export(tmp_path, DATA / "fp8_kv_tp1" / "ckpt", "nproc2", "--nproc", "2", "--shard-size", "20000"))
    assert differing(tp1, spread) == []
    tp2 = tensors(export(tmp_path, DATA / "fp8_kv_tp2" / "ckpt", "tp2"))
    calibrated_apart = {"model.layers.0.mlp.down_proj.input_scale": "decoder.layers.0.mlp.linear_fc2",
                        "model.layers.1.mlp.down_proj.input_scale": "decoder.layers.1.mlp.linear_fc2",
                        "model.layers.1.self_attn.o_proj.input_scale": "decoder.layers.1.self_attention.linear_proj"}
    assert differing(tp1, tp2) == sorted(calibrated_apart)
    amax = load_file(DATA / "fp8_kv_tp2" / "globals_read_with_torch.safetensors")
    for name, module in calibrated_apart.items():
        formula = (amax[f"{module}.input_quantizer._amax"].float() / 448).reshape(1)
        assert bits(tp2[name]) == bits(formula), name


def test_without_the_recipe_the_export_is_refused_and_nothing_is_written(tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(DATA / "fp8_kv_tp1" / "ckpt", checkpoint)
    shutil.rmtree(checkpoint / "iter_0000001" / "modelopt_state")
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["export", "llama", "--megatron", str(checkpoint), "--out", str(out), "--format",
                                   "modelopt", "--config", str(config_without_quantization(tmp_path)), "--quiet"])
    assert run.exit_code != 0
    assert "records no quantization recipe (modelopt_state/)" in run.output and "Traceback" not in run.output
    assert not out.exists()
