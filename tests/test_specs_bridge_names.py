"""The library's newer specs against the Megatron-Core names Megatron-Bridge 0.6.2 maps.

For each spec, the Megatron names of a model the size of the tiny HF model in test_specs_hf.py
are written out below from the bridge's mapping registry (src/megatron/bridge/models/<family>/
*_bridge.py) and Megatron-Core 0.16.1's module tree, each builder citing where its names come
from. Both sides are then checked at once: every Megatron name resolves, every HF name of the
real transformers model is claimed, and each pair is one to one (no target missing on the other
side). The quantizer buffers of every quantized Megatron linear resolve to HF quantizer buffers
of modules the HF model has.
"""

from __future__ import annotations

import re

import pytest

import quantmap
from quantmap.check import check
from quantmap.io.names import read_names
from quantmap.rules import WEIGHT
from test_specs_hf import PARAMS, build, variants
from test_specs_megatron import _deepseek

transformers = pytest.importorskip("transformers")
# Every test here builds or reads real transformers models: slow, left out of `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

EXPERTS = 4
HEAD = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
TIED_HEAD = HEAD[:2]  # share_embeddings_and_output_weights: no output_layer.weight


def _experts(te: bool, prefix: str = "mlp.experts.") -> list[str]:
    """TEGroupedMLP (TE GroupedLinear weight{i}) or SequentialMLP (local_experts.{i}), moe/experts.py."""
    if te:
        return [f"{prefix}linear_fc{n}.weight{e}" for e in range(EXPERTS) for n in (1, 2)]
    return [f"{prefix}local_experts.{e}.linear_fc{n}.weight" for e in range(EXPERTS) for n in (1, 2)]


def _model(head: list[str], layers: list[list[str]], root: str = "decoder.layers") -> list[str]:
    return head + [f"{root}.{index}.{suffix}" for index, suffixes in enumerate(layers) for suffix in suffixes]


# GPT layer (gpt_layer_specs.py): TE fuses the input norm into linear_qkv and a dense layer's
# pre-MLP norm into linear_fc1; the local spec keeps input_layernorm / pre_mlp_layernorm.
def _attention(te: bool, *extra: str) -> list[str]:
    norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
    return [norm, "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
            *(f"self_attention.{name}" for name in extra)]


