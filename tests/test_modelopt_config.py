"""What a checkpoint's ModelOpt recipe says per quantized module (quantmap/recipe.py) and the two config files
ModelOpt's deployable format writes from it (quantmap/formats/modelopt_config.py): the format of every quantizer
class of every real torch_dist fixture; ModelOpt 0.47.0's own hf_quant_config.json and config.json
quantization_config for fp8_kv_tp1 reproduced; and the NVFP4, AWQ, mixed-precision and wildcard cases derived by
hand from ModelOpt's source (paths inside modelopt/torch/ of the 0.47.0 wheel)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantmap.formats.modelopt_config import (
    ModelOptConfigError,
    file_text,
    hf_quant_config,
    quantization_config,
    summarise_exclude_modules,
)
from quantmap.io.torch_dist.modelopt import quant_cfg
from quantmap.recipe import (
    ModuleFormat,
    Quantizer,
    RecipeError,
    Stage,
    check_override,
    kv_cache_algo,
    kv_cache_algo_in,
    module_format,
    module_format_in,
    quantizer,
)

DATA = Path(__file__).parent / "data"
#: Each fixture's iteration directory (the one holding modelopt_state/).
ITERATION = {
    "fp8_kv_tp1": DATA / "dcp/fp8_kv_tp1/ckpt/iter_0000001",
    "fp8_kv_tp2": DATA / "dcp/fp8_kv_tp2/ckpt/release",
    "int8_tp2": DATA / "dcp/int8_tp2/ckpt/release",
    "w4a8_awq_bs32_tp2": DATA / "dcp/w4a8_awq_bs32_tp2/ckpt/release",
    "nvfp4_kv_tp2": DATA / "dcp/nvfp4_kv_tp2/ckpt/release",
    "int8_sq_tp2": DATA / "dcp/int8_sq_tp2/ckpt/release",
    "int4_awq_bs32_tp2": DATA / "dcp/int4_awq_bs32_tp2/ckpt/release",
}
MODELOPT_EXPORT = DATA / "dcp" / "fp8_kv_tp1" / "modelopt_export"

LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
#: Megatron linear module → the HF modules it becomes in a Llama (FORMATS.md 4.1).
HF_OF = {"self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "self_attention.linear_proj": ("self_attn.o_proj",),
         "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
         "mlp.linear_fc2": ("mlp.down_proj",)}

# fixture -> (format of every decoder linear, KV-cache algo), written from the fixture README's recipes:
# the stock FP8_DEFAULT_CFG + FP8_KV_CFG, INT8 per-channel (INT8_SMOOTHQUANT_CFG's quantizers, with and without
# smoothing: ModelOpt calls both int8_sq since the input quantizer is on), NVFP4_DEFAULT_CFG + NVFP4_KV_CFG,
# INT4_AWQ_CFG and W4A8_AWQ_BETA_CFG at block size 32. No recipe enables the KV quantizers except the _KV ones.
EXPECTED = {
    "fp8_kv_tp1": (ModuleFormat("FP8"), "FP8"),
    "fp8_kv_tp2": (ModuleFormat("FP8"), "FP8"),
    "int8_tp2": (ModuleFormat("W8A8_SQ_PER_CHANNEL"), None),
    "int8_sq_tp2": (ModuleFormat("W8A8_SQ_PER_CHANNEL"), None),
    "nvfp4_kv_tp2": (ModuleFormat("NVFP4", 16), "NVFP4"),
    "int4_awq_bs32_tp2": (ModuleFormat("W4A16_AWQ", 32), None),
    "w4a8_awq_bs32_tp2": (ModuleFormat("W4A8_AWQ", 32), None),
}


def hf_modules(entries: list[dict], layers: int = 2) -> dict[str, ModuleFormat | None]:
    """Every HF module of the 2-layer Llama fixtures with a weight but no norm, by HF name → its format."""
    modules: dict[str, ModuleFormat | None] = {"model.embed_tokens": None,
                                               "lm_head": module_format_in("output_layer", entries)}
    for layer in range(layers):
        for linear in LINEARS:
            fmt = module_format_in(f"decoder.layers.{layer}.{linear}", entries)
            modules.update({f"model.layers.{layer}.{hf}": fmt for hf in HF_OF[linear]})
    return modules


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_each_fixture_recipe_gives_each_quantizer_class_its_format_and_leaves_output_layer_unquantized(fixture):
    entries = quant_cfg(ITERATION[fixture])
    linear, kv = EXPECTED[fixture]
    for layer in (0, 1):
        for module in LINEARS:
            assert module_format_in(f"decoder.layers.{layer}.{module}", entries) == linear, (layer, module)
        assert kv_cache_algo_in(f"decoder.layers.{layer}.self_attention", entries) == kv
    assert module_format_in("output_layer", entries) is None  # *output_layer* disables it
    assert quantizer("output_layer.weight_quantizer", entries).enabled is False


def test_the_effective_attributes_are_those_of_the_last_matching_cfg_entry():
    nvfp4 = quant_cfg(ITERATION["nvfp4_kv_tp2"])
    weight = quantizer("decoder.layers.0.mlp.linear_fc1.weight_quantizer", nvfp4)
    assert weight == Quantizer(True, (Stage(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic",
                                                                           "scale_bits": (4, 3)}),))
    assert weight.stages[0].block_size == 16 and weight.stages[0].block_type == "dynamic"
    k_bmm = quantizer("decoder.layers.1.self_attention.core_attention.k_bmm_quantizer", nvfp4)
    assert k_bmm.enabled and k_bmm.stages[0].num_bits == (2, 1)  # *[kv]_bmm_quantizer
    assert not quantizer("decoder.layers.1.self_attention.core_attention.q_bmm_quantizer", nvfp4).enabled

    w4a8 = quantizer("decoder.layers.0.self_attention.linear_qkv.weight_quantizer",
                     quant_cfg(ITERATION["w4a8_awq_bs32_tp2"]))
    assert w4a8.sequential and [(s.num_bits, s.block_size) for s in w4a8.stages] == [(4, 32), ((4, 3), 0)]

    int8 = quant_cfg(ITERATION["int8_tp2"])
    assert quantizer("decoder.layers.0.mlp.linear_fc2.weight_quantizer", int8).stages[0].axis == 0
    awq = quant_cfg(ITERATION["int4_awq_bs32_tp2"])
    assert not quantizer("decoder.layers.0.mlp.linear_fc2.input_quantizer", awq).enabled  # W4A16
    assert not quantizer("decoder.layers.0.mlp.router.weight_quantizer", int8).enabled  # *router*


def test_a_toggle_keeps_the_attributes_a_later_cfg_replaces_them_and_expert_lists_match_the_singular_wildcard():
    fp8 = {"num_bits": (4, 3), "axis": None}
    entries = [{"quantizer_name": "*", "enable": False},
               {"quantizer_name": "*weight_quantizer", "cfg": fp8},
               {"quantizer_name": "*layers.1.*", "enable": False},
               {"quantizer_name": "*layers.1.mlp*", "enable": True},
               {"quantizer_name": "*layers.0.mlp*weight_quantizer", "cfg": [{"num_bits": 4, "block_sizes": {-1: 8}},
                                                                           {"num_bits": [4, 3]}]}]
    assert quantizer("decoder.layers.1.self_attention.linear_qkv.weight_quantizer", entries).enabled is False
    assert quantizer("decoder.layers.1.mlp.linear_fc1.weight_quantizer", entries) == Quantizer(True, (Stage((4, 3)),))
    assert module_format_in("decoder.layers.0.mlp.linear_fc2", entries) == ModuleFormat("W4A8_AWQ", 8)
    expert = quantizer("model.layers.2.mlp.experts.gate_up_proj_weight_quantizers.3", entries)
    assert expert.stages[0].num_bits == (4, 3)  # matched as "...gate_up_proj_weight_quantizer"
    assert not quantizer("decoder.layers.0.mlp.linear_fc2.input_quantizer", entries).configured


@pytest.mark.parametrize(("weight", "input_", "algo"), [
    ({"num_bits": (4, 3)}, {"num_bits": (4, 3)}, ModuleFormat("FP8")),
    ({"num_bits": (4, 3), "axis": 0}, {"num_bits": (4, 3)}, ModuleFormat("FP8_PER_CHANNEL_PER_TOKEN")),
    ({"num_bits": 8, "axis": 0}, {"num_bits": 8}, ModuleFormat("W8A8_SQ_PER_CHANNEL")),
    ({"num_bits": 8, "axis": 0}, None, ModuleFormat("W8A16")),
    ({"num_bits": 4, "block_sizes": {-1: 128}}, None, ModuleFormat("W4A16_AWQ", 128)),
    ({"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}, None,
     ModuleFormat("W4A16_NVFP4", 16)),
    ({"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}, {"num_bits": (4, 3)},
     ModuleFormat("W4A8_NVFP4_FP8", 16)),
    ({"num_bits": (4, 3), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}, None,
     ModuleFormat("MXFP8", 32)),
])
def test_module_format_follows_get_quantization_format_branch_by_branch(weight, input_, algo):
    # quant_utils.py:518-590; an input cfg of None means a disabled input quantizer
    entries = [{"quantizer_name": "*", "enable": False}, {"quantizer_name": "*weight_quantizer", "cfg": weight}]
    if input_ is not None:
        entries.append({"quantizer_name": "*input_quantizer", "cfg": input_})
    assert module_format_in("decoder.layers.0.mlp.linear_fc1", entries) == algo


def test_a_recipe_read_from_json_keeps_its_block_sizes():
    """JSON makes ModelOpt's ``block_sizes`` axis ``-1`` the string ``"-1"`` and pairs lists: the same format."""
    for entries in (quant_cfg(ITERATION["nvfp4_kv_tp2"]), quant_cfg(ITERATION["int4_awq_bs32_tp2"])):
        read_back = json.loads(json.dumps(entries))
        for module in ("decoder.layers.0.mlp.linear_fc1", "decoder.layers.1.self_attention.linear_proj"):
            assert module_format_in(module, read_back) == module_format_in(module, entries), module
            assert module_format_in(module, read_back).group_size in (16, 32)


