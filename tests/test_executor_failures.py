"""Failure paths on real gloo processes: every rank raises the same clear error, none hangs, and
nothing is left at the output path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from executor_support import global_state, rules_for, run_ranks, shard
from quantmap.executor import ParallelLayout

LAYOUT = dict(tp=2, num_layers=2)


class _FailingState(Mapping):
    """A rank's state whose storage breaks while it is being read."""

    def __init__(self, state: dict):
        self._state = state

    def __getitem__(self, name):
        if name.endswith("linear_proj.input_quantizer._amax"):
            raise RuntimeError("disk read failed")
        return self._state[name]

    def __iter__(self):
        return iter(self._state)

    def __len__(self):
        return len(self._state)


def _case(case: str, state: dict, rank: int, tmp: Path):
    if rank != 1:
        return state, tmp / case / "hf"
    if case == "missing":
        state.pop("decoder.layers.1.self_attention.linear_qkv.input_quantizer._amax")
    elif case == "shapes":
        state["decoder.layers.0.self_attention.linear_q_up_proj.weight_quantizer._amax"] = torch.ones(5, 1)
    elif case == "raises":
        state = _FailingState(state)
    return state, tmp / case / "hf"


CASES = ("missing", "shapes", "raises", "unwritable", "layout")


def _run_failures(tmp: str) -> dict:
    import torch.distributed as dist

    from quantmap.executor import Placement, export

    rank = dist.get_rank()
    rules = rules_for("dense")
    (Path(tmp) / "a-file").write_text("not a directory")
    out = {}
    for case in CASES:
        layout = ParallelLayout(**LAYOUT)
        state = shard(global_state("dense", 2), layout)[rank]
        state, target = _case(case, state, rank, Path(tmp))
        if case == "unwritable":
            target = Path(tmp) / "a-file" / "hf"
        try:
            if case == "layout":
                layout = ParallelLayout(tp=2, pp=2, num_layers=2)  # needs 4 ranks
            export(rules, state, Placement.from_world(layout), out=target)
            out[case] = "no error"
        except Exception as error:  # noqa: BLE001 - the error is what is checked
            out[case] = f"{type(error).__name__}: {error}"
    out["after"] = export(rules, shard(global_state("dense", 2), ParallelLayout(**LAYOUT))[rank],
                          Placement.from_world(ParallelLayout(**LAYOUT))).calls
    return out


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failures")
    outcomes = run_ranks(2, _run_failures, str(tmp))
    assert all(o[0] == "ok" for o in outcomes), outcomes
    return tmp, [o[1] for o in outcomes]


@pytest.mark.parametrize("case, words", [
    ("missing", ["rank 1", "decoder.layers.1.self_attention.linear_qkv.input_quantizer._amax", "Nothing was written"]),
    ("shapes", ["decoder.layers.0.self_attention.linear_q_up_proj.weight_quantizer._amax", "different shapes",
                "rank 0: [8, 1]", "rank 1: [5, 1]"]),
    ("raises", ["rank 1", "linear_proj.input_quantizer._amax", "RuntimeError: disk read failed"]),
    ("unwritable", ["cannot write the output", "a-file"]),
    ("layout", ["LayoutError", "needs tp*cp*dp*pp", "= 4"]),
])
@pytest.mark.slow
def test_every_rank_fails_with_the_same_clear_message_and_nothing_is_written(failures, case, words):
    tmp, results = failures
    assert results[0][case] == results[1][case], "ranks disagree on the error"
    assert results[0][case].startswith(("ExecutorError", "LayoutError")), results[0][case]
    for word in words:
        assert word in results[0][case], results[0][case]
    assert not (tmp / case).exists() or not any((tmp / case).iterdir())
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == [], "a staging directory was left behind"


@pytest.mark.slow
def test_the_group_stays_usable_after_a_failed_export(failures):
    _, results = failures
    assert results[0]["after"] == results[1]["after"] == 3


def test_an_expert_rank_short_of_one_expert_is_named_in_the_error(tmp_path):
    from quantmap.executor import ExecutorError, export_offline

    layout = ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4)
    ranks = shard(global_state("seq", 2, 4), layout)
    del ranks[1]["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.input_quantizer._amax"]
    with pytest.raises(ExecutorError) as raised:
        export_offline(rules_for("seq"), ranks, layout, out=tmp_path / "hf")
    assert "rank 1 has no local 'decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.input_quantizer._amax' " \
           "but rank 0 of the same pipeline stage holds it" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def _die_on_rank_1(tmp: str):
    import os

    import torch.distributed as dist

    from quantmap.executor import Placement, export

    layout = ParallelLayout(**LAYOUT)
    state = shard(global_state("dense", 2), layout)[dist.get_rank()]
    if dist.get_rank() == 1:
        os._exit(3)
    export(rules_for("dense"), state, Placement.from_world(layout), out=Path(tmp) / "hf")


@pytest.mark.slow
def test_a_worker_that_dies_stops_the_run_promptly_with_a_clear_error(tmp_path):
    import time

    from quantmap.executor import ExecutorError

    start = time.monotonic()
    with pytest.raises(ExecutorError, match="worker process 1 died .*exit code 3"):
        run_ranks(2, _die_on_rank_1, str(tmp_path))
    assert time.monotonic() - start < 30
    assert not (tmp_path / "hf").exists()


def _killed_between_staging_and_marker(tmp: str):
    import os
    import signal
    import types

    import torch.distributed as dist

    from quantmap.executor import Placement, export
    from quantmap.io import staging

    layout = ParallelLayout(**LAYOUT)
    state = shard(global_state("dense", 2), layout)[dist.get_rank()]
    if dist.get_rank() == 0:  # the writer dies after making its staging directory, before marking it
        staging.json = types.SimpleNamespace(dumps=lambda owner: os.kill(os.getpid(), signal.SIGKILL))
    export(rules_for("dense"), state, Placement.from_world(layout), out=Path(tmp) / "hf")


@pytest.mark.slow
def test_an_unmarked_staging_directory_of_a_killed_worker_is_removed_by_its_command(tmp_path):
    from quantmap.executor import ExecutorError
    from quantmap.io import staging

    (tmp_path / ".hf.tmp-1-othertok-00000000").mkdir()  # unmarked, and not this command's: kept
    with pytest.raises(ExecutorError, match="worker process 0 died .*SIGKILL"):
        run_ranks(2, _killed_between_staging_and_marker, str(tmp_path))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and not any((tmp_path / name / staging.MARKER).exists() for name in left), left
    staging.remove_owned(tmp_path / "hf")  # what the launcher does on every failure
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.tmp-1-othertok-00000000"]
