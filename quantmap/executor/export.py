"""Export (Megatron → Hugging Face): pack on every rank, plan on rank 0, move bytes, write.

Distributed, every rank's metadata goes to every rank (1 call) and the planner (group rank 0)
broadcasts its verdict (1 call). In memory, the packed buffers then go to rank 0 in one batch
(1 call: 3 in all). With files, several writers write the HF shard files, each file's entries
moved to its writer in one round of transfers (:mod:`quantmap.executor.writers`; one call per
round, ``ceil(files / writers)`` rounds; a torch_dist checkpoint's weights are not moved: each writer
reads those its file needs from the checkpoint itself), then the writers' statuses are gathered and
the final status broadcast (2 calls: ``4 + rounds`` in all, whatever the number of tensors). A failure
anywhere (a rank whose state cannot be read, a layout mistake, an unwritable output, a writer that
fails mid-file) reaches every rank through the verdict or the status, so all ranks raise the same
:class:`ExecutorError` and none hangs. Offline, one process plays every rank with the same plan
and no collectives, and writes the same bytes.
"""

from __future__ import annotations

import math
from array import array
from itertools import groupby
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from quantmap.executor.comm import WRITER
from quantmap.executor.module_records import ModuleRecords
from quantmap.executor.placement import Placement
from quantmap.parallel import ParallelLayout
from quantmap.executor.options import CASTS, OptionsError, RunOptions
from quantmap.executor.pack import Packed, empty_meta, pack, rebase, unpack_scalars
from quantmap.executor.plan import SHAPED, Plan
from quantmap.executor.progress import bar as progress_bar
from quantmap.executor.report import ExecutorError, Report, describe
from quantmap.executor.writers import file_bytes, schedule, write_rounds, writer_ranks
from quantmap.io.hf import INDEX, copy_model_files, write_index
from quantmap.io.safetensors_stream import each_record, raw_bytes
from quantmap.io.staging import Staged


class Export:
    """The result of an export. On rank 0 of an in-memory (or offline) export it yields the HF tensors;
    elsewhere it is empty. A distributed export to files leaves its tensors in the files.

    ``tensors()`` builds them one at a time (for in-process refit); fanned-out names share one
    tensor, so clone before modifying. ``report.disagreements`` fills as tensors are built.
    """

    def __init__(self, plan: Plan | None, buffers: dict[int, torch.Tensor] | None, calls: int = 0, moved: int = 0,
                 packs: dict[int, Packed] | None = None):
        self._plan = plan
        self._buffers = buffers
        self._packs = packs  # every rank's, where one process played them all and wrote files: tensors on demand
        self._records: _Records | None = None
        self.report = plan.report if plan else Report()
        self.calls = calls
        self.bytes = moved
        self.files: list[Path] = []

    @property
    def is_writer(self) -> bool:
        return self._plan is not None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._buffers is None and self._packs is not None:
            for rank, packed in self._packs.items():  # the writer pointed the offsets into its last file's buffer
                rebase(self._plan.metas[rank], range(len(packed.values)))
            self._buffers = {rank: packed.buffer for rank, packed in self._packs.items()}
        if self._plan is not None and self._buffers is None:
            raise ExecutorError("this export wrote its tensors to files with several writers and holds none; "
                                "export without out= to get them in memory, or read the files")
        records = self.records()
        for i in range(len(records)):
            yield from records.named_tensors(i)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())

    def records(self) -> "_Records":
        """The combined tensors as the file writer's records (empty except on the writer)."""
        if self._records is None:
            self._records = records_of(self._plan, self._buffers)
        return self._records


