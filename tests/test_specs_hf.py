"""The shipped specs against the real transformers library's names.

Each architecture is built tiny from its config (no download), saved with ``save_pretrained``,
and its on-disk names (per-expert under transformers v5, which fuses experts only in memory)
are read back from the safetensors header. Both ways must hold: every on-disk name is claimed
by a rule or excluded on purpose, and every HF name a rule stands for exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import quantmap
from quantmap.check import check
from quantmap.io.names import read_names
from quantmap.rules import WEIGHT
from quantmap.spec import shipped_specs

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).parent / "data" / "hf"
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
MOE = dict(num_experts_per_tok=2)


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
        "deepseek_v3": t.DeepseekV3Config(**{**TINY, "num_hidden_layers": 3, "num_key_value_heads": 4}, **MOE,
                                          n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                                          moe_intermediate_size=16, q_lora_rank=16, kv_lora_rank=8,
                                          qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                          n_group=1, topk_group=1),
        "gpt_oss": t.GptOssConfig(**TINY, **MOE, head_dim=8, num_local_experts=4),
        "phi3": t.Phi3Config(**TINY, pad_token_id=0),
    }


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "phi3"]
RECORDED = [arch for arch in ARCHS if arch != "phi3"]  # architectures with a names_<arch>.json fixture
PARAMS = {"deepseek_v3": {"num_layers": 3, "num_experts": 4}, "qwen3_moe": {"num_experts": 4},
          "mixtral": {"num_experts": 4}, "olmoe": {"num_experts": 4}}


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory) -> dict[str, list[str]]:
    """Every architecture's save_pretrained names, built once for the module."""
    import torch

    torch.manual_seed(0)
    names = {}
    for arch, config in _configs().items():
        folder = tmp_path_factory.mktemp(arch)
        model = transformers.AutoModelForCausalLM.from_config(config)
        assert type(model).__name__ in quantmap.load_spec(arch).architectures
        model.save_pretrained(folder)
        names[arch] = read_names(folder)
    return names


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
    # transformers does not build DeepSeek's MTP layer (model.layers.{num_layers}); the Megatron tests cover it.
    assert [p for p in dead if "{num_layers + i}" not in p] == []


@pytest.mark.parametrize("arch", RECORDED)
def test_fixture_names_agree_with_the_tiny_model_build(arch, on_disk):
    """The recorded fixture (other widths and counts) is claimed by the spec the same way."""
    fixture = DATA / f"names_{'llama' if arch == 'mistral' else arch}.json"
    record = json.loads(fixture.read_text())
    params = {"num_layers": record["config"]["num_hidden_layers"]} if arch == "deepseek_v3" else {}
    assert check(quantmap.compile(arch, **params), hf=list(record["on_disk_save_pretrained"])).findings == ()


# ModelOpt 0.47 names the quantizers of transformers v5 fused experts per fused tensor
# (mlp.experts.gate_up_proj_weight_quantizers.{E}); that layout is a later issue's.
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
