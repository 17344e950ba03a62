"""Expert runs: a rank's per-expert scalar quantizers moved as one entry must change nothing a user sees.

The files of an export with runs are byte-identical to those of the same export with every name
moved on its own; a disagreement inside a run is reported under the expert's own name; a rank that
lacks one expert of a run is told by that expert's name; and a rank folds only what the index proves
(one match, its expert left as ``*``, serves every member)."""

from __future__ import annotations

import pytest
import torch

import quantmap
from executor_support import global_state, rules_for, shard, values_of_every_rank
from quantmap.executor import ExecutorError, ParallelLayout, RunOptions
from quantmap.executor import expert_runs
from quantmap.executor.export import export_offline
from quantmap.executor.placement import Placement
from quantmap.executor.pack import pack
from quantmap.io.hf import INDEX

LAYOUTS = [ParallelLayout(ep=2, dp=2, num_layers=2, num_experts=4), ParallelLayout(tp=2, dp=2, ep=2, num_layers=2, num_experts=4),
           ParallelLayout(pp=2, ep=2, dp=2, num_layers=2, num_experts=8)]


def _files(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("form", ["seq", "grouped_per_expert"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"tp{layout.tp}pp{layout.pp}ep{layout.ep}")
def test_an_export_with_runs_writes_the_bytes_of_one_without(form, layout, tmp_path, monkeypatch):
    rules = rules_for(form, num_experts=layout.num_experts)
    states = shard(global_state(form, layout.num_layers, layout.num_experts), layout)
    folded = pack(rules, states[0], Placement.offline(layout, 0)).meta
    assert folded.runs, "precondition: the rank folds its experts"
    export_offline(rules, states, layout, out=tmp_path / "runs")
    in_memory = export_offline(rules, states, layout).state_dict()
    monkeypatch.setattr(expert_runs, "_MIN_RUN", 10**9)  # every name on its own
    assert not pack(rules, states[0], Placement.offline(layout, 0)).meta.runs
    export_offline(rules, states, layout, out=tmp_path / "names")
    assert _files(tmp_path / "runs") == _files(tmp_path / "names")
    one_by_one = export_offline(rules, states, layout).state_dict()
    assert in_memory.keys() == one_by_one.keys()
    assert all(torch.equal(in_memory[name], one_by_one[name]) for name in one_by_one)


@pytest.mark.parametrize("form", ["seq", "grouped_per_expert"])
def test_the_files_do_not_depend_on_the_layout_nor_on_runs(form, tmp_path):
    """One expert per rank folds nothing, two or four per rank fold: the files are the same bytes."""
    state = global_state(form, 2, 4)
    for label, layout in [("one", ParallelLayout(num_layers=2, num_experts=4)),
                          ("ep2", ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4)),
                          ("ep4", ParallelLayout(dp=4, ep=4, num_layers=2, num_experts=4))]:
        export_offline(rules_for(form, num_experts=4), shard(state, layout), layout, out=tmp_path / label)
    assert _files(tmp_path / "one") == _files(tmp_path / "ep2") == _files(tmp_path / "ep4")


def _tp2() -> tuple[ParallelLayout, list[dict]]:
    layout = ParallelLayout(tp=2, num_layers=1, num_experts=4)
    return layout, shard(global_state("seq", 1, 4), layout)


def test_tensor_parallel_copies_that_differ_inside_a_run_are_reported_under_the_experts_name():
    layout, states = _tp2()
    name = "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight_quantizer._amax"
    states[1][name] = states[1][name] + 1.0
    done = export_offline(rules_for("seq"), states, layout)
    dict(done.tensors())
    assert [note.split(":")[0] for note in done.report.disagreements] == [name]
    assert torch.equal(done.state_dict()["model.layers.0.mlp.experts.2.gate_proj.weight_quantizer._amax"],
                       states[1][name])


def test_a_rank_short_of_one_expert_of_its_peers_run_is_told_by_that_experts_name():
    layout, states = _tp2()
    lost = "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.input_quantizer._amax"
    del states[1][lost]
    with pytest.raises(ExecutorError) as raised:
        export_offline(rules_for("seq"), states, layout)
    message = str(raised.value)
    assert f"rank 1 has no {lost!r}" in message and message.count("problem") <= 1, message


SEQ_EXPERTS = """\
  - megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight
    hf:
      gate: model.layers.*.mlp.experts.FC1.gate_proj.weight
      up: model.layers.*.mlp.experts.FC1.up_proj.weight
    parallel: column
  - {megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight,
     hf: model.layers.*.mlp.experts.*.down_proj.weight, parallel: row}
"""


@pytest.mark.parametrize("case", ["shadowed", "offset"])
def test_a_run_is_folded_only_where_the_index_proves_one_template(case, tmp_path, monkeypatch):
    """A group is folded only where one match serves every member: not where a higher-priority rule
    claims one expert (a literal index shadows the wildcard rule), nor where the expert's index is
    shifted on its way to HF. Those names go one by one, and the export is the same either way."""
    if case == "shadowed":
        mappings = SEQ_EXPERTS.replace("FC1", "*") + (
            "  - {megatron: decoder.layers.*.mlp.experts.local_experts.3.linear_fc2.weight,\n"
            "     hf: model.layers.*.mlp.experts.3.down_proj_special.weight, parallel: row, priority: 1}\n")
    else:
        mappings = SEQ_EXPERTS.replace("FC1", "{shift + e}")
    spec = tmp_path / f"{case}.yaml"
    spec.write_text(f"name: {case}\nparams: {{shift: 100}}\nmappings:\n{mappings}")
    rules = quantmap.compile(str(spec))
    layout = ParallelLayout(num_layers=2, num_experts=4)
    states = shard(global_state("seq", 2, 4), layout)
    folded = {run.megatron[1] for run in pack(rules, states[0], Placement.offline(layout, 0)).meta.runs.values()}
    fc1 = {".linear_fc1.weight_quantizer._amax", ".linear_fc1.input_quantizer._amax"}
    fc2 = {".linear_fc2.weight_quantizer._amax", ".linear_fc2.input_quantizer._amax"}
    assert folded == (fc1 if case == "shadowed" else fc2)
    with_runs = export_offline(rules, states, layout).state_dict()
    monkeypatch.setattr(expert_runs, "_MIN_RUN", 10**9)
    one_by_one = export_offline(rules, states, layout).state_dict()
    assert with_runs.keys() == one_by_one.keys()
    assert all(torch.equal(with_runs[name], one_by_one[name]) for name in one_by_one)
    special = "model.layers.1.mlp.experts.3.down_proj_special.weight_quantizer._amax"
    shifted = "model.layers.1.mlp.experts.103.gate_proj.weight_quantizer._amax"
    assert (special if case == "shadowed" else shifted) in with_runs


def _export_on_ranks(tmp: str):
    import torch.distributed as dist

    from quantmap.executor import Placement as P, export

    layout = ParallelLayout(tp=2, dp=2, ep=2, num_layers=2, num_experts=4)
    state = shard(global_state("seq", 2, 4), layout)[dist.get_rank()]
    done = export(rules_for("seq"), state, P.from_world(layout), out=f"{tmp}/hf")
    return done.is_writer


@pytest.mark.slow
def test_a_distributed_export_with_runs_writes_the_offline_bytes(tmp_path):
    layout = ParallelLayout(tp=2, dp=2, ep=2, num_layers=2, num_experts=4)
    values_of_every_rank(4, _export_on_ranks, str(tmp_path))
    states = shard(global_state("seq", 2, 4), layout)
    export_offline(rules_for("seq"), states, layout, out=tmp_path / "offline")
    assert _files(tmp_path / "hf") == _files(tmp_path / "offline")
    assert (tmp_path / "hf" / INDEX).is_file()


def test_a_layer_whose_experts_lost_a_quantizer_is_found_missing_expert_by_expert():
    """The completeness check counts a run as its experts: a layer without the runs the others have
    is missing each of its experts' names."""
    layout = ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4)
    states = shard(global_state("seq", 2, 4), layout)
    for state in states:  # layer 1's fc2 input quantizers, on both EP ranks
        for name in [n for n in state if "layers.1." in n and "linear_fc2.input_quantizer" in n]:
            del state[name]
    assert pack(rules_for("seq"), states[0], Placement.offline(layout, 0)).meta.runs, "precondition: runs"
    with pytest.raises(ExecutorError, match="lack 4 quantizer tensor") as raised:
        export_offline(rules_for("seq"), states, layout)
    assert "decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.input_quantizer._amax" in str(raised.value)
    done = export_offline(rules_for("seq"), states, layout, options=RunOptions(allow_partial=True))
    assert sorted(done.report.missing) == [f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc2.input_quantizer"
                                           f"._amax" for e in range(4)]