def test_an_nvfp4_input_quantizer_with_a_pre_quant_scale_makes_nvfp4_awq():
    # quant_utils.py:565-566: the checkpoint's tensors, not the recipe, say whether _pre_quant_scale is there
    entries = quant_cfg(ITERATION["nvfp4_kv_tp2"])
    assert module_format_in("decoder.layers.0.mlp.linear_fc2", entries, pre_quant_scale=True) == \
        ModuleFormat("NVFP4_AWQ", 16)
    built = hf_quant_config({"model.layers.0.mlp.down_proj": ModuleFormat("NVFP4_AWQ", 16)}, None)
    assert built["quantization"] == {"quant_algo": "NVFP4_AWQ", "kv_cache_quant_algo": None, "group_size": 16,
                                     "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": []}


def test_what_the_recipe_cannot_name_is_refused():
    enabled_unconfigured = [{"quantizer_name": "*", "enable": True}]
    with pytest.raises(RecipeError, match="no quant_cfg entry configures it"):
        module_format_in("decoder.layers.0.mlp.linear_fc1", enabled_unconfigured)
    blockless_int4 = Quantizer(True, (Stage(num_bits=4),))
    with pytest.raises(RecipeError, match="INT4 weight needs block_sizes"):
        module_format(blockless_int4, Quantizer(False))
    with pytest.raises(RecipeError, match=r"\[8, \(4, 3\)\]"):
        module_format(Quantizer(True, (Stage(8), Stage((4, 3))), sequential=True))


