"""Real gloo processes at world sizes 2, 4 and 8: the distributed export equals the single-process
export of the unsharded state, and export then import gives back every rank's quantizer tensors.

Each world size is one spawn that runs all of its layouts in turn (process start-up dominates)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from executor_support import global_state, quantizers, rules_for, shard, values_of_every_rank
from quantmap.executor import ParallelLayout, RunOptions, export_offline
from quantmap.io.hf import Checkpoint

NUM_LAYERS, NUM_EXPERTS = 4, 8
SCENARIOS = {
    2: [("TP2", "dense", dict(tp=2)), ("PP2", "dense", dict(pp=2)),
        ("EP2", "grouped", dict(dp=2, ep=2)), ("EP2", "seq", dict(dp=2, ep=2))],
    4: [("TP2xPP2", "dense", dict(tp=2, pp=2)), ("TP2xEP2", "seq", dict(tp=2, dp=2, ep=2, etp=1)),
        ("PP2xEP2", "grouped", dict(pp=2, dp=2, ep=2))],
    8: [("PP2xEP4", "grouped", dict(pp=2, dp=4, ep=4)), ("PP2xEP4", "seq", dict(pp=2, dp=4, ep=4)),
        ("TP2xEP2xPP2", "grouped", dict(tp=2, dp=2, pp=2, ep=2)), ("TP2xEP2xPP2", "seq", dict(tp=2, dp=2, pp=2, ep=2)),
        ("TP2xPP2xDP2", "dense", dict(tp=2, pp=2, dp=2))],
}


def _layout(form: str, sizes: dict) -> ParallelLayout:
    return ParallelLayout(num_layers=NUM_LAYERS, num_experts=None if form == "dense" else NUM_EXPERTS, **sizes)


def _run_world(scenarios, tmp: str) -> dict:
    """On every rank: export to files and in memory, then import the files back."""
    import torch.distributed as dist

    from quantmap.executor import Placement, export, import_
    from quantmap.executor.placement import device_meshes
    from quantmap.io.shards import LazyShard, rank_file

    rank = dist.get_rank()
    out = {}
    for label, form, sizes in scenarios:
        layout = _layout(form, sizes)
        rules = rules_for(form, layout.num_experts)
        state = shard(global_state(form, NUM_LAYERS, layout.num_experts), layout)[rank]
        dense, expert = device_meshes(layout)
        placement = Placement.from_meshes(layout, dense, expert)
        given = Placement.from_groups(layout, **{dim: dense[dim].get_group() for dim in ("tp", "cp", "dp", "pp")},
                                      **{dim: expert[dim].get_group() for dim in ("etp", "ep", "edp")})
        base = Path(tmp) / f"{label}-{form}"
        written = export(rules, state, placement, out=base / "hf", options=RunOptions(shard_size=256))
        in_memory = export(rules, state, placement)
        import_(rules, base / "hf", placement, base / "mg")
        shard_file = LazyShard(rank_file(base / "mg", rank))
        out[(label, form)] = {
            "coords": (placement.coords, given.coords, layout.coords(rank)),
            "calls": (written.calls, in_memory.calls),
            "exported": in_memory.state_dict() if in_memory.is_writer else None,
            "imported": {name: shard_file[name] for name in shard_file},
        }
    return out


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def world(request, tmp_path_factory):
    size = request.param
    tmp = tmp_path_factory.mktemp(f"world{size}")
    return size, tmp, values_of_every_rank(size, _run_world, SCENARIOS[size], str(tmp))


def _assert_same(got: dict, expected: dict, what: str) -> None:
    assert sorted(got) == sorted(expected), f"{what}: names differ"
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{what}: {name} differs"


@pytest.mark.slow
def test_distributed_export_equals_single_process_export_of_the_unsharded_state(world):
    size, tmp, results = world
    for label, form, sizes in SCENARIOS[size]:
        layout = _layout(form, sizes)
        expected = export_offline(rules_for(form, layout.num_experts), [global_state(form, NUM_LAYERS, layout.num_experts)],
                                  ParallelLayout(num_layers=NUM_LAYERS, num_experts=layout.num_experts)).state_dict()
        _assert_same(results[0][(label, form)]["exported"], expected, f"{label} {form} in memory")
        files = Checkpoint(tmp / f"{label}-{form}" / "hf")
        assert len({files.weight_map[n] for n in files.names()}) > 1, "shard_size=256 must give several shards"
        _assert_same({n: files.get(n) for n in files.names()}, expected, f"{label} {form} files")
        assert all(r[(label, form)]["exported"] is None for r in results[1:]), "only the writer holds the result"


@pytest.mark.slow
def test_export_then_import_gives_back_every_ranks_quantizer_tensors(world):
    size, _, results = world
    for label, form, sizes in SCENARIOS[size]:
        layout = _layout(form, sizes)
        original = shard(global_state(form, NUM_LAYERS, layout.num_experts), layout)
        for rank in range(size):
            _assert_same(results[rank][(label, form)]["imported"], quantizers(original[rank]), f"{label} {form} rank {rank}")


@pytest.mark.slow
def test_meshes_and_caller_groups_place_every_rank_in_megatrons_rank_order(world):
    size, _, results = world
    for label, form, _ in SCENARIOS[size]:
        for rank in range(size):
            from_mesh, from_groups, from_order = results[rank][(label, form)]["coords"]
            assert from_mesh == from_groups == from_order, f"{label} {form} rank {rank}"


@pytest.mark.slow
def test_export_makes_a_number_of_collective_calls_independent_of_the_tensor_count(world):
    """3 in memory; 4 plus one per round of shard files with files (one writer per pipeline stage)."""
    size, tmp, results = world
    for label, form, sizes in SCENARIOS[size]:
        files = len(list((tmp / f"{label}-{form}" / "hf").glob("model-*.safetensors")))
        rounds = -(-files // sizes.get("pp", 1))
        for rank in range(size):
            assert results[rank][(label, form)]["calls"] == (4 + rounds, 3), f"{label} {form} rank {rank}"
