"""The spec language's reuse features: blocks and 'use', alternatives '{a|b}', 'drop', exclusions taken as
written, shipped bases by name. Each on real YAML in tmp dirs, with the laws as property tests."""

import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_spec_errors import errors as diagnostics
from test_spec_errors import write

import quantmap
from quantmap.check import check
from quantmap.index import Index
from quantmap.patterns import PatternError, intersects, parse
from quantmap.spec import load_spec

settings.register_profile("spec_language", suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)

BLOCK_SPEC = """\
    name: blocky
    params: {num_layers: null}
    blocks:
      layer:
        - {megatron: self_attention.linear_proj.weight, hf: self_attn.o_proj.weight, parallel: row}
        - {megatron: input_layernorm.weight, hf: input_layernorm.weight, quantizers: []}
      mlp:
        - {megatron: mlp.linear_fc2.weight, hf: mlp.down_proj.weight, parallel: row}
    use:
      - {block: [layer, mlp], prefix: {megatron: decoder.layers.*., hf: model.layers.*.}}
      - block: layer
        prefix: {megatron: "mtp.layers.{i}.{mtp_model_layer|transformer_layer}.", hf: "model.layers.{num_layers + i}."}
        priority: 10
    """


# --- blocks -------------------------------------------------------------------------------------------


def test_a_block_is_mapped_under_each_instance_prefix_with_its_priority_offset(tmp_path):
    rules = quantmap.compile(str(write(tmp_path, BLOCK_SPEC)), num_layers=4)
    weights = {r.megatron.text: r.priority for r in rules if r.kind == "weight"}
    assert weights == {
        "decoder.layers.*.self_attention.linear_proj.weight": 0, "decoder.layers.*.input_layernorm.weight": 0,
        "decoder.layers.*.mlp.linear_fc2.weight": 0,
        "mtp.layers.{i}.{mtp_model_layer|transformer_layer}.self_attention.linear_proj.weight": 10,
        "mtp.layers.{i}.{mtp_model_layer|transformer_layer}.input_layernorm.weight": 10,
    }
    # model.layers.4 is both decoder.layers.4 and the MTP layer 0: the instance's +10 decides.
    assert rules.to_megatron("model.layers.4.self_attn.o_proj.input_quantizer._amax").megatron == \
        "mtp.layers.0.mtp_model_layer.self_attention.linear_proj.input_quantizer._amax"
    assert rules.to_megatron("model.layers.3.self_attn.o_proj.weight").megatron == \
        "decoder.layers.3.self_attention.linear_proj.weight"


def test_a_block_alone_maps_nothing(tmp_path):
    path = write(tmp_path, BLOCK_SPEC.split("    use:")[0] + "    mappings:\n      - {megatron: a.weight, hf: b.weight}\n")
    assert [r.megatron.text for r in quantmap.compile(str(path), num_layers=1) if r.kind == "weight"] == ["a.weight"]


def test_errors_inside_a_block_point_at_the_block_mapping_written(tmp_path):
    text = BLOCK_SPEC.replace("hf: mlp.down_proj.weight", "hf: mlp.down_proj.wei*ght")
    error, = diagnostics(write(tmp_path, text), num_layers=2)
    assert error.code == "QM020"
    line = textwrap.dedent(text).splitlines().index("    - {megatron: mlp.linear_fc2.weight, hf: mlp.down_proj.wei*ght,"
                                                    " parallel: row}") + 1
    column = textwrap.dedent(text).splitlines()[line - 1].index("mlp.down_proj") + 1
    # the instance's prefix is not in the file at that place, so it is taken off the offset
    assert (error.location.line, error.location.column) == (line, column + len("mlp.down_proj.wei"))


def test_use_of_an_unknown_block_suggests_one(tmp_path):
    error, = diagnostics(write(tmp_path, BLOCK_SPEC.replace("[layer, mlp]", "[layer, mpl]")), num_layers=2)
    assert error.code == "QM043" and "'mpl'" in error.message and "'mlp'" in error.hint
    assert error.location.line == 10 and error.location.column == 21  # at "mpl"


