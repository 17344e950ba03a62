"""The two-way index: laws over generated specs, and the cases its fast path must not get wrong."""

import re
import textwrap

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantmap
from quantmap.rules import MOE_FANOUT

SEGMENT = st.sampled_from(["a", "b", "blk", "x1", "*", "*", "**"])


@st.composite
def specs(draw):
    """A random valid spec: distinct roots per mapping, random wildcards, fused groups, grouped MoE,
    fused-experts HF tensors (fan-in rules), some mappings for one HF naming only."""
    mappings = []
    for index in range(draw(st.integers(1, 5))):
        middle = draw(st.lists(SEGMENT, min_size=0, max_size=4))
        if "**" in middle and middle.count("**") > 1:
            middle = [s for s in middle if s != "**"] + ["**"]
        body = ".".join(middle)
        body = f".{body}" if body else ""
        grouped = draw(st.booleans()) and draw(st.booleans())
        fused = draw(st.sampled_from([None, None, "per-expert", "shared"]))
        parts = [""] if fused else draw(st.sampled_from([[""], ["q", "k", "v"], ["gate", "up"]]))
        if fused and not grouped:
            megatron = f"m{index}{body}.local_experts.*.lin.weight"  # SequentialMLP: the expert is the last capture
        else:
            megatron = f"m{index}{body}.lin.weight" + ("*" if grouped else "")
        expert = ".e.*" if grouped and not fused else ""

        def hf(part):
            return f"h{index}{body}.experts.p_proj" if fused else f"h{index}{body}{expert}.{part or 'p'}_proj.weight"

        mapping = {"megatron": megatron, "hf": hf("") if parts == [""] else {p: hf(p) for p in parts}}
        if fused:
            mapping["fused_experts"] = fused
        naming = draw(st.sampled_from([None, None, "on-disk", "in-memory"]))
        if naming:
            mapping["hf_naming"] = naming
        mappings.append(mapping)
    return {"name": "generated", "params": {"num_experts": 4}, "kv_cache": False, "mappings": mappings}


def fill_values(data, pattern):
    return [data.draw(st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,3}){0,2}", fullmatch=True)) if c.kind == "any"
            else str(data.draw(st.integers(0, 300))) for c in pattern.captures]


def forward_targets(rules, megatron: str) -> list[str]:
    match = rules.to_hf(megatron)
    return list(match.expert_names(range(match.rule.num_experts)) if match.kind == MOE_FANOUT else match.hf)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs(), st.data())
def test_forward_then_reverse_is_the_identity_on_every_target(tmp_path_factory, spec, data):
    """Every target of a name reverses to that name, unless another rule claims the target (the forward-only
    shared grouped weight quantizer under its per-expert form, an expert layout under SequentialMLP); then the
    winner's name maps forward onto the same target. A fan-in target reverses to every source, ``*``."""
    path = tmp_path_factory.mktemp("spec") / "generated.yaml"
    path.write_text(yaml.safe_dump(spec))
    for naming in ("on-disk", "in-memory"):
        rules = quantmap.compile(str(path), hf_naming=naming)
        assert all(m.get("hf_naming") in (None, naming) for m in spec["mappings"]
                   if any(r.origin.mapping == m["megatron"] for r in rules))
        for rule in rules:
            name = rule.megatron.fill(fill_values(data, rule.megatron))
            match = rules.to_hf(name)
            assert match is not None and match.rule is rule and match.megatron == name
            if rule.kind == MOE_FANOUT:
                expected = [(part, expert) for expert in range(rule.num_experts) for part in rule.parts]
            else:
                expected = [(part, None) for part in rule.parts]
            targets = forward_targets(rules, name)
            assert len(targets) == len(expected)
            for target, (part, expert) in zip(targets, expected):
                back = rules.to_megatron(target)
                if back.rule.fans_in:  # the expert stays '*': take the one this name is
                    assert "*" in back.megatron and back.expert is None
                    concrete = back.source_names([match.expert if rule.fans_in else 0])[0]
                else:
                    concrete = back.megatron
                if back.rule is rule:
                    assert concrete == name, (target, back)
                    assert (back.part or "", back.expert) == (part, expert)
                else:  # a forward-only rule, or one that a higher-priority mapping wins
                    assert not rule.reversible or back.rule.priority > rule.priority, (rule, back.rule)
                assert target in forward_targets(rules, concrete)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_resolve_then_match_gives_back_the_captures(tmp_path_factory, data):
    rules = quantmap.compile("llama")
    for rule in rules:
        values = fill_values(data, rule.megatron)
        match = rules.to_hf(rule.megatron.fill(values))
        assert match.captures == tuple(values)
        for pattern, name in zip(rule.hf, match.hf):
            assert pattern.match(name) == tuple(values)


def test_names_no_rule_claims_resolve_to_none():
    rules = quantmap.compile("llama")
    for name in ["decoder.layers.x.mlp.linear_fc2.weight", "decoder.layers.1.mlp.linear_fc2.weight\n",
                 "decoder.layers.1.mlp.linear_fc2", "decoder.layers.١.mlp.linear_fc2.weight", ""]:
        assert rules.to_hf(name) is None, name


