"""``quantmap export --format modelopt``: ModelOpt's deployable checkpoint, bit for bit what ModelOpt 0.47.0's own
Megatron exporter wrote for the same torch_dist checkpoint (``tests/data/dcp/fp8_kv_tp1/modelopt_export``), from
every saving layout and process count."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from moe_fixture import MIXTRAL, moe_state
from reference_formulas import e2m1_unpacked
from safetensors.torch import load_file
from typer.testing import CliRunner
from written_files import bits, differences, written

from quantmap.cli import app

DATA = Path(__file__).parent / "data" / "dcp"
QUANTIZED = re.compile(r"\.linear_(qkv|proj|fc1|fc2)\.weight(_w|_v)?$")  # the FP8 linears' weights
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


def test_fp8_with_kv_is_modelopts_own_export_bit_for_bit(tmp_path):
    out = export(tmp_path, DATA / "fp8_kv_tp1" / "ckpt", "fp8")
    expected = written(MODELOPT)
    assert len(expected) == 53 and differences(expected, written(out)) == []
    for name in ("hf_quant_config.json", "config.json"):
        assert json.loads((out / name).read_text()) == json.loads((MODELOPT / name).read_text()), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(expected)


def test_a_scale_one_ulp_off_is_a_difference():
    """The comparison above notices the smallest change: one weight_scale moved by one ulp."""
    expected = written(MODELOPT)
    name = "model.layers.1.mlp.down_proj.weight_scale"
    nudged = dict(expected, **{name: torch.nextafter(expected[name], torch.tensor(float("inf")))})
    assert differences(expected, nudged) == [name]


def test_every_layout_and_process_count_writes_the_same_bytes(tmp_path):
    """TP2 saves of the same model differ only where calibration itself differed: a row-parallel layer's input
    amax is the max over its TP ranks' shards of the activations, which rounds differently from TP1's; those
    scales are each the formula applied to the TP2 checkpoint's own amax."""
    tp1 = written(export(tmp_path, DATA / "fp8_kv_tp1" / "ckpt", "tp1"))
    spread = written(export(tmp_path, DATA / "fp8_kv_tp1" / "ckpt", "nproc2", "--nproc", "2", "--shard-size", "20000"))
    assert differences(tp1, spread) == []
    tp2 = written(export(tmp_path, DATA / "fp8_kv_tp2" / "ckpt", "tp2"))
    calibrated_apart = {"model.layers.0.mlp.down_proj.input_scale": "decoder.layers.0.mlp.linear_fc2",
                        "model.layers.1.mlp.down_proj.input_scale": "decoder.layers.1.mlp.linear_fc2",
                        "model.layers.1.self_attn.o_proj.input_scale": "decoder.layers.1.self_attention.linear_proj"}
    assert differences(tp1, tp2) == sorted(calibrated_apart)
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


