"""Gated DeltaNet ``in_proj``: one quantized Megatron linear against HF parts of which ModelOpt quantizes some.

ModelOpt 0.47 quantizes Megatron's ``self_attention.in_proj`` and HF's ``in_proj_qkv`` + ``in_proj_z``
(Qwen3.5) / ``in_proj_qkvz`` (Qwen3-Next), and disables ``*linear_attn.in_proj_a*`` /
``*linear_attn.in_proj_b*`` (``default_disabled_quantizers.yaml``); its Megatron exporter gives in_proj's
scales to the quantized parts only (``_gated_delta_net_slicing``). The specs say so with
``quantized_parts``: in_proj's quantizers fan out to those parts and back, nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantmap
from quantmap.diagnostics import SpecError
from quantmap.executor import ExecutorError, ParallelLayout, export_offline, import_offline
from quantmap.io.shards import LazyShard
from quantmap.model_names import HF, MEGATRON, ModelSize, model_names

REPO = Path(__file__).resolve().parents[1]
# 3 GDN layers and 1 full-attention layer, as Qwen3.5's full_attention_interval 4 gives them.
KINDS = ("linear_attention",) * 3 + ("full_attention",)
QUANTIZED = {"qwen3_5": ("qkv", "z"), "qwen3_5_moe": ("qkv", "z"), "qwen3_next": ("qkvz",)}
UNQUANTIZED = {"qwen3_5": ("a", "b"), "qwen3_5_moe": ("a", "b"), "qwen3_next": ("ba",)}
BUFFERS = ("weight_quantizer._amax", "input_quantizer._amax", "input_quantizer._pre_quant_scale")


def _rules(arch: str):
    return quantmap.compile(arch, **({} if arch == "qwen3_5" else {"num_experts": 2}))


def _in_proj(names: list[str]) -> list[str]:
    return [n for n in names if ".in_proj" in n and "_quantizer." in n]


@pytest.mark.parametrize("arch", sorted(QUANTIZED))
def test_every_in_proj_quantizer_name_of_both_sides_resolves_to_the_other_and_back(arch):
    """The names `quantmap names` lists for a 4-layer model: Megatron's in_proj quantizers go to exactly
    the quantized HF parts of their layer, and those come back to them."""
    rules = _rules(arch)
    size = ModelSize(4, 2, kinds=KINDS)
    megatron = _in_proj(model_names(rules, MEGATRON, size, buffers=BUFFERS))
    hf = _in_proj(model_names(rules, HF, size, buffers=BUFFERS))
    assert len(megatron) == 3 * len(BUFFERS) and len(hf) == len(QUANTIZED[arch]) * len(megatron)
    targets = []
    for name in megatron:
        layer, buffer = name.split(".")[2], name.split(".in_proj.")[1]
        match = rules.to_hf(name)
        assert match.hf == tuple(f"model.layers.{layer}.linear_attn.in_proj_{part}.{buffer}"
                                 for part in QUANTIZED[arch]), name
        targets += match.hf
        for part, target in zip(QUANTIZED[arch], match.hf):
            back = rules.to_megatron(target)
            assert (back.megatron, back.part) == (name, part)
    assert sorted(targets) == sorted(hf)


@pytest.mark.parametrize("arch", sorted(QUANTIZED))
def test_an_unquantized_parts_quantizer_is_not_mapped_and_says_which_part_of_which_weight_it_is(arch):
    rules = _rules(arch)
    names = [f"model.layers.1.linear_attn.in_proj_{part}.{buffer}" for part in UNQUANTIZED[arch]
             for buffer in BUFFERS]
    assert all(rules.to_megatron(name) is None for name in names)
    found = [rules.unquantized_part(name) for name in names]
    assert [(m.megatron, m.part) for m in found] == [("decoder.layers.1.self_attention.in_proj.weight", part)
                                                     for part in UNQUANTIZED[arch] for _ in BUFFERS]
    assert all(m.rule.quantized_parts == QUANTIZED[arch] for m in found)
    # A name no rule knows at all, and a quantized part's, are not "unquantized parts".
    assert rules.unquantized_part("model.layers.1.linear_attn.in_proj_qkvx.weight_quantizer._amax") is None
    assert rules.unquantized_part("model.layers.1.mlp.gate.weight_quantizer._amax") is None


def test_lookup_of_an_unquantized_parts_quantizer_says_why_it_is_not_mapped():
    name = "model.layers.1.linear_attn.in_proj_a.weight_quantizer._amax"
    run = subprocess.run([sys.executable, "-m", "quantmap", "lookup", "qwen3_5", "-r", name, "--json"],
                         capture_output=True, text=True, cwd=REPO)
    record = json.loads(run.stdout)
    assert run.returncode == 1 and record["match"] is None, run.stderr
    assert record["reason"].startswith("part 'a' of decoder.layers.1.self_attention.in_proj.weight is not "
                                       "quantized (its mapping's quantized_parts: qkv, z; ")
    assert "gated_delta_net.yaml:" in record["reason"]


def test_in_proj_scalars_export_to_the_quantized_parts_and_import_back_on_every_rank(tmp_path):
    """TP=2: the scalar amax is copied to in_proj_qkv and in_proj_z, the AWQ pre_quant_scale (the one input
    every part reads) too; the import gives every rank its in_proj state back exactly."""
    rules = _rules("qwen3_5")
    prefix = "decoder.layers.0.self_attention.in_proj."
    ranks = [{prefix + "weight_quantizer._amax": torch.tensor(2.5), prefix + "input_quantizer._amax": torch.tensor(1.5),
              prefix + "input_quantizer._pre_quant_scale": torch.linspace(0.5, 2.0, 32)} for _ in range(2)]
    layout = ParallelLayout(tp=2, num_layers=1)
    exported = export_offline(rules, ranks, layout, out=tmp_path / "hf")
    state = exported.state_dict()
    assert sorted(state) == sorted(f"model.layers.0.linear_attn.in_proj_{part}.{buffer}" for part in ("qkv", "z")
                                   for buffer in BUFFERS)
    for name, tensor in state.items():
        assert torch.equal(tensor, ranks[0][prefix + name.split(".", 5)[5]]), name
    report = import_offline(rules, tmp_path / "hf", layout, tmp_path / "megatron")
    assert report.written == 6 and report.disagreements == []
    for rank in range(2):
        back = LazyShard(tmp_path / "megatron" / f"rank_{rank:05d}.safetensors")
        assert sorted(back.keys()) == sorted(ranks[rank])
        assert all(torch.equal(back[name], ranks[rank][name]) for name in ranks[rank])


def test_a_per_channel_in_proj_weight_amax_is_refused_naming_the_parts_no_hf_tensor_holds(tmp_path):
    """Its rows cover b and a too, which HF keeps unquantized: no import could rebuild them, so no export."""
    state = {"decoder.layers.0.self_attention.in_proj.weight_quantizer._amax": torch.ones(40, 1)}
    with pytest.raises(ExecutorError) as raised:
        export_offline(_rules("qwen3_5"), [state], ParallelLayout(num_layers=1), out=tmp_path / "hf")
    message = str(raised.value)
    assert "in_proj.weight_quantizer._amax has shape [40, 1]" in message and "Nothing was written" in message
    assert "only the parts ['qkv', 'z'] of the group ['qkv', 'z', 'b', 'a'] carry quantizers" in message
    assert "rows of ['b', 'a']" in message and not (tmp_path / "hf").exists()


@pytest.mark.parametrize(("value", "says"), [
    ("[qkv, x]", "must name parts of the group ['qkv', 'z'], each once ('x' is none)"),
    ("[qkv, qkv]", "must name parts of the group ['qkv', 'z'], each once"),
    ("[]", "quantized_parts is empty"),
    ("[qkv, z]", "lists every part"),
])
def test_quantized_parts_that_do_not_fit_the_group_are_qm029_at_their_line(tmp_path, value, says):
    path = tmp_path / "spec.yaml"
    path.write_text("name: t\nmappings:\n  - megatron: a.*.in_proj.weight\n    hf: {qkv: b.*.qkv.weight, z: b.*.z.weight}\n"
                    f"    quantized_parts: {value}\n")
    with pytest.raises(SpecError) as raised:
        quantmap.compile(path)
    (problem,) = raised.value.diagnostics
    assert problem.code == "QM029" and says in problem.message and problem.location.line == 5


def test_quantized_parts_of_a_single_hf_name_is_qm029(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: t\nmappings:\n  - {megatron: a.*.proj.weight, hf: b.*.proj.weight, quantized_parts: [x]}\n")
    with pytest.raises(SpecError) as raised:
        quantmap.compile(path)
    assert [d.code for d in raised.value.diagnostics] == ["QM029"]
