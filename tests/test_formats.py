"""Output formats: a registry of declarations, the default ``quantizers`` format reading quantizer state
only, and weights passing through export and import for a format that takes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantmap
from megatron_layout import llama_hf_by_hand, write_shards as write_layout
from quantmap.executor import ExecutorError, ParallelLayout, RunOptions
from quantmap.executor.export import export_offline
from quantmap.executor.launch import export_from, import_checkpoint
from quantmap.formats import DEFAULT, FORMATS, Written, unchanged
from quantmap.formats.declaration import OutputFormat
from quantmap.io.hf import Checkpoint
from quantmap.io.shards import LazyShard, rank_file
from quantmap.roles import MODEL_ROLES, NORM, QUANTIZER_ROLES, WEIGHT, WEIGHT_AMAX

DATA = Path(__file__).parent / "data"
HEADS, GROUPS, HEAD_DIM, HIDDEN, FFN, VOCAB = 4, 2, 2, 8, 6, 10
LAYOUT = ParallelLayout(tp=2, pp=2, num_layers=2)
WEIGHTS = unchanged("test-weights", "weights, norms and the quantizer state, as is",
                    {WEIGHT, NORM} | QUANTIZER_ROLES)


@pytest.fixture
def weights_format(monkeypatch):
    monkeypatch.setitem(FORMATS, WEIGHTS.name, WEIGHTS)
    return RunOptions(format=WEIGHTS.name)


def llama_rules(spec="llama"):
    return quantmap.compile(spec, num_attention_heads=HEADS, num_query_groups=GROUPS, head_dim=HEAD_DIM,
                            hidden_size=HIDDEN)


def global_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """A two-layer Llama as Megatron-Core holds it unsharded: TE-fused norms, QKV interleaved per query
    group, ``[gate; up]``, per-tensor amax everywhere and a per-channel weight amax on ``linear_qkv``."""
    g = torch.Generator().manual_seed(seed)
    qkv_rows = (HEADS + 2 * GROUPS) * HEAD_DIM
    state = {"decoder.final_layernorm.weight": torch.randn(HIDDEN, generator=g),
             "output_layer.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    for layer in range(LAYOUT.num_layers):
        p = f"decoder.layers.{layer}."
        state |= {p + "self_attention.linear_qkv.weight": torch.randn(qkv_rows, HIDDEN, generator=g),
                  p + "self_attention.linear_qkv.layer_norm_weight": torch.randn(HIDDEN, generator=g),
                  p + "self_attention.linear_proj.weight": torch.randn(HIDDEN, HEADS * HEAD_DIM, generator=g),
                  p + "mlp.linear_fc1.weight": torch.randn(2 * FFN, HIDDEN, generator=g),
                  p + "mlp.linear_fc1.layer_norm_weight": torch.randn(HIDDEN, generator=g),
                  p + "mlp.linear_fc2.weight": torch.randn(HIDDEN, FFN, generator=g),
                  p + "self_attention.linear_qkv.weight_quantizer._amax": torch.rand(qkv_rows, 1, generator=g)}
        for module in ("self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            state[p + module + ".weight_quantizer._amax"] = torch.rand((), generator=g) + 0.1
        for module in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            state[p + module + ".input_quantizer._amax"] = torch.rand((), generator=g) + 0.1
    return state


def write_shards(directory, state: dict[str, torch.Tensor], quantizers_only: bool = False) -> None:
    write_layout(directory, state, LAYOUT, quantizers_only)


def hf_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors, by hand: the weights as tests/megatron_layout.py converts them, the per-channel
    q/k/v weight amax cut like their rows, the other quantizer state renamed (scalars copied to every part)."""
    out = llama_hf_by_hand(state, LAYOUT.num_layers, HEADS, GROUPS, HEAD_DIM)
    per_group = HEADS // GROUPS * HEAD_DIM
    for layer in range(LAYOUT.num_layers):
        m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        amax = state[m + "self_attention.linear_qkv.weight_quantizer._amax"].reshape(GROUPS, -1, 1)
        q_amax, k_amax, v_amax = amax.split([per_group, HEAD_DIM, HEAD_DIM], dim=1)
        out |= {h + "self_attn.q_proj.weight_quantizer._amax": q_amax.reshape(-1, 1),
                h + "self_attn.k_proj.weight_quantizer._amax": k_amax.reshape(-1, 1),
                h + "self_attn.v_proj.weight_quantizer._amax": v_amax.reshape(-1, 1)}
        for megatron, parts in (("self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj",
                                                                "self_attn.v_proj")),
                                ("self_attention.linear_proj", ("self_attn.o_proj",)),
                                ("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj")),
                                ("mlp.linear_fc2", ("mlp.down_proj",))):
            for buffer in ("weight_quantizer._amax", "input_quantizer._amax"):
                if megatron + "." + buffer == "self_attention.linear_qkv.weight_quantizer._amax":
                    continue
                for part in parts:
                    out[h + part + "." + buffer] = state[m + megatron + "." + buffer]
    return out


