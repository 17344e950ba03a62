"""Bad specs: each problem is a clear error naming file:line:col and saying what to change."""

import textwrap

import pytest

import quantmap
from quantmap.diagnostics import SpecError
from quantmap.limits import MAX_SPEC_BYTES

GOOD_MAPPING = "  - {megatron: decoder.layers.*.mlp.linear_fc2.weight, hf: model.layers.*.mlp.down_proj.weight}\n"


def write(tmp_path, text, name="spec.yaml", mode="w"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def errors(path, **params):
    with pytest.raises(SpecError) as raised:
        quantmap.compile(str(path), **params)
    return raised.value.diagnostics


def only(path, **params):
    found = errors(path, **params)
    assert len(found) == 1, found
    return found[0]


def test_yaml_syntax_error_points_at_the_line(tmp_path):
    path = write(tmp_path, "name: x\nmappings:\n  - {megatron: a.weight, hf: b.weight\n")
    error = only(path)
    assert error.code == "QM001"
    assert error.location.file.endswith("spec.yaml") and error.location.line == 4
    assert "YAML syntax error" in error.message


def test_empty_file_is_an_error_with_what_a_spec_needs(tmp_path):
    error = only(write(tmp_path, "# only a comment\n"))
    assert (error.code, error.location.line) == ("QM003", 1)
    assert "'name' and 'mappings'" in error.hint


def test_non_utf8_bytes_name_the_byte_and_its_place(tmp_path):
    error = only(write(tmp_path, b"name: x\ndescription: caf\xe9\n"))
    assert error.code == "QM002"
    assert (error.location.line, error.location.column) == (2, 17)
    assert "0xe9" in error.message


def test_unknown_key_suggests_the_closest_field(tmp_path):
    path = write(tmp_path, "name: x\nmappings:\n  - megatron: a.weight\n    hf: b.weight\n    quantizer: []\n")
    error = only(path)
    assert error.code == "QM010"
    assert (error.location.line, error.location.column) == (5, 5)
    assert "did you mean 'quantizers'" in error.hint


def test_wrong_type_names_the_field_and_the_value(tmp_path):
    path = write(tmp_path, "name: x\nmappings:\n  - {megatron: a.weight, hf: b.weight, priority: high}\n")
    error = only(path)
    assert error.code == "QM011"
    assert "mappings.0.priority" in error.message and "'high'" in error.hint
    assert error.location.line == 3


def test_missing_required_field_points_at_the_mapping(tmp_path):
    error = only(write(tmp_path, "name: x\nmappings:\n  - {megatron: a.weight}\n"))
    assert error.code == "QM012"
    assert "'hf'" in error.message and error.location.line == 3


def test_all_schema_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path, "name: x\nbogus: 1\nmappings:\n  - {megatron: a.weight}\n")
    assert {e.code for e in errors(path)} == {"QM010", "QM012"}


def test_wildcard_count_mismatch(tmp_path):
    path = write(tmp_path, "name: x\nmappings:\n  - {megatron: decoder.layers.*.w.weight, hf: model.w.weight}\n")
    error = only(path)
    assert error.code == "QM021" and "has 0 wildcard(s)" in error.message
    assert error.location.line == 3


def test_wildcard_kind_mismatch(tmp_path):
    path = write(tmp_path, "name: x\nmappings:\n  - {megatron: a.*.weight, hf: b.**.weight}\n")
    assert only(path).code == "QM021"


def test_malformed_wildcard_points_at_the_character(tmp_path):
    path = write(tmp_path, "name: x\nmappings:\n  - megatron: decoder.layers.***.weight\n    hf: model.weight\n")
    error = only(path)
    assert error.code == "QM020"
    # the scalar starts at column 15; the bad segment 15 characters into it
    assert (error.location.line, error.location.column) == (3, 15 + 15)


def test_empty_fused_group(tmp_path):
    error = only(write(tmp_path, "name: x\nmappings:\n  - {megatron: a.weight, hf: {}}\n"))
    assert error.code == "QM022" and "empty fused group" in error.message


def test_duplicate_mapping_names_both_places(tmp_path):
    path = write(tmp_path, "name: x\nmappings:\n" + GOOD_MAPPING + GOOD_MAPPING)
    error = only(path)
    assert error.code == "QM030" and error.location.line == 4
    assert "spec.yaml:3" in error.message


def test_duplicate_yaml_key_is_an_error(tmp_path):
    error = only(write(tmp_path, "name: x\nname: y\nmappings: []\n"))
    assert error.code == "QM030" and error.location.line == 2


