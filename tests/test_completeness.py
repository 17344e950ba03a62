"""Nothing silently partial: import and export both know what the layout requires (every layer of every
stage, every expert, every quantizer kind the other layers have), report or refuse what is missing, and
an export checks the rank files against the layout before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from executor_support import SPECS, global_state, quantizers, rules_for, run_ranks, shard
import quantmap
from quantmap.executor import ExecutorError, ParallelLayout, LayoutError, RunOptions, export_offline, import_offline
from quantmap.executor.completeness import missing_names
from quantmap.executor.launch import export_from
from quantmap.io.shards import save_shard

SPEC_FILES = {"dense": "dense_mla.yaml", "grouped": "moe_grouped.yaml", "seq": "moe_seq.yaml"}


def _hf(tmp_path: Path, form: str, layers: int, experts: int | None = None) -> tuple[Path, dict]:
    """A real HF checkpoint exported from a complete model, and its tensors."""
    out = tmp_path / f"hf-{form}-{layers}"
    result = export_offline(rules_for(form, experts), [global_state(form, layers, experts)],
                            ParallelLayout(num_layers=layers, num_experts=experts), out=out)
    return out, result.state_dict()


def _drop(hf: Path, dropped) -> list[str]:
    """Remove the names ``dropped(name)`` selects from the checkpoint's index; the removed names, sorted."""
    index_file = hf / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    gone = sorted(name for name in index["weight_map"] if dropped(name))
    index["weight_map"] = {name: file for name, file in index["weight_map"].items() if name not in gone}
    index_file.write_text(json.dumps(index))
    return gone


def _amax_names(names) -> list[str]:
    return sorted(name for name in names if "_quantizer." in name)


# -- import (item 1) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pp", [1, 2])
def test_import_reports_every_name_of_a_layer_removed_from_the_index_and_strict_refuses(tmp_path, pp):
    hf, _ = _hf(tmp_path, "seq", 4, 4)
    gone = _drop(hf, lambda name: name.startswith("model.layers.1."))
    layout = ParallelLayout(pp=pp, dp=2, ep=2, num_layers=4, num_experts=4)
    report = import_offline(rules_for("seq"), hf, layout, tmp_path / "loose")
    assert report.missing == _amax_names(gone) and report.problems == len(report.missing)
    with pytest.raises(ExecutorError, match=rf"{len(report.missing)} HF name\(s\) the layout's ranks need but the "
                                            rf"checkpoint lacks: model\.layers\.1\."):
        import_offline(rules_for("seq"), hf, layout, tmp_path / "strict", options=RunOptions(strict=True))
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("form", ["seq", "grouped"])
def test_import_reports_an_expert_removed_entirely(tmp_path, form):
    hf, _ = _hf(tmp_path, form, 2, 4)
    gone = _drop(hf, lambda name: ".experts.3." in name)
    assert gone
    report = import_offline(rules_for(form, 4), hf, ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4), tmp_path / "mg")
    assert report.missing == _amax_names(gone)


def test_import_of_an_empty_weight_map_is_refused_and_writes_nothing(tmp_path):
    hf, _ = _hf(tmp_path, "dense", 2)
    _drop(hf, lambda name: True)
    with pytest.raises(ExecutorError, match=r"the checkpoint holds no quantizer tensor that the spec claims .*"
                                            r"nothing to import"):
        import_offline(rules_for("dense"), hf, ParallelLayout(num_layers=2), tmp_path / "mg")
    assert not (tmp_path / "mg").exists()


def test_a_two_layer_checkpoint_imported_into_a_four_layer_layout_reports_layers_two_and_three(tmp_path):
    small, _ = _hf(tmp_path, "seq", 2, 4)
    _, full = _hf(tmp_path, "seq", 4, 4)
    expected = _amax_names(n for n in full if n.startswith(("model.layers.2.", "model.layers.3.")))
    report = import_offline(rules_for("seq"), small, ParallelLayout(pp=2, num_layers=4, num_experts=4), tmp_path / "mg")
    assert report.missing == expected


def _import_dropping_layer_one(tmp: str, strict: bool):
    from quantmap.executor import Placement, import_

    layout = ParallelLayout(pp=2, num_layers=4, num_experts=4)
    return import_(rules_for("seq"), Path(tmp) / "hf-seq-4", Placement.from_world(layout), Path(tmp) / f"mg-{strict}",
                   options=RunOptions(strict=strict))


