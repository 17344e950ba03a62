"""``quantmap names``: the names a model of a given size has, generated from the rules, against the
names of real models (the Megatron-Core and transformers fixtures) and Megatron-Core's TE/MoE layouts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_specs_megatron import _deepseek, _te_llama

import quantmap
from quantmap.check import check
from quantmap.io.names import read_names
from quantmap.model_names import HF, MEGATRON, ModelSize, ModelSizeError, model_names, unlisted
from quantmap.patterns import parse
from quantmap.spec.hf_config import ConfigError, layer_kinds_from_config

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent


def _record(path: Path) -> dict:
    return json.loads(path.read_text())


def _excluded(rules, side):
    patterns = [parse(p) for p in (rules.spec.exclude_megatron if side == MEGATRON else rules.spec.exclude_hf)]
    return lambda name: any(p.match(name) is not None for p in patterns)


@pytest.mark.parametrize(("fixture", "spec", "experts"), [
    ("state_fp8_default_kv_tp1", "llama", None), ("state_int4_awq_bs32_tp1", "llama", None),
    ("state_int8_smoothquant_tp1", "llama", None), ("state_fp8_default_kv_tp1", "mistral", None),
    ("state_fp8_default_kv_moeseq_tp1", "mixtral", 4), ("state_int8_default_moeseq_tp1", "mixtral", 4),
])
def test_megatron_names_are_the_real_state_dict_less_what_the_spec_excludes(fixture, spec, experts):
    """Local layer spec, SequentialMLP: generated == every real name the spec does not exclude, with the
    quantizer buffers the model's quantization config has."""
    record = _record(DATA / "megatron" / f"{fixture}.json")
    keys = list(record["state_dict_keys"])
    rules = quantmap.compile(spec)
    buffers = {".".join(name.split(".")[-2:]) for name in keys if "_quantizer." in name}
    size = ModelSize(record["model_config"]["num_layers"], experts, te=False, grouped=False)
    # ModelOpt disables the output layer's quantizers by default: the spec maps them, the fixture has none.
    generated = [name for name in model_names(rules, MEGATRON, size, buffers)
                 if not name.startswith("output_layer.") or name in keys]
    excluded = _excluded(rules, MEGATRON)
    assert len(generated) == len(set(generated))
    assert set(generated) == {name for name in keys if not excluded(name)}
    assert any(excluded(name) for name in keys)  # _extra_state is real, and left out on purpose


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral", "olmoe", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_hf_names_are_the_on_disk_names_of_a_tiny_real_model(arch):
    record = _record(DATA / "hf" / f"names_{arch}.json")
    config = record["config"]
    layers = config["num_hidden_layers"]
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts")
    dense = tuple(range(config.get("first_k_dense_replace", 0))) if "first_k_dense_replace" in config else None
    rules = quantmap.compile(arch, **({"num_layers": layers} if "num_layers" in quantmap.load_spec(arch).params else {}))
    # transformers does not save DeepSeek's MTP layer, so the on-disk model has none; the fixture sets
    # q_lora_rank, so it builds q_a_proj/q_b_proj and not the V2-Lite q_proj.
    omit = ["self_attention.linear_q_proj.weight"] if arch == "deepseek_v3" else []
    generated = model_names(rules, HF, ModelSize(layers, experts, dense_layers=dense), buffers=[], omit=omit)
    on_disk = record["on_disk_save_pretrained"]
    excluded = _excluded(rules, HF)
    assert sorted(generated) == sorted(name for name in on_disk if not excluded(name))


@pytest.mark.parametrize("te", [True, False])
def test_megatron_layouts_select_te_or_local_norms_and_grouped_or_sequential_experts(te):
    """DeepSeek-V3: dense first layer, MoE layers, MTP; TE (fused norms, TEGroupedMLP) or local
    (separate norms, SequentialMLP), against the layouts written out from Megatron-Core's source."""
    rules = quantmap.compile("deepseek_v3", num_layers=3)
    size = ModelSize(3, experts=2, mtp_layers=1, te=te, grouped=te, dense_layers=(0,))
    generated = model_names(rules, MEGATRON, size, buffers=[], omit=["self_attention.linear_q_proj.weight"])
    assert sorted(generated) == sorted(_deepseek(3, 1, 2, te=te, mtp=1))
    assert sorted(model_names(quantmap.compile("llama"), MEGATRON, ModelSize(2), buffers=[])) == sorted(_te_llama(2))