class _Records:
    """A plan's items as :class:`quantmap.io.safetensors_stream.Records`, built on demand: one record
    per item whose names share one tensor, one per HF name of a shaped item (its parts differ)."""

    def __init__(self, plan: Plan | None, buffers):
        self._items = plan.items if plan else []
        self.plan, self.buffers = plan, buffers
        self._item, self._part = array("q"), array("q")
        # A spec is asked for several times per record (shard sizes, header, data, index, schedule):
        # built once. Names are the plan's items' (a grouped block's made again), never copied here.
        self._specs: list[tuple] = []
        self._bulk: list = []  # per record: the dtype of a scalar built in bulk, _RUN, or None (one by one)
        self._casting = bytearray()  # per record: whether its tensor is cast to its spec's dtype when built
        self._folders: list[tuple[str, range]] = []  # each directory the format writes to, and its records
        fmt = plan.options.output_format if plan else None
        cast = getattr(torch, CASTS[plan.options.dtype]) if plan and plan.options.dtype else None
        groups = _by_directory(self._items, fmt)
        for directory, indices in groups:
            start = len(self._specs)
            for i in indices:
                self._add(i, cast if fmt.casts(self._items.role(i)) else None)
            if len(self._specs) > start or len(groups) == 1:  # a directory with nothing to write has no files
                self._folders.append((directory, range(start, len(self._specs))))
        self._built: tuple[int, list] | None = None  # the last item's tensors: its parts are written in a row

    def _add(self, i: int, cast: torch.dtype | None) -> None:
        """Item ``i``'s records; ``cast``: the dtype its tensors are written in, where the run casts them."""
        items, plan = self._items, self.plan
        if items.combine(i) == SHAPED:
            item = items[i]
            for part in range(item.records):
                self._item.append(i)
                self._part.append(part)
                dtype, shape = plan.spec(item, part)
                self._specs.append((1, cast or dtype, shape))
                self._bulk.append(None)
                self._casting.append(cast is not None and cast != dtype)
            return
        rank, entry = items.first_source(i)  # every copy has this dtype and shape (checked by the plan)
        dtype, shape = plan.metas[rank].dtypes[entry], plan.metas[rank].shapes[entry]
        expert_run = items.run(i)
        self._item.append(i)
        self._part.append(0)
        casting = cast is not None and cast != dtype
        self._casting.append(casting)
        if expert_run is not None:  # one record of distinct values, one per name
            self._specs.append((items.count(i), dtype, expert_run.shape))
            self._bulk.append(_RUN)
            return
        self._specs.append((items.count(i), cast or dtype, shape))
        self._bulk.append(dtype if math.prod(shape) == 1 and dtype in _BULK and not casting else None)

    def destinations(self) -> list[tuple[str, range]]:
        """Each directory the records go to (relative to the output) and its records, which lie together."""
        return self._folders

    def __len__(self) -> int:
        return len(self._item)

    def spec(self, i: int):
        return self._specs[i]

    def names(self, i: int):
        index = self._item[i]
        names = self._items.hf(index)
        if names is None:  # a grouped block's: made again
            names = self.plan.hf_names(self._items[index])
        return names if self._items.records(index) == 1 else names[self._part[i]:self._part[i] + 1]

    def named_tensors(self, i: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Record ``i``'s HF names with their tensors (shared by the names, except in an expert run)."""
        names = self.names(i)
        if self._bulk[i] is _RUN:
            yield from zip(names, self._run_values(i).reshape(len(names), *self._specs[i][2]).unbind())
            return
        tensor = self.tensor(i)
        for name in names:
            yield name, tensor

    def _run_values(self, i: int) -> torch.Tensor:
        """An expert run record's values, one per HF name: each expert's value once per part."""
        index = self._item[i]
        combined = self.plan.tensors(self._items[index], self.buffers)[0]
        return combined.unsqueeze(1).expand(-1, len(self._items.run(index).hf)).reshape(-1)

    def item(self, i: int) -> int:
        """The plan item record ``i`` comes from."""
        return self._item[i]

    def named_tensor(self, i: int, position: int) -> torch.Tensor:
        """The tensor of record ``i``'s ``position``-th name (its one tensor, except in an expert run)."""
        if self._bulk[i] is _RUN:
            return self._run_values(i).reshape(len(self.names(i)), *self._specs[i][2])[position]
        return self.tensor(i)

    def release(self) -> None:
        """Drop the last item's tensors: views into the buffers of the file just written, which they would keep
        alive while the next file's buffers are built (a second shard file's worth of memory)."""
        self._built = None

    def tensor(self, i: int) -> torch.Tensor:
        index = self._item[i]
        if self._built is None or self._built[0] != index:
            self._built = None  # drop the last item's tensors before building the next
            self._built = index, self.plan.tensors(self._items[index], self.buffers)
        tensor = self._built[1][self._part[i]]
        return tensor.to(self._specs[i][1]) if self._casting[i] else tensor

    def sources(self, i: int):
        """The (rank, entry) pairs record ``i`` is built from (every part of a shaped item needs all of
        its item's): what its writer must receive."""
        return self._items.sources(self._item[i])

    def data(self, indices) -> Iterator[bytes]:
        """The data of records ``indices``. Runs of scalar records of one dtype (a scalar item's copies
        and a fan-in's sources are all scalars: the plan checked) are built together (a SequentialMLP
        export has 10^5 of them), the rest one by one."""
        for lane, group in groupby(indices, key=self._bulk.__getitem__):
            group = list(group)
            if lane is _RUN:
                yield from (raw_bytes(self._run_values(i).contiguous()) for i in group)
            elif lane is None:
                yield from each_record(self, group)
            else:
                yield raw_bytes(self._scalars(group, lane))

    def _scalars(self, group: list[int], dtype: torch.dtype) -> torch.Tensor:
        """The values of scalar records ``group``, each ``count`` times: the max of each record's entries,
        as :meth:`Plan.tensors` combines copies; a record whose copies differ is built by the plan
        itself, which reports the disagreement."""
        codes, owner = self._items.source_codes([self._item[i] for i in group])
        values = unpack_scalars(self.buffers, self.plan.metas, codes >> 32, codes & 0xFFFFFFFF, dtype)
        out = torch.empty(len(group), dtype=dtype).scatter_reduce_(0, owner, values, "amax", include_self=False)
        for j in owner[values != out[owner]].unique().tolist():  # differing copies (or NaN): rare
            out[j] = self.tensor(group[j]).reshape(())
        return out.repeat_interleave(torch.tensor([self._specs[i][0] for i in group]))


_BULK = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # dtypes scatter_reduce takes the max of
_RUN = "run"  # a record's lane: an expert run (its values, built by the plan)


def records_of(plan: Plan | None, buffers):
    """The records an export writes: the plan's tensors under their HF names, or, for a format that computes
    its tensors per module, those (:class:`~quantmap.executor.module_records.ModuleRecords`)."""
    records = _Records(plan, buffers)
    if plan is not None and plan.options.output_format.modules is not None:
        return ModuleRecords(records, plan.options)
    return records


def _by_directory(items, fmt) -> list[tuple[str, range | list[int]]]:
    """The items of each directory ``fmt`` writes to, in its order (each in plan order): one directory
    holding every item where the format writes to one, as ``quantizers`` does."""
    if fmt is None or len(fmt.directories) == 1:
        return [(fmt.directories[0] if fmt else "", range(len(items)))]
    grouped: dict[str, list[int]] = {directory: [] for directory in fmt.directories}
    for i in range(len(items)):
        grouped[fmt.directory(items.role(i))].append(i)
    return list(grouped.items())


def export(rules, state: Mapping, placement: Placement, *, out: str | Path | None = None, writers: int | None = None,
           options: RunOptions = RunOptions()) -> Export:
    """Export this rank's ``state`` (local names → tensors); call on every rank of ``placement``'s group.

    With ``out`` the HF checkpoint is written there (staged, then renamed into place) by ``writers``
    ranks spread over the group (default: one per pipeline stage); ``out`` must be one directory
    that every writer can reach (a shared file system across nodes). Shards short of what the layout
    requires are refused unless ``options.allow_partial`` (then reported); ``options.strict`` refuses
    any finding (see :class:`Plan`).
    """
    from quantmap.executor.comm import Comm

    comm = Comm(placement.group, options.timeout)
    return run_export(comm, rules, {comm.rank: (state, placement)}, placement.layout, out, writers, options)


def export_offline(rules, states: Sequence[Mapping], layout: ParallelLayout, *, out: str | Path | None = None,
                   options: RunOptions = RunOptions()) -> Export:
    """One process plays every rank: ``states[r]`` is global rank ``r``'s local state."""
    from quantmap.executor.comm import Offline

    layout.check_world(len(states))
    ranks = {rank: (state, Placement.offline(layout, rank)) for rank, state in enumerate(states)}
    return run_export(Offline(len(states)), rules, ranks, layout, out, None, options)


def run_export(comm, rules, ranks: dict[int, tuple[Mapping, Placement]], layout: ParallelLayout,
               out: str | Path | None, writers: int | None, options: RunOptions) -> Export:
    """The one export path, for the ranks this process plays (``ranks``: group rank → its local state and
    placement; ``comm``: a :class:`~quantmap.executor.comm.Comm` of one rank, or
    :class:`~quantmap.executor.comm.Offline` for all): claim and pack each rank's tensors, plan on the
    writer from everyone's metadata, then gather the tensors (``out=None``) or write the files and publish."""
    try:
        options.check_export()
    except OptionsError as error:
        raise ExecutorError(str(error)) from None
    packs, staged = {}, None
    for rank, (state, placement) in ranks.items():
        try:
            packs[rank] = pack(rules, state, placement, options.output_format)
            if rank == WRITER and out is not None:
                staged = Staged(out)
        except Exception as error:  # shared with every rank through the verdict
            packs[rank] = Packed(empty_meta(placement, describe(error)))
    metas = comm.all_gather_objects({rank: packed.meta for rank, packed in packs.items()})
    verdict = plan = records = None
    if comm.is_writer:
        try:
            plan = Plan(rules, layout, metas, options)
            verdict = {"sizes": plan.sizes}
            if out is not None:
                records = records_of(plan, {})
                spread = writer_ranks(comm.processes, layout.pp if writers is None else writers)
                verdict.update(schedule=schedule(records, options.shard_size, spread), staging=str(staged.path))
        except Exception as error:  # any failure here must reach every rank, not leave them waiting
            if len(ranks) == comm.size:  # there is no other rank: as it is
                if staged:
                    staged.discard()
                raise
            verdict = {"error": describe(error)}
    verdict = comm.broadcast_object(verdict)
    if "error" in verdict:
        if staged:
            staged.discard()
        raise ExecutorError(verdict["error"])
    try:
        if out is None:
            result = Export(plan, comm.gather_buffers({rank: p.buffer for rank, p in packs.items()}, verdict["sizes"]))
        else:
            result = _write_spread(comm, rules, layout, packs, metas, records, verdict, staged, options,
                                   ranks[comm.rank][0])
    except BaseException:  # a peer that died mid-transfer, a timeout: leave no staging directory behind
        if staged:
            staged.discard()
        raise
    result.calls, result.bytes = comm.calls, comm.bytes
    return result


def _write_spread(comm, rules, layout, packs, metas, records, verdict, staged, options: RunOptions,
                  state: Mapping) -> Export:
    """The files, by the schedule's writers; then rank 0 writes the index and publishes, or discards.
    ``records`` are the planner's (rank 0); another writer builds its own from the same inputs (and
    the same ``options``, whose checks passed on rank 0). ``state`` is the state of the rank this process
    plays (offline, rank 0's): a writer reads the other ranks' shared entries with it."""
    spread = verdict["schedule"]
    if records is None and comm.rank in spread.writers:
        records = records_of(Plan(rules, layout, metas, options), {})
    plan = records.plan if records is not None else None
    planned = list(plan.report.disagreements) if plan else []  # found from metadata (replicas), before any file
    mine = sum(file_bytes(records, spread.bounds[s]) for s in range(len(spread.bounds))
               if spread.writer(s) == comm.rank) if records is not None else 0
    bar = progress_bar(mine, "export", options.progress and comm.is_writer, unit="B")
    try:
        status = write_rounds(comm, packs, spread, Path(verdict["staging"]), metas=metas, records=records,
                              buffers=records.buffers if records else None, report=plan.report if plan else None,
                              state=state, on_shard=bar.update)
    finally:
        bar.close()
    statuses = comm.gather_objects({rank: status if rank == comm.rank else None for rank in packs})
    final = None
    if comm.is_writer:
        final = _publish(records, [s for s in statuses if s is not None], spread, staged, planned, options)
    final = comm.broadcast_object(final)
    if final:
        raise ExecutorError(final)
    result = Export(plan if comm.is_writer else None, None, packs=packs if len(packs) == len(metas) else None)
    if comm.is_writer:
        result.files = ([staged.target / spread.path(s) for s in range(len(spread.bounds))] +
                        [staged.target / directory / INDEX for directory, _ in spread.directories] +
                        [staged.target / name for name in plan.report.copied])
    return result


def _publish(records: "_Records", statuses: list[dict], spread, staged: Staged, planned: list[str],
             options: RunOptions) -> str | None:
    """After every writer: each directory's index, the model's files (``options.model_files``) and the format's
    own (``config.json`` rewritten where the format adds to it), then the one rename; or the first error, with
    nothing left behind. The report lists the plan's findings (``planned``), then what the writers found, in
    file order."""
    errors = [s["error"] for s in statuses if s["error"]]
    notes = {shard: found for s in statuses for shard, found in s["disagreements"].items()}
    report = records.plan.report
    report.disagreements[:] = planned + [note for shard in sorted(notes) for note in notes[shard]]
    try:
        if errors:
            raise ExecutorError(errors[0])
        for directory, files in spread.directories:
            write_index(staged.path / directory, records, [spread.bounds[s] for s in files])
        report.copied = copy_model_files(options.model_files, staged.path)
        for added in options.output_format.files:  # the format's own files: a module-wise format's records say
            path = staged.path / added.name     # what it wrote of each module
            path.write_bytes(added.build(records.facts, path.read_bytes() if path.exists() else None))
        staged.publish()
        return None
    except Exception as error:
        staged.discard()
        return f"writing {staged.target} failed, nothing was written: {describe(error)}"