def test_weight_names_resolve_too_and_every_fanout_target_reverses():
    rules = quantmap.compile("llama")
    match = rules.to_hf("decoder.layers.7.self_attention.linear_qkv.weight")
    assert match.kind == "weight" and len(match.hf) == 3
    for part, name in zip("qkv", match.hf):
        back = rules.to_megatron(name)
        assert (back.megatron, back.part) == ("decoder.layers.7.self_attention.linear_qkv.weight", part)


def test_canonical_name_wins_reverse_lookup_for_a_shared_hf_norm():
    rules = quantmap.compile("llama")
    assert rules.to_hf("decoder.layers.2.input_layernorm.weight").hf == ("model.layers.2.input_layernorm.weight",)
    assert rules.to_megatron("model.layers.2.input_layernorm.weight").megatron == \
        "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"


def test_a_higher_priority_double_star_rule_shadows_a_fast_path_hit(tmp_path):
    path = tmp_path / "shadow.yaml"
    path.write_text(textwrap.dedent("""\
        name: shadow
        mappings:
          - {megatron: decoder.layers.*.mlp.fc.weight, hf: model.layers.*.mlp.fc.weight, quantizers: []}
          - {megatron: decoder.layers.**.fc.weight, hf: special.**.fc.weight, quantizers: [], priority: 5}
        """))
    rules = quantmap.compile(str(path))
    assert rules.to_hf("decoder.layers.3.mlp.fc.weight").hf == ("special.3.mlp.fc.weight",)


def test_offset_captures_pick_the_mtp_rule_only_past_the_decoder_layers(tmp_path):
    path = tmp_path / "mtp.yaml"
    path.write_text(textwrap.dedent("""\
        name: mtp
        params: {num_layers: null}
        mappings:
          - {megatron: decoder.layers.*.self_attention.linear_proj.weight, hf: model.layers.*.self_attn.o_proj.weight}
          - megatron: mtp.layers.*.mtp_model_layer.self_attention.linear_proj.weight
            hf: model.layers.{num_layers + i}.self_attn.o_proj.weight
            priority: 1
        """))
    rules = quantmap.compile(str(path), num_layers=61)
    assert rules.to_megatron("model.layers.61.self_attn.o_proj.weight_quantizer._amax").megatron == \
        "mtp.layers.0.mtp_model_layer.self_attention.linear_proj.weight_quantizer._amax"
    assert rules.to_megatron("model.layers.60.self_attn.o_proj.weight_quantizer._amax").megatron == \
        "decoder.layers.60.self_attention.linear_proj.weight_quantizer._amax"
    assert rules.to_hf("mtp.layers.1.mtp_model_layer.self_attention.linear_proj.weight").hf == (
        "model.layers.62.self_attn.o_proj.weight",)


def _index_spans(name: str) -> list[tuple[int, int]]:
    """Where the whole-segment indexes of a name lie (``layers.12.``)."""
    return [found.span(1) for found in re.finditer(r"\.([0-9]+)(?![^.])", name)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs(), st.data())
def test_a_template_is_the_match_of_every_name_with_another_index_there(tmp_path_factory, spec, data):
    """``to_hf_template(name, span)``, where it is given, is exactly what ``to_hf`` finds for every name
    that differs from ``name`` only in the index at ``span``: the same rule, its ``*`` filled in."""
    path = tmp_path_factory.mktemp("spec") / "generated.yaml"
    path.write_text(yaml.safe_dump(spec))
    for naming in ("on-disk", "in-memory"):
        rules = quantmap.compile(str(path), hf_naming=naming)
        for rule in rules:
            name = rule.megatron.fill(fill_values(data, rule.megatron))
            for start, end in _index_spans(name):
                template = rules.to_hf_template(name, (start, end))
                if template is None:
                    continue
                assert template.megatron == f"{name[:start]}*{name[end:]}"
                index = str(data.draw(st.integers(0, 10**6)))
                match = rules.to_hf(f"{name[:start]}{index}{name[end:]}")
                assert (match.rule, match.kind) == (template.rule, template.kind)
                assert match.megatron == template.megatron.replace("*", index)
                if match.kind != MOE_FANOUT:  # its own '*' is the block's experts
                    assert match.hf == tuple(hf.replace("*", index) for hf in template.hf)


def test_a_template_is_refused_where_another_rule_or_an_offset_could_change_the_match(tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text(textwrap.dedent("""\
        name: templates
        params: {shift: 100}
        mappings:
          - {megatron: a.*.b.*.w, hf: x.*.y.*.w}
          - {megatron: a.*.b.3.w, hf: special.*.w, priority: 1}
          - {megatron: c.*.d.*.w, hf: "x.{shift + i}.z.*.w"}
        """))
    rules = quantmap.compile(str(path))
    # a.N.b.3 belongs to another rule: no template for names of that shape (the proof is per key)
    assert [rules.to_hf_template("a.5.b.7.w", span) for span in [(2, 3), (6, 7)]] == [None, None]
    assert rules.to_hf_template("c.5.d.7.w", (2, 3)) is None  # shifted on its way to HF
    assert rules.to_hf_template("c.5.d.7.w", (6, 7)).hf == ("x.105.z.*.w",)
    assert rules.to_hf_template("c.5.d.7.w", (5, 7)) is None  # not an index's characters