def test_kv_cache_algo_takes_modelopt_precedence_and_the_config_records_only_fp8_and_nvfp4():
    fp4, fp8, int8 = Quantizer(True, (Stage((2, 1)),)), Quantizer(True, (Stage((4, 3)),)), Quantizer(True, (Stage(8),))
    assert kv_cache_algo(fp4, fp8) == "FP8" and kv_cache_algo(fp4, int8) == "INT8"
    assert kv_cache_algo(fp4, fp4) == "NVFP4" and kv_cache_algo(Quantizer(False, fp8.stages)) is None
    assert kv_cache_algo(Quantizer(True, (Stage((2, 1), affine=True),))) == "NVFP4_AFFINE"
    with pytest.raises(ModelOptConfigError, match="INT8"):
        hf_quant_config({"model.layers.0.mlp.down_proj": ModuleFormat("FP8")}, "INT8")


def test_fp8_kv_tp1_configs_equal_modelopt_0_47_0s_own_files():
    modules = hf_modules(quant_cfg(ITERATION["fp8_kv_tp1"]))
    kv = kv_cache_algo_in("decoder.layers.0.self_attention", quant_cfg(ITERATION["fp8_kv_tp1"]))
    built = hf_quant_config(modules, kv)
    written = (MODELOPT_EXPORT / "hf_quant_config.json").read_text(encoding="utf-8")
    assert built == json.loads(written)
    assert file_text(built) == written, "byte for byte, key order included"
    config = json.loads((MODELOPT_EXPORT / "config.json").read_text(encoding="utf-8"))
    assert quantization_config(built) == config["quantization_config"]
    assert list(quantization_config(built)) == list(config["quantization_config"])


