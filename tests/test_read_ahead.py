"""The writer's read-ahead (quantmap/executor/read_ahead.py) on real threads: reads run in the order the file
needs them while the file is built, a tensor waits only for its own entries, a failed read is the writer's
error, and no read runs after the write is over."""

from __future__ import annotations

import threading

import pytest

from quantmap.executor.read_ahead import ReadAhead

WAIT_S = 30  # a gate that never opens fails the test instead of hanging it


def _reads(ahead: ReadAhead, rank: int, entries, events: list, gates: dict | None = None, failing=()):
    add = ahead.later(rank)
    for entry in entries:
        def read(entry=entry):
            if gates and entry in gates:
                assert gates[entry].wait(WAIT_S), f"entry {entry}'s read was never let go"
            if entry in failing:
                raise ValueError(f"cannot read entry {entry}")
            events.append(("read", rank, entry))
        add(entry, read)


def test_reads_run_in_need_order_and_a_tensor_is_built_while_later_reads_are_still_to_come():
    ahead, events = ReadAhead(), []
    let_go = threading.Event()
    _reads(ahead, 0, [5, 3, 4], events, gates={4: let_go})  # entry 4 is read only once entry 3 was used
    _reads(ahead, 1, [0], events)
    need = [[(0, 3)], [(0, 4), (1, 0)], [(0, 5)]]  # the file's records, in order
    with ahead.running(need):
        ahead.wait([(0, 3)])
        events.append(("used", 0, 3))
        let_go.set()
        for keys in need[1:]:
            ahead.wait(keys)
            assert all(("read", *key) in events for key in keys)
    assert events == [("read", 0, 3), ("used", 0, 3), ("read", 0, 4), ("read", 1, 0), ("read", 0, 5)]


def test_entries_without_a_read_are_ready_at_once_and_reads_no_record_names_run_last():
    ahead, events = ReadAhead(), []
    _reads(ahead, 0, [1, 2], events)
    with ahead.running([[(0, 2)]]):
        ahead.wait([(7, 7)])  # not deferred (quantizer state): ready already
        ahead.wait([(0, 1)])
    assert events == [("read", 0, 2), ("read", 0, 1)]


def test_a_failed_read_is_raised_to_whoever_waits_for_it_or_for_a_later_entry():
    ahead, events = ReadAhead(), []
    _reads(ahead, 0, [1, 2, 3], events, failing={2})
    with ahead.running([[(0, 1)], [(0, 2)], [(0, 3)]]):
        ahead.wait([(0, 1)])
        with pytest.raises(ValueError, match="cannot read entry 2"):
            ahead.wait([(0, 2)])
        with pytest.raises(ValueError, match="cannot read entry 2"):
            ahead.wait([(0, 3)])
    assert events == [("read", 0, 1)]  # nothing read after the failure


def test_a_write_that_fails_stops_the_reads_not_started_and_none_outlives_it():
    ahead, events = ReadAhead(), []
    in_read, let_go = threading.Event(), threading.Event()
    add = ahead.later(0)

    def first():
        in_read.set()
        assert let_go.wait(WAIT_S)
        events.append(("read", 0, 1))

    add(1, first)
    _reads(ahead, 0, [2, 3], events)
    with pytest.raises(OSError, match="disk full"):
        with ahead.running([[(0, 1)], [(0, 2)], [(0, 3)]]):
            assert in_read.wait(WAIT_S)
            threading.Timer(0.2, let_go.set).start()  # the read in progress ends after the write failed
            raise OSError("disk full")
    assert events == [("read", 0, 1)]  # the read in progress finished; the others never started
    assert not any(t.name == "quantmap-read-ahead" for t in threading.enumerate())


def test_nothing_deferred_starts_no_thread():
    ahead = ReadAhead()
    before = threading.active_count()
    with ahead.running([[(0, 1)]]):
        assert threading.active_count() == before
        ahead.wait([(0, 1)])
