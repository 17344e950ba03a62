"""transformers v5 in-memory naming (``--hf-naming in-memory``) against the real library's names.

ModelOpt 0.47 on a live transformers 5.24 MoE model names the fused experts' quantizers after the fused
tensor (``mlp.experts.gate_up_proj_weight_quantizers.{E}._amax``, ``gate_up_proj_input_quantizer._amax``);
``tests/data/hf/quant_*.json`` hold every quantizer buffer of such runs and ``names_*.json`` the
in-memory parameter names. Under in-memory naming each buffer is the target of exactly one rule that a
reverse lookup returns, and its Megatron name(s) map forward onto it again; under on-disk naming the
fused-expert names are not claimed, and the per-expert on-disk names are (tests/test_specs_hf.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import quantmap
from quantmap.check import check
from quantmap.rules import FAN_IN, MOE_FANOUT

DATA = Path(__file__).parent / "data" / "hf"
QUANT = sorted(DATA.glob("quant_*.json"))
NAMES = sorted(DATA.glob("names_*.json"))
FUSED = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)_")


def _record(path: Path) -> dict:
    return json.loads(path.read_text())


def _params(config: dict) -> dict:
    """The spec parameters a fixture's model config gives (expert and decoder-layer counts)."""
    params = {}
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts")
    if experts:
        params["num_experts"] = experts
    if config["model_type"] == "deepseek_v3":
        params["num_layers"] = config["num_hidden_layers"]
    return params


def _config(arch: str) -> dict:
    return _record(DATA / f"names_{arch}.json")["config"]


def _forward_targets(rules, megatron: str) -> list[str]:
    match = rules.to_hf(megatron)
    return list(match.expanded if match.kind == MOE_FANOUT else match.hf)


@pytest.mark.parametrize("fixture", QUANT, ids=lambda p: p.stem)
def test_every_quantizer_buffer_is_the_target_of_exactly_one_rule_and_resolves_back(fixture):
    record = _record(fixture)
    rules = quantmap.compile(record["arch"], "in-memory", **_params(_config(record["arch"])))
    assert record["buffers"]
    for name in record["buffers"]:
        claiming = [rule for rule in rules if rule.reversible and any(p.match(name) is not None for p in rule.hf)]
        top = max(rule.priority for rule in claiming)
        winners = [rule for rule in claiming if rule.priority == top]
        assert len(winners) == 1, (name, winners)
        back = rules.to_megatron(name)
        assert back.rule is winners[0], name
        # A fan-in buffer stands for every expert's quantizer: each maps forward onto it.
        sources = back.expanded if back.kind == FAN_IN and back.expanded else (back.megatron,)
        assert "*" not in "".join(sources)
        assert all(name in _forward_targets(rules, source) for source in sources), name


@pytest.mark.parametrize("fixture", [p for p in QUANT if "moe" in p.name or "mixtral" in p.name
                                     or "deepseek" in p.name], ids=lambda p: p.stem)
def test_fused_expert_buffers_resolve_to_sequential_mlp_and_fan_in_from_every_expert(fixture):
    record = _record(fixture)
    params = _params(_config(record["arch"]))
    rules = quantmap.compile(record["arch"], "in-memory", **params)
    layer = next(int(n.split(".")[2]) for n in record["buffers"] if FUSED.search(n))
    head = f"model.layers.{layer}.mlp.experts."
    weight = rules.to_megatron(head + "gate_up_proj_weight_quantizers.3._amax")
    assert weight.megatron == f"decoder.layers.{layer}.mlp.experts.local_experts.3.linear_fc1.weight_quantizer._amax"
    fan_in = rules.to_megatron(head + "down_proj_input_quantizer._amax")
    assert fan_in.kind == FAN_IN
    assert fan_in.megatron == f"decoder.layers.{layer}.mlp.experts.local_experts.*.linear_fc2.input_quantizer._amax"
    assert len(fan_in.expanded) == params["num_experts"]
    # The grouped forms map forward onto the same buffers.
    assert rules.to_hf(f"decoder.layers.{layer}.mlp.experts.linear_fc1.weight_quantizer.3._amax").hf == \
        (head + "gate_up_proj_weight_quantizers.3._amax",)
    assert rules.to_hf(f"decoder.layers.{layer}.mlp.experts.linear_fc2.input_quantizer._amax").hf == \
        (head + "down_proj_input_quantizer._amax",)
    # Under on-disk naming no rule claims the fused names.
    on_disk = quantmap.compile(record["arch"], **params)
    assert [n for n in record["buffers"] if FUSED.search(n) and on_disk.to_megatron(n) is not None] == []


@pytest.mark.parametrize("fixture", NAMES, ids=lambda p: p.stem)
def test_every_in_memory_name_of_the_real_model_is_claimed_or_excluded(fixture):
    record = _record(fixture)
    arch = record["arch"]
    rules = quantmap.compile(arch, "in-memory", **_params(record["config"]))
    report = check(rules, hf=list(record["state_dict_keys"]))
    assert report.findings == (), report.to_text()


def _in_memory_name(name: str, conversions: list[dict]) -> str:
    """An on-disk name as transformers v5 loads it, by the model's own conversion mapping."""
    for conversion in conversions:
        if conversion["type"] == "WeightRenaming":
            for source, target in zip(conversion["source_patterns"], conversion["target_patterns"]):
                name = name.replace(source, target)
    for conversion in conversions:
        if conversion["type"] == "WeightConverter":
            for source in conversion["source_patterns"]:
                found = re.search(re.escape(source).replace(r"\*", r"\d+"), name)
                if found:
                    return name[:found.start()] + conversion["target_patterns"][0] + name[found.end():]
    return name


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "deepseek_v3", "mixtral"])
def test_a_weight_mapped_on_disk_maps_in_memory_to_the_name_transformers_converts_it_to(arch):
    record = _record(DATA / f"names_{arch}.json")
    on_disk = quantmap.compile(arch, **_params(record["config"]))
    in_memory = quantmap.compile(arch, "in-memory", **_params(record["config"]))
    converted = 0
    for name in record["on_disk_save_pretrained"]:
        v5 = _in_memory_name(name, record["conversion_mapping"])
        assert v5 in record["parameters"] or v5 in record["buffers"], (name, v5)
        megatron = on_disk.to_megatron(name).megatron
        assert v5 in in_memory.to_hf(megatron).hf, (name, megatron)
        converted += v5 != name
    assert converted >= 2 * 3 * 4  # at least two layers of gate, up and down for four experts