def test_producer_version_is_a_parameter_and_the_name_is_always_modelopt():
    built = hf_quant_config({"model.layers.0.mlp.down_proj": ModuleFormat("FP8")}, None, producer_version="0.48.0")
    assert built["producer"] == {"name": "modelopt", "version": "0.48.0"}
    # no KV quantization: the key stays, null (process_layer_quant_config starts from it, quant_utils.py:685-689),
    # and config.json has no kv_cache_scheme (convert_hf_config.py: `if kv_cache_quant_algo:`)
    assert built["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": []}
    assert "kv_cache_scheme" not in quantization_config(built)


def test_nvfp4_with_nvfp4_kv_gives_group_size_16_and_the_bare_kv_string():
    entries = quant_cfg(ITERATION["nvfp4_kv_tp2"])
    built = hf_quant_config(hf_modules(entries), kv_cache_algo_in("decoder.layers.0.self_attention", entries))
    # process_layer_quant_config's single-format branch (quant_utils.py:783-790) then the Megatron exporter's list
    assert json.dumps(built["quantization"]) == json.dumps({
        "quant_algo": "NVFP4", "kv_cache_quant_algo": "NVFP4", "group_size": 16,
        "exclude_modules": ["lm_head", "model.embed_tokens"]})
    nvfp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    assert json.dumps(quantization_config(built)) == json.dumps({
        "config_groups": {"group_0": {"input_activations": nvfp4, "weights": nvfp4, "targets": ["Linear"]}},
        "ignore": ["lm_head", "model.embed_tokens"], "quant_algo": "NVFP4", "kv_cache_scheme": "NVFP4",
        "producer": {"name": "modelopt", "version": "0.47.0"}, "quant_method": "modelopt"})


def test_awq_records_its_group_size_and_pre_quant_scale_and_config_json_has_no_config_groups_for_it():
    built = hf_quant_config(hf_modules(quant_cfg(ITERATION["int4_awq_bs32_tp2"])), None)
    assert json.dumps(built["quantization"]) == json.dumps({
        "quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 32, "has_zero_point": False,
        "pre_quant_scale": True, "exclude_modules": ["lm_head", "model.embed_tokens"]})
    # convert_hf_quant_config_format has config_groups only for FP8, NVFP4, W4A16_NVFP4, NVFP4_SVD and MIXED
    assert quantization_config(built) == {"ignore": ["lm_head", "model.embed_tokens"], "quant_algo": "W4A16_AWQ",
                                          "producer": {"name": "modelopt", "version": "0.47.0"},
                                          "quant_method": "modelopt"}