@pytest.mark.parametrize("te", [True, False])
def test_generated_names_of_both_sides_pair_up_under_check(te):
    rules = quantmap.compile("deepseek_v3", num_layers=2, num_experts=4)
    sequential = ModelSize(2, experts=4, mtp_layers=1, te=te, grouped=False, dense_layers=(0,))
    report = check(rules, megatron=model_names(rules, MEGATRON, sequential), hf=model_names(rules, HF, sequential))
    assert report.findings == ()
    # TE's dense layer 0 fuses its pre-MLP norm, but the HF norm's reverse lookup prefers pre_mlp_layernorm;
    # the local layout keeps MLA's latent norms apart, but their reverse lookups prefer TE's fused names.
    # Notes, not findings: no quantizer state goes there. No rule is dead in either layout.
    expected = ["model.layers.0.post_attention_layernorm.weight"] if te else [
        f"model.layers.{layer}.self_attn.{norm}_a_layernorm.weight" for layer in range(3) for norm in ("kv", "q")]
    assert [(n.code, n.name) for n in report.notes] == [("QM106", name) for name in expected]
    # A TEGroupedMLP model: the experts' HF buffers resolve back to SequentialMLP names, which it lacks
    # (QM102 where the grouped form maps one to one, ModelOpt 0.47's per-expert weight quantizers).
    grouped = ModelSize(2, experts=4, mtp_layers=1, te=te, grouped=True, dense_layers=(0,))
    report = check(rules, megatron=model_names(rules, MEGATRON, grouped), hf=model_names(rules, HF, grouped))
    assert report.findings and all(f.code in ("QM102", "QM106") and "local_experts" in f.message
                                   and ".experts." in f.name for f in report.findings)


def test_omit_leaves_out_the_mappings_of_a_form_the_model_does_not_build():
    rules = quantmap.compile("deepseek_v3", num_layers=2)
    size = ModelSize(2, experts=2, mtp_layers=1, te=False, grouped=False, dense_layers=(0,))
    full = model_names(rules, MEGATRON, size, buffers=[])
    less = model_names(rules, MEGATRON, size, buffers=[], omit=["self_attention.q_layernorm.weight"])
    assert sorted(set(full) - set(less)) == [
        "decoder.layers.0.self_attention.q_layernorm.weight", "decoder.layers.1.self_attention.q_layernorm.weight",
        "mtp.layers.0.mtp_model_layer.self_attention.q_layernorm.weight"]


def test_an_expert_capture_needs_the_expert_count():
    with pytest.raises(ModelSizeError, match="--experts"):
        model_names(quantmap.compile("mixtral"), HF, ModelSize(2))