def _dense_mlp(te: bool) -> list[str]:
    norm = "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"
    return [norm, "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]


def _moe_mlp(te: bool, *extra: str) -> list[str]:
    """moe_layer.py: the pre-MLP norm stays a module under TE (TENorm), router.py TopKRouter."""
    return ["pre_mlp_layernorm.weight", "mlp.router.weight", *(f"mlp.{name}" for name in extra), *_experts(te)]


def gemma2(te: bool = True) -> list[str]:
    """gemma2_bridge.py; gemma2_layer_spec (TE only): post-norms in TERowParallelLinearLayerNorm."""
    layer = _attention(True, "linear_proj.post_layernorm.weight") + _dense_mlp(True) + [
        "mlp.linear_fc2.post_layernorm.weight"]
    return _model(TIED_HEAD, [layer] * 2)


def gemma3(te: bool = True) -> list[str]:
    """gemma3_bridge.py; gemma3_layer_spec adds TENorm q_layernorm / k_layernorm."""
    extra = ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    return gemma2(te) + [f"decoder.layers.{i}.{s}" for i in range(2) for s in extra]


def exaone4(te: bool = True) -> list[str]:
    """exaone4_bridge.py: post-LN only (no input or pre-MLP norm), q/k norms, untied 32B head."""
    layer = ["self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
             "self_attention.linear_proj.post_layernorm.weight", "self_attention.q_layernorm.weight",
             "self_attention.k_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
             "mlp.linear_fc2.post_layernorm.weight"]
    return _model(HEAD, [layer] * 2)


def nemotron(te: bool) -> list[str]:
    """nemotron_bridge.py (TE names); the local spec's LayerNorm modules carry the biases instead."""
    if te:
        norms = ["self_attention.linear_qkv.layer_norm_bias", "mlp.linear_fc1.layer_norm_bias"]
    else:
        norms = ["input_layernorm.bias", "pre_mlp_layernorm.bias"]
    layer = _attention(te) + _dense_mlp(te) + norms
    return _model(HEAD + ["decoder.final_layernorm.bias"], [layer] * 2)


def qwen2_moe(te: bool) -> list[str]:
    """No bridge: Megatron-Core's MoE layer with a gated SharedExpertMLP (shared_experts.py gate_weight)."""
    attention = _attention(te, "linear_qkv.bias")
    moe = _moe_mlp(te, "shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight",
                   "shared_experts.gate_weight")
    return _model(HEAD, [attention + _dense_mlp(te), attention + moe, attention + moe])


def glm4_moe(te: bool) -> list[str]:
    """glm45_bridge.py: qkv bias, q/k norms, layer 0 dense, expert-bias router, one shared expert."""
    attention = _attention(te, "linear_qkv.bias", "q_layernorm.weight", "k_layernorm.weight")
    moe = _moe_mlp(te, "router.expert_bias", "shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight")
    return _model(HEAD, [attention + _dense_mlp(te), attention + moe, attention + moe])


def glm4_moe_mtp(te: bool) -> list[str]:
    """glm45_bridge.py MTP mappings; multi_token_prediction.py (enorm, hnorm, eh_proj, final_layernorm)."""
    attention = _attention(te, "linear_qkv.bias", "q_layernorm.weight", "k_layernorm.weight")
    moe = _moe_mlp(te, "router.expert_bias", "shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight")
    own = ["mtp.layers.0." + s for s in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")]
    return glm4_moe(te) + own + ["mtp.layers.0.mtp_model_layer." + s for s in attention + moe]


def ernie4_5_moe(te: bool) -> list[str]:
    """ernie_45_bridge.py: layer 0 dense (moe_layer_start_index 1), shared experts, expert bias, tied head."""
    moe = _moe_mlp(te, "router.expert_bias", "shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight")
    return _model(TIED_HEAD, [_attention(te) + _dense_mlp(te), _attention(te) + moe, _attention(te) + moe])


def minimax_m2(te: bool) -> list[str]:
    """minimax_m2_bridge.py: full-width q/k norms, every layer MoE with an expert-bias router."""
    layer = _attention(te, "q_layernorm.weight", "k_layernorm.weight") + _moe_mlp(te, "router.expert_bias")
    return _model(HEAD, [layer] * 2)


def deepseek_v2(te: bool) -> list[str]:
    """deepseek/common.py, both MLA query paths; DeepSeek-V2's router has no expert_bias."""
    return sorted({name for q_lora in (True, False)
                   for name in _deepseek(layers=3, dense=1, experts=EXPERTS, te=te, q_lora=q_lora, expert_bias=False)})


def kimi_k2(te: bool) -> list[str]:
    """kimi_bridge.py: deepseek/common.py without MTP."""
    return sorted({name for q_lora in (True, False)
                   for name in _deepseek(layers=3, dense=1, experts=EXPERTS, te=te, q_lora=q_lora)})


def qwen2_5_vl(te: bool) -> list[str]:
    """qwen25_vl_bridge.py: Qwen2 under language_model., and visual.** as HF's own vision module
    (modeling_qwen25_vl.py Qwen25VLModel.visual), so its names are HF's Qwen2_5_VisionTransformer's."""
    layer = _attention(te, "linear_qkv.bias") + _dense_mlp(te)
    language = ["language_model." + name for name in _model(HEAD, [layer] * 2)]
    block = ["norm1.weight", "norm2.weight", *(f"{m}.{p}" for m in ("attn.qkv", "attn.proj", "mlp.gate_proj",
                                                                   "mlp.up_proj", "mlp.down_proj")
                                             for p in ("weight", "bias"))]
    visual = ["visual.patch_embed.proj.weight", "visual.merger.ln_q.weight",
              *(f"visual.merger.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
              *(f"visual.blocks.{i}.{name}" for i in range(2) for name in block)]
    return language + visual


# Hybrid layers (experimental_attention_variant_module_specs.py, TE): GatedDeltaNet as the layer's
# self_attention (ssm/gated_delta_net.py: in_proj with the fused input norm, conv1d, A_log, dt_bias,
# out_norm, out_proj) for layers 0-2, gated full attention with q/k norms for layer 3.
GDN = ["self_attention.in_proj.layer_norm_weight", "self_attention.in_proj.weight", "self_attention.conv1d.weight",
       "self_attention.A_log", "self_attention.dt_bias", "self_attention.out_norm.weight",
       "self_attention.out_proj.weight"]
FULL = _attention(True, "q_layernorm.weight", "k_layernorm.weight")
SHARED = ("shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight", "shared_experts.gate_weight")


def _hybrid(mlp: list[str]) -> list[str]:
    return _model(HEAD, [GDN + mlp, GDN + mlp, GDN + mlp, FULL + mlp])


def _mtp(mlp: list[str]) -> list[str]:
    """qwen35_bridge.py _get_*_mtp_mappings: one MTP layer with a full-attention inner layer."""
    own = ["mtp.layers.0." + s for s in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "final_layernorm.weight")]
    return own + ["mtp.layers.0.mtp_model_layer." + s for s in FULL + mlp]


def qwen3_5(te: bool = True) -> list[str]:
    """qwen35_bridge.py Qwen35Bridge: hybrid layers, dense SwiGLU MLP."""
    return _hybrid(_dense_mlp(True))


def qwen3_5_moe(te: bool) -> list[str]:
    """qwen35_bridge.py Qwen35MoEBridge: hybrid layers, MoE with a gated shared expert."""
    return _hybrid(_moe_mlp(te, *SHARED))


def qwen3_next(te: bool) -> list[str]:
    """qwen3_next_bridge.py: the same Megatron model as Qwen3.5-MoE (HF differs in in_proj only)."""
    return qwen3_5_moe(te)


def nemotron_h(te: bool) -> list[str]:
    """nemotron_h_bridge.py; Megatron-Core mamba_layer_specs.py mamba_stack_spec (TE) for the tiny
    pattern Mamba, MoE, attention, MLP; MoE with and without latent projections (both HF variants)."""
    mamba = [f"mixer.{name}" for name in ("in_proj.layer_norm_weight", "in_proj.weight", "conv1d.weight",
                                          "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight", "out_proj.weight")]
    moe = _moe_mlp(te, "router.expert_bias", "shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight",
                   "fc1_latent_proj.weight", "fc2_latent_proj.weight")
    head = ["embedding.word_embeddings.weight", "decoder.final_norm.weight", "output_layer.weight"]
    return _model(head, [mamba, moe, _attention(True), _dense_mlp(True)])


BRIDGES = [gemma2, gemma3, exaone4, nemotron, qwen2_moe, glm4_moe, ernie4_5_moe, minimax_m2, deepseek_v2, kimi_k2,
           qwen2_5_vl, qwen3_5, qwen3_5_moe, qwen3_next, nemotron_h]
# The bridge builds these with TE layer specs only (its own, or the experimental-attention one;
# the MoE ones still get both expert layouts).
TE_ONLY = {gemma2, gemma3, exaone4, qwen3_5}
CASES = [pytest.param(builder, te, id=f"{builder.__name__}-{'te_grouped' if te else 'local_sequential'}")
         for builder in BRIDGES for te in (True, False) if te or builder not in TE_ONLY]


@pytest.fixture(scope="module")
def hf_names(tmp_path_factory) -> dict[str, list[str]]:
    """The save_pretrained names of each spec's tiny model (every variant test_specs_hf.py builds)."""
    import torch

    torch.manual_seed(0)
    out = {}
    for arch in [builder.__name__ for builder in BRIDGES]:
        names: list[str] = []
        for index, config in enumerate(variants(arch)):
            folder = tmp_path_factory.mktemp(f"{arch}{index}")
            build(arch, config).save_pretrained(folder)
            names += [name for name in read_names(folder) if name not in names]
        out[arch] = names
    return out


def _rules(arch: str):
    return quantmap.compile(arch, **PARAMS.get(arch, {}))


@pytest.mark.parametrize(("builder", "te"), CASES)
def test_bridge_names_pair_with_the_real_hf_names_one_to_one(builder, te, hf_names):
    arch = builder.__name__
    report = check(_rules(arch), megatron=builder(te), hf=hf_names[arch])
    assert report.findings == (), [(f.code, f.name) for f in report.findings][:10]


LINEAR = re.compile(r"\.(linear_\w+|eh_proj|self_attention\.out_proj|mixer\.(in|out)_proj|\w+_latent_proj)\.weight\d*$")


@pytest.mark.parametrize(("builder", "te"), CASES)
def test_quantizers_of_every_megatron_linear_resolve_to_hf_modules_the_model_has(builder, te, hf_names):
    """<linear>.weight_quantizer._amax (one per GroupedLinear, fanned out) names HF quantizers of
    modules whose weights are on disk, and the HF names come back to the same Megatron name or, for
    a grouped linear, to the per-expert SequentialMLP name of the expert."""
    arch = builder.__name__
    rules = _rules(arch)
    modules = {name[: -len(".weight")] for name in hf_names[arch] if name.endswith(".weight")}
    linears = sorted({re.sub(r"\.weight\d*$", "", name) for name in builder(te)
                      if LINEAR.search(name) and not name.startswith("output_layer")})
    assert linears
    for module in linears:
        name = f"{module}.weight_quantizer._amax"
        match = rules.to_hf(name)
        assert match is not None and match.kind != WEIGHT, name
        targets = match.expanded or match.hf
        assert targets and {t.rsplit(".", 2)[0] for t in targets} <= modules, (name, targets)
        if te and ".experts.linear_fc" in module:
            continue  # a grouped quantizer comes back as each expert's SequentialMLP quantizer
        assert {rules.to_megatron(t).megatron for t in targets} == {name}, name


@pytest.mark.parametrize("te", [True, False], ids=["te_grouped", "local_sequential"])
def test_glm4_moe_mtp_layer_is_hf_layer_num_layers(te):
    """transformers builds no MTP layer: its HF names are what the spec derives, checked back."""
    rules = _rules("glm4_moe")
    names = glm4_moe_mtp(te)
    hf = sorted({t for name in names for t in (rules.to_hf(name).expanded or rules.to_hf(name).hf)})
    assert "model.layers.3.eh_proj.weight" in hf and "model.layers.3.self_attn.q_proj.bias" in hf
    assert not any(name.startswith("model.layers.4.") for name in hf)
    assert check(rules, megatron=names, hf=hf).findings == ()
    assert rules.to_megatron("model.layers.3.mlp.experts.1.up_proj.weight_quantizer._amax").megatron == (
        "mtp.layers.0.mtp_model_layer.mlp.experts.local_experts.1.linear_fc1.weight_quantizer._amax")
    assert rules.to_megatron("model.layers.3.self_attn.k_bmm_quantizer._amax").megatron == (
        "mtp.layers.0.mtp_model_layer.self_attention.core_attention.k_bmm_quantizer._amax")
    assert rules.to_megatron("model.layers.2.self_attn.k_bmm_quantizer._amax").megatron == (
        "decoder.layers.2.self_attention.core_attention.k_bmm_quantizer._amax")
    # Megatron-Core <= 0.16 names the inner layer transformer_layer: read too, written as mtp_model_layer
    assert rules.to_hf("mtp.layers.0.transformer_layer.self_attention.linear_qkv.bias").hf == tuple(
        f"model.layers.3.self_attn.{p}_proj.bias" for p in "qkv")


def test_mla_without_q_lora_maps_linear_q_proj_to_q_proj_with_kv_cache_rules():
    for arch in ("deepseek_v2", "deepseek_v3", "kimi_k2"):
        rules = _rules(arch)
        assert rules.to_hf("decoder.layers.1.self_attention.linear_q_proj.input_quantizer._amax").hf == (
            "model.layers.1.self_attn.q_proj.input_quantizer._amax",), arch
        assert rules.to_megatron("model.layers.1.self_attn.v_bmm_quantizer._amax").megatron == (
            "decoder.layers.1.self_attention.core_attention.v_bmm_quantizer._amax"), arch


def test_qwen2_moe_shared_expert_gate_is_mapped_without_quantizers():
    rules = _rules("qwen2_moe")
    assert rules.to_hf("decoder.layers.1.mlp.shared_experts.gate_weight").hf == (
        "model.layers.1.mlp.shared_expert_gate.weight",)
    assert rules.to_megatron("model.layers.1.mlp.shared_expert_gate.weight_quantizer._amax") is None
    assert rules.to_hf("decoder.layers.1.mlp.shared_experts.linear_fc1.weight_quantizer._amax").hf == (
        "model.layers.1.mlp.shared_expert.gate_proj.weight_quantizer._amax",
        "model.layers.1.mlp.shared_expert.up_proj.weight_quantizer._amax")


def test_gemma_pre_mlp_norm_is_pre_feedforward_not_post_attention():
    """In Gemma, post_attention_layernorm normalises attention's output (inside linear_proj)."""
    for arch in ("gemma2", "gemma3"):
        rules = _rules(arch)
        assert rules.to_megatron("model.layers.0.post_attention_layernorm.weight").megatron == (
            "decoder.layers.0.self_attention.linear_proj.post_layernorm.weight")
        assert rules.to_megatron("model.layers.0.pre_feedforward_layernorm.weight").megatron == (
            "decoder.layers.0.mlp.linear_fc1.layer_norm_weight")


@pytest.mark.parametrize(("arch", "mlp"), [("qwen3_5", _dense_mlp(True)), ("qwen3_5_moe", _moe_mlp(True, *SHARED)),
                                           ("qwen3_next", _moe_mlp(True, *SHARED))])
def test_hybrid_mtp_layer_is_hf_mtp_with_the_decoders_quantizers(arch, mlp):
    """HF keeps the MTP layer under mtp.* (transformers builds none). ModelOpt >= 0.46 disables mtp.* by
    default, but a stock KV-cache config re-enables its k/v_bmm quantizers and a user may enable the rest:
    every linear of the MTP maps its quantizers as the decoder's do, to HF modules of the MTP."""
    rules = _rules(arch)
    names = _mtp(mlp)
    hf = sorted({t for name in names for t in (rules.to_hf(name).expanded or rules.to_hf(name).hf)})
    assert {"mtp.fc.weight", "mtp.norm.weight", "mtp.layers.0.self_attn.q_proj.weight"} <= set(hf)
    assert all(name.startswith("mtp.") for name in hf)
    assert check(rules, megatron=names, hf=hf).findings == ()
    modules = {name[: -len(".weight")] for name in hf if name.endswith(".weight")}
    linears = {re.sub(r"\.weight\d*$", "", name) for name in names if LINEAR.search(name)}
    assert {"mtp.layers.0.eh_proj", "mtp.layers.0.mtp_model_layer.self_attention.linear_qkv"} <= linears
    for name in names:
        module = re.sub(r"\.weight\d*$", "", name)
        match = rules.to_hf(f"{module}.weight_quantizer._amax")
        if module not in linears:  # norms, router, shared-expert gate
            assert match is None, name
            continue
        targets = match.expanded or match.hf
        assert targets and {t.rsplit(".", 2)[0] for t in targets} <= modules, (name, targets)
    assert rules.to_hf("mtp.layers.0.eh_proj.input_quantizer._amax").hf == ("mtp.fc.input_quantizer._amax",)
    for inner in ("mtp_model_layer", "transformer_layer"):  # Megatron-Core <= 0.16 names it transformer_layer
        kv = f"mtp.layers.0.{inner}.self_attention.core_attention.k_bmm_quantizer._amax"
        assert rules.to_hf(kv).hf == ("mtp.layers.0.self_attn.k_bmm_quantizer._amax",)
    assert rules.to_megatron("mtp.layers.0.self_attn.v_bmm_quantizer._amax").megatron == (
        "mtp.layers.0.mtp_model_layer.self_attention.core_attention.v_bmm_quantizer._amax")


def test_gated_delta_net_in_proj_maps_its_weight_parts_and_out_proj_its_quantizers():
    """in_proj's quantizers: tests/test_gated_delta_net.py."""
    for arch, parts in (("qwen3_5", ("qkv", "z", "b", "a")), ("qwen3_next", ("qkvz", "ba"))):
        rules = _rules(arch)
        assert rules.to_hf("decoder.layers.0.self_attention.in_proj.weight").hf == tuple(
            f"model.layers.0.linear_attn.in_proj_{p}.weight" for p in parts)
        assert rules.to_megatron("model.layers.2.linear_attn.out_proj.input_quantizer._amax").megatron == (
            "decoder.layers.2.self_attention.out_proj.input_quantizer._amax")
        assert rules.to_hf("decoder.layers.0.self_attention.conv1d.weight_quantizer._amax") is None


def test_nemotron_h_mamba_mixer_quantizes_in_and_out_proj_only():
    rules = _rules("nemotron_h")
    assert rules.to_megatron("backbone.layers.0.mixer.in_proj.input_quantizer._amax").megatron == (
        "decoder.layers.0.mixer.in_proj.input_quantizer._amax")
    assert rules.to_hf("decoder.layers.0.mixer.out_proj.weight_quantizer._amax").hf == (
        "backbone.layers.0.mixer.out_proj.weight_quantizer._amax",)
    for name in ("conv1d", "norm"):
        assert rules.to_hf(f"decoder.layers.0.mixer.{name}.weight_quantizer._amax") is None
    # An attention layer's KV cache sits on HF's mixer (NemotronHAttention).
    assert rules.to_megatron("backbone.layers.2.mixer.k_bmm_quantizer._amax").megatron == (
        "decoder.layers.2.self_attention.core_attention.k_bmm_quantizer._amax")
    # The one norm of a layer: its reverse lookup picks the Mamba layer's fused name.
    assert rules.to_megatron("backbone.layers.2.norm.weight").megatron == (
        "decoder.layers.2.mixer.in_proj.layer_norm_weight")
    assert check(rules, megatron=["mtp.layers.0.eh_proj.weight"], hf=["mtp.layers.0.eh_proj.weight"]).findings == ()