def test_a_mixed_recipe_gives_mixed_precision_with_one_entry_per_quantized_module():
    # FP8 everywhere, layer 1's fc1 left unquantized, layer 1's fc2 NVFP4.
    nvfp4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
    entries = quant_cfg(ITERATION["fp8_kv_tp1"]) + [
        {"quantizer_name": "*layers.1.mlp.linear_fc1.*", "enable": False},
        {"quantizer_name": "*layers.1.mlp.linear_fc2.*_quantizer", "cfg": nvfp4}]
    built = hf_quant_config(hf_modules(entries), kv_cache_algo_in("decoder.layers.0.self_attention", entries))
    # By hand from ModelOpt 0.47.0: each quantized HF module gets process_layer_quant_config's entry
    # (quant_utils.py:703 "FP8", :735 NVFP4 with group_size = the awq_block_size record = block_sizes[-1]), in the
    # order of the sorted "<name>.quantization" records (unified_export_megatron.py:2002); two distinct entries make
    # MIXED_PRECISION and keep quantized_layers (:768-770); the Megatron exporter then adds its own sorted list of
    # unquantized modules (unified_export_megatron.py:382-383) and the KV algo (:392-393).
    fp8 = {"quant_algo": "FP8"}
    expected_layers = {
        "model.layers.0.mlp.down_proj": fp8, "model.layers.0.mlp.gate_proj": fp8, "model.layers.0.mlp.up_proj": fp8,
        "model.layers.0.self_attn.k_proj": fp8, "model.layers.0.self_attn.o_proj": fp8,
        "model.layers.0.self_attn.q_proj": fp8, "model.layers.0.self_attn.v_proj": fp8,
        "model.layers.1.mlp.down_proj": {"quant_algo": "NVFP4", "group_size": 16},
        "model.layers.1.self_attn.k_proj": fp8, "model.layers.1.self_attn.o_proj": fp8,
        "model.layers.1.self_attn.q_proj": fp8, "model.layers.1.self_attn.v_proj": fp8}
    excluded = ["lm_head", "model.embed_tokens", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert json.dumps(built) == json.dumps({
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "FP8",
                         "quantized_layers": expected_layers, "exclude_modules": excluded}})
    # convert_hf_config.py:213-234: one group per distinct entry in first-seen order, targets sorted, then the
    # per-layer detail; _quant_algo_to_group_config (:23-127) for each group
    fp8_tensor = {"dynamic": False, "num_bits": 8, "type": "float"}
    fp4_tensor = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    assert json.dumps(quantization_config(built)) == json.dumps({
        "config_groups": {
            "group_0": {"input_activations": fp8_tensor, "weights": fp8_tensor,
                        "targets": sorted(name for name, entry in expected_layers.items() if entry == fp8)},
            "group_1": {"input_activations": fp4_tensor, "weights": fp4_tensor,
                        "targets": ["model.layers.1.mlp.down_proj"]}},
        "quantized_layers": expected_layers, "ignore": excluded, "quant_algo": "MIXED_PRECISION",
        "kv_cache_scheme": fp8_tensor, "producer": {"name": "modelopt", "version": "0.47.0"},
        "quant_method": "modelopt"})
    # ModelOpt's HF exporter keeps process_layer_quant_config's output, which has no exclude_modules when mixed
    assert "exclude_modules" not in hf_quant_config(hf_modules(entries), "FP8", summarise=True)["quantization"]


def test_summarised_exclude_modules_use_prefix_wildcards_only_where_no_quantized_module_matches():
    # _prefix_wildcard_summarize_exclude_modules (quant_utils.py:609-680), by hand: layer 1's MLP is the first
    # prefix at a dot that no quantized name starts with, so one "model.layers.1.mlp*" covers its three modules.
    quantized = [f"model.layers.{layer}.self_attn.{p}_proj" for layer in (0, 1) for p in "qkvo"]
    quantized += [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    unquantized = ["lm_head", "model.embed_tokens"] + [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert summarise_exclude_modules(unquantized, quantized) == ["lm_head", "model.embed_tokens", "model.layers.1.mlp*"]
    # A prefix another module extends takes the pair form, written as "prefix.*" alone (:671-676).
    assert summarise_exclude_modules(["a.b.c", "a.b.d"], ["a.bc.x"]) == ["a.b.*"]
    # MoE routers beside quantized experts: every prefix is taken, so each router is named, never "*.mlp.gate".
    experts = [f"model.layers.{layer}.mlp.experts.{e}.{p}_proj" for layer in (0, 1) for e in (0, 1)
               for p in ("gate", "up", "down")]
    routers = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert summarise_exclude_modules(["lm_head"] + routers, experts) == ["lm_head"] + routers
    modules = dict.fromkeys(experts, ModuleFormat("FP8")) | dict.fromkeys(routers + ["lm_head"])
    assert hf_quant_config(modules, None)["quantization"]["exclude_modules"] == ["lm_head"] + routers


def test_nothing_quantized_writes_no_config():
    with pytest.raises(ModelOptConfigError, match="no module is quantized"):
        hf_quant_config({"lm_head": None}, None)


def test_an_override_the_recipe_contradicts_names_both_and_one_it_agrees_with_passes():
    recipe = "ckpt/iter_0000001/modelopt_state/common.pt"
    check_override("FP8", ModuleFormat("FP8"), "model.layers.0.self_attn.q_proj", recipe)
    with pytest.raises(RecipeError, match=r"model.layers.0.mlp.down_proj: the requested quant_algo NVFP4 "
                                          r"contradicts .*common.pt\), which quantizes it as W4A16_AWQ"):
        check_override("NVFP4", ModuleFormat("W4A16_AWQ", 32), "model.layers.0.mlp.down_proj", recipe)
    with pytest.raises(RecipeError, match="requested quant_algo FP8 .* which leaves it unquantized"):
        check_override("FP8", None, "lm_head", recipe)
