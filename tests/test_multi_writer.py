"""Several writers on real gloo processes: the files (every shard and the index) are byte for byte
those of the offline export, whatever the layout, the number of writers or the shard size; a writer
that fails mid-file leaves nothing behind and every rank raises the same error; and the schedule
that deals records to files and files to writers obeys its laws."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from executor_support import global_state, rules_for, run_ranks, shard
from quantmap.executor import ParallelLayout, RunOptions, export_offline
from quantmap.executor.writers import schedule, writer_ranks
from quantmap.io.hf import INDEX

NUM_LAYERS, NUM_EXPERTS = 4, 8
# (label, form, layout sizes, writers, shard size, channels). A dense per-channel record is
# 8*channels bytes: 64 with 8 channels, so a 40-byte shard forces a file per record or two and puts a
# record larger than a shard in its own file; with 2^14 channels each rank's half is a large entry
# (pack.LARGE), which travels from its own tensor into its place in the writer's buffer.
CASES = [
    ("PP4xTP2", "dense", dict(pp=4, tp=2), None, 40, 8),
    ("PP4xTP2", "dense", dict(pp=4, tp=2), 3, 40, 8),
    ("TP2xPP2xDP2", "dense", dict(tp=2, pp=2, dp=2), 8, 100, 8),
    ("PP2xTP2", "dense", dict(pp=2, tp=2, dp=2), None, 300_000, 2**14),
    ("PP2xEP4", "seq", dict(pp=2, dp=4, ep=4), None, 256, 8),
    ("TP2xEP2xPP2", "grouped", dict(tp=2, dp=2, pp=2, ep=2), 5, 64, 8),
    ("EP8", "grouped", dict(dp=8, ep=8), 1, 10**6, 8),
]


def _layout(form: str, sizes: dict) -> ParallelLayout:
    return ParallelLayout(num_layers=NUM_LAYERS, num_experts=None if form == "dense" else NUM_EXPERTS, **sizes)


def _states(form: str, layout: ParallelLayout, channels: int = 8) -> list[dict]:
    return shard(global_state(form, NUM_LAYERS, layout.num_experts, channels=channels), layout)


def _export_cases(tmp: str) -> list[int]:
    import torch.distributed as dist

    from quantmap.executor import Placement, export

    calls = []
    for n, (label, form, sizes, writers, shard_size, channels) in enumerate(CASES):
        layout = _layout(form, sizes)
        state = _states(form, layout, channels)[dist.get_rank()]
        result = export(rules_for(form, layout.num_experts), state, Placement.from_world(layout),
                        out=Path(tmp) / f"{n}" / "hf", writers=writers, options=RunOptions(shard_size=shard_size))
        calls.append(result.calls)
    return calls


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("writers")
    outcomes = run_ranks(8, _export_cases, str(tmp))
    for rank, outcome in enumerate(outcomes):
        assert outcome[0] == "ok", f"rank {rank}: {outcome[1]}\n{outcome[2]}"
    return tmp, [outcome[1] for outcome in outcomes]


@pytest.mark.parametrize("n", range(len(CASES)), ids=[f"{c[0]}-{c[1]}-w{c[3]}-s{c[4]}" for c in CASES])
@pytest.mark.slow
def test_multi_writer_files_equal_the_offline_export_byte_for_byte(exported, tmp_path, n):
    tmp, calls = exported
    label, form, sizes, writers, shard_size, channels = CASES[n]
    layout = _layout(form, sizes)
    expected = tmp_path / "hf"
    export_offline(rules_for(form, layout.num_experts), _states(form, layout, channels), layout, out=expected,
                   options=RunOptions(shard_size=shard_size))
    got = tmp / f"{n}" / "hf"
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    assert INDEX in names
    for name in names:
        assert (got / name).read_bytes() == (expected / name).read_bytes(), f"{name} differs"
    files = len(names) - 1
    spread = len(writer_ranks(8, layout.pp if writers is None else writers))
    assert [rank[n] for rank in calls] == [4 + -(-files // spread)] * 8, calls
    if channels > 8:
        from quantmap.executor.pack import LARGE
        from quantmap.io.hf import Checkpoint

        read = Checkpoint(got)
        assert max(read.get(name).nbytes for name in read.names()) >= 2 * LARGE, "each TP half must be a large entry"
    if n == 0:
        assert files > 8, "the small shard size must give many files"
        big = [p for p in got.glob("model-*") if p.stat().st_size > shard_size + 8 + 2000]
        assert all(len(_keys(p)) == 1 for p in big)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return list(handle.keys())


@pytest.mark.slow
def test_a_record_larger_than_a_shard_gets_a_file_of_its_own(exported):
    tmp, _ = exported
    from quantmap.io.hf import Checkpoint

    files = Checkpoint(tmp / "0" / "hf")
    per_channel = [n for n in files.names() if files.get(n).numel() > 1]
    assert per_channel, "the dense form has per-channel amax"
    for name in per_channel:
        assert [n for n in files.names() if files.weight_map[n] == files.weight_map[name]] == [name]


# -- a writer that fails while writing ----------------------------------------------------------

def _fail_on_rank_2(tmp: str) -> dict:
    import torch.distributed as dist

    from quantmap.executor import Placement, export
    from quantmap.io import safetensors_stream

    rank = dist.get_rank()
    layout = _layout("dense", dict(pp=2, tp=2))  # writers: ranks 0 and 2
    state = _states("dense", layout)[rank]
    rules = rules_for("dense")
    if rank == 2:
        real = safetensors_stream.write

        def half_then_fail(path, records, indices, **kwargs):
            real(path, records, indices, **kwargs)
            with open(path, "r+b") as handle:
                handle.truncate(handle.seek(0, 2) // 2)
            raise OSError(28, "No space left on device")

        safetensors_stream.write = half_then_fail
    out = {}
    try:
        export(rules, state, Placement.from_world(layout), out=Path(tmp) / "hf", options=RunOptions(shard_size=100))
        out["error"] = "no error"
    except Exception as error:  # noqa: BLE001 - the error is what is checked
        out["error"] = f"{type(error).__name__}: {error}"
    if rank == 2:
        safetensors_stream.write = real
    out["after"] = export(rules, state, Placement.from_world(layout), out=Path(tmp) / "again",
                          options=RunOptions(shard_size=100)).calls
    return out


@pytest.mark.slow
def test_a_writer_failing_mid_file_leaves_nothing_and_every_rank_raises_the_same_error(tmp_path):
    outcomes = run_ranks(4, _fail_on_rank_2, str(tmp_path))
    assert all(o[0] == "ok" for o in outcomes), outcomes
    errors = {o[1]["error"] for o in outcomes}
    assert len(errors) == 1, errors
    error = errors.pop()
    assert error.startswith("ExecutorError: writing ") and "nothing was written" in error, error
    assert "rank 2 writing model-00002-of-" in error and "No space left on device" in error, error
    assert not (tmp_path / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"], "a staging directory was left behind"
    assert len({o[1]["after"] for o in outcomes}) == 1, "the group must stay usable"


# -- the schedule's laws ----------------------------------------------------------------------------

class _FakeRecords:
    """Records with given sizes (float32 elements), name counts and sources."""

    def __init__(self, records):
        self._records = records

    def __len__(self):
        return len(self._records)

    def spec(self, i):
        elements, count, _ = self._records[i]
        return count, torch.float32, (elements,)

    def sources(self, i):
        return self._records[i][2]


_record = st.tuples(st.integers(1, 40), st.integers(1, 3),
                    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 30)), min_size=1, max_size=4))


@settings(max_examples=200, deadline=None)
@given(st.lists(_record, max_size=40), st.integers(1, 200), st.integers(1, 8), st.integers(1, 8))
def test_every_record_is_in_exactly_one_file_within_the_shard_size_and_every_file_has_one_writer(
        records, shard_size, size, count):
    fake = _FakeRecords(records)
    plan = schedule(fake, shard_size, writer_ranks(size, count))
    flat = [i for indices in plan.bounds for i in indices]
    assert flat == list(range(len(records))), "every record once, in order"
    data = [sum(4 * records[i][0] * records[i][1] for i in indices) for indices in plan.bounds]
    for indices, filled in zip(plan.bounds, data):
        assert filled <= shard_size or len(indices) == 1, "over the shard size only for a single record"
    for k in range(len(plan.bounds) - 1):  # greedy: the next record did not fit
        first = plan.bounds[k + 1][0]
        assert data[k] + 4 * records[first][0] * records[first][1] > shard_size
    assert len(set(plan.writers)) == len(plan.writers) == min(size, count)
    seen = [s for k in range(plan.rounds) for s in plan.round(k)]
    assert seen == list(range(len(plan.bounds))), "every file in exactly one round"
    for k in range(plan.rounds):
        assert len({plan.writer(s) for s in plan.round(k)}) == len(plan.round(k)), "one file per writer per round"
    for indices, needs in zip(plan.bounds, plan.needs):
        wanted = {source for i in indices for source in records[i][2]}
        got = [(rank, entry) for rank, entries in needs.items() for entry in entries]
        assert sorted(got) == sorted(wanted), "each needed entry sent once to the file's writer"