def test_a_child_uses_the_blocks_of_the_spec_it_extends(tmp_path):
    write(tmp_path, BLOCK_SPEC, "base.yaml")
    child = write(tmp_path, """\
        name: child
        extends: base.yaml
        use:
          - {block: mlp, prefix: {megatron: extra.*., hf: model.extra.*.}}
        """)
    rules = quantmap.compile(str(child), num_layers=2)
    assert rules.to_hf("extra.3.mlp.linear_fc2.weight").hf == ("model.extra.3.mlp.down_proj.weight",)
    assert rules.to_hf("decoder.layers.1.mlp.linear_fc2.weight") is not None


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 90), layer=st.integers(0, 120), mtp=st.integers(0, 3),
       inner=st.sampled_from(["mtp_model_layer", "transformer_layer"]))
def test_a_block_instantiated_then_resolved_gives_back_its_captures(tmp_path_factory, layers, layer, mtp, inner):
    path = write(tmp_path_factory.mktemp("blocks"), BLOCK_SPEC)
    rules = quantmap.compile(str(path), num_layers=layers)
    name = f"decoder.layers.{layer}.self_attention.linear_proj.weight_quantizer._amax"
    found = rules.to_hf(name)
    assert found.captures == (str(layer),) and found.hf == (f"model.layers.{layer}.self_attn.o_proj.weight_quantizer._amax",)
    found = rules.to_hf(f"mtp.layers.{mtp}.{inner}.input_layernorm.weight")
    assert found.captures == (str(mtp),) and found.hf == (f"model.layers.{layers + mtp}.input_layernorm.weight",)
    back = rules.to_megatron(found.hf[0])
    assert back.captures == (str(mtp),) and back.megatron == f"mtp.layers.{mtp}.mtp_model_layer.input_layernorm.weight"


def test_deepseek_v3_writes_the_decoder_layer_once_and_maps_both_mtp_names():
    text = (quantmap.spec.library.SPEC_DIR / "deepseek_v3.yaml").read_text()
    assert text.count("linear_kv_down_proj.weight") == 1
    rules = quantmap.compile("deepseek_v3", num_layers=61, num_experts=4)
    for inner in ("mtp_model_layer", "transformer_layer"):
        name = f"mtp.layers.0.{inner}.mlp.experts.local_experts.3.linear_fc1.weight_quantizer._amax"
        assert rules.to_hf(name).hf == ("model.layers.61.mlp.experts.3.gate_proj.weight_quantizer._amax",
                                        "model.layers.61.mlp.experts.3.up_proj.weight_quantizer._amax")
    # the MTP layer is an MoE layer: no dense MLP under it
    assert rules.to_hf("mtp.layers.0.mtp_model_layer.mlp.linear_fc2.weight") is None
    assert rules.to_megatron("model.layers.61.self_attn.kv_a_layernorm.weight").megatron == \
        "mtp.layers.0.mtp_model_layer.self_attention.linear_kv_up_proj.layer_norm_weight"


INNER = "{mtp_model_layer|transformer_layer}"
# The prefixes of a decoder layer and of an MTP inner layer, (Megatron, HF), as the shipped specs write them.
DECODER_LAYER = (("decoder.layers.*.",), ("model.layers.*.",))
MTP_LAYER = ((f"mtp.layers.{{i}}.{INNER}.", f"mtp.layers.*.{INNER}."), ("model.layers.{num_layers + i}.", "mtp.layers.*."))


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe", "qwen3_5", "qwen3_5_moe", "qwen3_next"])
def test_an_mtp_inner_layer_is_the_decoders_blocks_used_again_not_a_copy(arch):
    """Every mapping of the MTP's inner layer comes from a block instance (written relative to the layer, once)
    and is one of the decoder layer's mappings under the other prefix; both Megatron names of the inner layer
    are read (Megatron-Core <= 0.16 names it transformer_layer)."""
    spec = load_spec(arch)

    def relative(m, prefixes):
        megatron, hf = prefixes
        inner = next((p for p in megatron if m.megatron.startswith(p)), None)
        return None if inner is None else (m.megatron[len(inner):], tuple(
            (part, next(name[len(p):] for p in hf if name.startswith(p))) for part, name in m.hf))

    decoder = {relative(m, DECODER_LAYER) for m in spec.mappings}
    inner = [m for m in spec.mappings if relative(m, MTP_LAYER)]
    assert len(inner) >= 8
    for m in inner:
        assert m.prefix_lengths[0] == len(m.megatron) - len(relative(m, MTP_LAYER)[0]), m.megatron  # from a block
        assert relative(m, MTP_LAYER) in decoder, m.megatron


