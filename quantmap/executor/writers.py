"""Several writers: an export's HF shard files are spread over ranks and moved to them file by file.

Block amax of a large model runs to tens of GB, too much to funnel through one process. The planner
(group rank 0) cuts the records into shard files exactly as a single writer does
(:func:`quantmap.io.hf.shard_bounds`, so the files are byte-identical to an offline export), deals
the files round-robin to the writers, and lists for each file the packed entries, per source rank,
that its records are built from (``Records.sources``). In round ``k`` writer ``w`` writes file
``k*W + w``: every source rank sends it just that file's entries (small ones copied into one block,
large ones straight from their tensors into their place in the writer's buffer; one batch of
point-to-point transfers for the whole group per round), but for the *shared* ones (``RankMeta.shared``:
a torch_dist checkpoint's weights, whose files every process can read), which the writer reads itself,
straight into their place (:func:`quantmap.executor.pack.read_shared`): of a whole model's export, only
the quantizer state and the metadata travel. The writer builds the file's records one at a time and
streams them out, then drops the round's buffers. A writer thus holds one file's inputs at a time,
plus the record being built. The planner writes the index after every writer is done.
A format that writes to several directories (``hf``: the model, and ``quantizer_state/``) has each cut into
its own files and index (:func:`quantmap.io.hf.directories`); the files of all of them are dealt alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantmap.executor.read_ahead import ReadAhead
from quantmap.executor.pack import Packed, read_shared, rebase, receiving, sent, transfer_order
from quantmap.executor.rank_meta import RankMeta
from quantmap.executor.report import Report, describe
from quantmap.io.hf import directories, record_bytes, shard_bounds, shard_name, write_shard


@dataclass(frozen=True)
class Schedule:
    """Which writer writes which shard file, and what each file needs from each source rank."""

    bounds: list[range]  # the records of each shard file
    writers: list[int]  # group ranks; file ``s`` goes to ``writers[s % len(writers)]``
    needs: list[dict[int, list[int]]]  # per file: source rank -> its entries, in first-use order
    folders: list[tuple[str, range]] | None = None  # each directory and its files (None: all in the output)

    def writer(self, shard: int) -> int:
        return self.writers[shard % len(self.writers)]

    @property
    def directories(self) -> list[tuple[str, range]]:
        """Each directory (relative to the output; ``""`` the output itself) and the numbers of its files."""
        return self.folders if self.folders is not None else [("", range(len(self.bounds)))]

    def path(self, shard: int) -> str:
        """File ``shard``'s path relative to the output: ``model-0000K-of-0000N.safetensors`` in its directory."""
        for directory, files in self.directories:
            if shard in files:
                name = shard_name(shard - files.start, len(files))
                return f"{directory}/{name}" if directory else name
        raise IndexError(shard)

    @property
    def rounds(self) -> int:
        return -(-len(self.bounds) // len(self.writers))

    def round(self, k: int) -> range:
        """The files written in round ``k`` (one per writer, the last round possibly fewer)."""
        width = len(self.writers)
        return range(k * width, min((k + 1) * width, len(self.bounds)))


def writer_ranks(size: int, count: int) -> list[int]:
    """``count`` writers spread evenly over a group of ``size`` ranks. In Megatron's default order a
    pipeline stage is a contiguous block of ranks, so one writer per stage is each stage's first rank."""
    count = max(1, min(count, size))
    return [k * size // count for k in range(count)]


def schedule(records, shard_size: int, writers: list[int]) -> Schedule:
    """The plan of a multi-writer write, from the records' sizes and sources alone."""
    bounds, folders = [], []
    for directory, indices in directories(records):
        cut = shard_bounds(records, shard_size, indices)
        folders.append((directory, range(len(bounds), len(bounds) + len(cut))))
        bounds += cut
    needs = []
    for indices in bounds:
        by_rank: dict[int, dict[int, None]] = {}  # dicts keep first-use order and drop repeats
        for i in indices:
            for rank, entry in records.sources(i):
                by_rank.setdefault(rank, {})[entry] = None
        needs.append({rank: list(entries) for rank, entries in sorted(by_rank.items())})
    return Schedule(bounds, writers, needs, folders)


def file_bytes(records, indices: range) -> int:
    """Data bytes of the shard file of records ``indices`` (what a progress bar over bytes counts)."""
    return sum(record_bytes(records, i) for i in indices)


def write_rounds(comm, packs: dict[int, Packed], plan: Schedule, directory: Path, *, metas: list[RankMeta] | None = None,
                 records=None, buffers: dict | None = None, report: Report | None = None, state=None,
                 on_shard=None) -> dict | None:
    """This process's part of the write: every round, send the entries each writer elsewhere needs from
    the ranks it plays (``packs``), but for the shared ones (:func:`~quantmap.executor.pack.sent`); on a
    writer (``records`` given, reading ``buffers`` and ``metas``), receive its file's entries, then take
    those of the ranks it plays from ``packs``, read the shared ones with its own ``state`` (the one it
    packed), and write the file.

    A writer reads its file's entries (its own, and the shared ones) after the round's transfers, so a
    read that fails is its error, reported in its status, not a transfer its peers wait on. A writer that
    fails keeps taking part in the remaining rounds (so no peer waits on it), writes nothing more, and
    reports. Returns a writer's status, ``{"error": message | None, "disagreements": {file: [notes]}}``,
    and ``None`` elsewhere.
    """
    status = {"error": None, "disagreements": {}} if records is not None else None
    for k in range(plan.rounds):
        files = plan.round(k)
        sends = [(plan.writer(s), piece) for s in files if plan.writer(s) not in packs
                 for rank, packed in packs.items() if rank in plan.needs[s]
                 for piece in packed.pieces(transfer_order(packed.meta, sent(packed.meta, plan.needs[s][rank])))]
        mine = next((s for s in files if plan.writer(s) in packs), None)
        receives, layouts = [], {}
        if mine is not None:
            for source, entries in plan.needs[mine].items():
                meta, own = metas[source], source in packs
                moved = transfer_order(meta, entries if own else sent(meta, entries))
                shared = [] if own else [e for e in entries if e in meta.shared]
                size = rebase(meta, moved + shared)  # the shared ones after those received
                layouts[source] = moved, shared
                if not own:
                    buffers[source] = comm.empty(size)
                    receives += [(source, view) for view in receiving(meta, moved, buffers[source])]
        comm.exchange(sends, receives)
        del sends, receives
        if mine is None:
            continue
        for source in buffers:
            buffers[source] = buffers[source].cpu()
        if status["error"] is None:
            before = len(report.disagreements)
            try:
                ahead = ReadAhead()
                for source, (moved, shared) in layouts.items():
                    later = ahead.later(source)
                    if source in packs:
                        buffers[source] = packs[source].take(moved, later)
                    else:
                        read_shared(state, metas[source], shared, buffers[source], later)
                path = directory / plan.path(mine)
                path.parent.mkdir(exist_ok=True)
                with ahead.running(records.sources(i) for i in plan.bounds[mine]), records.plan.reading_ahead(ahead):
                    write_shard(path, records, plan.bounds[mine])
            except Exception as error:  # reported to every rank through the status
                status["error"] = f"rank {comm.rank} writing {plan.path(mine)}: {describe(error)}"
            status["disagreements"][mine] = report.disagreements[before:]
            if on_shard is not None:
                on_shard(file_bytes(records, plan.bounds[mine]))
        records.release()
        buffers.clear()
    return status
