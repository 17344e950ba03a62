"""Laws of the executor, driven by hypothesis through the one-process "play every rank" mode (the same
pack/plan/write code as the distributed path, without process start-up): the export does not depend
on the layout, and export then import gives back every rank's quantizer tensors."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from executor_support import global_state, quantizers, rules_for, shard
from quantmap.executor import ParallelLayout, RunOptions, export_offline, import_offline
from quantmap.io.shards import LazyShard


@st.composite
def layouts(draw):
    form = draw(st.sampled_from(["dense", "grouped", "seq"]))
    tp, pp, dp = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 4]))
    ep = 1 if form == "dense" else draw(st.sampled_from([e for e in (1, 2, 4) if (tp * dp) % e == 0]))
    etp = draw(st.sampled_from([e for e in (1, tp) if (tp * dp) % (e * ep) == 0]))
    stages = draw(st.sampled_from([None, "uneven"])) if pp == 2 else None
    num_layers = draw(st.sampled_from([2, 4])) if stages is None else 3
    layers_per_stage = [2, 1] if stages else None
    experts = None if form == "dense" else ep * draw(st.sampled_from([1, 2]))
    layout = ParallelLayout(tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, num_layers=num_layers, num_experts=experts,
                    layers_per_stage=layers_per_stage)
    return form, layout, draw(st.integers(0, 2**16))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layouts())
def test_export_does_not_depend_on_the_layout_and_import_inverts_it(case):
    form, layout, seed = case
    rules = rules_for(form, layout.num_experts)
    state = global_state(form, layout.num_layers, layout.num_experts, seed=seed)
    expected = export_offline(rules, [state], ParallelLayout(num_layers=layout.num_layers, num_experts=layout.num_experts))
    ranks = shard(state, layout)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_offline(rules, ranks, layout, out=Path(tmp) / "hf", options=RunOptions(shard_size=512))
        got = exported.state_dict()
        want = expected.state_dict()
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[name], want[name]) for name in want)
        report = import_offline(rules, Path(tmp) / "hf", layout, Path(tmp) / "mg")
        assert report.missing == [] and report.disagreements == []
        for rank, original in enumerate(ranks):
            back = LazyShard(Path(tmp) / "mg" / f"rank_{rank:05d}.safetensors")
            assert sorted(back) == sorted(quantizers(original))
            assert all(torch.equal(back[name], tensor) for name, tensor in quantizers(original).items())


@settings(max_examples=20, deadline=None)
@given(values=st.lists(st.sampled_from([0.5, 1.25, 3.0, 7.75]), min_size=2, max_size=2))
def test_tensor_parallel_copies_combine_by_max_and_disagreement_is_reported(values):
    layout = ParallelLayout(tp=2, num_layers=1)
    rules = rules_for("dense")
    ranks = shard(global_state("dense", 1), layout)
    name = "decoder.layers.0.self_attention.linear_proj.input_quantizer._amax"
    for rank, value in enumerate(values):
        ranks[rank][name] = torch.tensor(value)
    result = export_offline(rules, ranks, layout)
    got = result.state_dict()["model.layers.0.self_attn.o_proj.input_quantizer._amax"]
    assert got.item() == max(values)
    assert bool(result.report.disagreements) == (values[0] != values[1])


def test_import_fans_in_by_max_and_reports_parts_that_disagree(tmp_path):
    layout = ParallelLayout(dp=2, ep=2, num_layers=1, num_experts=4)
    rules = rules_for("grouped", 4)
    state = global_state("grouped", 1, 4)
    export_offline(rules, [state], ParallelLayout(num_layers=1, num_experts=4), out=tmp_path / "hf")
    from safetensors.torch import load_file, save_file
    shard_file = next((tmp_path / "hf").glob("model-*.safetensors"))
    tensors = load_file(shard_file)
    tensors["model.layers.0.mlp.experts.3.up_proj.input_quantizer._amax"] = torch.tensor(99.0)
    save_file(tensors, shard_file, metadata={"format": "pt"})
    report = import_offline(rules, tmp_path / "hf", layout, tmp_path / "mg")
    rank1 = LazyShard(tmp_path / "mg" / "rank_00001.safetensors")
    assert rank1["decoder.layers.0.mlp.experts.linear_fc1.input_quantizer._amax"].item() == 99.0
    rank0 = LazyShard(tmp_path / "mg" / "rank_00000.safetensors")
    assert rank0["decoder.layers.0.mlp.experts.linear_fc1.input_quantizer._amax"].item() < 99.0
    assert len(report.disagreements) == 1 and "imported the max" in report.disagreements[0]


def test_import_state_builds_one_ranks_local_state_for_load_state_dict(tmp_path):
    from quantmap.executor import Placement, import_state

    layout = ParallelLayout(tp=2, pp=2, dp=2, ep=2, num_layers=4, num_experts=4)
    rules = rules_for("seq")
    state = global_state("seq", 4, 4)
    export_offline(rules, [state], ParallelLayout(num_layers=4, num_experts=4), out=tmp_path / "hf")
    ranks = shard(state, layout)
    for rank in (0, 7):
        local, report = import_state(rules, tmp_path / "hf", Placement.offline(layout, rank))
        assert sorted(local) == sorted(quantizers(ranks[rank])) and report.missing == []
        assert all(torch.equal(local[n], t) for n, t in quantizers(ranks[rank]).items())


def test_an_input_side_tensor_of_a_column_parallel_layer_is_whole_on_every_rank_not_concatenated(tmp_path):
    """``_pre_quant_scale`` is whole on every column-parallel rank (AWQ searches it per rank):
    concatenating it like the weight amax would write a wrong tensor; it is exported once, as the max
    of the copies, and their disagreement is reported."""
    layout = ParallelLayout(tp=2, num_layers=1)
    ranks = shard(global_state("dense", 1), layout)
    name = "decoder.layers.0.self_attention.linear_q_up_proj.input_quantizer._pre_quant_scale"
    copies = [torch.rand(16) + rank for rank in range(2)]
    for rank in range(2):
        ranks[rank][name] = copies[rank]
    result = export_offline(rules_for("dense"), ranks, layout, out=tmp_path / "hf")
    exported = result.state_dict()["model.layers.0.self_attn.q_b_proj.input_quantizer._pre_quant_scale"]
    assert torch.equal(exported, torch.maximum(*copies))
    assert [note for note in result.report.disagreements if name in note]
