"""Import checks on real files: names the layout cannot hold are reported (and refused under --strict),
names outside the decoder layers land on the pipeline stage Megatron-Core builds them on, the --strict
message lists each kind of problem, and a failed import leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantmap
from executor_support import global_state, rules_for, run_ranks
from quantmap.executor import ExecutorError, ParallelLayout, RunOptions, export_offline, import_offline
from quantmap.executor.naming import to_local
from quantmap.io.shards import LazyShard, rank_file


def _leftovers(parent: Path) -> list[str]:
    """Hidden staging directories (``.NAME.tmp-XXXX``) left in ``parent``."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_layers_beyond_the_layout_are_reported_and_refused_under_strict(tmp_path):
    rules = rules_for("grouped", 4)
    exported = export_offline(rules, [global_state("grouped", 4, 4)], ParallelLayout(num_layers=4, num_experts=4),
                              out=tmp_path / "hf")
    beyond = sorted(n for n in exported.state_dict() if n.startswith(("model.layers.2.", "model.layers.3.")))
    small = ParallelLayout(num_layers=2, num_experts=4)
    with pytest.raises(ExecutorError) as raised:
        import_offline(rules, tmp_path / "hf", small, tmp_path / "strict", options=RunOptions(strict=True))
    message = str(raised.value)
    assert f"{len(beyond)} HF name(s) no rank of the layout holds" in message
    assert beyond[0] in message and "check num_layers/num_experts in layout.json" in message
    assert not (tmp_path / "strict").exists() and _leftovers(tmp_path) == []
    report = import_offline(rules, tmp_path / "hf", small, tmp_path / "loose")
    assert sorted(report.outside) == beyond and report.problems == len(beyond)
    assert f"{len(beyond)} name(s) no rank of the layout holds (layer or expert beyond the layout):" in report.lines()


@pytest.mark.parametrize("form", ["seq", "grouped"])
def test_experts_beyond_the_layout_are_reported_and_refused_under_strict(tmp_path, form):
    exported = export_offline(rules_for(form, 8), [global_state(form, 2, 8)], ParallelLayout(num_layers=2, num_experts=8),
                              out=tmp_path / "hf")
    beyond = sorted(n for n in exported.state_dict() if any(f".experts.{e}." in n for e in range(4, 8)))
    assert beyond
    rules, small = rules_for(form, 4), ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4)
    with pytest.raises(ExecutorError, match=r"HF name\(s\) no rank of the layout holds .*num_experts in layout\.json"):
        import_offline(rules, tmp_path / "hf", small, tmp_path / "strict", options=RunOptions(strict=True))
    assert not (tmp_path / "strict").exists()
    report = import_offline(rules, tmp_path / "hf", small, tmp_path / "loose")
    assert sorted(report.outside) == beyond and report.missing == []


def test_names_outside_the_decoder_layers_sit_on_the_stage_megatron_builds_them_on():
    layout = ParallelLayout(pp=3, dp=2, ep=2, num_layers=3, num_experts=4)

    def holders(name: str) -> dict[int, str]:
        held = {c.rank: to_local(name, layout, c) for c in map(layout.coords, range(layout.world_size))}
        return {rank: local for rank, local in held.items() if local is not None}

    stages = lambda name: sorted({layout.coords(rank).pp for rank in holders(name)})  # noqa: E731
    assert stages("embedding.word_embeddings.weight_quantizer._amax") == [0]
    for name in ("output_layer.weight_quantizer._amax", "decoder.final_layernorm.weight",
                 "language_model.output_layer.input_quantizer._amax",
                 "mtp.layers.0.mtp_model_layer.self_attention.linear_proj.weight_quantizer._amax"):
        assert stages(name) == [2], name
    assert stages("some_other_module.input_quantizer._amax") == [0, 1, 2]
    mtp_expert = "mtp.layers.0.mtp_model_layer.mlp.experts.local_experts.3.linear_fc1.input_quantizer._amax"
    held = holders(mtp_expert)
    assert {(layout.coords(r).pp, layout.coords(r).ep) for r in held} == {(2, 1)}
    assert set(held.values()) == {mtp_expert.replace("local_experts.3", "local_experts.1")}


