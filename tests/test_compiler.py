"""Compiling specs into rules: the derivations, their determinism, and immutability."""

import dataclasses
import json
import textwrap

import pytest

import quantmap
from quantmap.rules import AMAX, FANOUT, MOE_FANOUT, WEIGHT

MOE_SPEC = """\
    name: tiny_moe
    extends: llama
    params: {num_experts: 8}
    mappings:
      - megatron: decoder.layers.*.mlp.experts.linear_fc1.weight*
        hf: {gate: model.layers.*.mlp.experts.*.gate_proj.weight, up: model.layers.*.mlp.experts.*.up_proj.weight}
      - megatron: decoder.layers.*.mlp.experts.linear_fc2.weight*
        hf: model.layers.*.mlp.experts.*.down_proj.weight
      - megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight
        hf: {gate: model.layers.*.mlp.experts.*.gate_proj.weight, up: model.layers.*.mlp.experts.*.up_proj.weight}
        priority: -1
      - {megatron: decoder.layers.*.mlp.router.weight, hf: model.layers.*.mlp.gate.weight, quantizers: []}
    """


@pytest.fixture()
def moe(tmp_path):
    path = tmp_path / "tiny_moe.yaml"
    path.write_text(textwrap.dedent(MOE_SPEC))
    return quantmap.compile(str(path))


def by_megatron(rules):
    return {rule.megatron.text: rule for rule in rules}


def test_llama_derives_weight_amax_fanout_and_kv_rules():
    rules = by_megatron(quantmap.compile("llama"))
    qkv = rules["decoder.layers.*.self_attention.linear_qkv.weight_quantizer._amax"]
    assert qkv.kind == FANOUT and qkv.parts == ("q", "k", "v")
    assert [p.text for p in qkv.hf] == [f"model.layers.*.self_attn.{x}_proj.weight_quantizer._amax" for x in "qkv"]
    assert rules["decoder.layers.*.mlp.linear_fc2.input_quantizer._amax"].kind == AMAX
    assert rules["decoder.layers.*.mlp.linear_fc1.weight"].kind == WEIGHT
    kv = rules["decoder.layers.*.self_attention.core_attention.k_bmm_quantizer._amax"]
    assert kv.kind == AMAX and kv.hf[0].text == "model.layers.*.self_attn.k_bmm_quantizer._amax"
    assert kv.origin.derived == "kv_cache"
    # norms and embeddings carry no quantizers
    assert not any("input_layernorm.weight_quantizer" in text for text in rules)


def test_compile_json_is_byte_identical_across_runs():
    first = json.dumps(quantmap.compile("llama").to_json())
    assert first == json.dumps(quantmap.compile("llama").to_json())
    source = json.loads(first)[0]["source"]
    assert source["file"].startswith("quantmap/specs/") and source["line"] > 0
    assert (source["mapping"], source["derived"]) == ("embedding.word_embeddings.weight", "weight")


def test_rules_are_immutable_values():
    rules = quantmap.compile("llama")
    rule = next(iter(rules))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.kind = "amax"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.megatron.text = "x"
    assert isinstance(rules.rules, tuple) and isinstance(rule.hf, tuple)


def test_grouped_moe_yields_moe_fanout_with_the_expert_wildcard(moe):
    rules = by_megatron(moe)
    fc1 = rules["decoder.layers.*.mlp.experts.linear_fc1.weight_quantizer._amax"]
    assert fc1.kind == MOE_FANOUT and fc1.expert_capture == 1 and fc1.num_experts == 8
    match = moe.to_hf("decoder.layers.5.mlp.experts.linear_fc1.weight_quantizer._amax")
    assert match.hf == ("model.layers.5.mlp.experts.*.gate_proj.weight_quantizer._amax",
                        "model.layers.5.mlp.experts.*.up_proj.weight_quantizer._amax")
    assert len(match.expanded) == 16
    assert match.expanded[2:4] == ("model.layers.5.mlp.experts.1.gate_proj.weight_quantizer._amax",
                                   "model.layers.5.mlp.experts.1.up_proj.weight_quantizer._amax")
    assert match.expert_names([6]) == ("model.layers.5.mlp.experts.6.gate_proj.weight_quantizer._amax",
                                       "model.layers.5.mlp.experts.6.up_proj.weight_quantizer._amax")


