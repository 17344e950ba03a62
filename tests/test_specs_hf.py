"""The shipped specs against the real transformers library's names.

Each architecture is built tiny from its config (no download), saved with ``save_pretrained``,
and its on-disk names (per-expert under transformers v5, which fuses experts only in memory)
are read back from the safetensors header. Both ways must hold: every on-disk name is claimed
by a rule or excluded on purpose, and every HF name a rule stands for exists.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

import quantmap
from quantmap.check import check
from quantmap.io.names import read_names
from quantmap.ops import apply, reverse
from quantmap.rules import WEIGHT
from quantmap.spec import shipped_specs

transformers = pytest.importorskip("transformers")
# Every test here builds or reads real transformers models: slow, left out of `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data" / "hf"
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
MOE = dict(num_experts_per_tok=2)
# DeepSeek-shaped MLA + MoE: 3 layers, the first dense.
DEEPSEEK = dict(**{**TINY, "num_hidden_layers": 3, "num_key_value_heads": 4}, **MOE, n_routed_experts=4,
                n_shared_experts=1, first_k_dense_replace=1, moe_intermediate_size=16, kv_lora_rank=8,
                qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1)

HYBRID = dict(**{**TINY, "num_hidden_layers": 4}, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2,
              linear_key_head_dim=8, linear_value_head_dim=8)


def _configs() -> dict:
    t = transformers
    return {
        "llama": t.LlamaConfig(**TINY),
        "mistral": t.MistralConfig(**TINY),
        "qwen2": t.Qwen2Config(**TINY),
        "qwen3": t.Qwen3Config(**TINY, head_dim=8),
        # Layer 0 dense (mlp_only_layers), so the spec's dense MLP is exercised next to the experts.
        "qwen3_moe": t.Qwen3MoeConfig(**{**TINY, "num_hidden_layers": 3}, **MOE, head_dim=8, num_experts=4,
                                      moe_intermediate_size=16, mlp_only_layers=[0]),
        "mixtral": t.MixtralConfig(**TINY, **MOE, num_local_experts=4),
        "olmoe": t.OlmoeConfig(**TINY, **MOE, num_experts=4),
        # Both MLA query paths: q_lora_rank set (q_a_proj / q_b_proj) and null (q_proj, DeepSeek-V2-Lite style).
        "deepseek_v3": [t.DeepseekV3Config(**DEEPSEEK, q_lora_rank=rank) for rank in (16, None)],
        "gpt_oss": t.GptOssConfig(**TINY, **MOE, head_dim=8, num_local_experts=4),
        "phi3": t.Phi3Config(**TINY, pad_token_id=0),
        # Tied embeddings as released (no lm_head.weight on disk).
        "gemma2": t.Gemma2Config(**TINY, head_dim=8),
        "gemma3": t.Gemma3TextConfig(**TINY, head_dim=8),
        "qwen2_moe": t.Qwen2MoeConfig(**{**TINY, "num_hidden_layers": 3}, **MOE, num_experts=4,
                                      moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                      mlp_only_layers=[0]),
        "deepseek_v2": [t.DeepseekV2Config(**DEEPSEEK, q_lora_rank=rank) for rank in (16, None)],
        # Kimi K2's checkpoint is DeepseekV3ForCausalLM (model_type kimi_k2); transformers has no class of its own.
        "kimi_k2": [t.DeepseekV3Config(**DEEPSEEK, q_lora_rank=rank) for rank in (16, None)],
        "glm4_moe": t.Glm4MoeConfig(**{**TINY, "num_hidden_layers": 3}, **MOE, head_dim=8, n_routed_experts=4,
                                    n_shared_experts=1, first_k_dense_replace=1, moe_intermediate_size=16, n_group=1,
                                    topk_group=1, attention_bias=True, use_qk_norm=True),
        "nemotron": t.NemotronConfig(**TINY),
        # EXAONE 4.0 32B (untied) and 1.2B (tied) heads.
        "exaone4": [t.Exaone4Config(**TINY, tie_word_embeddings=tied) for tied in (False, True)],
        "ernie4_5_moe": t.Ernie4_5_MoeConfig(**{**TINY, "num_hidden_layers": 3}, moe_num_experts=4, moe_k=2,
                                             moe_intermediate_size=16, moe_num_shared_experts=1,
                                             moe_layer_start_index=1),
        "minimax_m2": t.MiniMaxM2Config(**TINY, **MOE, head_dim=8, num_local_experts=4),
        # Hybrid: layers 0-2 Gated DeltaNet, layer 3 full attention (full_attention_interval 4).
        "qwen3_5": t.Qwen3_5TextConfig(**HYBRID),
        "qwen3_5_moe": t.Qwen3_5MoeTextConfig(**HYBRID, **MOE, num_experts=4, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=32),
        "qwen3_next": t.Qwen3NextConfig(**HYBRID, **MOE, num_experts=4, moe_intermediate_size=16,
                                        shared_expert_intermediate_size=32),
        # Layers: Mamba-2, MoE, attention, MLP (NemotronHConfig's default pattern); with and without
        # the MoE latent projections.
        "nemotron_h": [t.NemotronHConfig(**{**TINY, "num_hidden_layers": 4}, head_dim=8, mamba_num_heads=4,
                                         mamba_head_dim=8, n_groups=2, ssm_state_size=8, n_routed_experts=4,
                                         moe_intermediate_size=16, moe_shared_expert_intermediate_size=32,
                                         moe_latent_size=latent) for latent in (None, 16)],
        "qwen2_5_vl": t.Qwen2_5_VLConfig(
            text_config=dict(**TINY, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                               fullatt_block_indexes=[1])),
    }


# Architectures that are no causal LM for AutoModelForCausalLM: built with their own class.
MODEL_CLASS = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def build(arch: str, config):
    if arch in MODEL_CLASS:
        return getattr(transformers, MODEL_CLASS[arch])(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def variants(arch: str) -> list:
    """The configs built for an architecture (several where one spec serves several layouts)."""
    configs = _configs()[arch]
    return configs if isinstance(configs, list) else [configs]


def linear_modules(model, folder: Path) -> set[str]:
    """The on-disk module names of the model's nn.Linear layers.

    transformers v5 may rename modules in memory (a VLM's model.language_model.layers.* is
    model.layers.* on disk); a linear whose in-memory name is not on disk is found by its weight:
    the on-disk tensor with the same module tail and the same values.
    """
    import torch
    from safetensors.torch import load_file

    disk = {name: tensor for path in folder.glob("*.safetensors") for name, tensor in load_file(path).items()}
    out = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if f"{name}.weight" in disk:
            out.add(name)
            continue
        tail = "." + ".".join(name.split(".")[-2:]) + ".weight"
        same = [key for key, tensor in disk.items() if key.endswith(tail) and tensor.shape == module.weight.shape
                and torch.equal(tensor, module.weight.detach())]
        out.update(key[: -len(".weight")] for key in same[:1] if len(same) == 1)
    return out


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "phi3",
         "gemma2", "gemma3", "qwen2_moe", "deepseek_v2", "kimi_k2", "glm4_moe", "nemotron", "exaone4", "ernie4_5_moe",
         "minimax_m2", "qwen2_5_vl", "qwen3_5", "qwen3_5_moe", "qwen3_next", "nemotron_h"]
# architectures with a names_<arch>.json fixture
RECORDED = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]
PARAMS = {"deepseek_v3": {"num_layers": 3, "num_experts": 4}, "qwen3_moe": {"num_experts": 4},
          "mixtral": {"num_experts": 4}, "olmoe": {"num_experts": 4}, "deepseek_v2": {"num_experts": 4},
          "kimi_k2": {"num_layers": 3, "num_experts": 4}, "glm4_moe": {"num_layers": 3, "num_experts": 4},
          "qwen2_moe": {"num_experts": 4}, "ernie4_5_moe": {"num_experts": 4}, "minimax_m2": {"num_experts": 4},
          "qwen3_5_moe": {"num_experts": 4}, "qwen3_next": {"num_experts": 4}, "nemotron_h": {"num_experts": 4}}
# Tied embeddings: neither side has the output head that base/common.yaml maps (the specs drop it).
TIED = {"gemma2", "gemma3", "ernie4_5_moe"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[list[str], set[str]]]:
    """Every architecture's save_pretrained names and its nn.Linear modules, built once for the module.

    An architecture with several variants (e.g. both MLA query paths) gets the union of their names.
    """
    import torch

    torch.manual_seed(0)
    out = {}
    for arch in _configs():
        names, linears = [], set()
        for index, config in enumerate(variants(arch)):
            folder = tmp_path_factory.mktemp(f"{arch}{index}")
            model = build(arch, config)
            assert type(model).__name__ in quantmap.load_spec(arch).architectures
            model.save_pretrained(folder)
            names += [name for name in read_names(folder) if name not in names]
            linears |= linear_modules(model, folder)
        out[arch] = (names, linears)
    return out


@pytest.fixture(scope="module")
def on_disk(built) -> dict[str, list[str]]:
    return {arch: names for arch, (names, _) in built.items()}


def test_every_architecture_is_built_and_has_a_shipped_spec():
    assert sorted(_configs()) == sorted(ARCHS)
    assert set(ARCHS) == set(shipped_specs())


@pytest.mark.parametrize("arch", ARCHS)
def test_every_on_disk_name_is_claimed_or_excluded_and_its_group_exists(arch, on_disk):
    report = check(quantmap.compile(arch, **PARAMS.get(arch, {})), hf=on_disk[arch])
    assert report.findings == ()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_weight_rule_targets_names_the_model_has(arch, on_disk):
    """Rules for names transformers never writes would be dead weight, or a wrong name."""
    rules = quantmap.compile(arch, **PARAMS.get(arch, {}))
    names = on_disk[arch]
    dead = [pattern.text for rule in rules if rule.kind == WEIGHT for pattern in rule.hf
            if not any(pattern.match(name) is not None for name in names)]
    # transformers does not build MTP layers (model.layers.{num_layers}, or mtp.*); the Megatron tests cover them.
    dead = [p for p in dead if "{num_layers + i}" not in p and not p.startswith("mtp.")]
    assert dead == []


@pytest.mark.parametrize("arch", RECORDED)
def test_fixture_names_agree_with_the_tiny_model_build(arch, on_disk):
    """The recorded fixture (other widths and counts) is claimed by the spec the same way."""
    fixture = DATA / f"names_{'llama' if arch == 'mistral' else arch}.json"
    record = json.loads(fixture.read_text())
    params = {"num_layers": record["config"]["num_hidden_layers"]} if arch == "deepseek_v3" else {}
    assert check(quantmap.compile(arch, **params), hf=list(record["on_disk_save_pretrained"])).findings == ()


# ModelOpt 0.47 names the quantizers of transformers v5 fused experts per fused tensor
# (mlp.experts.gate_up_proj_weight_quantizers.{E}): in-memory names, which tests/test_hf_naming.py
# checks under --hf-naming in-memory. Under the default on-disk naming every other buffer resolves.
FUSED_EXPERT_QUANTIZER = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)_(weight_quantizers\.\d+|input_quantizer)\.")


@pytest.mark.parametrize("fixture", sorted(DATA.glob("quant_*.json")), ids=lambda p: p.stem)
def test_every_dense_quantizer_buffer_of_modelopt_is_a_rule_target(fixture):
    record = json.loads(fixture.read_text())
    rules = quantmap.compile(record["arch"], **({"num_layers": 3} if record["arch"] == "deepseek_v3" else {}))
    buffers = [name for name in record["buffers"] if not FUSED_EXPERT_QUANTIZER.search(name)]
    assert buffers and [name for name in buffers if rules.to_megatron(name) is None] == []


def test_kv_cache_quantizers_of_mla_attention_map_to_megatron_core_attention():
    record = json.loads((DATA / "quant_deepseek_v3_FP8_DEFAULT_CFG_plus_FP8_KV_CFG.json").read_text())
    rules = quantmap.compile("deepseek_v3", num_layers=3)
    for module in record["modules_with_k_bmm_quantizer"]:
        layer = module.split(".")[2]
        assert rules.to_megatron(f"{module}.k_bmm_quantizer._amax").megatron == (
            f"decoder.layers.{layer}.self_attention.core_attention.k_bmm_quantizer._amax")
        assert rules.to_megatron(f"{module}.v_bmm_quantizer._amax").megatron == (
            f"decoder.layers.{layer}.self_attention.core_attention.v_bmm_quantizer._amax")


@pytest.mark.parametrize("arch", sorted(TIED))
def test_a_spec_of_a_tied_architecture_claims_no_output_head(arch, on_disk):
    rules = quantmap.compile(arch, **PARAMS.get(arch, {}))
    assert all(config.tie_word_embeddings for config in variants(arch)) and "lm_head.weight" not in on_disk[arch]
    assert rules.to_megatron("lm_head.weight") is None and rules.to_hf("output_layer.weight_quantizer._amax") is None


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - TIED))
def test_a_spec_claims_lm_head_for_an_architecture_with_an_untied_head(arch, on_disk):
    """output_layer.{weight,input}_quantizer <-> lm_head.*: ModelOpt disables the head by default, but a user
    who quantizes it gets these buffers, so every spec of an untied architecture maps them."""
    rules = quantmap.compile(arch, **PARAMS.get(arch, {}))
    assert rules.to_megatron("lm_head.weight_quantizer._amax").megatron.endswith("output_layer.weight_quantizer._amax")
    assert any(not config.tie_word_embeddings for config in variants(arch)) and "lm_head.weight" in on_disk[arch]
    fixture = DATA / f"names_{'llama' if arch == 'mistral' else arch}.json"
    if arch in RECORDED:  # the recorded fixtures agree
        record = json.loads(fixture.read_text())
        assert record["config"]["tie_word_embeddings"] is False and "lm_head.weight" in record["on_disk_save_pretrained"]


# ModelOpt 0.47's default disabled quantizers (modelopt_recipes/configs/ptq/units/
# default_disabled_quantizers.yaml), the ones that name modules of these models.
MODELOPT_DISABLED = ["*block_sparse_moe.gate*", "*linear_attn.conv1d*", "*linear_attn.in_proj_a*",
                     "*linear_attn.in_proj_b*", "*lm_head*", "*mixer.conv1d*", "*mlp.gate.*",
                     "*mlp.shared_expert_gate.*", "*router*", "mtp.*", "*visual*"]


def _quantized_modules(names: list[str], linears: set[str]) -> tuple[list[str], list[str]]:
    """The modules ModelOpt puts weight and input quantizers on, and the linears it leaves alone.

    Quantized: every nn.Linear whose weight is on disk, and every per-expert projection on disk
    (transformers v5 fuses experts in memory; the specs name their quantizers per expert).
    """
    expert = re.compile(r"\.experts\.\d+\.\w+\.weight$")
    modules = sorted({name[: -len(".weight")] for name in names if name.endswith(".weight")
                      and (name[: -len(".weight")] in linears or expert.search(name))})
    disabled = [m for m in modules if any(fnmatch.fnmatchcase(f"{m}.weight_quantizer", p) for p in MODELOPT_DISABLED)]
    return [m for m in modules if m not in disabled], disabled


@pytest.mark.parametrize("arch", ARCHS)
def test_modelopt_quantizers_of_every_hf_linear_resolve_both_ways(arch, built):
    """<linear>.weight_quantizer._amax / input_quantizer._amax go to Megatron and come back unchanged;
    the linears ModelOpt leaves unquantized (heads, routers, gates) get no quantizer rule."""
    rules = quantmap.compile(arch, **PARAMS.get(arch, {}))
    quantized, disabled = _quantized_modules(*built[arch])
    assert quantized
    for module in quantized:
        for buffer in ("weight_quantizer._amax", "input_quantizer._amax"):
            name = f"{module}.{buffer}"
            match = rules.to_megatron(name)
            assert match is not None and match.kind != WEIGHT, name
            back = rules.to_hf(match.megatron)
            assert name in (back.expanded or back.hf), (name, match.megatron)
    # The head is disabled by default but mapped on purpose (a user may quantize it); the rest stay unmapped.
    assert [m for m in disabled if m != "lm_head" and rules.to_megatron(f"{m}.weight_quantizer._amax")] == []


@pytest.mark.parametrize("arch", sorted(TIED))
def test_check_in_memory_strict_passes_on_a_tied_live_models_names(arch, tmp_path):
    """`quantmap check ARCH --hf-naming in-memory --strict` on the live model's state_dict names, tied
    lm_head.weight included, exits 0 with nothing to report."""
    import subprocess
    import sys

    names = [n for config in variants(arch) for n in build(arch, config).state_dict()]
    assert "lm_head.weight" in names
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    params = [f"-p{key}={value}" for key, value in PARAMS.get(arch, {}).items()]
    run = subprocess.run([sys.executable, "-m", "quantmap", "check", arch, "--hf", str(tmp_path / "names.txt"),
                          "--hf-naming", "in-memory", "--strict", *params], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stdout + run.stderr


# ModelOpt's own wrappers for these expert modules, not its generic _QuantFusedExperts (huggingface.py
# _fused_experts_wrapper_class: "non-standard layouts ... have their own explicit registrations").
OWN_EXPERTS_WRAPPER = {"GptOssExperts"}


def _fused_expert_quantizers(model) -> list[str]:
    """The quantizer buffers ModelOpt's generic fused-experts wrapper gives a live model (ModelOpt
    huggingface.py _QuantFusedExperts: any module with ``num_experts`` and 3-D ``gate_up_proj`` (or,
    non-gated, ``up_proj``) and ``down_proj`` gets ``<tensor>_weight_quantizers.{E}`` and one
    ``<tensor>_input_quantizer`` per tensor)."""
    import torch

    out = []
    for name, module in model.named_modules():
        down = getattr(module, "down_proj", None)
        if (type(module).__name__ in OWN_EXPERTS_WRAPPER or not hasattr(module, "num_experts")
                or not isinstance(down, torch.Tensor) or down.dim() != 3):
            continue
        first = "gate_up_proj" if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) else "up_proj"
        for tensor in (first, "down_proj"):
            out.append(f"{name}.{tensor}_input_quantizer._amax")
            out += [f"{name}.{tensor}_weight_quantizers.{e}._amax" for e in range(module.num_experts)]
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_in_memory_name_of_a_live_model_is_claimed_and_its_fused_expert_quantizers_resolve_both_ways(arch):
    """Under --hf-naming in-memory, every name of the live model's state_dict is claimed or excluded (a
    tied head's lm_head.weight included: the spec excludes it), and every fused-expert quantizer ModelOpt
    would give it goes to Megatron and back."""
    rules = quantmap.compile(arch, "in-memory", **PARAMS.get(arch, {}))
    names, quantizers = [], []
    for config in variants(arch):
        model = build(arch, config)
        names += [n for n in model.state_dict() if n not in names]
        quantizers += [n for n in _fused_expert_quantizers(model) if n not in quantizers]
    report = check(rules, hf=names)
    assert report.findings == (), report.to_text()
    for name in quantizers:
        match = rules.to_megatron(name)
        assert match is not None, name
        back = rules.to_hf(match.source_names([0])[0] if "*" in match.megatron else match.megatron)
        assert name in (back.expanded or back.hf), (name, match.megatron)
    moe = {"qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "qwen2_moe", "deepseek_v2", "kimi_k2", "glm4_moe",
           "ernie4_5_moe", "minimax_m2", "qwen3_5_moe", "qwen3_next", "nemotron_h"}
    assert bool(quantizers) == (arch in moe)


# Megatron-Bridge 0.6.2 (src/megatron/bridge/models/gpt_oss/gpt_oss_bridge.py), restated: how it turns
# gpt-oss's HF expert tensors into Megatron's per-expert ones (hf_to_megatron) and back (megatron_to_hf,
# whose per-expert results its grouped export stacks on dim 0, model_bridge._accumulate_grouped_export).
def _bridge_import(tensor: str, hf, expert: int):
    import torch

    if tensor == "down_proj":  # maybe_modify_loaded_hf_weight: BF16 [E, I, H] (I != H) -> [E, H, I]
        hf = hf.transpose(-1, -2).contiguous()
    weight = hf[expert]
    if tensor.startswith("gate_up_proj"):
        if weight.ndim == 2:  # _align_expert_weight_to_shape: [H, 2I] -> Megatron's [2I, H]
            weight = weight.t().contiguous()
        weight = torch.cat((weight[::2, ...], weight[1::2, ...]), dim=0)  # GPTOSSMLPGateUpProjMapping._interleave
    return weight


def _bridge_export(tensor: str, experts: list):
    import torch

    out = []
    for weight in experts:
        if tensor.startswith("gate_up_proj"):  # GPTOSSMLPGateUpProjMapping._uninterleave, then transpose
            gate, up = torch.chunk(weight, 2, dim=0)
            weight = torch.empty_like(weight)
            weight[::2, ...], weight[1::2, ...] = gate, up
            weight = weight.transpose(0, 1) if weight.ndim == 2 else weight
        elif tensor == "down_proj":  # GPTOSSMLPDownProjMapping.megatron_to_hf: the weight, not the bias
            weight = weight.transpose(-1, -2)
        out.append(weight.contiguous())
    return torch.stack(out, dim=0)


GPT_OSS_EXPERTS = {"gate_up_proj": "linear_fc1.weight", "gate_up_proj_bias": "linear_fc1.bias",
                   "down_proj": "linear_fc2.weight", "down_proj_bias": "linear_fc2.bias"}


@pytest.mark.parametrize("tensor", sorted(GPT_OSS_EXPERTS))
@pytest.mark.parametrize("form", ["local_experts.{e}.{name}", "{name}{e}"], ids=["sequential", "grouped"])
def test_gpt_oss_expert_layouts_turn_megatron_bridge_experts_into_the_real_hf_tensor_and_back(tensor, form):
    """The rule of each gpt-oss expert tensor, run on a tiny GptOssForCausalLM's own tensors: Megatron's
    per-expert tensors, made as Megatron-Bridge makes them, become exactly the HF tensor, and the HF
    tensor becomes exactly them again (weights and biases, SequentialMLP and TEGroupedMLP names)."""
    import torch

    torch.manual_seed(0)
    config = _configs()["gpt_oss"]
    model = build("gpt_oss", config)
    parameter = getattr(model.model.layers[1].mlp.experts, tensor)
    with torch.no_grad():  # distinct values (the biases start at zero), so that any misplaced element shows
        parameter.copy_(torch.randperm(parameter.numel()).reshape(parameter.shape))
    hf = parameter.detach()
    experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
    assert inter != hidden and hf.shape[0] == experts
    megatron = [_bridge_import(tensor, hf, e) for e in range(experts)]
    shape = {"gate_up_proj": (2 * inter, hidden), "gate_up_proj_bias": (2 * inter,), "down_proj": (hidden, inter),
             "down_proj_bias": (hidden,)}[tensor]  # Megatron's [out, in] and [out]
    assert all(tuple(m.shape) == shape for m in megatron) and torch.equal(_bridge_export(tensor, megatron), hf)

    rules = quantmap.compile("gpt_oss", num_experts=experts)
    names = [f"decoder.layers.1.mlp.experts.{form.format(e=e, name=GPT_OSS_EXPERTS[tensor])}" for e in range(experts)]
    matches = [rules.to_hf(name) for name in names]
    assert {m.hf for m in matches} == {(f"model.layers.1.mlp.experts.{tensor}",)} and len({m.rule for m in matches}) == 1
    ops = matches[0].rule.layout.ops
    (exported,) = apply(ops, megatron)
    assert torch.equal(exported, hf)
    imported = apply(reverse(ops), [hf])
    assert len(imported) == experts and all(torch.equal(a, b) for a, b in zip(imported, megatron))
