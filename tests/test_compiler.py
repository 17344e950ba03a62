"""Compiling specs into rules: the derivations, their determinism, and immutability."""

import dataclasses
import json
import re
import textwrap

import pytest

import quantmap
from quantmap.rules import AMAX, FANOUT, MOE_FANOUT, WEIGHT
from quantmap.spec import shipped_specs

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


def test_grouped_moe_also_yields_modelopt_047_per_expert_weight_quantizers_which_win_reverse_lookup(moe):
    match = moe.to_hf("decoder.layers.5.mlp.experts.linear_fc1.weight_quantizer.6._amax")
    assert match.kind == FANOUT and match.hf == ("model.layers.5.mlp.experts.6.gate_proj.weight_quantizer._amax",
                                                 "model.layers.5.mlp.experts.6.up_proj.weight_quantizer._amax")
    assert moe.to_hf("decoder.layers.5.mlp.experts.linear_fc2.weight_quantizer.6._amax").hf == \
        ("model.layers.5.mlp.experts.6.down_proj.weight_quantizer._amax",)
    back = moe.to_megatron("model.layers.5.mlp.experts.6.up_proj.weight_quantizer._amax")
    assert back.megatron == "decoder.layers.5.mlp.experts.linear_fc1.weight_quantizer.6._amax" and back.part == "up"
    shared = by_megatron(moe)["decoder.layers.*.mlp.experts.linear_fc1.weight_quantizer._amax"]
    assert not shared.reversible and shared.to_json()["reversible"] is False
    # Input quantizers stay one per grouped linear: no per-expert form.
    assert moe.to_hf("decoder.layers.5.mlp.experts.linear_fc1.input_quantizer.6._amax") is None


def test_grouped_weight_quantizer_shared_makes_the_older_form_the_one_an_import_writes(tmp_path):
    path = tmp_path / "old_moe.yaml"
    old_form = MOE_SPEC.replace("      - megatron: decoder.layers.*.mlp.experts.linear_fc2.weight*\n",
                                "      - grouped_weight_quantizer: shared\n"
                                "        megatron: decoder.layers.*.mlp.experts.linear_fc2.weight*\n")
    assert old_form != MOE_SPEC
    path.write_text(textwrap.dedent(old_form))
    rules = quantmap.compile(str(path))
    back = rules.to_megatron("model.layers.5.mlp.experts.6.down_proj.weight_quantizer._amax")
    assert back.kind == MOE_FANOUT and back.megatron == "decoder.layers.5.mlp.experts.linear_fc2.weight_quantizer._amax"
    assert rules.to_hf("decoder.layers.5.mlp.experts.linear_fc2.weight_quantizer.6._amax").hf == \
        ("model.layers.5.mlp.experts.6.down_proj.weight_quantizer._amax",)  # export still maps both