# --- alternatives ---------------------------------------------------------------------------------------

WORD = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)


@st.composite
def patterns_with_alternatives(draw):
    segments = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["word", "star", "choice"]))
        if kind == "star":
            segments.append("*")
        elif kind == "choice":
            segments.append("{" + "|".join(draw(st.lists(WORD, min_size=2, max_size=3, unique=True))) + "}")
        else:
            segments.append(draw(WORD))
    return ".".join(segments)


@given(patterns_with_alternatives(), st.data())
def test_every_alternative_matches_and_fill_gives_the_canonical_one(text, data):
    pattern = parse(text)
    values = data.draw(st.tuples(*[st.integers(0, 999).map(str) for _ in pattern.captures]))
    variants = pattern.variants()
    assert variants[0].fill(values) == pattern.fill(values)  # the first alternative is canonical
    for variant in variants:
        name = variant.fill(values)
        assert pattern.match(name) == values  # fill then match gives back the captures
        assert variant.match(name) == values


def test_alternatives_are_whole_segments_of_distinct_words():
    pattern = parse("a.{x|y}.*.w")
    assert pattern.match("a.y.3.w") == ("3",) and pattern.match("a.z.3.w") is None
    assert pattern.fill(["3"]) == "a.x.3.w" and pattern.arity == 1
    with pytest.raises(PatternError, match="listed twice"):
        parse("a.{x|x}.w")
    with pytest.raises(PatternError, match="alternatives"):
        parse("a.pre{x|y}.w")


def test_intersects_sees_each_alternative():
    assert intersects(parse("a.{x|y}.*"), parse("a.y.*"))
    assert not intersects(parse("a.{x|y}.*"), parse("a.z.*"))
    assert intersects(parse("a.{x|y}.*"), parse("a.{z|x}.*"))


def test_every_alternative_resolves_in_one_probe_of_the_fast_index(tmp_path):
    path = write(tmp_path, """\
        name: alt
        mappings:
          - {megatron: "decoder.{layers|blocks}.*.linear_proj.weight", hf: "model.{layers|h}.*.o_proj.weight"}
        """)
    rules = quantmap.compile(str(path))
    index = Index(rules.rules)
    assert not index.forward.slow and not index.reverse.slow  # every variant has its own dict key
    assert len(index.forward.stages[0].table) == 2 * len(rules)
    for side in ("layers", "blocks"):
        assert rules.to_hf(f"decoder.{side}.7.linear_proj.weight").hf == ("model.layers.7.o_proj.weight",)
    assert rules.to_megatron("model.h.7.o_proj.weight").megatron == "decoder.layers.7.linear_proj.weight"


def test_two_mappings_sharing_an_alternative_conflict(tmp_path):
    path = write(tmp_path, """\
        name: alt
        mappings:
          - {megatron: "a.{x|y}.*.weight", hf: "p.*.weight", quantizers: []}
          - {megatron: "a.{z|y}.*.weight", hf: "q.*.weight", quantizers: []}
        """)
    assert {d.code for d in diagnostics(path)} == {"QM030"}
    path.write_text(path.read_text().replace('"q.*.weight", quantizers: []', '"q.*.weight", quantizers: [], priority: 1'))
    assert quantmap.compile(str(path)).to_hf("a.y.0.weight").hf == ("q.0.weight",)


