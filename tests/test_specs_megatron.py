"""The shipped specs against Megatron-Core's names.

The fixtures are dumps of real Megatron-Core 0.16 models (local layer spec, GQA dense and
SequentialMLP MoE, single rank and TP=2) quantized by real ModelOpt 0.47. Layouts the fixtures
lack (Transformer Engine's fused norms, TEGroupedMLP, MLA, MTP) are written out below from
Megatron-Core's source, each line citing where the name comes from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import quantmap
from quantmap.check import check
from quantmap.diagnostics import SpecError
from quantmap.spec import shipped_specs
from quantmap.rules import FAN_IN, MOE_FANOUT, WEIGHT

DATA = Path(__file__).parent / "data"
MEGATRON = sorted((DATA / "megatron").glob("state_*.json"))
DENSE_SPECS = ["llama", "mistral", "qwen2", "qwen3", "phi3"]
MOE_SPECS = ["qwen3_moe", "mixtral", "olmoe"]


def _record(path: Path) -> dict:
    return json.loads(path.read_text())


def _specs_for(path: Path) -> list[str]:
    return MOE_SPECS if "_moeseq_" in path.name else DENSE_SPECS


@pytest.mark.parametrize("path", MEGATRON, ids=lambda p: p.stem)
def test_every_state_dict_key_of_a_real_megatron_model_resolves_or_is_excluded(path):
    keys = list(_record(path)["state_dict_keys"])
    for spec in _specs_for(path):
        assert check(quantmap.compile(spec), megatron=keys).findings == (), spec


@pytest.mark.parametrize("path", MEGATRON, ids=lambda p: p.stem)
def test_every_quantizer_buffer_resolves_to_an_hf_quantizer_buffer(path):
    buffers = list(_record(path)["quantizer_buffers"])
    assert buffers
    for spec in _specs_for(path):
        rules = quantmap.compile(spec)
        matches = {name: rules.to_hf(name) for name in buffers}
        assert all(m is not None and m.kind != WEIGHT for m in matches.values()), spec
        # The same buffer (e.g. weight_quantizer._amax) on the HF module.
        assert all(target.endswith("." + ".".join(name.split(".")[-2:]))
                   for name, m in matches.items() for target in m.hf), spec


@pytest.mark.parametrize(("megatron", "hf"), [
    ("state_fp8_default_kv_tp1", "quant_llama_FP8_DEFAULT_CFG_plus_FP8_KV_CFG"),
    ("state_int4_awq_bs32_tp1", "quant_llama_INT4_AWQ_CFG"),
    ("state_int8_smoothquant_tp1", "quant_llama_INT8_SMOOTHQUANT_CFG"),
])
def test_megatron_and_modelopt_hf_buffers_of_one_config_match_one_to_one(megatron, hf):
    """Both 2-layer Llama-shaped models: the quantizer names must pair up exactly, both ways."""
    report = check(quantmap.compile("llama"),
                   megatron=list(_record(DATA / "megatron" / f"{megatron}.json")["quantizer_buffers"]),
                   hf=list(_record(DATA / "hf" / f"{hf}.json")["buffers"]))
    assert report.findings == ()


# --- Layouts the fixtures do not hold, named as Megatron-Core 0.16 names them. ---

def _te_llama(layers: int) -> list[str]:
    """TE layer spec: norms fused into the next linear as layer_norm_weight (gpt_layer_specs.py)."""
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    for layer in range(layers):
        prefix = f"decoder.layers.{layer}."
        names += [prefix + s for s in (
            "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
            "self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight",
            "mlp.linear_fc2.weight")]
    return names


def _deepseek(layers: int, dense: int, experts: int, te: bool, mtp: int = 0, q_lora: bool = True,
              expert_bias: bool = True) -> list[str]:
    """MLA (multi_latent_attention.py MLASelfAttention), MoE (moe_layer.py, router.py, experts.py,
    shared_experts.py) and MTP (multi_token_prediction.py, with the inner layer as mtp_model_layer).

    TE spec: MLA input norm separate, q/kv latent norms fused into the up projections, dense
    layers' pre-MLP norm fused into linear_fc1, TEGroupedMLP experts ``weight{i}``. Local spec:
    every norm its own module, SequentialMLP experts ``local_experts.{i}``. Without q LoRA
    (q_lora_rank None) the query is one linear_q_proj; without expert bias (DeepSeek-V2) the router
    has no expert_bias.
    """

    def layer(prefix: str, moe: bool) -> list[str]:
        query = (("self_attention.linear_q_down_proj.weight", "self_attention.linear_q_up_proj.weight") if q_lora
                 else ("self_attention.linear_q_proj.weight",))
        out = [prefix + s for s in (
            "input_layernorm.weight", *query, "self_attention.linear_kv_down_proj.weight",
            "self_attention.linear_kv_up_proj.weight", "self_attention.linear_proj.weight")]
        latent = ("q", "kv") if q_lora else ("kv",)
        if te:
            out += [prefix + f"self_attention.linear_{x}_up_proj.layer_norm_weight" for x in latent]
        else:
            out += [prefix + f"self_attention.{x}_layernorm.weight" for x in latent]
        if not moe:
            norm = "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"
            return out + [prefix + s for s in (norm, "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")]
        out += [prefix + s for s in (
            "pre_mlp_layernorm.weight", "mlp.router.weight", *(("mlp.router.expert_bias",) if expert_bias else ()),
            "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight")]
        for e in range(experts):
            out += ([prefix + f"mlp.experts.linear_fc1.weight{e}", prefix + f"mlp.experts.linear_fc2.weight{e}"]
                    if te else [prefix + f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                                prefix + f"mlp.experts.local_experts.{e}.linear_fc2.weight"])
        return out

    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    for index in range(layers):
        names += layer(f"decoder.layers.{index}.", moe=index >= dense)
    for index in range(mtp):
        names += [f"mtp.layers.{index}.{s}" for s in (
            "enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")]
        names += layer(f"mtp.layers.{index}.mtp_model_layer.", moe=True)
    return names


def _hf_names(arch: str) -> list[str]:
    return list(_record(DATA / "hf" / f"names_{arch}.json")["on_disk_save_pretrained"])


def test_transformer_engine_llama_names_pair_with_hf_llama_names_one_to_one():
    assert check(quantmap.compile("llama"), megatron=_te_llama(2), hf=_hf_names("llama")).findings == ()


@pytest.mark.parametrize("te", [True, False], ids=["te_grouped", "local_sequential"])
def test_deepseek_v3_megatron_names_pair_with_hf_names_one_to_one(te):
    """The HF fixture: 3 layers, the first dense, 8 routed experts and a shared expert."""
    megatron = _deepseek(layers=3, dense=1, experts=8, te=te)
    report = check(quantmap.compile("deepseek_v3", num_layers=3, num_experts=8), megatron=megatron,
                   hf=_hf_names("deepseek_v3"))
    assert report.findings == ()


@pytest.mark.parametrize("te", [True, False], ids=["te_grouped", "local_sequential"])
def test_deepseek_v3_mtp_layer_is_hf_layer_num_layers(te):
    rules = quantmap.compile("deepseek_v3", num_layers=61, num_experts=4)
    names = _deepseek(layers=61, dense=3, experts=4, te=te, mtp=1)
    report = check(rules, megatron=names)
    assert report.findings == ()
    hf = {target for name in names for target in _forward(rules, name)}
    assert "model.layers.61.self_attn.q_a_proj.weight" in hf and "model.layers.61.eh_proj.weight" in hf
    assert not any(n.startswith("model.layers.62.") for n in hf)
    assert check(rules, megatron=names, hf=sorted(hf)).findings == ()


def _forward(rules, name: str) -> tuple[str, ...]:
    match = rules.to_hf(name)
    return match.expanded or match.hf


def test_reverse_lookup_of_layer_num_layers_gives_the_mtp_name_never_a_decoder_layer():
    rules = quantmap.compile("deepseek_v3", num_layers=61)
    assert rules.to_megatron("model.layers.61.self_attn.q_a_proj.weight_quantizer._amax").megatron == (
        "mtp.layers.0.mtp_model_layer.self_attention.linear_q_down_proj.weight_quantizer._amax")
    assert rules.to_megatron("model.layers.61.self_attn.k_bmm_quantizer._amax").megatron == (
        "mtp.layers.0.mtp_model_layer.self_attention.core_attention.k_bmm_quantizer._amax")
    assert rules.to_megatron("model.layers.61.mlp.experts.7.up_proj.weight").megatron == (
        "mtp.layers.0.mtp_model_layer.mlp.experts.local_experts.7.linear_fc1.weight")
    assert rules.to_megatron("model.layers.61.shared_head.norm.weight").megatron == "mtp.layers.0.final_layernorm.weight"
    assert rules.to_megatron("model.layers.60.self_attn.q_a_proj.weight_quantizer._amax").megatron == (
        "decoder.layers.60.self_attention.linear_q_down_proj.weight_quantizer._amax")


def test_deepseek_v3_without_num_layers_is_one_clear_error():
    with pytest.raises(SpecError) as raised:
        quantmap.compile("deepseek_v3")
    [error] = raised.value.diagnostics
    assert error.code == "QM050" and "'num_layers'" in error.message and "--param num_layers=N" in error.hint


def test_mla_attention_gets_kv_cache_rules_on_core_attention():
    rules = quantmap.compile("deepseek_v3", num_layers=61)
    match = rules.to_hf("decoder.layers.5.self_attention.core_attention.v_bmm_quantizer._amax")
    assert match.hf == ("model.layers.5.self_attn.v_bmm_quantizer._amax",)


@pytest.mark.parametrize("spec", MOE_SPECS)
def test_grouped_expert_weights_and_quantizers_fan_out_to_every_hf_expert(spec):
    rules = quantmap.compile(spec, num_experts=4)
    up = rules.to_hf("decoder.layers.1.mlp.experts.linear_fc1.weight3").hf
    assert len(up) == 2 and all(".experts.3." in name for name in up)
    amax = rules.to_hf("decoder.layers.1.mlp.experts.linear_fc2.weight_quantizer._amax")
    assert len(amax.expanded) == 4 and {name.split(".experts.")[1][0] for name in amax.expanded} == set("0123")


@pytest.mark.parametrize("spec", MOE_SPECS)
def test_hf_expert_quantizers_resolve_to_sequential_experts_one_to_one(spec):
    rules = quantmap.compile(spec)
    hf = rules.to_hf("decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight_quantizer._amax").hf[0]
    assert rules.to_megatron(hf).megatron == "decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight_quantizer._amax"


def test_qwen2_qkv_bias_fans_out_to_q_k_v_biases():
    match = quantmap.compile("qwen2").to_hf("decoder.layers.0.self_attention.linear_qkv.bias")
    assert match.hf == tuple(f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv")


def test_gpt_oss_expert_quantizers_fan_in_to_its_shared_ones_and_the_biases_map_to_the_packed_ones():
    # ModelOpt 0.47 _QuantGptOssExperts: one gate_up_proj_weight_quantizer for all experts.
    rules = quantmap.compile("gpt_oss")
    back = rules.to_megatron("model.layers.0.mlp.experts.gate_up_proj_weight_quantizer._amax")
    assert back.kind == FAN_IN
    assert back.megatron == "decoder.layers.0.mlp.experts.local_experts.*.linear_fc1.weight_quantizer._amax"
    for name in ("decoder.layers.0.mlp.experts.linear_fc2.weight_quantizer.3._amax",
                 "decoder.layers.0.mlp.experts.linear_fc2.weight_quantizer._amax",
                 "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight_quantizer._amax"):
        assert rules.to_hf(name).hf == ("model.layers.0.mlp.experts.down_proj_weight_quantizer._amax",), name
    report = check(rules, megatron=["decoder.layers.0.mlp.experts.linear_fc1.weight0",
                                    "decoder.layers.0.mlp.experts.linear_fc1.weight1",
                                    "decoder.layers.0.mlp.experts.linear_fc1.bias0",
                                    "decoder.layers.0.self_attention.core_attention.softmax_offset"],
                   hf=["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.gate_up_proj_bias",
                       "model.layers.0.self_attn.sinks"])
    assert report.findings == ()
    # Megatron-Bridge's GPTOSSMLP*ProjMapping: each expert's bias is one row of the HF bias of all experts.
    for megatron, hf in (("local_experts.3.linear_fc1.bias", "gate_up_proj_bias"), ("linear_fc1.bias3", "gate_up_proj_bias"),
                         ("local_experts.3.linear_fc2.bias", "down_proj_bias"), ("linear_fc2.bias3", "down_proj_bias")):
        assert rules.to_hf(f"decoder.layers.0.mlp.experts.{megatron}").hf == (f"model.layers.0.mlp.experts.{hf}",)
    assert rules.to_megatron("model.layers.0.mlp.experts.down_proj_bias").megatron == \
        "decoder.layers.0.mlp.experts.local_experts.*.linear_fc2.bias"

EVERY_MOE_SPEC = ["deepseek_v2", "deepseek_v3", "ernie4_5_moe", "glm4_moe", "gpt_oss", "kimi_k2", "minimax_m2",
                  "mixtral", "nemotron_h", "olmoe", "qwen2_moe", "qwen3_5_moe", "qwen3_moe", "qwen3_next"]


def _expert_of(match, expert: int) -> bool:
    """Whether a forward match is expert ``expert``'s alone: its own HF names, or its share of a fan-in."""
    if match.kind == FAN_IN:
        return match.expert == expert
    return all(re.search(rf"[._]{expert}\.", name) for name in match.hf)


