"""Gated DeltaNet ``in_proj``: one quantized Megatron linear against HF parts of which ModelOpt quantizes some;
and the rows of the GDN weights (and of the gated attention's ``linear_qkv``) on each TP rank, as Megatron-Core
lays them out.

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


# A hand-built GDN layer: 2 key heads of dim 2, 4 value heads of dim 2 (2 per key head), hidden 3.
GDN = {"linear_num_key_heads": 2, "linear_key_head_dim": 2, "linear_num_value_heads": 4, "linear_value_head_dim": 2}
IN_PROJ, CONV1D = "decoder.layers.0.self_attention.in_proj.weight", "decoder.layers.0.self_attention.conv1d.weight"


def _tagged(rows: int, tag: int, *rest: int) -> torch.Tensor:
    """Row i of the tensor holds tag * 100 + i in every element, so a row tells where it came from."""
    return (tag * 100 + torch.arange(rows, dtype=torch.float32)).reshape(rows, *[1] * len(rest)).expand(rows, *rest) \
        .contiguous()


def _rows(tensor: torch.Tensor) -> list[int]:
    return [int(v) for v in tensor.reshape(tensor.shape[0], -1)[:, 0]]


def _span(tag: int, start: int, count: int) -> list[int]:
    return [tag * 100 + i for i in range(start, start + count)]


def _model_options(folder: Path):
    """Whole-model runs (format hf) of a GDN layer alone: the rest of the model absent, and no output head."""
    from quantmap.executor.options import RunOptions
    from quantmap.io.hf import model_files

    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**GDN, "tie_word_embeddings": True}))
    return RunOptions(format="hf", allow_partial=True, model_files=model_files(config=str(folder / "config.json")))


# What each rank of TP=2 holds, written out from Megatron-Core 0.16.1 ssm/gated_delta_net.py: in_proj's rows
# are [q; k; v; z; b; a] (q, k: key heads x key dim = 4 rows; v, z: value heads x value dim = 8; b, a: value
# heads = 4), conv1d's [q; k; v], and rank r holds [q_r; k_r; v_r; z_r; b_r; a_r] (its forward cuts its rows
# by qk_dim // tp, ..., num_value_heads // tp): here key head r and value heads 2r, 2r + 1.
# Qwen3.5 (in_proj_qkv = [q; k; v] whole, tag 1; in_proj_z 2, in_proj_b 3, in_proj_a 4; conv1d 5):
QWEN3_5 = {rank: {IN_PROJ: _span(1, 2 * rank, 2) + _span(1, 4 + 2 * rank, 2) + _span(1, 8 + 4 * rank, 4)
                  + _span(2, 4 * rank, 4) + _span(3, 2 * rank, 2) + _span(4, 2 * rank, 2),
                  CONV1D: _span(5, 2 * rank, 2) + _span(5, 4 + 2 * rank, 2) + _span(5, 8 + 4 * rank, 4)}
           for rank in range(2)}
# Qwen3-Next (in_proj_qkvz, tag 1: per key head g, [q_g (2) k_g (2) v_g (4) z_g (4)]; in_proj_ba, tag 2: per key
# head [b_g (2) a_g (2)]): rank r holds key head r, so its in_proj is key head r's qkvz block, then its ba block.
QWEN3_NEXT = {rank: {IN_PROJ: _span(1, 12 * rank, 12) + _span(2, 4 * rank, 4),
                     CONV1D: QWEN3_5[rank][CONV1D]} for rank in range(2)}


@pytest.mark.parametrize(("arch", "hf", "expected"), [
    ("qwen3_5", {"in_proj_qkv": _tagged(16, 1, 3), "in_proj_z": _tagged(8, 2, 3), "in_proj_b": _tagged(4, 3, 3),
                 "in_proj_a": _tagged(4, 4, 3)}, QWEN3_5),
    ("qwen3_next", {"in_proj_qkvz": _tagged(24, 1, 3), "in_proj_ba": _tagged(8, 2, 3)}, QWEN3_NEXT),
])
def test_each_tp_rank_holds_the_in_proj_and_conv1d_rows_megatron_core_gives_it_and_they_export_back(
        tmp_path, arch, hf, expected):
    from safetensors.torch import save_file

    source = {f"model.layers.0.linear_attn.{name}.weight": tensor for name, tensor in hf.items()}
    source["model.layers.0.linear_attn.conv1d.weight"] = _tagged(16, 5, 1, 4)
    layout, options = ParallelLayout(tp=2, num_layers=1), _model_options(tmp_path / "hf")
    save_file(source, tmp_path / "hf" / "model.safetensors")
    rules = quantmap.compile(arch, **GDN, **({} if arch == "qwen3_5" else {"num_experts": 2}))
    import_offline(rules, tmp_path / "hf", layout, tmp_path / "megatron", options=options)
    for rank in range(2):
        shard = LazyShard(tmp_path / "megatron" / f"rank_{rank:05d}.safetensors")
        assert sorted(shard.keys()) == [CONV1D, IN_PROJ]
        assert {name: _rows(shard[name]) for name in shard.keys()} == expected[rank], rank
    states = [{name: shard[name] for name in shard.keys()}
              for shard in (LazyShard(tmp_path / "megatron" / f"rank_{rank:05d}.safetensors") for rank in range(2))]
    back = export_offline(rules, states, layout, options=options).state_dict()
    assert sorted(back) == sorted(source) and all(torch.equal(back[name], source[name]) for name in source)


@pytest.mark.parametrize("direction", ["import", "export"])
def test_gdn_sizes_that_contradict_the_rows_are_refused_naming_both_numbers(tmp_path, direction):
    """linear_num_key_heads=1 gives in_proj 2 x 2 + 2 x 8 + 2 x 4 = 28 rows; the tensor has 32."""
    from safetensors.torch import save_file

    rules = quantmap.compile("qwen3_5", **{**GDN, "linear_num_key_heads": 1})
    layout, options = ParallelLayout(tp=2, num_layers=1), _model_options(tmp_path / "hf")
    with pytest.raises(ExecutorError) as raised:
        if direction == "import":
            parts = {"qkv": 16, "z": 8, "b": 4, "a": 4}
            save_file({f"model.layers.0.linear_attn.in_proj_{part}.weight": torch.zeros(rows, 3)
                       for part, rows in parts.items()}, tmp_path / "hf" / "model.safetensors")
            import_offline(rules, tmp_path / "hf", layout, tmp_path / "megatron", options=options)
        else:
            export_offline(rules, [{IN_PROJ: torch.zeros(16, 3)}] * 2, layout, options=options)
    message = str(raised.value)
    assert "linear_num_key_heads=1, linear_key_head_dim=2, linear_num_value_heads=4, linear_value_head_dim=2 give 28 " \
           "rows, but the tensor has 32" in message, message


def test_each_tp_rank_holds_its_query_groups_gated_attention_rows(tmp_path):
    """The full-attention layers' linear_qkv with Megatron-Core's attention_output_gate (attention.py
    get_query_key_value_tensors): each query group is [its query heads; their gate heads; k; v], and TP ranks
    hold whole groups. HF q_proj holds each head's query then its gate (2 x head_dim rows per head). With 4 heads
    in 2 groups of head dim 2, rank r holds group r: heads 2r and 2r + 1."""
    from safetensors.torch import save_file

    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    source = {f"model.layers.0.self_attn.{name}.weight": _tagged(rows, tag, 3)
              for name, rows, tag in (("q_proj", 16, 1), ("k_proj", 4, 2), ("v_proj", 4, 3))}
    layout, options = ParallelLayout(tp=2, num_layers=1), _model_options(tmp_path / "hf")
    save_file(source, tmp_path / "hf" / "model.safetensors")
    rules = quantmap.compile("qwen3_5", num_attention_heads=4, num_query_groups=2, head_dim=2)
    import_offline(rules, tmp_path / "hf", layout, tmp_path / "megatron", options=options)
    for rank in range(2):
        shard = LazyShard(tmp_path / "megatron" / f"rank_{rank:05d}.safetensors")
        query = _span(1, 8 * rank, 2) + _span(1, 8 * rank + 4, 2)  # heads 2r, 2r + 1: rows 4h, 4h + 1
        gate = _span(1, 8 * rank + 2, 2) + _span(1, 8 * rank + 6, 2)  # rows 4h + 2, 4h + 3
        assert _rows(shard[qkv]) == query + gate + _span(2, 2 * rank, 2) + _span(3, 2 * rank, 2), rank


@pytest.mark.slow
def test_the_zero_centred_out_norm_is_hf_minus_one_in_megatron_and_comes_back_bit_for_bit(tmp_path):
    """Megatron-Core's GDN out_norm is zero-centred (layernorm_zero_centered_gamma: it stores w - 1), HF's
    linear_attn.norm plain (w): Megatron-Bridge's RMSNorm2ZeroCenteredRMSNormMapping. Values in [0.5, 2]
    (where w - 1 is exact in fp32) go there and back bit for bit."""
    import torch
    from typer.testing import CliRunner

    from quantmap.cli import app
    from quantmap.executor.naming import to_global
    from quantmap.io.shards import LazyShard, rank_file
    from quantmap.parallel import ParallelLayout
    from test_specs_hf import build, variants

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build("qwen3_next", variants("qwen3_next")[0])
    norms = {name: p for name, p in model.named_parameters() if name.endswith("linear_attn.norm.weight")}
    assert norms
    with torch.no_grad():
        for p in norms.values():
            p.copy_(torch.rand(p.shape) * 1.5 + 0.5)
    model.save_pretrained(tmp_path / "hf")
    ParallelLayout(tp=2, num_layers=model.config.num_hidden_layers, num_experts=4).write(tmp_path)
    for args in (["import", "qwen3_next", "--hf", str(tmp_path / "hf"), "--layout", str(tmp_path / "layout.json"),
                  "--out", str(tmp_path / "meg"), "--format", "hf"],
                 ["export", "qwen3_next", "--megatron", str(tmp_path / "meg"), "--out", str(tmp_path / "back"),
                  "--format", "hf", "--like", str(tmp_path / "hf")]):
        run = CliRunner().invoke(app, [*args, "-p", "num_experts=4", "--quiet"])
        assert run.exit_code == 0, run.output
    layout = ParallelLayout.read(tmp_path)
    for rank in range(layout.world_size):
        shard = LazyShard(rank_file(tmp_path / "meg", rank))
        for local in shard:
            if local.endswith("self_attention.out_norm.weight"):
                name = to_global(local, layout, layout.coords(rank))
                hf = norms[name.replace("decoder.layers", "model.layers").replace("self_attention.out_norm",
                                                                                  "linear_attn.norm")]
                assert torch.equal(shard[local], hf.detach() - 1), name
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    assert all(torch.equal(back[name], p.detach()) for name, p in norms.items())