# --- drop -----------------------------------------------------------------------------------------------


def test_drop_removes_inherited_mappings_and_their_derived_rules(tmp_path):
    path = write(tmp_path, """\
        name: nonorm
        extends: llama
        drop: [decoder.layers.*.input_layernorm.weight]
        """)
    rules = quantmap.compile(str(path))
    assert rules.to_hf("decoder.layers.0.input_layernorm.weight") is None
    assert rules.to_megatron("model.layers.0.input_layernorm.weight").megatron == \
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"


def test_a_drop_that_drops_nothing_is_an_error_with_the_closest_pattern(tmp_path):
    path = write(tmp_path, """\
        name: bad
        extends: llama
        drop: [decoder.layers.*.input_layernorm.weight, decoder.layers.*.input_layernorm.wieght]
        """)
    error, = diagnostics(path)
    assert error.code == "QM042" and "wieght" in error.message
    assert "decoder.layers.*.input_layernorm.weight" in error.hint
    assert (error.location.line, error.location.column) == (3, 49)  # the second item
    alone = write(tmp_path, "name: x\ndrop: [a.weight]\nmappings: [{megatron: a.weight, hf: b.weight}]\n", "alone.yaml")
    error, = diagnostics(alone)
    assert error.code == "QM042" and "extends" in error.hint


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_drop_then_extends_is_the_inherited_spec_minus_the_dropped_mappings(tmp_path_factory, data):
    parent = load_spec("deepseek_v3")
    patterns = [m.megatron for m in parent.mappings]
    dropped = data.draw(st.lists(st.sampled_from(patterns), unique=True, max_size=len(patterns)))
    directory = tmp_path_factory.mktemp("drop")
    path = write(directory, "name: child\nextends: deepseek_v3\ndrop: [" + ", ".join(f"{p!r}" for p in dropped) + "]\n")
    child = load_spec(str(path))
    assert [m.megatron for m in child.mappings] == [p for p in patterns if p not in dropped]
    assert [m.spec for m in child.mappings] == [m.spec for m in parent.mappings if m.megatron not in dropped]


# --- prefixes, exclusions and shipped bases ------------------------------------------------------------


def test_prefixes_apply_to_mappings_and_exclusions_are_taken_as_written(tmp_path):
    path = write(tmp_path, """\
        name: vlm
        extends: llama
        prefix: {megatron: language_model., hf: model.language_model.}
        exclude:
          megatron: ["vision_model.**"]
          hf: ["model.visual.**"]
        """)
    spec = load_spec(str(path))
    assert spec.exclude_megatron == ("**._extra_state", "vision_model.**")
    assert spec.exclude_hf == ("model.visual.**",)
    report = check(quantmap.compile(str(path)),
                            megatron=["vision_model.blocks.0.attn.weight", "language_model.output_layer.weight"],
                            hf=["model.visual.blocks.0.attn.qkv.weight", "model.language_model.lm_head.weight"])
    assert [f.code for f in report.findings] == []


def test_shipped_bases_are_reachable_by_name_from_a_spec_anywhere(tmp_path):
    for ref in ("base/gqa", "base/gqa.yaml"):
        path = write(tmp_path, f"name: mine\nextends: {ref}\nmappings: []\n")
        spec = load_spec(str(path))
        assert spec.files[:2] == ("quantmap/specs/base/common.yaml", "quantmap/specs/base/gqa.yaml")
    path = write(tmp_path, "name: mine\nextends: base/gqb\nmappings: []\n")
    error, = diagnostics(path)
    assert error.code == "QM040" and "base/gqa" in error.hint


# --- sharper compile diagnostics ------------------------------------------------------------------------

QKV = "decoder.layers.*.self_attention.linear_qkv"