def test_mtp_quantizers_are_imported_onto_the_last_stage_only_and_export_back(tmp_path):
    rules = quantmap.compile("deepseek_v3", num_layers=2, num_experts=4)
    state = {f"decoder.layers.{layer}.self_attention.linear_proj.{q}_quantizer._amax": torch.tensor(layer + 1.5)
             for layer in range(2) for q in ("weight", "input")}
    mtp = {f"mtp.layers.0.mtp_model_layer.self_attention.linear_proj.{q}_quantizer._amax": torch.tensor(9.0)
           for q in ("weight", "input")}
    state.update(mtp)
    original = export_offline(rules, [state], ParallelLayout(num_layers=2), out=tmp_path / "hf").state_dict()
    layout = ParallelLayout(pp=2, num_layers=2)
    import_offline(rules, tmp_path / "hf", layout, tmp_path / "mg", options=RunOptions(strict=True))
    files = [LazyShard(rank_file(tmp_path / "mg", rank)) for rank in range(2)]
    assert not set(mtp) & set(files[0].keys())
    assert set(mtp) <= set(files[1].keys())
    again = export_offline(rules, files, layout)
    assert again.report.duplicates == []
    got = again.state_dict()
    assert sorted(got) == sorted(original) and all(torch.equal(got[n], original[n]) for n in original)


def test_the_strict_message_lists_each_kind_of_problem_with_counts_and_examples(tmp_path):
    rules = rules_for("dense")
    export_offline(rules, [global_state("dense", 2)], ParallelLayout(num_layers=2), out=tmp_path / "hf")
    index_file = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard_name = next(iter(index["weight_map"].values()))
    tensors = load_file(tmp_path / "hf" / shard_name)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.ones(2, 2)  # a weight: not a problem
    tensors["junk.x"] = torch.ones(1)
    missing = "model.layers.0.self_attn.k_proj.input_quantizer._amax"
    del tensors[missing]
    save_file(tensors, tmp_path / "hf" / shard_name, metadata={"format": "pt"})
    index["weight_map"] = {name: shard_name for name in tensors}
    index_file.write_text(json.dumps(index))
    beyond = sorted(n for n in tensors if n.startswith("model.layers.1.") and "_quantizer." in n)
    with pytest.raises(ExecutorError) as raised:
        import_offline(rules, tmp_path / "hf", ParallelLayout(num_layers=1), tmp_path / "mg", options=RunOptions(strict=True))
    message = str(raised.value)
    assert message.startswith("import refused (--strict): 1 HF name(s) no rule of the spec claims: junk.x; "
                              f"1 HF name(s) the layout's ranks need but the checkpoint lacks: {missing}; "
                              f"{len(beyond)} HF name(s) no rank of the layout holds (a layer or expert beyond it): ")
    assert f", and {len(beyond) - 3} more (check num_layers/num_experts in layout.json). Nothing was written." in message
    assert "skipped" not in message and ":;" not in message


def test_an_offline_import_interrupted_after_staging_leaves_nothing(tmp_path, monkeypatch):
    from quantmap.executor import importer

    rules = rules_for("dense")
    export_offline(rules, [global_state("dense", 2)], ParallelLayout(num_layers=2), out=tmp_path / "hf")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importer, "write_rank", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_offline(rules, tmp_path / "hf", ParallelLayout(tp=2, num_layers=2), tmp_path / "mg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def _import_with_a_lost_peer(tmp: str):
    """Every rank's gather fails (a peer that vanished): the writer has already created the staging
    directory, so this is the failure that used to leave it behind."""
    from quantmap.executor import Placement, import_
    from quantmap.executor.comm import Comm

    def lost(self, obj):
        raise RuntimeError("connection to a peer was lost")

    Comm.gather_objects = lost
    import_(rules_for("dense"), Path(tmp) / "hf", Placement.from_world(ParallelLayout(tp=2, num_layers=2)), Path(tmp) / "mg")


@pytest.mark.slow
def test_a_distributed_import_failing_after_staging_leaves_nothing(tmp_path):
    export_offline(rules_for("dense"), [global_state("dense", 2)], ParallelLayout(num_layers=2), out=tmp_path / "hf")
    outcomes = run_ranks(2, _import_with_a_lost_peer, str(tmp_path))
    assert [o[0] for o in outcomes] == ["error", "error"]
    assert all("connection to a peer was lost" in o[1] for o in outcomes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