def test_reverse_of_a_moe_target_gives_the_grouped_name_and_expert(moe):
    match = moe.to_megatron("model.layers.5.mlp.experts.6.up_proj.input_quantizer._amax")
    assert match.kind == MOE_FANOUT
    assert match.megatron == "decoder.layers.5.mlp.experts.linear_fc1.input_quantizer._amax"
    assert (match.part, match.expert) == ("up", 6)


def test_grouped_expert_weights_resolve_per_expert(moe):
    match = moe.to_hf("decoder.layers.2.mlp.experts.linear_fc2.weight7")
    assert match.kind == WEIGHT and match.hf == ("model.layers.2.mlp.experts.7.down_proj.weight",)
    assert moe.to_megatron("model.layers.2.mlp.experts.7.down_proj.weight").megatron == \
        "decoder.layers.2.mlp.experts.linear_fc2.weight7"


def test_sequential_mlp_experts_are_plain_per_expert_rules(moe):
    match = moe.to_hf("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight_quantizer._amax")
    assert match.kind == FANOUT
    assert match.hf[1] == "model.layers.1.mlp.experts.3.up_proj.weight_quantizer._amax"


def test_kv_rules_are_skipped_under_mtp_with_the_reason(tmp_path):
    path = tmp_path / "mtp.yaml"
    path.write_text(textwrap.dedent("""\
        name: mtp
        mappings:
          - megatron: mtp.layers.*.mtp_model_layer.self_attention.linear_qkv.weight
            hf: {q: mtp.*.q_proj.weight, k: mtp.*.k_proj.weight, v: mtp.*.v_proj.weight}
          - megatron: decoder.layers.*.self_attention.linear_qkv.weight
            hf: {q: model.layers.*.attn.q.weight, k: model.layers.*.attn.k.weight, v: model.layers.*.attn.v.weight}
        """))
    rules = quantmap.compile(str(path))
    reasons = [w.message for w in rules.warnings if w.code == "QM061"]
    assert len(reasons) == 2
    assert "lies under 'mtp'" in reasons[0]
    assert "do not share one parent module ending in q_proj/k_proj/v_proj" in reasons[1]
    assert not any(r.origin.derived == "kv_cache" for r in rules)


def test_mla_attention_gets_kv_rules_when_asked(tmp_path):
    path = tmp_path / "mla.yaml"
    path.write_text(textwrap.dedent("""\
        name: mla
        mappings:
          - megatron: decoder.layers.*.self_attention.linear_kv_down_proj.weight
            hf: model.layers.*.self_attn.kv_a_proj_with_mqa.weight
            kv_cache: true
        """))
    match = quantmap.compile(str(path)).to_megatron("model.layers.3.self_attn.v_bmm_quantizer._amax")
    assert match.megatron == "decoder.layers.3.self_attention.core_attention.v_bmm_quantizer._amax"


def test_quantizers_are_not_derived_when_the_hf_side_is_not_a_weight(tmp_path):
    path = tmp_path / "fused.yaml"
    path.write_text("name: f\nmappings:\n  - {megatron: decoder.layers.*.mlp.linear_fc1.weight, "
                    "hf: model.layers.*.mlp.experts.gate_up_proj, kind: plain}\n")
    rules = quantmap.compile(str(path))
    assert [r.kind for r in rules] == [WEIGHT]
    assert [w.code for w in rules.warnings] == ["QM060"]


def test_extends_overrides_by_megatron_name_and_prefixes_every_name(tmp_path):
    path = tmp_path / "vlm.yaml"
    path.write_text(textwrap.dedent("""\
        name: vlm
        extends: llama
        prefix: {megatron: language_model., hf: model.language_model.}
        mappings:
          - {megatron: output_layer.weight, hf: lm_head_v2.weight, quantizers: []}
        """))
    rules = quantmap.compile(str(path))
    assert rules.to_hf("language_model.output_layer.weight").hf == ("model.language_model.lm_head_v2.weight",)
    assert rules.to_hf("language_model.decoder.layers.0.mlp.linear_fc2.weight_quantizer._amax").hf == (
        "model.language_model.model.layers.0.mlp.down_proj.weight_quantizer._amax",)
    assert rules.to_hf("decoder.layers.0.mlp.linear_fc2.weight") is None
    assert sum(r.megatron.text.endswith("output_layer.weight") for r in rules) == 1