@pytest.mark.parametrize(("mapping", "hint"), [
    ("{megatron: decoder.layers.*.self_attention.linear_proj.weight, hf: model.layers.*.o_proj.weight, kind: plain}",
     "remove 'kind'"),
    ("{megatron: decoder.layers.*.self_attention.linear_proj.weight, hf: model.layers.*.o_proj.weight, kind: qkv}",
     "kv_cache: true"),
    ("{megatron: decoder.layers.*.mlp.linear_fc2.weight, hf: model.layers.*.down.weight, kind: fused}", "group"),
])
def test_a_kind_with_no_effect_on_one_hf_name_is_an_error(tmp_path, mapping, hint):
    path = write(tmp_path, f"name: k\nmappings:\n  - {mapping}\n")
    error, = diagnostics(path)
    assert error.code == "QM027" and hint in error.hint
    # at the kind's value ('  - ' and the mapping's '{' come before column 5)
    assert error.location.line == 3 and mapping[error.location.column - 5:].startswith(mapping.split("kind: ")[1][:4])


@pytest.mark.parametrize("mapping", [
    f"{{megatron: {QKV}.weight, hf: model.layers.*.qkv.weight, kind: plain}}",  # QM025 asks for it
    "{megatron: decoder.layers.*.mlp.linear_fc1.weight, hf: model.layers.*.fc1.weight, kind: plain}",
    # on a fused Megatron tensor any kind says how the HF tensor holds the group (here: no known cut)
    "{megatron: decoder.layers.*.mlp.linear_fc1.weight, hf: model.layers.*.gate_up.weight, kind: fused}",
    f"{{megatron: {QKV}.weight, hf: model.layers.*.qkv_proj.weight, kind: qkv, hf_parts: [q, k, v]}}",
    "{megatron: decoder.layers.*.mlp.linear_fc1.weight, hf: model.layers.*.gate_up.weight, kind: gated_mlp, "
    "hf_parts: [gate, up]}",
    "{megatron: a.*.w.weight, hf: {x: b.*.x.weight, y: b.*.y.weight}, kind: fused}",
])
def test_kinds_that_have_an_effect_are_accepted(tmp_path, mapping):
    assert len(quantmap.compile(str(write(tmp_path, f"name: k\nmappings:\n  - {mapping}\n"))))


def test_no_kv_cache_warning_for_a_bias_or_other_non_weight_mapping(tmp_path):
    path = write(tmp_path, """\
        name: mtp
        mappings:
          - megatron: mtp.layers.*.mtp_model_layer.self_attention.linear_qkv.bias
            hf: {q: mtp.*.self_attn.q_proj.bias, k: mtp.*.self_attn.k_proj.bias, v: mtp.*.self_attn.v_proj.bias}
          - megatron: mtp.layers.*.mtp_model_layer.self_attention.linear_qkv.weight
            hf: {q: mtp.*.self_attn.q_proj.weight, k: mtp.*.self_attn.k_proj.weight, v: mtp.*.self_attn.v_proj.weight}
        """)
    rules = quantmap.compile(str(path))
    assert [(w.code, w.location.line) for w in rules.warnings] == [("QM061", 5)]  # the weight's only


@pytest.mark.slow
def test_compile_table_shows_priority_and_parallel():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "quantmap", "compile", "llama"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[1].startswith("spec files: quantmap/specs/llama.yaml extends quantmap/specs/base/")
    assert out[2].split() == ["kind", "prio", "parallel", "megatron", "->", "hf"]
    row = next(line for line in out if "linear_qkv.layer_norm_weight " in line).split()
    assert row[:4] == ["weight", "1", "replicated", "decoder.layers.*.self_attention.linear_qkv.layer_norm_weight"]
    row = next(line for line in out if line.split()[3:4] == ["decoder.layers.*.self_attention.linear_proj.weight"])
    assert row.split()[:3] == ["weight", "0", "row"]


CHOICE_SEGMENT = st.sampled_from(["a", "{b|c}", "{c|d|e}", "*", "x1", "{f|g}"])


