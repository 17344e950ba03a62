"""Each rank file records where it sits (its coordinates and the global layers and experts its local
indices stand for), whoever writes it (``save_shard`` or an import), and export refuses a file read for
another position: swapped expert-parallel ranks or pipeline stages no longer export a wrong model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from executor_support import SPECS, global_state, rules_for, run_ranks, shard
import quantmap
from quantmap.executor import ExecutorError, ParallelLayout, RunOptions, export_offline, import_offline
from quantmap.executor.launch import export_from
from quantmap.io.shards import COORDINATES_KEY, LazyShard, coordinates, rank_file, save_shard

BIG_SHARDS = RunOptions(shard_size=2**30)


def _recorded(path: Path) -> dict:
    with safe_open(path, "pt") as handle:
        return json.loads(handle.metadata()[COORDINATES_KEY])


def _save(tmp_path: Path, form: str, layout: ParallelLayout) -> Path:
    directory = tmp_path / "shards"
    for rank, state in enumerate(shard(global_state(form, layout.num_layers, layout.num_experts), layout)):
        save_shard(state, layout, directory, rank=rank)
    return directory


def _swap(directory: Path, a: int, b: int) -> None:
    first, second = rank_file(directory, a), rank_file(directory, b)
    os.replace(first, directory / "swap")
    os.replace(second, first)
    os.replace(directory / "swap", second)


def test_save_shard_records_the_rank_coordinates_and_its_layer_and_expert_ranges(tmp_path):
    layout = ParallelLayout(pp=2, dp=2, ep=2, num_layers=4, num_experts=4)
    directory = _save(tmp_path, "seq", layout)
    assert _recorded(rank_file(directory, 3)) == {"rank": 3, "tp": 0, "cp": 0, "dp": 1, "pp": 1, "etp": 0, "ep": 1,
                                                  "edp": 0, "layers": [2, 4], "experts": [2, 4]}
    assert _recorded(rank_file(directory, 0))["layers"] == [0, 2]


def test_an_import_records_every_rank_coordinates(tmp_path):
    layout = ParallelLayout(tp=2, pp=2, num_layers=2)
    export_offline(rules_for("dense"), [global_state("dense", 2)], ParallelLayout(num_layers=2), out=tmp_path / "hf")
    import_offline(rules_for("dense"), tmp_path / "hf", layout, tmp_path / "mg")
    for rank in range(layout.world_size):
        assert _recorded(rank_file(tmp_path / "mg", rank)) == coordinates(layout, layout.coords(rank))
    assert _recorded(rank_file(tmp_path / "mg", 3))["layers"] == [1, 2] and _recorded(rank_file(tmp_path / "mg", 3))["experts"] is None


def test_swapped_expert_parallel_rank_files_are_refused_naming_both(tmp_path):
    layout = ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4)
    directory = _save(tmp_path, "seq", layout)
    _swap(directory, 0, 1)
    with pytest.raises(ExecutorError) as raised:
        export_from(quantmap.compile(str(SPECS / "moe_seq.yaml")), directory, tmp_path / "hf", BIG_SHARDS)
    message = str(raised.value)
    assert message.startswith("export failed on 2 ranks:")
    assert ("rank 0: rank_00000.safetensors was written for rank 1 (tp=0 cp=0 dp=1 pp=0 etp=0 ep=1 edp=0, "
            "layers 0..1, experts 2..3) but is read as rank 0 (tp=0 cp=0 dp=0 pp=0 etp=0 ep=0 edp=0, layers 0..1, "
            "experts 0..1); the rank files were swapped or renamed") in message
    assert "rank 1: rank_00001.safetensors was written for rank 0" in message
    assert not (tmp_path / "hf").exists()


def _export_files(directory: str, out: str):
    from quantmap.executor import Placement, export

    placement = Placement.from_world(ParallelLayout.read(directory))
    export(rules_for("dense"), LazyShard(rank_file(directory, placement.coords.rank)), placement, out=out)


@pytest.mark.slow
def test_swapped_pipeline_stages_fail_a_distributed_export_on_every_rank(tmp_path):
    directory = _save(tmp_path, "dense", ParallelLayout(pp=2, num_layers=4))
    _swap(directory, 0, 1)
    outcomes = run_ranks(2, _export_files, str(directory), str(tmp_path / "hf"))
    assert [o[0] for o in outcomes] == ["error", "error"] and outcomes[0][1] == outcomes[1][1]
    assert "rank_00000.safetensors was written for rank 1" in outcomes[0][1]
    assert "rank_00001.safetensors was written for rank 0" in outcomes[0][1]


def test_files_written_for_another_layout_are_refused(tmp_path):
    """TP=2 files read as DP=2 would export rank 0's half of each per-channel amax as the whole."""
    directory = _save(tmp_path, "dense", ParallelLayout(tp=2, num_layers=2))
    ParallelLayout(dp=2, num_layers=2).write(directory)
    with pytest.raises(ExecutorError, match=r"rank 1: rank_00001\.safetensors was written for rank 1 \(tp=1 cp=0 dp=0 "
                                            r"pp=0 etp=1 ep=0 edp=0, layers 0\.\.1\) but is read as rank 1 \(tp=0 cp=0 "
                                            r"dp=1 pp=0 etp=0 ep=0 edp=1, layers 0\.\.1\)"):
        export_from(quantmap.compile(str(SPECS / "dense_mla.yaml")), directory, tmp_path / "hf", BIG_SHARDS)


def test_files_without_coordinates_still_export(tmp_path):
    layout = ParallelLayout(tp=2, num_layers=2)
    directory = tmp_path / "plain"
    directory.mkdir()
    layout.write(directory)
    for rank, state in enumerate(shard(global_state("dense", 2), layout)):
        save_file({n: t.contiguous() for n, t in state.items() if "_quantizer." in n}, str(rank_file(directory, rank)))
    report = export_from(quantmap.compile(str(SPECS / "dense_mla.yaml")), directory, tmp_path / "hf", BIG_SHARDS)
    assert report.written > 0 and (tmp_path / "hf").is_dir()


@pytest.mark.parametrize("recorded", ["[1]", "5", '{"rank": 0, "layers": 5}', '{"rank": 0, "experts": ["a", "b"]}'])
def test_coordinates_that_are_json_but_not_a_rank_position_are_refused_clearly(tmp_path, recorded):
    directory = _save(tmp_path, "dense", ParallelLayout(tp=2, num_layers=2))
    path = rank_file(directory, 0)
    with safe_open(path, "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    save_file(tensors, str(path), metadata={"format": "pt", COORDINATES_KEY: recorded})
    with pytest.raises(ExecutorError) as raised:
        export_from(quantmap.compile(str(SPECS / "dense_mla.yaml")), directory, tmp_path / "hf", BIG_SHARDS)
    message = str(raised.value)
    assert f"rank_00000.safetensors: its {COORDINATES_KEY} metadata is not a JSON object of a rank's coordinates" \
           in message and "rewrite the file" in message and "Error:" not in message, message
    assert not (tmp_path / "hf").exists()