@pytest.mark.slow
@pytest.mark.parametrize("naming", ["on-disk", "in-memory"])
@pytest.mark.parametrize("spec", EVERY_MOE_SPEC)
def test_every_moe_spec_maps_both_modelopt_grouped_forms_and_sequential_experts(spec, naming):
    """ModelOpt <= 0.46's shared grouped weight quantizer, 0.47's per-expert weight_quantizer.{E}, the
    shared grouped input quantizer and SequentialMLP's local_experts.{E}: all four resolve in every MoE
    spec under both HF namings, a per-expert one to its own expert (the same HF names whichever Megatron
    layout holds it), a shared one to every expert."""
    declared = quantmap.load_spec(spec).params
    rules = quantmap.compile(spec, naming, **{k: v for k, v in {"num_experts": 4, "num_layers": 4}.items()
                                              if k in declared})
    prefix = "decoder.layers.1.mlp.experts."
    for buffer in ("weight_quantizer._amax", "input_quantizer._amax"):
        shared = rules.to_hf(f"{prefix}linear_fc2.{buffer}")
        assert shared is not None and shared.kind in (MOE_FANOUT, FAN_IN) and shared.expert is None, (buffer, shared)
        sequential = rules.to_hf(f"{prefix}local_experts.3.linear_fc2.{buffer}")
        assert sequential is not None and _expert_of(sequential, 3), (buffer, sequential)
    per_expert = rules.to_hf(f"{prefix}linear_fc2.weight_quantizer.3._amax")
    assert per_expert is not None and _expert_of(per_expert, 3), per_expert
    assert per_expert.hf == rules.to_hf(f"{prefix}local_experts.3.linear_fc2.weight_quantizer._amax").hf


@pytest.mark.slow
def test_every_moe_spec_is_every_shipped_spec_with_routed_experts():
    def routed(spec: str) -> bool:
        declared = quantmap.load_spec(spec).params
        rules = quantmap.compile(spec, **{k: 4 for k in ("num_experts", "num_layers") if k in declared})
        return rules.to_hf("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight") is not None

    assert [spec for spec in sorted(shipped_specs()) if routed(spec)] == EVERY_MOE_SPEC