@pytest.mark.slow
def test_a_distributed_import_reports_the_missing_layer_and_strict_refuses_on_every_rank(tmp_path):
    hf, _ = _hf(tmp_path, "seq", 4, 4)
    gone = _amax_names(_drop(hf, lambda name: name.startswith("model.layers.1.")))
    outcomes = run_ranks(2, _import_dropping_layer_one, str(tmp_path), False)
    assert [o[0] for o in outcomes] == ["ok", "ok"]
    assert outcomes[0][1].missing == gone
    outcomes = run_ranks(2, _import_dropping_layer_one, str(tmp_path), True)
    assert [o[0] for o in outcomes] == ["error", "error"]
    assert all(f"{len(gone)} HF name(s) the layout's ranks need but the checkpoint lacks" in o[1] for o in outcomes)
    assert not (tmp_path / "mg-True").exists()


def test_a_complete_import_reports_nothing_missing_even_with_dense_and_moe_layers(tmp_path):
    """DeepSeek-style: the first layer dense, the rest MoE; neither kind of layer is 'missing' the other's MLP."""
    dense, moe = global_state("dense", 1), global_state("seq", 3, 4)
    mixed = {name: value for name, value in moe.items() if not name.startswith("decoder.layers.0.mlp.")}
    mixed.update((name, value) for name, value in dense.items()
                 if name.startswith("decoder.layers.0.mlp.") and "q_up" not in name)
    assert missing_names(quantizers(mixed), ParallelLayout(num_layers=3, num_experts=4)) == []
    partial = {name: value for name, value in mixed.items() if ".local_experts.1." not in name}
    assert missing_names(quantizers(partial), ParallelLayout(num_layers=3, num_experts=4)) == sorted(
        set(quantizers(mixed)) - set(partial))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_whatever_is_removed_from_layers_after_a_complete_first_one_is_exactly_what_is_missing(data):
    """The law behind both directions: with one complete layer left, the missing set is the removed set."""
    form = data.draw(st.sampled_from(["dense", "seq"]))
    full = sorted(quantizers(global_state(form, 4, 4 if form == "seq" else None)))
    layout = ParallelLayout(num_layers=4, num_experts=4 if form == "seq" else None)
    later = [name for name in full if not name.startswith("decoder.layers.0.")]
    whole_layers = data.draw(st.sets(st.sampled_from([1, 2, 3])))
    removed = {name for name in later if any(name.startswith(f"decoder.layers.{layer}.") for layer in whole_layers)}
    removed |= set(data.draw(st.lists(st.sampled_from(later), max_size=12)))
    assert missing_names(set(full) - removed, layout) == sorted(removed)


# -- export (item 2) ----------------------------------------------------------------------------------------
def _shards(tmp_path: Path, form: str, layout: ParallelLayout, edit=None) -> Path:
    """A real shard directory (``save_shard`` per rank) of a complete model, after ``edit(rank, state)``."""
    directory = tmp_path / "shards"
    for rank, state in enumerate(shard(global_state(form, layout.num_layers, layout.num_experts), layout)):
        if edit is not None:
            edit(rank, state)
        save_shard(state, layout, directory, rank=rank)
    return directory


def _export(directory: Path, out: Path, form: str = "dense", experts: int | None = None, **options):
    """Export a shard directory the way the CLI does offline (one lazily read file per rank)."""
    params = {"num_experts": experts} if form == "grouped" else {}
    return export_from(quantmap.compile(str(SPECS / SPEC_FILES[form]), **params), directory, out,
                         RunOptions(shard_size=2**30, **options))


def test_an_empty_pipeline_stage_file_is_refused_and_reported_under_allow_partial(tmp_path):
    layout = ParallelLayout(pp=2, num_layers=4)
    directory = _shards(tmp_path, "dense", layout, lambda rank, state: state.clear() if rank == 1 else None)
    stage_one = _amax_names(n for n in global_state("dense", 4) if n.startswith(("decoder.layers.2.", "decoder.layers.3.")))
    with pytest.raises(ExecutorError, match=rf"the shards lack {len(stage_one)} quantizer tensor\(s\) that the layout "
                                            rf"requires .*decoder\.layers\.2\..*--allow-partial"):
        _export(directory, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    report = _export(directory, tmp_path / "partial", allow_partial=True)
    assert report.missing == stage_one and (tmp_path / "partial").is_dir()
    with pytest.raises(ExecutorError, match=r"export refused \(--strict\): .* Megatron name\(s\) the layout's ranks "
                                            r"need but the shards lack"):
        _export(directory, tmp_path / "strict", allow_partial=True, strict=True)


@pytest.mark.parametrize("form", ["seq", "grouped"])
def test_every_ep_rank_lacking_the_same_local_expert_is_refused(tmp_path, form):
    layout = ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4)

    def drop_local_expert_zero(rank, state):
        for name in [n for n in state if ".local_experts.0." in n or n.endswith("weight0")]:
            del state[name]

    directory = _shards(tmp_path, form, layout, drop_local_expert_zero)
    if form == "grouped":  # a grouped block has no per-expert quantizer: its amax covers the block
        assert not _export(directory, tmp_path / "hf", form, 4).missing
        return
    gone = _amax_names(n for n in global_state(form, 2, 4) if ".local_experts.0." in n or ".local_experts.2." in n)
    with pytest.raises(ExecutorError, match=rf"the shards lack {len(gone)} quantizer tensor"):
        _export(directory, tmp_path / "hf", form, 4)
    assert _export(directory, tmp_path / "partial", form, 4, allow_partial=True).missing == gone