def read_hf(directory) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(directory)
    return {name: checkpoint.get(name) for name in checkpoint.names()}


# -- the registry ---------------------------------------------------------------------------------

def test_quantizers_is_the_default_and_reads_exactly_the_quantizer_roles():
    quantizers = FORMATS[DEFAULT]
    assert DEFAULT == "quantizers" == RunOptions().format and RunOptions().output_format is quantizers
    assert all(quantizers.reads(role) and quantizers.reads_back(role) for role in QUANTIZER_ROLES)
    assert not any(quantizers.reads(role) or quantizers.reads_back(role) for role in MODEL_ROLES)
    assert not quantizers.files and quantizers.modules is None


def test_a_declaration_naming_an_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown role"):
        unchanged("typo", "", {"wieght"})
    with pytest.raises(ValueError, match=r"reads unknown role\(s\) \['amax'\]"):
        OutputFormat("typo", "", writes={WEIGHT_AMAX: (Written(("amax",)),)}, restores={})


# -- the quantizers format never reads a weight ---------------------------------------------------

class _Watched(dict):
    """A rank's state that records which tensors were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)


def test_the_quantizers_format_counts_weights_and_never_reads_one(tmp_path):
    write_shards(tmp_path / "meg", global_model())
    states = [_Watched(LazyShard(rank_file(tmp_path / "meg", rank))) for rank in range(LAYOUT.world_size)]
    result = export_offline(llama_rules(), states, LAYOUT)
    assert not any("quantizer" not in name for state in states for name in state.read)
    written = dict(result.tensors())
    assert all("quantizer" in name for name in written)
    reference = hf_reference(global_model())
    assert {name for name in reference if "quantizer" in name} == set(written)
    # (6 per layer + final norm + output layer) on its TP ranks, counted by the owning ranks
    assert result.report.weights == (6 * 2 + 2) * LAYOUT.tp


# -- weights pass ---------------------------------------------------------------------------------

def test_a_format_that_takes_weights_exports_them_cut_as_megatron_lays_them_out(tmp_path, weights_format):
    state = global_model()
    write_shards(tmp_path / "meg", state)
    report = export_from(llama_rules(), tmp_path / "meg", tmp_path / "hf", weights_format)
    written, reference = read_hf(tmp_path / "hf"), hf_reference(state)
    assert set(written) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(written[name], tensor), name
    assert report.weights == 0 and not report.unclaimed and not report.disagreements


def test_a_format_that_takes_weights_imports_them_back_into_each_rank(tmp_path, weights_format):
    write_shards(tmp_path / "meg", global_model())
    rules = llama_rules()
    export_from(rules, tmp_path / "meg", tmp_path / "hf", weights_format)
    report = import_checkpoint(rules, tmp_path / "hf", tmp_path / "meg", tmp_path / "again", weights_format)
    assert report.weights == 0 and not report.missing and not report.unclaimed
    for rank in range(LAYOUT.world_size):
        before, after = LazyShard(rank_file(tmp_path / "meg", rank)), LazyShard(rank_file(tmp_path / "again", rank))
        assert set(before) == set(after)
        for name in before:
            assert torch.equal(before[name], after[name]), (rank, name)


def test_a_weight_whose_tensor_parallel_split_is_unknown_is_refused_by_name(tmp_path, weights_format):
    """A spec that maps the embedding without ``parallel``: at TP=2 its halves cannot be joined, so the
    export stops naming it, never writing one rank's half as the embedding."""
    state = global_model()
    state["embedding.word_embeddings.weight"] = torch.randn(VOCAB, HIDDEN)
    write_shards(tmp_path / "meg", state)
    with pytest.raises(ExecutorError, match=r"embedding\.word_embeddings\.weight has shape \[5, 8\] on each of 2 "
                                            r"tensor-parallel rank\(s\).*does not declare 'parallel'"):
        export_from(llama_rules(DATA / "specs" / "llama_unsplit_embedding.yaml"), tmp_path / "meg", tmp_path / "hf",
                    weights_format)
    assert not (tmp_path / "hf").exists()


