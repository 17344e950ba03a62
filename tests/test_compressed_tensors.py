"""``quantmap export --format compressed-tensors``, proven by its real consumer on a CPU: transformers 5.25.0 with
compressed-tensors 0.20.1 loads each export of the dense torch_dist fixtures (TP1 and TP2) with no key missing,
dequantizes every Linear weight to the formula applied to the Megatron weight bit for bit (the formulas written
out in ``reference_formulas.py``, not quantmap's), and computes Megatron's weight-only fake-quant logits; its bytes are the ``modelopt``
format's where the two formats share them; SmoothQuant / AWQ ``pre_quant_scale`` is folded exactly or refused.

The MoE half of the issue is ``test_compressed_tensors_moe.py``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

import torch.distributed.checkpoint as dcp  # noqa: E402
from reference_formulas import FORMULAS, HEAD, HEADS, KV_HEADS, qkv_parts, unquantized_hf  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers_consumer import assert_all_keys_taken, load  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from quantmap.cli import app  # noqa: E402

DATA = Path(__file__).parent / "data" / "dcp"
CONFIG = DATA / "reference" / "hf_config_dense.json"
LOGITS = load_file(DATA / "reference" / "logits_fp8_kv_dense_L2.safetensors")
LAYERS = 2
TE_NORMS = ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")  # the fixtures'
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
FIXTURES = {"fp8_kv_tp1": "fp8", "fp8_kv_tp2": "fp8", "int8_tp2": "int8", "nvfp4_kv_tp2": "nvfp4"}


# -- the Megatron side, read with plain torch ----------------------------------------------------------

def megatron_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint, by plain ``dcp.load``."""
    directory = next(path.parent for path in checkpoint.rglob(".metadata"))
    reader = dcp.FileSystemReader(directory)
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()
             if hasattr(meta, "size") and "_extra_state" not in key}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def own_quantizers(state: dict, fixture: str) -> dict[str, torch.Tensor]:
    """The checkpoint's own quantizer state, fc1's per-row amax in [gate; up] order: a TP save holds each rank's
    rows as [gate_r; up_r] (ModelOpt's row order), so they are taken apart by the fixture's TP size."""
    tp = int(fixture.rpartition("_tp")[2])
    out = {key: value for key, value in state.items() if "_quantizer" in key}
    for key, value in out.items():
        if key.endswith("linear_fc1.weight_quantizer._amax") and value.numel() > 1:
            rows = value.reshape(tp, 2, value.shape[0] // (2 * tp), -1)
            out[key] = torch.cat((rows[:, 0].reshape(-1, rows.shape[-1]), rows[:, 1].reshape(-1, rows.shape[-1])))
    return out


def hf_linears(state: dict, quantizers: dict) -> dict[str, tuple]:
    """Each HF linear's (weight, amax, pre_quant_scale) from Megatron's: q/k/v out of the fused QKV rows ([q of
    the group's heads, k, v] per query group), gate/up out of fc1 (``weight_w`` / ``weight_v``; the TP1 amax
    rows are [gate; up])."""
    out = {}
    for layer in range(LAYERS):
        megatron, hf = f"decoder.layers.{layer}", f"model.layers.{layer}"

        def quantizer(linear, what):
            return quantizers.get(f"{megatron}.{linear}.{what}")

        weight = state[f"{megatron}.self_attention.linear_qkv.weight"]
        amax = quantizer("self_attention.linear_qkv", "weight_quantizer._amax")
        pqs = quantizer("self_attention.linear_qkv", "input_quantizer._pre_quant_scale")
        weights = qkv_parts(weight)
        amaxes = [amax] * 3 if amax.numel() == 1 else qkv_parts(amax.reshape(weight.shape[0], -1))
        for part, part_weight, part_amax in zip("qkv", weights, amaxes):
            out[f"{hf}.self_attn.{part}_proj"] = (part_weight, part_amax, pqs)
        fc1 = quantizer("mlp.linear_fc1", "weight_quantizer._amax")
        for part, half in (("gate", 0), ("up", 1)):
            amax = fc1 if fc1.numel() == 1 else fc1.reshape(2, 128, -1)[half]
            out[f"{hf}.mlp.{part}_proj"] = (state[f"{megatron}.mlp.linear_fc1.weight_{'wv'[half]}"], amax,
                                            quantizer("mlp.linear_fc1", "input_quantizer._pre_quant_scale"))
        for name, linear in (("self_attn.o_proj", "self_attention.linear_proj"), ("mlp.down_proj", "mlp.linear_fc2")):
            out[f"{hf}.{name}"] = (state[f"{megatron}.{linear}.weight"], quantizer(linear, "weight_quantizer._amax"),
                                   quantizer(linear, "input_quantizer._pre_quant_scale"))
    return out


def reference_model(fixture: str, kind: str | None, state=None, quantizers=None):
    """The model Megatron's weight-only fake quantization computes, built here: each linear's weight through the
    formula (``kind``; ``None``: unquantized), its ``pre_quant_scale`` applied to its input."""
    state = megatron_state(DATA / fixture / "ckpt") if state is None else state
    quantizers = own_quantizers(state, fixture) if quantizers is None else quantizers
    weights = unquantized_hf(state, LAYERS, TE_NORMS)
    hooks = {}
    for name, (weight, amax, pqs) in hf_linears(state, quantizers).items():
        weights[f"{name}.weight"] = FORMULAS[kind](weight, amax) if kind else weight
        if pqs is not None:
            hooks[name] = pqs
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(CONFIG)).eval()
    model.load_state_dict(weights, strict=True)
    for name, pqs in hooks.items():
        model.get_submodule(name).register_forward_pre_hook(lambda _, args, pqs=pqs: (args[0] * pqs,))
    return model