def test_a_pipeline_stage_missing_some_of_its_tensors_is_refused(tmp_path):
    layout = ParallelLayout(pp=2, num_layers=4)
    name = "decoder.layers.1.self_attention.linear_proj.input_quantizer._amax"  # stage 1's local layer 1

    directory = _shards(tmp_path, "dense", layout, lambda rank, state: state.pop(name) if rank == 1 else None)
    with pytest.raises(ExecutorError, match=r"the shards lack 1 quantizer tensor\(s\) .*decoder\.layers\.3\."
                                            r"self_attention\.linear_proj\.input_quantizer\._amax"):
        _export(directory, tmp_path / "hf")


def _export_an_empty_stage(directory: str, out: str, allow_partial: bool):
    from quantmap.executor import Placement, export
    from quantmap.io.shards import LazyShard, rank_file

    placement = Placement.from_world(ParallelLayout.read(directory))
    result = export(rules_for("dense"), LazyShard(rank_file(directory, placement.coords.rank)), placement, out=out,
                    options=RunOptions(allow_partial=allow_partial))
    return result.report.missing, result.calls


@pytest.mark.slow
def test_a_distributed_export_with_an_empty_stage_fails_on_every_rank_or_reports_it(tmp_path):
    directory = _shards(tmp_path, "dense", ParallelLayout(pp=2, num_layers=4),
                        lambda rank, state: state.clear() if rank == 1 else None)
    outcomes = run_ranks(2, _export_an_empty_stage, str(directory), str(tmp_path / "hf"), False)
    assert [o[0] for o in outcomes] == ["error", "error"] and outcomes[0][1] == outcomes[1][1]
    assert "the shards lack" in outcomes[0][1] and not (tmp_path / "hf").exists()
    outcomes = run_ranks(2, _export_an_empty_stage, str(directory), str(tmp_path / "partial"), True)
    (missing, calls), _ = outcomes[0][1], outcomes[1][1]
    assert missing[0].startswith("decoder.layers.2.") and calls == 5  # 4 + one round of files (one writer per stage)


def test_extra_rank_files_beyond_the_layout_are_refused_before_any_work(tmp_path):
    layout = ParallelLayout(tp=2, num_layers=2)
    directory = _shards(tmp_path, "dense", layout)
    save_file({"x": torch.ones(1)}, str(directory / "rank_00002.safetensors"))
    with pytest.raises(LayoutError, match=r"holds 1 rank file\(s\) beyond the layout's 2 rank\(s\) \(tp\*cp\*dp\*pp = "
                                          r"2\*1\*1\*1 = 2\): rank_00002\.safetensors; they would not be exported"):
        _export(directory, tmp_path / "hf")


@pytest.mark.slow
def test_a_layout_far_bigger_than_the_rank_files_fails_at_once_through_the_cli(tmp_path):
    directory = _shards(tmp_path, "dense", ParallelLayout(num_layers=2))
    # Within quantmap's bound on world sizes (a larger one is refused as such: tests/test_adversarial.py).
    (directory / "layout.json").write_text(json.dumps({"tp": 1, "pp": 1, "dp": 100000, "num_layers": 2}))
    done = subprocess.run([sys.executable, "-m", "quantmap", "export", str(SPECS / "dense_mla.yaml"), "--megatron",
                           str(directory), "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"error: {directory} holds 1 rank file(s) but its layout.json needs 100000 "
                                  f"(tp*cp*dp*pp = 1*1*100000*1 = 100000); missing rank_00001.safetensors")
    assert len(done.stderr.splitlines()) == 1 and not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_the_cli_refuses_an_incomplete_export_and_allow_partial_reports_it(tmp_path):
    layout = ParallelLayout(pp=2, num_layers=4)
    directory = _shards(tmp_path, "dense", layout, lambda rank, state: state.clear() if rank == 1 else None)
    command = [sys.executable, "-m", "quantmap", "export", str(SPECS / "dense_mla.yaml"), "--megatron", str(directory)]
    refused = subprocess.run(command + ["--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and refused.stderr.startswith("error: export stopped before any tensor moved: "
                                                                 "the shards lack")
    partial = subprocess.run(command + ["--out", str(tmp_path / "p"), "--allow-partial"], capture_output=True,
                             text=True, timeout=120)
    assert partial.returncode == 0, partial.stderr
    assert "name(s) missing:" in partial.stderr and "decoder.layers.*.self_attention" in partial.stderr