def test_fused_experts_weights_are_stacked_into_one_hf_tensor_from_every_expert_and_rank(weights_format):
    """transformers v5's in-memory ``gate_up_proj [E, 2I, H]`` stacks every expert's ``[gate; up]``, and
    ``down_proj [E, H, I]`` every expert's ``linear_fc2``: one HF tensor from E Megatron names, each split
    over two tensor-parallel ranks (``linear_fc1`` rank ``r`` holds ``[gate_r; up_r]``, ``linear_fc2`` its
    ``I / 2`` input columns), gathered by hand here."""
    experts = 3
    rules = quantmap.compile("qwen3_moe", "in-memory", num_experts=experts, num_attention_heads=HEADS,
                             num_query_groups=GROUPS, head_dim=HEAD_DIM, hidden_size=HIDDEN)
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(2, experts, FFN, HIDDEN, generator=g)
    down = torch.randn(experts, HIDDEN, FFN, generator=g)
    half = FFN // 2
    prefix = "decoder.layers.0.mlp.experts.local_experts"
    states = [{**{f"{prefix}.{e}.linear_fc1.weight": torch.cat([gate[e, r * half:(r + 1) * half],
                                                                up[e, r * half:(r + 1) * half]])
                  for e in range(experts)},
               **{f"{prefix}.{e}.linear_fc2.weight": down[e, :, r * half:(r + 1) * half].contiguous()
                  for e in range(experts)}} for r in range(2)]
    out = export_offline(rules, states, ParallelLayout(tp=2, num_layers=1, num_experts=experts),
                         options=weights_format).state_dict()
    assert sorted(out) == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(out["model.layers.0.mlp.experts.gate_up_proj"], torch.cat([gate, up], dim=1))
    assert torch.equal(out["model.layers.0.mlp.experts.down_proj"], down)


def test_a_fused_experts_tensor_short_of_an_expert_is_refused_by_name(weights_format):
    experts = 2
    rules = quantmap.compile("qwen3_moe", "in-memory", num_experts=experts, hidden_size=HIDDEN)
    state = {"decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight": torch.randn(HIDDEN, FFN)}
    with pytest.raises(ExecutorError, match=r"model\.layers\.0\.mlp\.experts\.down_proj stacks the weights of 2 "
                                            r"experts but the shards hold 1 of them \(lacking expert\(s\) 0\)"):
        export_offline(rules, [state], ParallelLayout(num_layers=1, num_experts=experts), options=weights_format)


# -- the command line -----------------------------------------------------------------------------

def test_export_and_import_take_a_registered_format_and_default_to_quantizers(tmp_path):
    from typer.testing import CliRunner

    from quantmap.cli import app

    write_shards(tmp_path / "meg", global_model())
    spec = ["llama", "-p", f"num_attention_heads={HEADS}", "-p", f"num_query_groups={GROUPS}", "-p",
            f"head_dim={HEAD_DIM}", "-p", f"hidden_size={HIDDEN}"]
    runs = [CliRunner().invoke(app, ["export", *spec, "--megatron", str(tmp_path / "meg"), "--out",
                                     str(tmp_path / out), "--quiet", *given])
            for out, given in (("default", []), ("named", ["--format", "quantizers"]))]
    assert [run.exit_code for run in runs] == [0, 0], [run.output for run in runs]
    files = sorted(path.name for path in (tmp_path / "named").iterdir())
    assert files == sorted(path.name for path in (tmp_path / "default").iterdir())
    assert all((tmp_path / "named" / f).read_bytes() == (tmp_path / "default" / f).read_bytes() for f in files)
    back = CliRunner().invoke(app, ["import", *spec, "--hf", str(tmp_path / "named"), "--layout",
                                    str(tmp_path / "meg"), "--out", str(tmp_path / "back"), "--format", "quantizers"])
    assert back.exit_code == 0, back.output
    wrong = CliRunner().invoke(app, ["export", *spec, "--megatron", str(tmp_path / "meg"), "--out",
                                     str(tmp_path / "x"), "--format", "deployable"])
    assert wrong.exit_code == 2 and "'deployable' is not one of 'quantizers'" in wrong.output


def test_a_torch_dist_checkpoint_exports_a_format_that_takes_weights(tmp_path, weights_format):
    """A torch_dist checkpoint's weights are read for export (tests/test_torch_dist_weights.py checks their
    values; tests/test_torch_dist_import_weights.py writes them back)."""
    checkpoint = DATA / "dcp" / "fp8_kv_tp1" / "ckpt"
    sized = quantmap.compile("llama", num_attention_heads=4, num_query_groups=2, head_dim=16)  # the QKV cut
    export_from(sized, checkpoint, tmp_path / "weights", weights_format)
    assert "model.layers.1.mlp.gate_proj.weight" in Checkpoint(tmp_path / "weights").names()