# -- the export, and the consumer -----------------------------------------------------------------------

def export(out: Path, checkpoint: Path, *extra: str, fmt: str = "compressed-tensors"):
    return CliRunner().invoke(app, ["export", "llama", "--megatron", str(checkpoint), "--out", str(out), "--format",
                                    fmt, "--config", str(CONFIG), "--dtype", "fp32", *extra])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each fixture exported once for the module's tests."""
    made = {}

    def get(fixture: str) -> Path:
        if fixture not in made:
            out = tmp_path_factory.mktemp("ct") / fixture
            run = export(out, DATA / fixture / "ckpt")
            assert run.exit_code == 0, run.output
            made[fixture] = out
        return made[fixture]
    return get


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(LOGITS["input_ids"]).logits


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def differing_weights(model, expected: dict[str, torch.Tensor]) -> list[str]:
    return sorted(name for name, weight in expected.items()
                  if not torch.equal(model.get_submodule(name).weight.detach(), weight))


def expected_weights(fixture: str, kind: str) -> dict[str, torch.Tensor]:
    state = megatron_state(DATA / fixture / "ckpt")
    quantizers = own_quantizers(state, fixture)
    return {name: FORMULAS[kind](weight, amax) for name, (weight, amax, _) in hf_linears(state, quantizers).items()}


@pytest.mark.slow
@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_every_scheme_loads_with_no_key_missing_and_dequantizes_to_the_formula_bit_for_bit(fixture, exported):
    out = exported(fixture)
    model, info = load(out)
    assert_all_keys_taken(info)
    expected = expected_weights(fixture, FIXTURES[fixture])
    assert len(expected) == 7 * LAYERS and differing_weights(model, expected) == []
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    assert config["format"] == {"fp8": "float-quantized", "int8": "int-quantized",
                                "nvfp4": "nvfp4-pack-quantized"}[FIXTURES[fixture]]
    kv = {"fp8": {"num_bits": 8, "type": "float"}, "nvfp4": {"num_bits": 4, "type": "float"}}.get(FIXTURES[fixture])
    assert (config["kv_cache_scheme"] is None) == (kv is None)
    if kv:
        assert kv.items() <= config["kv_cache_scheme"].items()


@pytest.mark.slow
def test_the_fp32_fp8_export_computes_megatrons_weight_only_logits_and_not_the_unquantized_ones(exported):
    got = logits(load(exported("fp8_kv_tp1"))[0])
    off = (got - LOGITS["logits_weight_only"]).abs().max()
    assert off <= 1e-4
    assert (got - LOGITS["logits_unquantized"]).abs().max() > 10 * off


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["int8_tp2", "nvfp4_kv_tp2", "fp8_kv_tp2"])
def test_other_recipes_compute_the_weight_only_model_built_from_the_formulas(fixture, exported):
    got = logits(load(exported(fixture))[0])
    off = (got - logits(reference_model(fixture, FIXTURES[fixture]))).abs().max()
    assert off <= 1e-4
    assert (got - logits(reference_model(fixture, None))).abs().max() > 10 * off