def megatron_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint, by plain ``dcp.load`` (not quantmap's reader)."""
    import torch.distributed.checkpoint as dcp

    from quantmap.io.torch_dist import locate, read_entries

    directory = locate(checkpoint).path
    state = {key: torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
             for key, entry in read_entries(directory).items() if entry.dtype is not None}
    dcp.load(state, storage_reader=dcp.FileSystemReader(directory), no_dist=True)
    return state


def test_import_reads_a_deployed_checkpoint_back_into_a_copy_of_the_megatron_checkpoint(tmp_path):
    """export → import --into gives back every amax (scale × 448: the calibrated value or one ulp from it, except
    KV scales at ModelOpt's 1.0 clamp, whose amax becomes the bound 448), the dequantized weights, and every other
    tensor bit for bit (an fp32 export); exporting the result again writes the same deployed bytes."""
    source = DATA / "fp8_kv_tp1" / "ckpt"
    config = config_without_quantization(tmp_path)
    deployed = tmp_path / "deployed"
    for command in (["export", "llama", "--megatron", str(source), "--out", str(deployed), "--config", str(config)],
                    ["import", "llama", "--hf", str(deployed), "--into", str(source), "--out", str(tmp_path / "back")]):
        run = CliRunner().invoke(app, [*command, "--format", "modelopt"])
        assert run.exit_code == 0, run.output
    assert "28 tensor(s) amax computed back from its scale" in run.output
    assert "14 tensor(s) dequantized from FP8" in run.output
    before, after = megatron_state(source), megatron_state(tmp_path / "back")
    assert sorted(after) == sorted(before)
    files = written(deployed)
    ulp = []
    for key, value in before.items():
        if key.endswith("_bmm_quantizer._amax"):
            assert float(after[key]) == 448.0 and float(value) / 448 < 1.0, key  # clamped: the bound comes back
        elif key.endswith("_amax"):
            if not torch.equal(after[key], value):
                assert torch.equal(after[key], torch.nextafter(value, after[key])), key
                ulp.append(key)
        elif QUANTIZED.search(key):
            continue  # dequantized: checked through the re-export below, and one by hand
        else:
            assert bits(after[key]) == bits(value), key
    assert 0 < len(ulp) < 16  # this fixture: 4 of the 16 linear amax are one ulp off, the rest exact
    again = written(export_fp32(tmp_path, tmp_path / "back", config))
    assert differences(files, again) == []
    proj = "model.layers.0.self_attn.o_proj."
    dequantized = after["decoder.layers.0.self_attention.linear_proj.weight"]
    assert torch.equal(dequantized, files[proj + "weight"].float() * files[proj + "weight_scale"])


def export_fp32(tmp_path: Path, checkpoint: Path, config: Path) -> Path:
    out = tmp_path / "again"
    run = CliRunner().invoke(app, ["export", "llama", "--megatron", str(checkpoint), "--out", str(out), "--format",
                                   "modelopt", "--config", str(config), "--quiet"])
    assert run.exit_code == 0, run.output
    return out


def state_dict_form(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A torch_dist checkpoint's tensors as one Megatron-Core rank's ``state_dict()`` holds them: SwiGLU's saved
    halves joined into ``linear_fc1.weight``, per-tensor amax 0-d (``[1]`` in the checkpoint)."""
    state = {key: value.reshape(()) if key.endswith("_amax") else value
             for key, value in megatron_state(checkpoint).items() if "_extra_state" not in key}
    for layer in range(2):
        fc1 = f"decoder.layers.{layer}.mlp.linear_fc1."
        state[fc1 + "weight"] = torch.cat([state.pop(fc1 + "weight_w"), state.pop(fc1 + "weight_v")])
    return state


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_shard_directories_of_other_layouts_write_the_same_bytes(tmp_path, tp, pp):
    """The same model laid out by hand as PP2 and TP2×PP2 shard directories, its recipe recorded beside them
    (``recipe.json``), exports what the TP1 torch_dist checkpoint does."""
    from megatron_layout import write_shards

    from quantmap.executor import ParallelLayout
    from quantmap.io.torch_dist.modelopt import quant_cfg

    source = DATA / "fp8_kv_tp1" / "ckpt"
    state = state_dict_form(source)
    shards = tmp_path / "shards"
    write_shards(shards, state, ParallelLayout(tp=tp, pp=pp, dp=1, num_layers=2), recipe=quant_cfg(
        source / "iter_0000001"))
    assert differences(written(export(tmp_path, source, "tp1")), written(export(tmp_path, shards, "from_shards"))) == []


def test_a_shard_directory_without_a_recipe_takes_one_from_the_command_line(tmp_path):
    from megatron_layout import write_shards

    from quantmap.executor import ParallelLayout
    from quantmap.io.torch_dist.modelopt import quant_cfg

    source = DATA / "fp8_kv_tp1" / "ckpt"
    state = state_dict_form(source)
    shards = tmp_path / "shards"
    write_shards(shards, state, ParallelLayout(tp=2, pp=1, dp=1, num_layers=2))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"quant_cfg": quant_cfg(source / "iter_0000001")}))
    assert differences(written(export(tmp_path, source, "tp1")),
                     written(export(tmp_path, shards, "from_shards", "--recipe", str(recipe)))) == []


@pytest.mark.parametrize("tp,dp,ep", [(2, 1, 1), (1, 2, 2), (2, 2, 2)])
def test_moe_experts_are_written_one_by_one_and_every_expert_parallel_layout_agrees(tmp_path, tp, dp, ep):
    """Every expert of every EP rank, under its own global number and per-expert names (as vLLM's MoE loaders
    read them), never packed; the router left unquantized; EP2 and TP2 give the TP1 bytes."""
    from megatron_layout import write_shards

    from quantmap.executor import ParallelLayout

    state, recipe = moe_state()
    files = {}
    for name, layout in (("one", ParallelLayout(tp=1, pp=1, dp=1, num_layers=2, num_experts=4)),
                         ("spread", ParallelLayout(tp=tp, pp=1, dp=dp, ep=ep, num_layers=2, num_experts=4))):
        write_shards(tmp_path / f"{name}-shards", state, layout, recipe=recipe)
        out = tmp_path / name
        run = CliRunner().invoke(app, ["export", "mixtral", "--megatron", str(tmp_path / f"{name}-shards"), "--out",
                                       str(out), "--format", "modelopt", "--config", str(MIXTRAL), "--quiet"])
        assert run.exit_code == 0, run.output
        files[name] = written(out)
    assert differences(files["one"], files["spread"]) == []
    names = files["one"]
    for layer in range(2):
        for expert in range(4):
            for w in ("w1", "w2", "w3"):
                prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}."
                assert names[prefix + "weight"].dtype == torch.float8_e4m3fn
                assert names[prefix + "weight_scale"].shape == () and names[prefix + "input_scale"].shape == (1,)
        assert names[f"model.layers.{layer}.block_sparse_moe.gate.weight"].dtype == torch.float32
    quantization = json.loads((tmp_path / "one" / "hf_quant_config.json").read_text())["quantization"]
    assert quantization["quant_algo"] == "FP8" and quantization["kv_cache_quant_algo"] == "FP8"
    assert quantization["exclude_modules"] == ["lm_head", "model.embed_tokens", "model.layers.0.block_sparse_moe.gate",
                                               "model.layers.1.block_sparse_moe.gate"]


def fp8_shards(tmp_path: Path, state: dict[str, torch.Tensor], recipe: list) -> Path:
    from megatron_layout import write_shards

    from quantmap.executor import ParallelLayout

    shards = tmp_path / "shards"
    write_shards(shards, state, ParallelLayout(tp=1, pp=1, dp=1, num_layers=2), recipe=recipe)
    return shards


def run_export(tmp_path: Path, shards: Path, *extra: str):
    return CliRunner().invoke(app, ["export", "llama", "--megatron", str(shards), "--out", str(tmp_path / "out"),
                                    "--format", "modelopt", "--config", str(config_without_quantization(tmp_path)),
                                    *extra])


def recipe_quantizing_the_output_layer() -> list:
    from quantmap.io.torch_dist.modelopt import quant_cfg

    return [entry for entry in quant_cfg(DATA / "fp8_kv_tp1" / "ckpt" / "iter_0000001")
            if entry["quantizer_name"] not in ("*output_layer*", "*lm_head*")]


def test_a_quantized_output_layer_is_written_quantized(tmp_path):
    state = state_dict_form(DATA / "fp8_kv_tp1" / "ckpt")
    state["output_layer.weight_quantizer._amax"] = state["output_layer.weight"].abs().amax()
    state["output_layer.input_quantizer._amax"] = torch.tensor(3.0)
    run = run_export(tmp_path, fp8_shards(tmp_path, state, recipe_quantizing_the_output_layer()), "--strict")
    assert run.exit_code == 0, run.output
    files = written(tmp_path / "out")
    assert files["lm_head.weight"].dtype == torch.float8_e4m3fn
    assert bits(files["lm_head.weight_scale"]) == bits(state["output_layer.weight_quantizer._amax"] / 448)
    quantization = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert quantization["exclude_modules"] == ["model.embed_tokens"]


def test_an_uncalibrated_quantizer_is_written_as_modelopt_does_reported_and_refused_under_strict(tmp_path):
    """A zero amax, and a quantizer the recipe enables that holds no amax at all, both become ModelOpt's maximum
    bound (scale 1); the export says so, and ``--strict`` refuses it with nothing written."""
    state = state_dict_form(DATA / "fp8_kv_tp1" / "ckpt")
    shards = fp8_shards(tmp_path, state, recipe_quantizing_the_output_layer())  # no output_layer amax in the state
    refused = run_export(tmp_path, shards, "--strict")
    assert refused.exit_code == 1 and not (tmp_path / "out").exists()
    assert "refused (--strict): 2 quantizer(s) the recipe enables hold no amax (uncalibrated): " \
           "lm_head.weight_quantizer._amax, lm_head.input_quantizer._amax" in refused.output
    state["decoder.layers.0.mlp.linear_fc2.weight_quantizer._amax"] = torch.tensor(0.0)
    shutil.rmtree(shards)
    shards = fp8_shards(tmp_path, state, recipe_quantizing_the_output_layer())
    refused = run_export(tmp_path, shards, "--strict")
    assert refused.exit_code == 1 and not (tmp_path / "out").exists()
    assert "zero amax (uncalibrated): decoder.layers.0.mlp.linear_fc2.weight_quantizer._amax" in refused.output
    run = run_export(tmp_path, shards)
    assert run.exit_code == 0, run.output
    assert "uncalibrated" in run.output and "lm_head.weight_quantizer._amax" in run.output
    files = written(tmp_path / "out")
    for name in ("model.layers.0.mlp.down_proj.weight_scale", "lm_head.weight_scale", "lm_head.input_scale"):
        assert files[name].float().flatten().tolist() == [1.0], name


def nvfp4_by_hand(packed: torch.Tensor, blocks: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """An NVFP4 payload's values: each code an E2M1 value, times its block's scale times the global one."""
    return e2m1_unpacked(packed) * (blocks.float() * global_scale).repeat_interleave(16, dim=1)


@pytest.mark.parametrize("fixture,again", [("int8_sq_tp2", True), ("int8_tp2", True), ("nvfp4_kv_tp2", False)])
def test_nvfp4_and_int8_checkpoints_read_back(tmp_path, fixture, again):
    """Deployed INT8 (SmoothQuant or plain) and NVFP4 go back into the Megatron checkpoint: every amax from its
    scale within one ulp, the pre-quant scales as they were, the weights the deployed values. INT8 re-exports
    the same bytes; NVFP4 does not (its block scales are recomputed from the dequantized weights), but the
    dequantized weights are exactly what the deployed payload says."""
    source = DATA / fixture / "ckpt"
    config = config_without_quantization(tmp_path)
    deployed = tmp_path / "deployed"
    for command in (["export", "llama", "--megatron", str(source), "--out", str(deployed), "--config", str(config)],
                    ["import", "llama", "--hf", str(deployed), "--into", str(source), "--out", str(tmp_path / "back")]):
        run = CliRunner().invoke(app, [*command, "--format", "modelopt", "--quiet"])
        assert run.exit_code == 0, run.output
    before, after = megatron_state(source), megatron_state(tmp_path / "back")
    for key, value in before.items():
        if key.endswith("_amax"):
            assert torch.equal(after[key], value) or torch.equal(after[key], torch.nextafter(value, after[key])), key
        elif key.endswith("_pre_quant_scale"):
            assert torch.equal(after[key], value), key
    files = written(deployed)
    proj = "model.layers.1.self_attn.o_proj."
    dequantized = after["decoder.layers.1.self_attention.linear_proj.weight"]
    if fixture.startswith("nvfp4"):
        expected = nvfp4_by_hand(files[proj + "weight"], files[proj + "weight_scale"], files[proj + "weight_scale_2"])
    else:
        expected = files[proj + "weight"].float() * files[proj + "weight_scale"][:, None]
    assert torch.equal(dequantized, expected)
    if again:
        assert differences(files, written(export_fp32(tmp_path, tmp_path / "back", config))) == []


def test_a_deployed_int4_awq_checkpoint_is_refused_with_the_reason(tmp_path):
    deployed = tmp_path / "deployed"
    source = DATA / "int4_awq_bs32_tp2" / "ckpt"
    run = CliRunner().invoke(app, ["export", "llama", "--megatron", str(source), "--out", str(deployed), "--format",
                                   "modelopt", "--config", str(config_without_quantization(tmp_path)), "--quiet"])
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(app, ["import", "llama", "--hf", str(deployed), "--into", str(source), "--out",
                                   str(tmp_path / "back"), "--format", "modelopt"])
    assert run.exit_code == 1 and "folded into the norms" in run.output and not (tmp_path / "back").exists()


def test_a_mixed_recipe_writes_mixed_precision_per_layer(tmp_path):
    """Layer 1's down_proj in INT8 per channel, its o_proj left out, the rest FP8: each linear is written in its
    own format, and the configs say MIXED_PRECISION with one entry per quantized layer, as ModelOpt does."""
    from quantmap.io.torch_dist.modelopt import quant_cfg

    state = state_dict_form(DATA / "fp8_kv_tp1" / "ckpt")
    fc2 = "decoder.layers.1.mlp.linear_fc2."
    state[fc2 + "weight_quantizer._amax"] = state[fc2 + "weight"].abs().amax(dim=1, keepdim=True)
    int8 = {"num_bits": 8, "axis": 0}
    recipe = quant_cfg(DATA / "fp8_kv_tp1" / "ckpt" / "iter_0000001") + [
        {"quantizer_name": "*layers.1.mlp.linear_fc2.weight_quantizer", "cfg": int8, "enable": True},
        {"quantizer_name": "*layers.1.mlp.linear_fc2.input_quantizer", "cfg": {"num_bits": 8, "axis": None},
         "enable": True},
        {"quantizer_name": "*layers.1.self_attention.linear_proj.*", "enable": False}]
    run = run_export(tmp_path, fp8_shards(tmp_path, state, recipe), "--quiet")
    assert run.exit_code == 0, run.output
    files = written(tmp_path / "out")
    down = "model.layers.1.mlp.down_proj."
    assert files[down + "weight"].dtype == torch.int8 and files[down + "weight_scale"].shape == (64,)
    assert bits(files[down + "weight_scale"]) == bits(state[fc2 + "weight_quantizer._amax"].reshape(-1) / 127)
    assert files["model.layers.1.self_attn.o_proj.weight"].dtype == torch.float32
    assert "model.layers.1.self_attn.o_proj.weight_scale" not in files
    assert files["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    quantization = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert quantization["quant_algo"] == "MIXED_PRECISION"
    layers = quantization["quantized_layers"]
    assert layers[down[:-1]] == {"quant_algo": "W8A8_SQ_PER_CHANNEL"}
    assert layers["model.layers.0.self_attn.q_proj"] == {"quant_algo": "FP8"} and len(layers) == 13
    assert "model.layers.1.self_attn.o_proj" in quantization["exclude_modules"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_algo"] == "MIXED_PRECISION" and config["quantized_layers"] == layers
