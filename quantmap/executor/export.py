"""Export (Megatron → Hugging Face): pack on every rank, plan on the writer, move bytes once, write.

Distributed, an export is four collective calls whatever the model: gather metadata to the
writer (global rank 0 of the group), broadcast its verdict, send the packed buffers to it in one
batch, and (when writing files) broadcast the final status. A failure anywhere (a rank whose
state cannot be read, a layout mistake, an unwritable output) reaches every rank through the
verdict or the status, so all ranks raise the same :class:`ExecutorError` and none hangs.
Offline, one process plays every rank with the same code and no collectives.
"""

from __future__ import annotations

from array import array
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from quantmap.executor.groups import Placement
from quantmap.executor.layout import Layout
from quantmap.executor.pack import Packed, empty_meta, pack
from quantmap.executor.plan import Plan
from quantmap.executor.progress import bar as progress_bar
from quantmap.executor.report import ExecutorError, Report
from quantmap.io.hf import DEFAULT_SHARD_SIZE, write_checkpoint
from quantmap.io.staging import Staged


class Export:
    """The result of an export. On the writer it yields the HF tensors; elsewhere it is empty.

    ``tensors()`` builds them one at a time (for in-process refit); fanned-out names share one
    tensor, so clone before modifying. ``report.disagreements`` fills as tensors are built.
    """

    def __init__(self, plan: Plan | None, buffers: dict[int, torch.Tensor] | None, calls: int = 0, moved: int = 0):
        self._plan = plan
        self._buffers = buffers
        self.report = plan.report if plan else Report()
        self.calls = calls
        self.bytes = moved
        self.files: list[Path] = []

    @property
    def is_writer(self) -> bool:
        return self._plan is not None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        records = self.records()
        for i in range(len(records)):
            tensor = records.tensor(i)
            for name in records.names(i):
                yield name, tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())

    def records(self) -> "_Records":
        """The combined tensors as the file writer's records (empty except on the writer)."""
        return _Records(self._plan, self._buffers)

    def write(self, out: Path, shard_size: int, progress: bool = False) -> list[Path]:
        records = self.records()
        bar = progress_bar(len(records), "export", progress)
        try:
            self.files = write_checkpoint(out, records, shard_size, on_record=bar.update)
        finally:
            bar.close()
        return self.files


class _Records:
    """A plan's items as :class:`quantmap.io.safetensors_stream.Records`, built on demand: one record
    per item whose names share one tensor, one per HF name of a shaped item (its parts differ)."""

    def __init__(self, plan: Plan | None, buffers):
        self._items = plan.items if plan else []
        self._plan, self._buffers = plan, buffers
        self._item, self._part = array("q"), array("q")
        for i in range(len(self._items)):
            parts = self._items[i].records
            self._item.extend([i] * parts)
            self._part.extend(range(parts))
        self._built: tuple[int, list] | None = None  # the last item's tensors: its parts are written in a row

    def __len__(self) -> int:
        return len(self._item)

    def spec(self, i: int):
        item = self._items[self._item[i]]
        count = 1 if item.records > 1 else item.count
        return (count, *self._plan.spec(item, self._part[i]))

    def names(self, i: int):
        item = self._items[self._item[i]]
        names = self._plan.hf_names(item)
        return names if item.records == 1 else names[self._part[i]:self._part[i] + 1]

    def tensor(self, i: int) -> torch.Tensor:
        index = self._item[i]
        if self._built is None or self._built[0] != index:
            self._built = index, self._plan.tensors(self._items[index], self._buffers)
        return self._built[1][self._part[i]]


def export(rules, state: Mapping, placement: Placement, *, out: str | Path | None = None,
           shard_size: int = DEFAULT_SHARD_SIZE, timeout: timedelta = timedelta(minutes=10),
           progress: bool = False, strict: bool = False, allow_partial: bool = False) -> Export:
    """Export this rank's ``state`` (local names → tensors); call on every rank of ``placement``'s group.

    With ``out`` the writer writes the HF checkpoint there (staged, then renamed into place). Shards
    short of what the layout requires are refused unless ``allow_partial`` (then reported);
    ``strict`` refuses any finding (see :class:`Plan`).
    """
    from quantmap.executor.comm import Comm

    comm = Comm(placement.group, timeout)
    staged = None
    try:
        packed = pack(rules, state, placement)
        if comm.is_writer and out is not None:
            staged = Staged(out)
    except Exception as error:  # shared with every rank through the verdict
        packed = Packed(empty_meta(placement, _describe(error)))
    metas = comm.gather_objects(packed.meta)
    verdict = None
    if comm.is_writer:
        try:
            plan = Plan(rules, placement.layout, metas, strict=strict, allow_partial=allow_partial)
            verdict = {"sizes": plan.sizes}
        except Exception as error:  # any failure here must reach every rank, not leave them waiting
            verdict = {"error": _describe(error)}
    verdict = comm.broadcast_object(verdict)
    if "error" in verdict:
        if staged:
            staged.discard()
        raise ExecutorError(verdict["error"])
    try:
        buffers = comm.gather_buffers(packed.buffer, verdict["sizes"])
        result = Export(plan if comm.is_writer else None, buffers)
        if out is not None:
            status = None
            if comm.is_writer:
                status = _write(result, staged, shard_size, progress)
            status = comm.broadcast_object(status)
            if status:
                raise ExecutorError(status)
    except BaseException:  # a peer that died mid-transfer, a timeout: leave no staging directory behind
        if staged:
            staged.discard()
        raise
    result.calls, result.bytes = comm.calls, comm.bytes
    return result


def export_offline(rules, states: Sequence[Mapping], layout: Layout, *, out: str | Path | None = None,
                   shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = False, strict: bool = False,
                   allow_partial: bool = False) -> Export:
    """One process plays every rank: ``states[r]`` is global rank ``r``'s local state."""
    layout.check_world(len(states))
    staged = Staged(out) if out is not None else None
    metas, buffers = [], {}
    for rank, state in enumerate(states):
        placement = Placement.offline(layout, rank)
        try:
            packed = pack(rules, state, placement)
        except Exception as error:
            packed = Packed(empty_meta(placement, _describe(error)))
        metas.append(packed.meta)
        buffers[rank] = packed.buffer
    try:
        result = Export(Plan(rules, layout, metas, strict=strict, allow_partial=allow_partial), buffers)
    except ExecutorError:
        if staged:
            staged.discard()
        raise
    if staged is not None:
        status = _write(result, staged, shard_size, progress)
        if status:
            raise ExecutorError(status)
    return result


def _write(result: Export, staged: Staged, shard_size: int, progress: bool) -> str | None:
    """Write and publish; the error message (for every rank) or ``None``."""
    try:
        result.write(staged.path, shard_size, progress)
        result.files = [staged.target / f.name for f in result.files]
        staged.publish()
        return None
    except Exception as error:
        staged.discard()
        return f"writing {staged.target} failed, nothing was written: {_describe(error)}"


def _describe(error: BaseException) -> str:
    text = str(error)
    return text if isinstance(error, (ExecutorError, ValueError, OSError)) and text else f"{type(error).__name__}: {text}"