@pytest.mark.slow
def test_the_default_fake_quant_route_runs_and_is_nearer_the_full_fake_quant_logits(exported):
    """Weights and inputs fake-quantized by compressed-tensors: nearer (in L2) Megatron's full fake-quant logits
    than the unquantized ones (not by the largest entry: transformers applies no KV-cache scheme, Megatron did)."""
    model, info = load(exported("fp8_kv_tp1"), dequantize=False)
    assert_all_keys_taken(info)
    got = logits(model)
    assert torch.dist(got, LOGITS["logits"]) < torch.dist(got, LOGITS["logits_unquantized"])
    assert not torch.allclose(got, LOGITS["logits_weight_only"], atol=1e-4)  # the inputs were quantized too


@pytest.mark.slow
def test_a_scale_written_wrong_fails_the_dequantize_check(exported, tmp_path):
    """The negative control: one weight_scale one ulp up, and exactly its module dequantizes differently."""
    out = tmp_path / "wrong"
    shutil.copytree(exported("int8_tp2"), out)
    [shard] = out.glob("*.safetensors")
    found = load_file(shard)
    name = "model.layers.1.self_attn.v_proj.weight_scale"
    found[name] = torch.nextafter(found[name], torch.tensor(float("inf")))
    save_file(found, shard, metadata={"format": "pt"})
    assert differing_weights(load(out)[0], expected_weights("int8_tp2", "int8")) == [name.rpartition(".")[0]]


@pytest.mark.slow
@pytest.mark.parametrize("fixture, kind", [("fp8_kv_tp1", "fp8"), ("nvfp4_kv_tp2", "nvfp4")])
def test_the_bytes_shared_with_the_modelopt_format_are_the_same(fixture, kind, exported, tmp_path):
    """FP8 and NVFP4 payloads and NVFP4 block scales are ModelOpt's bytes; the other scales its scales reshaped
    ([] → [1]), or for NVFP4 the reciprocals: global scale 6·448 / amax where ModelOpt writes amax / (6·448)."""
    modelopt = tmp_path / "modelopt"
    run = export(modelopt, DATA / fixture / "ckpt", fmt="modelopt")
    assert run.exit_code == 0, run.output
    mo, ct = tensors(modelopt), tensors(exported(fixture))
    amax = megatron_state(DATA / fixture / "ckpt")
    for layer in range(LAYERS):
        for linear in LINEARS:
            name = f"model.layers.{layer}.{linear}"
            if kind == "fp8":
                assert bits(ct[f"{name}.weight"]) == bits(mo[f"{name}.weight"])
                assert bits(ct[f"{name}.weight_scale"]) == bits(mo[f"{name}.weight_scale"].reshape(1))
                assert bits(ct[f"{name}.input_scale"]) == bits(mo[f"{name}.input_scale"].reshape(1))
            else:
                assert bits(ct[f"{name}.weight_packed"]) == bits(mo[f"{name}.weight"])
                assert bits(ct[f"{name}.weight_scale"]) == bits(mo[f"{name}.weight_scale"])
                for ours, theirs in (("weight_global_scale", "weight_scale_2"), ("input_global_scale", "input_scale")):
                    product = float(ct[f"{name}.{ours}"]) * float(mo[f"{name}.{theirs}"])
                    assert abs(product - 1) < 2 ** -22, (name, ours)
        megatron = f"decoder.layers.{layer}.self_attention.core_attention"
        for which in "kv":  # the calibrated scale, unclamped (ModelOpt's Megatron exporter clamps FP8 at 1.0)
            kv = amax[f"{megatron}.{which}_bmm_quantizer._amax"].float().reshape(1)
            key = f"model.layers.{layer}.self_attn.{which}_{'scale' if kind == 'fp8' else 'global_scale'}"
            assert torch.equal(ct[key], kv / 448 if kind == "fp8" else 2688 / kv), key
        if kind == "nvfp4":
            name = f"model.layers.{layer}.self_attn.q_proj"
            qkv = amax[f"decoder.layers.{layer}.self_attention.linear_qkv.weight_quantizer._amax"].float().reshape(1)
            assert torch.equal(ct[f"{name}.weight_global_scale"], 2688 / qkv)