def test_fused_experts_mappings_derive_amax_moe_fanout_and_fan_in_rules(tmp_path):
    path = tmp_path / "fused.yaml"
    path.write_text(textwrap.dedent("""\
        name: fused
        params: {num_experts: 4}
        mappings:
          - {megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight,
             hf: model.layers.*.mlp.experts.gate_up_proj, fused_experts: per-expert, priority: 1,
             kind: gated_mlp, hf_parts: [gate, up], parallel: column}
          - {megatron: decoder.layers.*.mlp.experts.linear_fc1.weight*, hf: model.layers.*.mlp.experts.gate_up_proj,
             fused_experts: per-expert, kind: gated_mlp, hf_parts: [gate, up], parallel: column}
          - {megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight,
             hf: model.layers.*.mlp.experts.down_proj, fused_experts: shared, priority: 1}
          - {megatron: decoder.layers.*.mlp.experts.linear_fc2.weight*, hf: model.layers.*.mlp.experts.down_proj,
             fused_experts: shared}
        """))
    rules = by_megatron(quantmap.compile(str(path)))
    head = "decoder.layers.*.mlp.experts."
    kinds = {text[len(head):]: (rule.kind, rule.expert_capture, [p.text.split("experts.")[1] for p in rule.hf])
             for text, rule in rules.items() if text.startswith(head) and "_pre_quant_scale" not in text}
    assert kinds == {
        "local_experts.*.linear_fc1.weight": ("weight", 1, ["gate_up_proj"]),
        "local_experts.*.linear_fc1.weight_quantizer._amax": ("amax", None, ["gate_up_proj_weight_quantizers.*._amax"]),
        "local_experts.*.linear_fc1.input_quantizer._amax": ("fan_in", 1, ["gate_up_proj_input_quantizer._amax"]),
        "linear_fc1.weight*": ("weight", 1, ["gate_up_proj"]),
        "linear_fc1.weight_quantizer._amax": ("moe_fanout", 1, ["gate_up_proj_weight_quantizers.*._amax"]),
        "linear_fc1.weight_quantizer.*._amax": ("amax", None, ["gate_up_proj_weight_quantizers.*._amax"]),
        "linear_fc1.input_quantizer._amax": ("fan_in", None, ["gate_up_proj_input_quantizer._amax"]),
        # shared (gpt-oss): one weight quantizer for every expert, so every form fans in
        "local_experts.*.linear_fc2.weight": ("weight", 1, ["down_proj"]),
        "local_experts.*.linear_fc2.weight_quantizer._amax": ("fan_in", 1, ["down_proj_weight_quantizer._amax"]),
        "local_experts.*.linear_fc2.input_quantizer._amax": ("fan_in", 1, ["down_proj_input_quantizer._amax"]),
        "linear_fc2.weight*": ("weight", 1, ["down_proj"]),
        "linear_fc2.weight_quantizer._amax": ("fan_in", None, ["down_proj_weight_quantizer._amax"]),
        "linear_fc2.weight_quantizer.*._amax": ("fan_in", 1, ["down_proj_weight_quantizer._amax"]),
        "linear_fc2.input_quantizer._amax": ("fan_in", None, ["down_proj_input_quantizer._amax"]),
        # W4A8's sequential weight quantizer: each stage as its expert's quantizer, the stage last on both sides
        # (a grouped block's shared form has no stages: its staged name is the per-expert form's)
        "local_experts.*.linear_fc1.weight_quantizer.*._amax": ("amax", None,
                                                               ["gate_up_proj_weight_quantizers.*.*._amax"]),
        "linear_fc1.weight_quantizer.*.*._amax": ("amax", None, ["gate_up_proj_weight_quantizers.*.*._amax"]),
        "local_experts.*.linear_fc2.weight_quantizer.*._amax": ("fan_in", 1, ["down_proj_weight_quantizer.*._amax"]),
        "linear_fc2.weight_quantizer.*.*._amax": ("fan_in", 1, ["down_proj_weight_quantizer.*._amax"]),
    }
    assert all(rule.num_experts == 4 for rule in rules.values() if rule.kind in ("fan_in", "moe_fanout"))
    # A per-expert weight quantizer lies like its weight's rows ([gate; up] per TP shard); many experts'
    # quantizers meeting in one tensor have no per-element layout.
    per_expert = rules[head + "local_experts.*.linear_fc1.weight_quantizer._amax"].layout
    assert per_expert.tp.groups == 2 and per_expert.ops is not None and per_expert.reason is None
    assert rules[head + "linear_fc1.weight_quantizer.*._amax"].layout == per_expert
    fan_in = rules[head + "local_experts.*.linear_fc1.input_quantizer._amax"].layout
    assert fan_in.ops is None and "only per-tensor amax combines" in fan_in.reason
    # The weight of a fused-experts tensor: the experts stacked on dim 0, each expert's rows cut on dim 1.
    gate_up = rules[head + "local_experts.*.linear_fc1.weight"].layout
    assert [op.to_json() for op in gate_up.ops] == [
        {"op": "stack", "dim": 0, "count": 4}, {"op": "split", "dim": 1, "units": [1, 1], "groups": 1, "multiple": 1},
        {"op": "concat", "dim": 1, "units": [1, 1], "groups": 1, "multiple": 1}]
    assert [op.to_json() for op in rules[head + "linear_fc2.weight*"].layout.ops] == [
        {"op": "stack", "dim": 0, "count": 4}]


def test_output_layer_quantizers_map_to_lm_head_and_norms_embeddings_routers_have_none():
    for spec in shipped_specs():
        rules = quantmap.compile(spec, **{"num_layers": 3} if spec in ("deepseek_v3", "glm4_moe") else {})
        for buffer in ("weight_quantizer._amax", "input_quantizer._amax"):
            if spec in ("gemma2", "gemma3", "ernie4_5_moe"):  # tied embeddings: no head on either side
                assert rules.to_megatron(f"lm_head.{buffer}") is None, spec
                continue
            head = rules.to_megatron(f"lm_head.{buffer}").megatron  # a VLM's sits under language_model.
            assert head.endswith(f"output_layer.{buffer}") and head.split("output_layer.")[0] in ("", "language_model."), spec
            assert rules.to_hf(head).hf == (f"lm_head.{buffer}",), spec
        for rule in rules:
            if rule.buffer is not None and rule.origin.derived != "kv_cache":
                assert not re.search(r"(norm|embedding|router)", rule.origin.mapping), (spec, rule.megatron.text)


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