@pytest.mark.slow
def test_cli_prints_one_name_per_line_or_json():
    base = [sys.executable, "-m", "quantmap", "names", "llama", "--side", "hf", "--layers", "2", "--weights-only"]
    lines = subprocess.run(base, capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    as_json = json.loads(subprocess.run(base + ["--json"], capture_output=True, text=True, cwd=REPO, check=True).stdout)
    assert lines == as_json and "model.layers.1.mlp.down_proj.weight" in lines
    assert lines.index("model.layers.0.mlp.down_proj.weight") < lines.index("model.layers.1.input_layernorm.weight")
    amax = subprocess.run(base[:-1] + ["--buffer", "weight_quantizer._amax"], capture_output=True, text=True,
                          cwd=REPO, check=True).stdout.split()
    assert set(amax) - set(lines) == {name for name in amax if name.endswith(".weight_quantizer._amax")}
    bad = subprocess.run(base + ["--dense-layers", "5"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and ">= --layers 2" in bad.stderr


@pytest.mark.slow
def test_the_size_defaults_to_what_config_json_gives_and_is_asked_for_without_it(tmp_path):
    """--layers and --experts default to the config's num_hidden_layers and expert count; --layers wins."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 3}))
    base = ["mixtral", "--side", "hf", "--weights-only"]
    from_config = _names_cli(*base, "--config", str(config))
    assert from_config.returncode == 0, from_config.stderr
    assert from_config.stdout == _names_cli(*base, "--layers", "2", "--experts", "3").stdout
    assert "model.layers.1.block_sparse_moe.experts.2.w2.weight" in from_config.stdout.split()
    fewer = _names_cli(*base, "--config", str(config), "--layers", "1").stdout.split()
    assert fewer and not [name for name in fewer if name.startswith("model.layers.1.")]
    config.write_text(json.dumps({"model_type": "mixtral"}))
    for args, said in [((), "pass --layers N (or --config)"), (("--config", str(config)), "has no num_hidden_layers")]:
        missing = _names_cli(*base, *args)
        assert missing.returncode == 2 and said in missing.stderr and "Traceback" not in missing.stderr


# The newer specs whose model a size describes (hybrids and Qwen2.5-VL below), built tiny from their
# transformers config, one variant at a time: (arch, variant index, --omit for the form that variant's
# config does not build).
_BUILT = [("phi3", 0, ()), ("gemma2", 0, ()), ("gemma3", 0, ()), ("qwen2_moe", 0, ()), ("glm4_moe", 0, ()),
          ("nemotron", 0, ()), ("exaone4", 0, ()), ("exaone4", 1, ("output_layer.weight",)), ("ernie4_5_moe", 0, ()),
          ("minimax_m2", 0, ())] + [
    (arch, variant, omit) for arch in ("deepseek_v2", "kimi_k2") for variant, omit in (
        (0, ("self_attention.linear_q_proj.weight",)),  # q_lora_rank set: q_a_proj / q_b_proj
        (1, ("self_attention.linear_q_down_proj.weight", "self_attention.linear_q_up_proj.weight",
             "self_attention.linear_q_up_proj.layer_norm_weight", "self_attention.q_layernorm.weight")))]


@pytest.mark.parametrize("arch, variant, omit", _BUILT, ids=[f"{a}-{v}" for a, v, _ in _BUILT])
@pytest.mark.slow
def test_hf_names_of_newer_specs_are_the_on_disk_names_of_their_tiny_model(arch, variant, omit, tmp_path):
    pytest.importorskip("transformers")
    import test_specs_hf as built

    config = built.variants(arch)[variant]
    built.build(arch, config).save_pretrained(tmp_path)
    text = config.get_text_config()
    experts = next((getattr(text, key) for key in ("num_local_experts", "num_experts", "n_routed_experts",
                                                   "moe_num_experts") if isinstance(getattr(text, key, None), int)), None)
    dense = next((tuple(range(getattr(text, key))) for key in ("first_k_dense_replace", "moe_layer_start_index")
                  if getattr(text, key, None) is not None), tuple(getattr(text, "mlp_only_layers", None) or ()) or None)
    layers = text.num_hidden_layers
    params = {**built.PARAMS.get(arch, {}), **({"num_layers": layers} if "num_layers" in quantmap.load_spec(arch).params
                                               else {})}
    rules = quantmap.compile(arch, **params)
    generated = model_names(rules, HF, ModelSize(layers, experts, dense_layers=dense), buffers=[], omit=omit)
    excluded = _excluded(rules, HF)
    assert sorted(generated) == sorted(name for name in read_names(tmp_path) if not excluded(name))


def _names_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantmap", "names", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


# Hybrid models, whose layers differ in kind (Gated DeltaNet / full attention; Mamba / MoE / attention / MLP),
# and Qwen2.5-VL, whose vision tower is mapped with '**': (arch, variant index, --omit). Nemotron-H's first
# variant has no MoE latent projections (moe_latent_size null).
_HYBRID = [("qwen3_5", 0, ()), ("qwen3_5_moe", 0, ()), ("qwen3_next", 0, ()),
           ("nemotron_h", 0, ("mlp.fc1_latent_proj.weight", "mlp.fc2_latent_proj.weight")), ("nemotron_h", 1, ()),
           ("qwen2_5_vl", 0, ())]


@pytest.mark.parametrize("arch, variant, omit", _HYBRID, ids=[f"{a}-{v}" for a, v, _ in _HYBRID])
@pytest.mark.slow
def test_hf_names_of_a_hybrid_model_read_its_layer_kinds_from_config_json(arch, variant, omit, tmp_path):
    """`names --config` reads each layer's kind from the saved config.json (layer_types, layers_block_type) and
    lists exactly the tiny model's on-disk names, less what the spec excludes and what a '**' mapping matches,
    which it names on stderr instead."""
    pytest.importorskip("transformers")
    import test_specs_hf as built

    config = built.variants(arch)[variant]
    built.build(arch, config).save_pretrained(tmp_path)
    text = config.get_text_config()
    experts = next((getattr(text, key) for key in ("num_experts", "n_routed_experts")
                    if isinstance(getattr(text, key, None), int)), None)
    args = [arch, "--side", "hf", "--layers", str(text.num_hidden_layers), "--weights-only", "--config", str(tmp_path),
            *(["--experts", str(experts)] if experts else []), *(f"--omit={o}" for o in omit)]
    result = _names_cli(*args)
    assert result.returncode == 0, result.stderr
    rules = quantmap.compile(arch, **built.PARAMS.get(arch, {}))
    excluded = _excluded(rules, HF)
    deep = [pattern for rule in rules if rule.origin.mapping in unlisted(rules) for pattern in rule.hf]
    in_tower = [name for name in read_names(tmp_path) if any(p.match(name) for p in deep)]
    expected = sorted(name for name in read_names(tmp_path) if not excluded(name) and name not in in_tower)
    assert sorted(result.stdout.split()) == expected
    assert bool(in_tower) == (arch == "qwen2_5_vl")  # the vision tower's names, not listed
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert [line.split("'")[1] for line in notes] == unlisted(rules) and all("--omit" in line for line in notes)
    if in_tower:  # --omit says the tower is left out on purpose: the same list, no note
        again = _names_cli(*args, *(f"--omit={pattern}" for pattern in unlisted(rules)))
        assert again.stdout == result.stdout and "note:" not in again.stderr


def _kinds(arch: str, config, tmp_path: Path) -> tuple[str, ...]:
    """The layer kinds that `names --config` reads from the model's saved config.json."""
    config.to_json_file(tmp_path / "config.json")
    layers = config.get_text_config().num_hidden_layers
    return layer_kinds_from_config(tmp_path, quantmap.load_spec(arch).hybrid, layers)


_BRIDGED = [(arch, te) for arch in ("qwen3_5", "qwen3_5_moe", "qwen3_next", "nemotron_h", "qwen2_5_vl")
            for te in (True, False) if te or arch != "qwen3_5"]


@pytest.mark.parametrize("arch, te", _BRIDGED,
                         ids=[f"{a}-{'te_grouped' if t else 'local_sequential'}" for a, t in _BRIDGED])
def test_megatron_names_of_a_hybrid_model_are_the_bridges(arch, te, tmp_path):
    """Against the Megatron names tests/test_specs_bridge_names.py writes out from Megatron-Bridge and
    Megatron-Core (the hybrids' experimental-attention and Mamba stack specs fuse every norm, as TE does,
    under either expert layout); the MTP layer of the Qwen3.5 family with --mtp-layers 1."""
    pytest.importorskip("transformers")
    import test_specs_bridge_names as bridge
    import test_specs_hf as built

    rules = quantmap.compile(arch, **built.PARAMS.get(arch, {}))
    expected = getattr(bridge, arch)(te)
    if arch == "qwen2_5_vl":  # visual.** cannot be listed from a size
        deep = [rule.megatron for rule in rules if rule.origin.mapping in unlisted(rules)]
        expected = [name for name in expected if not any(p.match(name) for p in deep)]
        kinds, layers = None, 2  # the tiny model's, which the bridge names are written for
    else:  # the tiny config's kinds (nemotron_h: its latent variant; the bridge names cover both variants)
        kinds = _kinds(arch, built.variants(arch)[-1], tmp_path)
        layers = len(kinds)
    # the hybrids' Megatron layer specs are TE's (fused norms) under either expert layout
    size = ModelSize(layers, bridge.EXPERTS, te=te or kinds is not None, grouped=te, kinds=kinds)
    generated = model_names(rules, MEGATRON, size, buffers=[])
    assert len(generated) == len(set(generated)) and sorted(generated) == sorted(expected)
    if arch.startswith("qwen3") and te:  # one MTP layer: full attention and the model's MLP (grouped experts)
        mlp = bridge._dense_mlp(True) if arch == "qwen3_5" else bridge._moe_mlp(True, *bridge.SHARED)
        with_mtp = ModelSize(layers, bridge.EXPERTS, mtp_layers=1, kinds=kinds)
        added = set(model_names(rules, MEGATRON, with_mtp, buffers=[])) - set(generated)
        assert sorted(added) == sorted(bridge._mtp(mlp))


# Older config.json forms, and what transformers 5 writes for the same model: hybrid_override_pattern (Nemotron-H
# checkpoints saved before layers_block_type), the legacy 'mamba' / 'attention' layer types, and
# full_attention_interval without layer_types (Qwen3-Next-80B-A3B's config).
_OLDER = [("nemotron_h", "NemotronHConfig", {"hybrid_override_pattern": "M*-EM"},
           ("mamba", "attention", "mlp", "moe", "mamba")),
          ("nemotron_h", "NemotronHConfig", {"layers_block_type": ["mamba", "attention", "mlp", "moe"]},
           ("mamba", "attention", "mlp", "moe")),
          ("qwen3_next", "Qwen3NextConfig", {"full_attention_interval": 3, "num_hidden_layers": 6},
           ("linear_attention", "linear_attention", "full_attention") * 2)]


@pytest.mark.parametrize("arch, config_class, older, kinds", _OLDER,
                         ids=[f"{a}-{next(iter(o))}" for a, _, o, _ in _OLDER])
def test_layer_kinds_of_an_older_config_json_are_those_transformers_builds(arch, config_class, older, kinds, tmp_path):
    transformers = pytest.importorskip("transformers")
    hybrid = quantmap.load_spec(arch).hybrid
    (tmp_path / "older.json").write_text(json.dumps(older))
    getattr(transformers, config_class)(**older).to_json_file(tmp_path / "config.json")
    assert layer_kinds_from_config(tmp_path / "older.json", hybrid, len(kinds)) == kinds
    assert layer_kinds_from_config(tmp_path, hybrid, len(kinds)) == kinds  # transformers' own list


@pytest.mark.parametrize("config, problem", [
    ({"num_hidden_layers": 4}, "has none of the keys layers_block_type, hybrid_override_pattern; give each layer's "
                               "kind with --layer-kind"),
    ({"hybrid_override_pattern": "M*-"}, "gives 3 layers, but the model has 4"),
    ({"hybrid_override_pattern": "M*-X"}, "holds 'X', which the spec does not know"),
    # the first key the config has is read, even where a later one would do
    ({"layers_block_type": "M*-E", "hybrid_override_pattern": "M*-E"}, "layers_block_type holds '*', '-', 'E', 'M'"),
])
def test_layer_kinds_a_config_json_cannot_give_are_named(config, problem, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape(problem)):
        layer_kinds_from_config(tmp_path, quantmap.load_spec("nemotron_h").hybrid, 4)


@pytest.mark.slow
def test_a_hybrid_spec_needs_each_layers_kind_and_the_cli_takes_them_per_kind(tmp_path):
    with pytest.raises(ModelSizeError, match="--layer-kind KIND=LAYERS") as error:
        model_names(quantmap.compile("qwen3_5"), HF, ModelSize(4))
    assert "linear_attention, full_attention" in str(error.value)
    with pytest.raises(ModelSizeError, match="no kinds of layer"):
        model_names(quantmap.compile("llama"), HF, ModelSize(2, kinds=("full_attention",) * 2))
    with pytest.raises(ModelSizeError, match="no layer kind 'mamba'"):
        model_names(quantmap.compile("qwen3_5"), HF, ModelSize(1, kinds=("mamba",)))
    base = ["nemotron_h", "--side", "megatron", "--layers", "4", "--experts", "4"]
    by_kind = _names_cli(*base, "--layer-kind", "mamba=0", "--layer-kind", "moe=1", "--layer-kind", "attention=2",
                         "--layer-kind", "mlp=3")
    (tmp_path / "config.json").write_text(json.dumps({"hybrid_override_pattern": "ME*-"}))
    assert by_kind.returncode == 0 and by_kind.stdout == _names_cli(*base, "--config", str(tmp_path)).stdout
    assert "decoder.layers.2.self_attention.linear_qkv.weight" in by_kind.stdout.split()
    unset = _names_cli(*base, "--layer-kind", "mamba=0-2")
    assert unset.returncode == 2 and "layers 3 have no kind" in unset.stderr
    none = _names_cli(*base)
    assert none.returncode == 2 and "--layer-kind" in none.stderr and "mamba, attention, mlp, moe" in none.stderr


def test_hybrid_names_of_both_sides_pair_up_under_check():
    """SequentialMLP experts (the one-to-one layout): every generated name pairs with one on the other side. The
    notes are a layer's norm whose reverse lookup prefers another kind's fused name (the spec's priorities)."""
    for arch, kinds in (("qwen3_next", ("linear_attention",) * 3 + ("full_attention",)),
                        ("nemotron_h", ("mamba", "moe", "attention", "mlp"))):
        rules = quantmap.compile(arch, num_experts=2)
        size = ModelSize(4, experts=2, mtp_layers=1, grouped=False, kinds=kinds)
        report = check(rules, megatron=model_names(rules, MEGATRON, size), hf=model_names(rules, HF, size))
        assert report.findings == ()
        assert report.notes and all(n.code == "QM106" and n.name.endswith("norm.weight") for n in report.notes)


@pytest.mark.parametrize("grouped", [True, False])
def test_gpt_oss_megatron_names_give_each_expert_its_weights_and_biases(grouped):
    """gpt-oss's expert quantizers fan in to one HF quantizer: the Megatron side's extra capture is the expert."""
    rules = quantmap.compile("gpt_oss")
    names = model_names(rules, MEGATRON, ModelSize(1, experts=2, grouped=grouped), buffers=["weight_quantizer._amax"])
    experts = sorted(name.split("mlp.experts.")[1] for name in names if ".mlp.experts." in name)
    each = ["linear_fc{fc}.bias{e}", "linear_fc{fc}.weight{e}", "linear_fc{fc}.weight_quantizer.{e}._amax"] if grouped \
        else ["local_experts.{e}.linear_fc{fc}.bias", "local_experts.{e}.linear_fc{fc}.weight",
              "local_experts.{e}.linear_fc{fc}.weight_quantizer._amax"]
    assert experts == sorted(form.format(fc=fc, e=e) for form in each for fc in (1, 2) for e in range(2))


@pytest.mark.parametrize("naming", ["on-disk", "in-memory"])
def test_per_expert_weight_quantizers_are_listed_once_per_expert_not_per_layer(naming):
    """ModelOpt 0.47's grouped ``linear_fc1.weight_quantizer.{E}`` and transformers v5's in-memory
    ``gate_up_proj_weight_quantizers.{E}``: the index is the expert (3 layers, 4 experts: 0..3 in each
    layer; it was 0..2, one per layer)."""
    rules = quantmap.compile("qwen3_moe", naming, num_experts=4)
    size = ModelSize(3, experts=4, grouped=True)
    megatron = [n for n in model_names(rules, MEGATRON, size, ["weight_quantizer._amax"])
                if ".linear_fc1.weight_quantizer." in n]
    assert megatron == [f"decoder.layers.{layer}.mlp.experts.linear_fc1.weight_quantizer.{e}._amax"
                        for layer in range(3) for e in range(4)]
    # W4A8's two stages follow the expert: weight_quantizer.{E}.{S}, never a stage read as a layer or expert.
    staged = [n for n in model_names(rules, MEGATRON, size, ["weight_quantizer.*._amax"])
              if ".linear_fc1.weight_quantizer." in n]
    assert staged == [f"decoder.layers.{layer}.mlp.experts.linear_fc1.weight_quantizer.{e}.{s}._amax"
                      for layer in range(3) for e in range(4) for s in range(2)]
    if naming == "in-memory":
        hf = [n for n in model_names(rules, HF, size, ["weight_quantizer._amax"]) if "gate_up_proj_weight_quantizers" in n]
        assert hf == [f"model.layers.{layer}.mlp.experts.gate_up_proj_weight_quantizers.{e}._amax"
                      for layer in range(3) for e in range(4)]


# MoE models whose config.json makes some layers dense, each way transformers reads it: DeepSeek's
# first_k_dense_replace (both MLA query paths), Qwen3-MoE's mlp_only_layers, ERNIE 4.5's moe_layer_start_index.
_DENSE_FROM_CONFIG = [("deepseek_v3", 0, ("self_attention.linear_q_proj.weight",)),
                      ("deepseek_v3", 1, ("self_attention.linear_q_down_proj.weight",
                                          "self_attention.linear_q_up_proj.weight",
                                          "self_attention.linear_q_up_proj.layer_norm_weight",
                                          "self_attention.q_layernorm.weight")),
                      ("qwen3_moe", 0, ()), ("ernie4_5_moe", 0, ())]


@pytest.mark.slow
@pytest.mark.parametrize("arch, variant, omit", _DENSE_FROM_CONFIG, ids=[f"{a}-{v}" for a, v, _ in _DENSE_FROM_CONFIG])
def test_names_with_config_alone_gives_the_dense_layers_their_mlp_as_the_real_model_has_it(arch, variant, omit,
                                                                                          tmp_path):
    """`names ARCH --side hf --config config.json`, no size flags: the layers the config makes dense list
    their MLP and no experts, exactly the tiny model's on-disk names."""
    pytest.importorskip("transformers")
    import test_specs_hf as built

    config = built.variants(arch)[variant]
    built.build(arch, config).save_pretrained(tmp_path)
    result = _names_cli(arch, "--side", "hf", "--weights-only", "--config", str(tmp_path / "config.json"),
                        *(f"--omit={o}" for o in omit))
    assert result.returncode == 0, result.stderr
    rules = quantmap.compile(arch, config=tmp_path / "config.json")
    excluded = _excluded(rules, HF)
    on_disk = sorted(name for name in read_names(tmp_path) if not excluded(name))
    assert sorted(result.stdout.split()) == on_disk
    assert any(".0.mlp.down_proj.weight" in name for name in on_disk)  # layer 0 is dense in each config


@pytest.mark.parametrize(("config", "dense"), [
    ({"first_k_dense_replace": 3}, (0, 1, 2)),
    ({"mlp_only_layers": [1], "decoder_sparse_step": 2}, (0, 1, 2)),  # layer i is MoE when (i + 1) % 2 == 0
    ({"moe_layer_start_index": 1, "moe_layer_end_index": 2, "moe_layer_interval": 1}, (0, 3)),
    ({"moe_layer_start_index": 0, "moe_layer_end_index": -1, "moe_layer_interval": 2}, (0, 2)),
    ({"num_hidden_layers": 4}, None),
])
def test_dense_layers_are_read_from_config_json_as_transformers_builds_the_layers(config, dense, tmp_path):
    from quantmap.spec.hf_config import dense_layers_from_config

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert dense_layers_from_config(tmp_path, 4) == dense


def test_a_dense_layer_key_of_the_wrong_type_is_one_line_naming_the_file_and_key(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_hidden_layers": 2, "n_routed_experts": 2, "first_k_dense_replace": "1"}))
    result = _names_cli("deepseek_v3", "--side", "hf", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{config}: first_k_dense_replace is '1', not an integer >= 0" in " ".join(result.stderr.split())