@pytest.mark.parametrize("fixture", ["int8_sq_tp2", "int4_awq_bs32_tp2"])
def test_a_pre_quant_scale_that_differs_within_a_gqa_group_is_refused_and_nothing_is_written(fixture, tmp_path):
    run = export(tmp_path / "out", DATA / fixture / "ckpt")
    assert run.exit_code != 0 and "Traceback" not in run.output
    assert "o_proj folds into its rows, but one value head feeds 2 query heads (GQA)" in run.output
    assert not (tmp_path / "out").exists()


def tied_checkpoint(fixture: str, directory: Path) -> Path:
    """A copy of the fixture whose o_proj ``pre_quant_scale`` is equal across the query heads of each GQA group
    (each group takes its first head's): a checkpoint in which the fold into v_proj is exact."""
    from quantmap.executor.torch_dist_checkpoint import read_state
    from quantmap.executor.values import converted
    from quantmap.io.torch_dist import locate
    from quantmap.io.torch_dist.write import write_into

    state = read_state(locate(DATA / fixture / "ckpt"))[1]
    for layer in range(LAYERS):
        name = f"decoder.layers.{layer}.self_attention.linear_proj.input_quantizer._pre_quant_scale"
        grouped = state[name].reshape(KV_HEADS, HEADS // KV_HEADS, HEAD)
        state[name] = grouped[:, :1].expand_as(grouped).reshape(-1).clone()
    return Path(write_into(locate(DATA / fixture / "ckpt"), state, out=directory, convert=converted).path)


@pytest.mark.slow
@pytest.mark.parametrize("fixture, kind", [("int8_sq_tp2", "int8"), ("int4_awq_bs32_tp2", "int4")])
def test_smoothquant_and_awq_fold_into_the_norms_and_v_up_rows_exactly(fixture, kind, tmp_path):
    """The folded model (norm · pqs before q/k/v and gate/up, v_proj / up_proj rows · pqs of o_proj / down_proj)
    computes what the unfolded weight-only fake-quant model does, pre_quant_scale applied to the inputs."""
    checkpoint = tied_checkpoint(fixture, tmp_path / "tied")
    out = tmp_path / "out"
    run = export(out, checkpoint)
    assert run.exit_code == 0, run.output
    assert "pre_quant_scale folded into the norms before q/k/v and gate/up: 4 module(s)" in run.output
    assert "pre_quant_scale folded into the rows of v_proj / up_proj (for o_proj / down_proj): 4" in run.output
    assert not [name for name in tensors(out) if "pre_quant" in name]
    model, info = load(out)
    assert_all_keys_taken(info)
    state = megatron_state(checkpoint)
    quantizers = own_quantizers(state, fixture)
    # the unfolded linears (all but v_proj and up_proj) dequantize to the formula bit for bit
    unfolded = {name: FORMULAS[kind](weight, amax) for name, (weight, amax, _) in hf_linears(state, quantizers).items()
                if not name.endswith(("v_proj", "up_proj"))}
    assert differing_weights(model, unfolded) == []
    got, unfolded_logits = logits(model), logits(reference_model(fixture, kind, state, quantizers))
    off = (got - unfolded_logits).abs().max()
    assert off <= 1e-5 * unfolded_logits.abs().max()
    assert (got - logits(reference_model(fixture, None, state, quantizers))).abs().max() > 10 * off


def test_import_of_the_format_is_refused_before_any_work(tmp_path):
    """Nothing reads a compressed-tensors checkpoint back yet: one error line, nothing written."""
    run = CliRunner().invoke(app, ["import", "llama", "--hf", str(tmp_path), "--into",
                                   str(DATA / "fp8_kv_tp1" / "ckpt"), "--out", str(tmp_path / "back"), "--format",
                                   "compressed-tensors"])
    assert run.exit_code == 1 and "is written by export but not read back by import yet" in run.output
    assert not (tmp_path / "back").exists()