@st.composite
def specs_with_alternatives(draw):
    """Random specs with alternatives on either side, distinct roots per mapping, some fused groups."""
    mappings = []
    for index in range(draw(st.integers(1, 4))):
        middle = ".".join(draw(st.lists(CHOICE_SEGMENT, min_size=1, max_size=4)))
        hf_middle = ".".join(draw(st.permutations(middle.split("."))))  # same captures, other order of text
        if [s == "*" for s in hf_middle.split(".")] != [s == "*" for s in middle.split(".")]:
            hf_middle = middle
        parts = draw(st.sampled_from([[""], ["gate", "up"]]))
        hf = {p or "": f"{{h{index}|k{index}}}.{hf_middle}.{p or 'p'}_proj.weight" for p in parts}
        mappings.append({"megatron": f"m{index}.{middle}.lin.weight", "hf": hf[""] if parts == [""] else hf})
    return {"name": "generated", "kv_cache": False, "mappings": mappings}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs_with_alternatives(), st.data())
def test_every_alternative_resolves_and_reverse_lookups_give_the_canonical_name(tmp_path_factory, spec, data):
    import yaml

    path = tmp_path_factory.mktemp("alt") / "generated.yaml"
    path.write_text(yaml.safe_dump(spec))
    rules = quantmap.compile(str(path))
    for rule in rules:
        values = [str(data.draw(st.integers(0, 300))) for _ in rule.megatron.captures]
        canonical = rule.megatron.fill(values)
        variant = data.draw(st.sampled_from(rule.megatron.variants()))
        match = rules.to_hf(variant.fill(values))
        assert match is not None and match.rule is rule and match.captures == tuple(values)
        assert match.hf == tuple(p.fill(values) for p in rule.hf)  # targets hold the canonical text
        for pattern, part in zip(rule.hf, rule.parts):
            hf_variant = data.draw(st.sampled_from(pattern.variants()))
            back = rules.to_megatron(hf_variant.fill(values))
            assert back.megatron == canonical and (back.part or "") == part


# --- hybrid layer kinds -------------------------------------------------------------------------------

HYBRID_SPEC = """\
    name: hybrid
    mappings:
      - {megatron: decoder.layers.*.mixer.in_proj.weight, hf: model.layers.*.mixer.in_proj.weight}
      - {megatron: decoder.layers.*.self_attention.linear_proj.weight, hf: model.layers.*.attn.o_proj.weight}
      - {megatron: decoder.layers.*.norm.weight, hf: model.layers.*.norm.weight, quantizers: []}
    hybrid:
      kinds:
        mamba: [mixer., norm.weight]
        attention: [self_attention.]
      config:
        - key: hybrid_override_pattern
          values: {M: mamba, "*": attention}
    """


def test_hybrid_kinds_mark_mappings_at_a_segment_start_and_are_inherited(tmp_path):
    hybrid = load_spec(write(tmp_path, HYBRID_SPEC)).hybrid
    assert hybrid.kinds_of("decoder.layers.*.mixer.norm.weight") == {"mamba"}
    assert hybrid.kinds_of("decoder.layers.*.pre_mlp_layernorm.weight") == frozenset()  # 'norm.weight' mid-word
    assert hybrid.kinds_of("decoder.final_layernorm.weight") == frozenset()
    assert load_spec("qwen3_next").hybrid == load_spec("qwen3_5").hybrid == load_spec("base/gated_delta_net").hybrid


@pytest.mark.parametrize("old, new, code, message, hint, at", [
    ('"*": attention}', '"*": atention}', "QM044", "gives layer kind 'atention', which hybrid.kinds does not declare",
     "did you mean 'attention'?", '"*": atention'),
    ("attention: [self_attention.]", "attention: [self_attn.]", "QM044", "'self_attn.' (layer kind 'attention') "
     "marks no mapping", "begins after a dot", "self_attn."),
    ("attention: [self_attention.]", "attention: []", "QM044", "layer kind 'attention' lists no Megatron text",
     "self_attention.in_proj.", "attention: []"),
    ("values: {M: mamba, \"*\": attention}", "every: attention", "QM011", "'every' and 'others' go together",
     "", "key: hybrid"),
])
def test_a_hybrid_section_that_does_not_fit_the_spec_is_an_error_at_its_place(tmp_path, old, new, code, message,
                                                                                hint, at):
    text = HYBRID_SPEC.replace(old, new)
    error, = diagnostics(write(tmp_path, text))
    assert error.code == code and message in error.message and hint in error.hint
    lines = textwrap.dedent(text).splitlines()
    line = next(number for number, content in enumerate(lines, 1) if at in content)
    assert error.location.line == line