def test_ambiguous_overlap_without_priority_is_an_error(tmp_path):
    path = write(tmp_path, "name: x\nmappings:\n" + GOOD_MAPPING
                 + "  - {megatron: decoder.layers.**.weight, hf: model.layers.**.weight_alt, quantizers: []}\n")
    found = errors(path)
    assert {e.code for e in found} == {"QM031"}
    assert all("priority" in e.hint for e in found)


def test_overlap_with_a_priority_resolves_to_the_higher(tmp_path):
    path = write(tmp_path, "name: x\nmappings:\n" + GOOD_MAPPING
                 + "  - {megatron: decoder.layers.**.weight, hf: model.layers.**.weight_alt, quantizers: [],"
                   " priority: -1}\n")
    rules = quantmap.compile(str(path))
    assert rules.to_hf("decoder.layers.1.mlp.linear_fc2.weight").hf == ("model.layers.1.mlp.down_proj.weight",)
    assert rules.to_hf("decoder.layers.1.x.weight").hf == ("model.layers.1.x.weight_alt",)


def test_two_rules_with_one_hf_target(tmp_path):
    path = write(tmp_path, """\
        name: x
        mappings:
          - {megatron: decoder.layers.*.a.weight, hf: model.layers.*.norm.weight, quantizers: []}
          - {megatron: decoder.layers.*.b.weight, hf: model.layers.*.norm.weight, quantizers: []}
        """)
    error = only(path)
    assert error.code == "QM032" and "model.layers.*.norm.weight" in error.message


def test_grouped_moe_mapping_without_expert_wildcard(tmp_path):
    path = write(tmp_path, """\
        name: x
        params: {num_experts: 4}
        mappings:
          - {megatron: decoder.layers.*.mlp.experts.linear_fc1.weight*, hf: model.layers.*.mlp.experts.gate_up_proj.weight}
        """)
    error = only(path)
    assert error.code == "QM023" and "no expert wildcard" in error.message


def test_extends_of_a_missing_file(tmp_path):
    path = write(tmp_path, "name: x\nextends: ./nowhere.yaml\nmappings: []\n")
    error = only(path)
    assert error.code == "QM040" and error.location.line == 2


def test_extends_of_an_unknown_shipped_name_suggests_one(tmp_path):
    error = only(write(tmp_path, "name: x\nextends: lama\nmappings: []\n"))
    assert error.code == "QM040" and "did you mean 'llama'" in error.hint


def test_extends_cycle(tmp_path):
    write(tmp_path, "name: a\nextends: b.yaml\nmappings: []\n", "a.yaml")
    write(tmp_path, "name: b\nextends: a.yaml\nmappings: []\n", "b.yaml")
    error = only(tmp_path / "a.yaml")
    assert error.code == "QM041" and "a.yaml -> b.yaml -> a.yaml" in error.message


