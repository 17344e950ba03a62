"""Export refuses inputs that would otherwise give a silently wrong checkpoint, and leaves nothing
behind when a rank fails after the go-ahead."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import quantmap
from executor_support import global_state, rules_for, run_ranks, shard
from quantmap.executor import ExecutorError, ParallelLayout, RunOptions, export_offline
from quantmap.io.shards import LazyShard


def test_a_layout_claiming_more_layers_than_the_shards_hold_is_refused(tmp_path):
    real = ParallelLayout(pp=2, num_layers=4)
    ranks = shard(global_state("dense", 4), real)
    claimed = ParallelLayout(pp=2, num_layers=8)  # would renumber stage 1's layers 0-1 as 4-5
    with pytest.raises(ExecutorError, match=r"rank 1 holds local layers 0\.\.1 but the layout puts 4 layer\(s\) "
                                            r"on pipeline stage 1; check num_layers"):
        export_offline(rules_for("dense"), ranks, claimed, out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("form", ["seq", "grouped"])
def test_a_layout_claiming_more_experts_than_the_shards_hold_is_refused(tmp_path, form):
    real = ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4)
    ranks = shard(global_state(form, 2, 4), real)
    claimed = ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=8)  # would give experts 2-3 to rank 1's block
    with pytest.raises(ExecutorError, match=r"holds local experts 0\.\.1 but the layout gives each of its ep=2 "
                                            r"ranks 4; check num_experts"):
        export_offline(rules_for(form, 8), ranks, claimed, out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_an_expert_tensor_without_an_expert_index_on_every_ep_rank_is_refused(tmp_path):
    spec = tmp_path / "shared.yaml"
    spec.write_text(textwrap.dedent("""\
        name: shared
        mappings:
          - {megatron: decoder.layers.*.mlp.experts.scale.weight, hf: model.layers.*.mlp.experts.scale.weight}
        """))
    layout = ParallelLayout(dp=2, ep=2, num_layers=1, num_experts=2)
    name = "decoder.layers.0.mlp.experts.scale.input_quantizer._amax"
    ranks = [{name: torch.tensor(1.0)}, {name: torch.tensor(2.0)}]  # one copy per EP rank: which is right?
    with pytest.raises(ExecutorError, match=r"held by several ranks of one tensor-parallel position"):
        export_offline(quantmap.compile(spec), ranks, layout, out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _export_with_a_transfer_failure(out: str):
    """Rank 1 fails inside the data transfer, after every rank has been told to go ahead."""
    import torch.distributed as dist

    from quantmap.executor import Placement, export
    from quantmap.executor.comm import Comm

    layout = ParallelLayout(tp=2, num_layers=2)
    placement = Placement.from_world(layout)
    state = shard(global_state("dense", 2), layout)[placement.coords.rank]
    if dist.get_rank() == 1:
        def failing(self, sends, receives):
            raise RuntimeError("injected failure during the transfer")
        Comm.exchange = failing
    export(rules_for("dense"), state, placement, out=out, options=RunOptions(timeout=timedelta(seconds=20)))


@pytest.mark.slow
def test_a_rank_failing_after_the_go_ahead_leaves_no_staging_directory(tmp_path):
    outcomes = run_ranks(2, _export_with_a_transfer_failure, str(tmp_path / "hf"))
    assert [outcome[0] for outcome in outcomes] == ["error", "error"]
    assert "injected failure during the transfer" in outcomes[1][1]
    assert list(Path(tmp_path).iterdir()) == []


def test_a_disagreement_is_reported_once_however_often_the_tensors_are_built(tmp_path):
    layout = ParallelLayout(tp=2, num_layers=1)
    ranks = shard(global_state("dense", 1), layout)
    ranks[1]["decoder.layers.0.self_attention.linear_proj.input_quantizer._amax"] = torch.tensor(99.0)
    result = export_offline(rules_for("dense"), ranks, layout, out=tmp_path / "hf")
    result.state_dict()
    result.state_dict()
    assert len(result.report.disagreements) == 1
    assert result.report.written == len(result.state_dict())


def test_a_fan_in_disagreement_names_the_source_that_differs_and_its_value():
    """Real ModelOpt state (tests/data/megatron, TP=2, 4 SequentialMLP experts, FP8): the experts'
    input amax agree, so one expert is raised to 5 on both TP ranks. The report names that expert and
    shows 5 next to the others' value, not the first four copies (experts 0 and 1, all equal)."""
    data = Path(__file__).parent / "data" / "megatron"
    layout = ParallelLayout(tp=2, num_layers=2, num_experts=4)
    ranks = [dict(LazyShard(data / f"state_fp8_default_kv_moeseq_tp2pp1ep1_rank{r}.safetensors").items())
             for r in range(2)]
    source = "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.input_quantizer._amax"
    for state in ranks:
        state[source] = torch.tensor(5.0)
    rules = quantmap.compile("qwen3_moe", hf_naming="in-memory", num_experts=4)
    result = export_offline(rules, ranks, layout)
    result.state_dict()  # the copies are compared as the tensors are built
    (note,) = result.report.disagreements
    assert note.startswith("model.layers.0.mlp.experts.gate_up_proj_input_quantizer._amax: its 4 Megatron source(s)")
    assert f"{source} (rank 0): 5" in note and "local_experts.0.linear_fc1.input_quantizer._amax (rank 0): 3.89993" in note