# --- in_memory_renames --------------------------------------------------------------------------------

RENAMED_SPEC = """\
    name: renamed
    in_memory_renames: {"backbone.": "model."}
    mappings:
      - {megatron: decoder.layers.*.mlp.linear_fc2.weight, hf: backbone.layers.*.mixer.down_proj.weight, parallel: row}
      - {megatron: decoder.layers.*.mlp.router.weight, hf: backbone.layers.*.mixer.gate.weight, quantizers: [],
         hf_naming: on-disk}
      - {megatron: decoder.layers.*.mlp.router.weight, hf: model.layers.*.mixer.router.weight, quantizers: [],
         hf_naming: in-memory}
    exclude:
      hf: ["backbone.layers.*.mixer.D"]
    """


def test_in_memory_renames_apply_in_memory_to_what_serves_both_namings(tmp_path):
    path = write(tmp_path, RENAMED_SPEC)
    on_disk, in_memory = quantmap.compile(str(path)), quantmap.compile(str(path), "in-memory")
    name = "decoder.layers.3.mlp.linear_fc2.weight_quantizer._amax"
    assert on_disk.to_hf(name).hf == ("backbone.layers.3.mixer.down_proj.weight_quantizer._amax",)
    assert in_memory.to_hf(name).hf == ("model.layers.3.mixer.down_proj.weight_quantizer._amax",)
    assert in_memory.to_megatron("model.layers.3.mixer.down_proj.weight_quantizer._amax").megatron == name
    assert in_memory.to_megatron("backbone.layers.3.mixer.down_proj.weight") is None
    # A mapping written for one naming keeps its names; the exclusions are renamed with the mappings.
    assert in_memory.to_hf("decoder.layers.3.mlp.router.weight").hf == ("model.layers.3.mixer.router.weight",)
    assert on_disk.to_hf("decoder.layers.3.mlp.router.weight").hf == ("backbone.layers.3.mixer.gate.weight",)
    assert check(in_memory, hf=["model.layers.0.mixer.D", "model.layers.0.mixer.down_proj.weight"]).findings == ()
    assert [f.name for f in check(in_memory, hf=["backbone.layers.0.mixer.D"]).findings] == ["backbone.layers.0.mixer.D"]


def test_in_memory_renames_are_inherited_unless_set(tmp_path):
    write(tmp_path, RENAMED_SPEC, name="base.yaml")
    child = write(tmp_path, "name: child\nextends: base.yaml\n", name="child.yaml")
    assert load_spec(child).in_memory_renames == {"backbone.": "model."}
    own = write(tmp_path, "name: own\nextends: base.yaml\nin_memory_renames: {}\n", name="own.yaml")
    assert load_spec(own).in_memory_renames == {}


@pytest.mark.parametrize("renames, said", [('{"model.": "model.language_model.", "model.layers.": "x."}', "is the start of"),
                                          ('{"": "model."}', "empty prefix")])
def test_in_memory_renames_that_could_apply_two_ways_are_refused_where_written(tmp_path, renames, said):
    path = write(tmp_path, f"""\
        name: ambiguous
        in_memory_renames: {renames}
        mappings:
          - {{megatron: output_layer.weight, hf: lm_head.weight}}
        """)
    [error] = diagnostics(path)
    assert error.code == "QM045" and said in error.message
    assert (error.location.line, error.location.column) == (2, 20) and error.hint