def test_yaml_aliases_are_rejected_before_they_can_expand(tmp_path):
    lines = ["name: x", "a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    found = errors(write(tmp_path, "\n".join(lines) + "\n"))
    assert {e.code for e in found} == {"QM005"}
    assert found[0].location.line == 2


def test_spec_over_the_size_limit(tmp_path):
    path = write(tmp_path, "name: x\n" + "# padding\n" * (MAX_SPEC_BYTES // 10 + 1))
    error = only(path)
    assert error.code == "QM004" and f"{MAX_SPEC_BYTES:,}" in error.message


def test_missing_run_time_parameter_says_how_to_give_it(tmp_path):
    path = write(tmp_path, """\
        name: x
        params: {num_layers: null}
        mappings:
          - {megatron: mtp.layers.*.eh_proj.weight, hf: 'model.layers.{num_layers + i}.eh_proj.weight'}
        """)
    error = only(path)
    assert error.code == "QM050" and "--param num_layers=N" in error.hint
    assert quantmap.compile(str(path), num_layers=4).to_hf("mtp.layers.0.eh_proj.weight").hf == (
        "model.layers.4.eh_proj.weight",)


def test_unknown_run_time_parameter_suggests_the_declared_one(tmp_path):
    path = write(tmp_path, "name: x\nparams: {num_layers: null}\nmappings: []\n")
    error = only(path, num_layer=3)
    assert error.code == "QM050" and "did you mean 'num_layers'" in error.hint


def test_errors_render_as_file_line_col_lines(tmp_path):
    line = "  - {megatron: a.weight, hf: b.weight, quantizer: []}"
    path = write(tmp_path, f"name: x\nmappings:\n{line}\n")
    column = line.index("quantizer") + 1
    assert str(only(path)).startswith(f"{path}:3:{column}: error QM010: unknown key 'quantizer'")


def test_fused_experts_mapping_whose_hf_side_keeps_the_expert_wildcard(tmp_path):
    path = write(tmp_path, """\
        name: x
        mappings:
          - {megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight,
             hf: model.layers.*.mlp.experts.*.down_proj, fused_experts: per-expert}
        """)
    error = only(path)
    assert error.code == "QM026" and "model.layers.*.mlp.experts.*.down_proj" in error.message
    assert "but the last (the expert" in error.message and "hf: model.layers.*.mlp.experts.gate_up_proj" in error.hint
    assert (error.location.line, error.location.column) == (4, 65)  # at fused_experts' value


def test_fused_experts_mapping_onto_a_group_or_without_an_expert_is_an_error(tmp_path):
    path = write(tmp_path, """\
        name: x
        mappings:
          - megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight
            hf: {gate: model.layers.*.mlp.experts.gate_proj, up: model.layers.*.mlp.experts.up_proj}
            fused_experts: shared
          - {megatron: decoder.layers.*.mlp.linear_fc2.weight, hf: model.layers.mlp.down_proj, fused_experts: shared}
        """)
    found = errors(path)
    assert [e.code for e in found] == ["QM026", "QM026"]
    assert "its HF side is a group" in found[0].message
    assert "does not end in the expert index" in found[1].message


def test_hf_naming_is_validated_by_the_schema_and_by_compile(tmp_path):
    path = write(tmp_path, "name: x\nmappings:\n  - {megatron: a.weight, hf: b.weight, hf_naming: on_disk}\n")
    error = only(path)
    assert error.code == "QM011" and "hf_naming" in error.message
    with pytest.raises(ValueError, match="hf_naming must be 'on-disk' or 'in-memory', not 'disk'"):
        quantmap.compile("llama", hf_naming="disk")


def test_one_weight_may_map_once_per_hf_naming_but_not_twice_in_one(tmp_path):
    moe = "  - {megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight, "
    on_disk = moe + "hf: model.layers.*.mlp.experts.*.down_proj.weight, hf_naming: on-disk}\n"
    in_memory = moe + "hf: model.layers.*.mlp.experts.down_proj, fused_experts: per-expert, hf_naming: in-memory}\n"
    both = moe + "hf: model.layers.*.mlp.experts.*.down_proj.weight}\n"
    rules = quantmap.compile(str(write(tmp_path, "name: x\nmappings:\n" + on_disk + in_memory)), "in-memory")
    assert rules.to_hf("decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight_quantizer._amax").hf == \
        ("model.layers.0.mlp.experts.down_proj_weight_quantizers.3._amax",)
    # The same naming twice clashes with its first; a mapping for both namings with the first of either.
    for second, first_line in ((on_disk, 4), (both, 3)):
        error = only(write(tmp_path, "name: x\nmappings:\n" + in_memory + on_disk + second, name="twice.yaml"))
        assert error.code == "QM030" and error.location.line == 5 and f"twice.yaml:{first_line}:" in error.message


def test_the_documented_bias_mappings_compile_as_the_docs_say(tmp_path):
    """docs/authoring.md's linear_fc1.bias examples: a bias derives no quantizer rule (``quantizers: []``
    changes nothing), and a fused module's bias mapped 1:1 needs its kind (QM025)."""
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parent.parent / "docs" / "authoring.md").read_text()
    block = text.split("**Biases** need nothing")[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    gated, plain = block.split("   # or,")
    for mapping in (gated, "   # or," + plain):
        path = write(tmp_path, "name: biased\nextends: llama\nmappings:\n" + textwrap.dedent(mapping))
        rules = [r for r in quantmap.compile(str(path)) if r.megatron.text.endswith("linear_fc1.bias")]
        assert [r.kind for r in rules] == ["weight"], rules
        spec = yaml.safe_load(path.read_text())
        spec["mappings"][0]["quantizers"] = []
        with_empty = write(tmp_path, yaml.safe_dump(spec), name="empty.yaml")
        assert [r.kind for r in quantmap.compile(str(with_empty)) if r.megatron.text.endswith("linear_fc1.bias")] \
            == ["weight"]
    path.write_text(path.read_text().replace(" kind: plain,", ""))
    error = only(path)
    assert error.code == "QM025" and "linear_fc1.bias" in error.message
