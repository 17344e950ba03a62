"""Spec side of shaped quantizer state: fused HF tensors (hf_parts), the layouts the compiler
derives and prints, parameters from a Hugging Face config.json, and mappings refused for guessing."""

from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner

import quantmap
from quantmap.cli import app
from quantmap.diagnostics import SpecError

QKV = "decoder.layers.*.self_attention.linear_qkv.weight"


def _spec(tmp_path, mapping: str):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: t
        params: {{num_attention_heads: 4, num_query_groups: 2}}
        mappings:
          - {mapping}
        """))
    return path


def _only_error(path) -> object:
    with pytest.raises(SpecError) as raised:
        quantmap.compile(path)
    (error,) = raised.value.diagnostics
    return error


@pytest.mark.parametrize("mapping, says", [
    (f"{{megatron: {QKV}, hf: {{q: a.*.q.weight, k: a.*.k.weight, v: a.*.v.weight}}, hf_parts: [q, k, v]}}",
     "'hf' is a group"),
    (f"{{megatron: {QKV}, hf: a.*.qkv.weight, hf_parts: [q, k, v]}}", "needs 'kind: qkv'"),
    (f"{{megatron: {QKV}, hf: a.*.qkv.weight, kind: qkv, hf_parts: [q, k, k]}}", "each of ['q', 'k', 'v'] once"),
])
def test_hf_parts_that_do_not_fit_the_mapping_are_qm024_at_their_line(tmp_path, mapping, says):
    error = _only_error(_spec(tmp_path, mapping))
    assert error.code == "QM024" and says in error.message and error.location.line == 4
    assert "hf_parts: [q, k, v]" in error.hint


@pytest.mark.parametrize("module", ["self_attention.linear_qkv", "mlp.linear_fc1"])
def test_a_fused_megatron_tensor_mapped_one_to_one_without_a_kind_is_refused(tmp_path, module):
    error = _only_error(_spec(tmp_path, f"{{megatron: decoder.layers.*.{module}.weight, hf: a.*.fused.weight}}"))
    assert error.code == "QM025" and "kind: plain" in error.hint
    explicit = _spec(tmp_path, f"{{megatron: decoder.layers.*.{module}.weight, hf: a.*.fused.weight, kind: plain}}")
    assert quantmap.compile(explicit).to_hf(f"decoder.layers.0.{module}.weight").hf == ("a.0.fused.weight",)


def test_hf_parts_in_another_order_reorders_the_parts(tmp_path):
    path = _spec(tmp_path, f"{{megatron: {QKV}, hf: a.*.kvq.weight, kind: qkv, hf_parts: [k, v, q], parallel: column}}")
    rule = quantmap.compile(path).to_hf("decoder.layers.0.self_attention.linear_qkv.weight_quantizer._amax").rule
    assert [op.to_json()["op"] for op in rule.layout.ops] == ["split", "select", "concat"]
    assert rule.layout.ops[2].units == (2, 2, 4)


def test_compile_json_shows_each_rules_layout_and_why_one_is_unknown():
    result = CliRunner().invoke(app, ["compile", "llama", "--format", "json", "-p", "num_attention_heads=8",
                                      "-p", "num_query_groups=2"])
    rules = {(r["megatron"], r["kind"]): r["layout"] for r in json.loads(result.stdout)}
    qkv = rules[("decoder.layers.*.self_attention.linear_qkv.weight_quantizer._amax", "fanout")]
    assert qkv["tp"] == {"mode": "split", "dim": 0, "groups": 1}
    assert qkv["ops"] == [{"op": "split", "dim": 0, "units": [4, 1, 1], "groups": 2, "multiple": 1}]
    fc1 = rules[("decoder.layers.*.mlp.linear_fc1.weight_quantizer._amax", "fanout")]
    assert fc1["tp"]["groups"] == 2, "each rank holds [gate_r; up_r]"
    unknown = rules[("decoder.layers.*.self_attention.core_attention.k_bmm_quantizer._amax", "amax")]
    assert unknown["ops"] is None and "per-tensor" in unknown["reason"]


def test_without_head_counts_the_qkv_layout_says_which_parameters_it_needs():
    rule = quantmap.compile("llama").to_hf("decoder.layers.0.self_attention.linear_qkv.weight_quantizer._amax").rule
    assert rule.layout.ops is None and "num_attention_heads and num_query_groups" in rule.layout.reason


def _config(tmp_path, **values):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **values}))
    return path


def test_config_json_gives_the_parameters_the_spec_declares_and_param_wins(tmp_path):
    config = _config(tmp_path, num_hidden_layers=61, hidden_size=7168, num_attention_heads=64, num_key_value_heads=8,
                     n_routed_experts=256)
    rules = quantmap.compile("llama", config=config, num_query_groups=4)
    assert rules.params["num_attention_heads"] == 64 and rules.params["num_query_groups"] == 4
    assert rules.params["hidden_size"] == 7168 and rules.params["head_dim"] == 112
    assert "num_experts" not in rules.params, "llama declares no num_experts: the config's is ignored"
    moe = quantmap.compile("deepseek_v3", config=config)
    assert moe.params["num_layers"] == 61 and moe.params["num_experts"] == 256


def test_config_of_a_vision_language_model_is_read_from_its_text_config(tmp_path):
    config = _config(tmp_path, text_config={"num_attention_heads": 8, "hidden_size": 64}, hidden_size=1)
    params = quantmap.compile("llama", config=config).params
    assert params["hidden_size"] == 64 and params["num_query_groups"] == 8 and params["head_dim"] == 8


def test_every_spec_command_takes_config(tmp_path):
    config = _config(tmp_path, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    name = "decoder.layers.0.self_attention.linear_qkv.weight_quantizer._amax"
    for args in (["compile", "llama"], ["validate", "llama"], ["lookup", "llama", name],
                 ["check", "llama", "--megatron", str(_names(tmp_path, name))]):
        result = CliRunner().invoke(app, [*args, "--config", str(config)])
        assert result.exit_code == 0, (args, result.output)
    for verb in ("export", "import"):
        assert "--config" in CliRunner().invoke(app, [verb, "--help"]).output


def _names(tmp_path, name):
    path = tmp_path / "names.txt"
    path.write_text(name + "\n")
    return path


def test_an_unreadable_config_is_an_input_error_naming_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(app, ["compile", "llama", "--config", str(bad)])
    assert result.exit_code == 1 and "error: --config: " in result.output and "config.json is not a JSON config" in result.output


FC1 = "decoder.layers.*.mlp.experts.local_experts.*.linear_fc1"


@pytest.mark.parametrize("mapping, says", [
    (f"{{megatron: {FC1}.weight, hf: a.*.gate_up, fused_experts: shared, kind: gated_mlp, hf_parts: [gate, up], "
     f"hf_layout: [transposed, transposed]}}", "lists 'transposed' twice"),
    (f"{{megatron: {FC1}.weight, hf: a.*.gate_up, fused_experts: shared, kind: fused, hf_layout: [interleaved]}}",
     "needs 'kind: gated_mlp' and 'hf_parts' (got kind 'fused', no hf_parts)"),
    (f"{{megatron: {FC1}.bias, hf: a.*.gate_up_bias, fused_experts: shared, kind: gated_mlp, hf_parts: [gate, up], "
     f"hf_layout: [interleaved, transposed]}}", "is not a weight"),
    ("{megatron: decoder.layers.*.mlp.linear_fc2.weight, hf: model.layers.*.mlp.down_proj.weight, parallel: row, "
     "hf_layout: [zero_centered]}", "may carry quantizers, as a linear does"),
])
def test_an_hf_layout_that_does_not_fit_the_mapping_is_qm028_at_its_line(tmp_path, mapping, says):
    error = _only_error(_spec(tmp_path, mapping))
    assert error.code == "QM028" and says in error.message and error.location.line == 4, error


def test_an_unknown_hf_layout_entry_is_a_schema_error_naming_the_allowed_ones(tmp_path):
    error = _only_error(_spec(tmp_path, f"{{megatron: {FC1}.weight, hf: a.*.gate_up, fused_experts: shared, "
                                        f"kind: plain, hf_layout: [swapped]}}"))
    assert error.code == "QM011" and "hf_layout.0" in error.message and "'interleaved', 'transposed' or 'zero_centered'" in error.message
    assert error.location.line == 4 and "swapped" in error.hint


def test_compile_json_shows_the_gpt_oss_expert_stack_interleave_and_transpose():
    result = CliRunner().invoke(app, ["compile", "gpt_oss", "--format", "json", "-p", "num_experts=32"])
    rules = {r["megatron"]: r["layout"] for r in json.loads(result.stdout) if r["kind"] == "weight"}
    gate_up = rules[f"{FC1}.weight"]
    assert gate_up["tp"] == {"mode": "split", "dim": 0, "groups": 2}, "each ETP rank holds [gate_r; up_r]"
    assert gate_up["ops"] == [{"op": "stack", "dim": 0, "count": 32},
                              {"op": "split", "dim": 1, "units": [1, 1], "groups": 1, "multiple": 1},
                              {"op": "concat", "dim": 1, "units": [1, 1], "groups": 0, "multiple": 1},
                              {"op": "transpose", "dims": [1, 2]}]
    assert rules["decoder.layers.*.mlp.experts.linear_fc1.weight*"] == gate_up
    assert [op["op"] for op in rules[f"{FC1}.bias"]["ops"]] == ["stack", "split", "concat"]
    assert [op["op"] for op in rules["decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight"]["ops"]] == \
        ["stack", "transpose"]
    assert rules["decoder.layers.*.mlp.experts.linear_fc2.bias*"] == {
        "tp": {"mode": "replicated"}, "ops": [{"op": "stack", "dim": 0, "count": 32}], "reason": None}


def test_without_the_expert_count_a_fused_experts_weight_layout_says_what_it_needs():
    rule = quantmap.compile("gpt_oss").to_hf("decoder.layers.0.mlp.experts.linear_fc2.bias3").rule
    assert rule.layout.ops is None and "--param num_experts=N" in rule.layout.reason


def test_a_shaped_quantizer_of_a_transposed_or_interleaved_hf_tensor_is_refused_with_the_reason(tmp_path):
    """ModelOpt's per-channel axis on an [in, out] or interleaved tensor is not known: no guess."""
    path = _spec(tmp_path, f"{{megatron: {FC1}.weight, hf: a.*.gate_up, fused_experts: per-expert, kind: gated_mlp, "
                           f"hf_parts: [gate, up], hf_layout: [interleaved, transposed], parallel: column}}")
    rules = quantmap.compile(path)
    weight_amax = rules.to_hf("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight_quantizer._amax")
    assert weight_amax.hf == ("a.0.gate_up_weight_quantizers.1._amax",)
    layout = weight_amax.rule.layout
    assert layout.ops is None and "declared interleaved and transposed" in layout.reason
    assert layout.tp is not None, "the TP split is still known; only the HF side is not"
