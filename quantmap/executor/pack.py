"""The rank-local half of an export: claim, rename and pack this rank's tensors into one buffer.

Only names the rule set claims are packed, under their global names; the rest are listed for the
report. Of those, only the roles the output format reads (:meth:`quantmap.formats.OutputFormat.reads`)
are read at all: the others (a model's weights, for the ``quantizers`` format) are counted, never
loaded. Data-parallel replicas hold copies, so only the first replica of each view packs: dense
tensors on ``dp == cp == 0``, expert tensors on ``edp == 0``; where a view has replicas, every copy's
digest goes into the metadata for the writer to compare. Every tensor read is checked for values
that cannot be right (:mod:`quantmap.executor.values`). A buffer is one flat byte tensor
(each tensor aligned to its element size), so any mix of dtypes travels in a single transfer.
Packing copies nothing but an expert run's scalars (stacked into one entry,
:mod:`quantmap.executor.expert_runs`): a buffer is built when it is sent, of all entries (one
writer) or of the entries one HF shard file needs (several writers, shard by shard).

The model's own tensors (weights, norms: :data:`quantmap.roles.MODEL_ROLES`) are not even read here: a
rank's weights are gigabytes. Their entry is planned from their dtype and shape alone (a state that
knows them without reading the data says so with ``tensor_spec(name)``, as
:class:`~quantmap.io.shards.LazyShard` does from the file's header), and holds a :class:`Deferred` read,
made when the buffer of the output file that needs it is built and dropped once copied there (a state
with ``read_into(name, out)`` reads it straight into its place in that buffer, no tensor in between). So a
process holds at most the tensors of the file being written. Their values are not checked (quantizer
state is: an amax has a meaning a weight's values do not) and data-parallel replicas of them are not
compared: only the first replica's are read.

Where every process of the run can read a state's weights (a torch_dist checkpoint's files, which the
state reads by global name: ``shared_name(name)``, ``read_shared(name, out)``), the rank marks them
*shared* in its metadata (``meta.shared``): the writer of a file that needs them reads them itself
(:func:`read_shared`) and the rank never sends them (:func:`sent`). A shard file's tensors and a live
model's are sent.
"""

from __future__ import annotations

import math
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import torch

from quantmap.executor.placement import Placement
from quantmap.executor.expert_runs import expert_groups, template
from quantmap.formats import OutputFormat
from quantmap.formats.quantizers import QUANTIZERS
from quantmap.executor.naming import globalizer, is_expert
from quantmap.executor.rank_meta import RankMeta
from quantmap.executor.report import ExecutorError
from quantmap.executor.values import check_values, copy_digest, owns, quiet, replicated, scalar_digests
from quantmap.gc_pause import paused_gc
from quantmap.io.shards import LazyShard
from quantmap.roles import MODEL_ROLES
from quantmap.rules import WEIGHT


class Deferred(NamedTuple):
    """A packed entry read from its state only when its bytes are needed (:meth:`Packed.value`)."""

    state: Mapping
    local: str


@dataclass
class Packed:
    """What one rank sends: ``meta`` (small, to the writer first) and the tensors it describes."""

    meta: RankMeta
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def buffer(self) -> torch.Tensor:
        """Every entry in one byte buffer, at ``meta.offsets``."""
        return self.take(range(len(self.values)))

    def take(self, entries, later=None) -> torch.Tensor:
        """Entries ``entries`` (indices into ``meta``) in one new byte buffer, in that order, at the
        offsets :func:`offsets` gives for them. ``later(entry, read)``, where given, takes the reads of
        deferred entries instead of their being done here (:class:`~quantmap.executor.read_ahead.ReadAhead`):
        their places in the buffer are filled when ``read()`` runs."""
        starts, size = offsets(self.meta, entries)
        buffer = torch.empty(size, dtype=torch.uint8)
        entries = list(entries)
        at = 0
        while at < len(entries):
            span = self._scalar_span(entries, at)
            if span <= 1 and self._read_into(entries[at], buffer, starts[at], later):
                at += 1
                continue
            if span > 1:  # consecutive one-element entries of one dtype lie back to back: one copy
                scalars = [self.value(e) for e in entries[at:at + span]]  # detached when read
                values = torch.stack([v if v.dim() == 0 else v.reshape(()) for v in scalars])
                flat = values.cpu().view(torch.uint8)
            else:
                flat = self.flat_bytes(entries[at])
            buffer[starts[at]:starts[at] + flat.numel()] = flat
            at += max(span, 1)
        return buffer

    def _read_into(self, entry: int, buffer: torch.Tensor, start: int, later=None) -> bool:
        """Read a :class:`Deferred` entry straight into its place in ``buffer`` (now, or by ``later``), where
        its state can (``read_into(name, out)``, as :class:`~quantmap.executor.torch_dist_checkpoint.CheckpointState`
        has): its bytes are then copied once, from the file into the buffer; ``False`` where it cannot."""
        value = self.values[entry]
        read_into = getattr(value.state, "read_into", None) if isinstance(value, Deferred) else None
        if read_into is None:
            return False
        dtype, shape = self.meta.dtypes[entry], self.meta.shapes[entry]
        with reading(value.local):
            spec = value.state.tensor_spec(value.local)
        self._check_planned(entry, value.local, spec[0], tuple(spec[1]))
        _read_now_or_later(entry, value.local, read_into,
                           buffer[start:start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape), later)
        return True

    def _scalar_span(self, entries: list[int], at: int) -> int:
        """How many entries from ``entries[at]`` on are one-element tensors of its dtype (0 if it is not one)."""
        dtypes, shapes = self.meta.dtypes, self.meta.shapes
        dtype, end = dtypes[entries[at]], at
        while end < len(entries) and dtypes[entries[end]] == dtype and math.prod(shapes[entries[end]]) == 1:
            end += 1
        return end - at

    def flat_bytes(self, entry: int) -> torch.Tensor:
        """Entry ``entry``'s bytes, a view of its tensor (a copy only if it is not contiguous)."""
        return self.value(entry).reshape(-1).contiguous().cpu().view(torch.uint8)

    def value(self, entry: int) -> torch.Tensor:
        """Entry ``entry``'s tensor; a :class:`Deferred` one read now (and not kept), and checked against the
        dtype and shape it was planned with."""
        value = self.values[entry]
        if not isinstance(value, Deferred):
            return value
        tensor = read_tensor(value.state, value.local)
        self._check_planned(entry, value.local, tensor.dtype, tuple(tensor.shape))
        return tensor

    def _check_planned(self, entry: int, local: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        planned = self.meta.dtypes[entry], self.meta.shapes[entry]
        if (dtype, shape) != planned:
            raise ValueError(f"{local!r} reads as {dtype} {list(shape)} but was planned as "
                             f"{planned[0]} {list(planned[1])} from its metadata; the checkpoint changed while it was "
                             f"exported, or its header is wrong".replace("torch.", ""))

    def pieces(self, entries: list[int]) -> list[torch.Tensor]:
        """Entries ``entries`` (in :func:`transfer_order`) as the pieces of their transfer: the small
        ones copied into one block, each large one its own tensor's bytes, uncopied; what
        :func:`receiving` cuts the receiver's buffer into."""
        small = [e for e in entries if not _large(self.meta, e)]
        return ([self.take(small)] if small else []) + [self.flat_bytes(e) for e in entries[len(small):]]


def empty_meta(placement: Placement, error: str | None = None) -> RankMeta:
    return RankMeta(placement.coords, error)


def pack(rules, state: Mapping, placement: Placement, output_format: OutputFormat = QUANTIZERS) -> Packed:
    """Claim and pack the tensors of ``state`` (local names → tensors) that ``output_format`` reads;
    exceptions propagate to the caller."""
    layout = placement.layout
    if isinstance(state, LazyShard):
        state.check_coordinates(layout, placement.coords)
    packing = _Packing(rules, state, placement, output_format)
    with paused_gc():  # 10^4 names and their entries: acyclic, and scanned again and again otherwise
        groups, singles = expert_groups(state.keys(), layout.experts_per_rank)
        for local in singles:
            packing.one(local)
        for members in groups:
            if not packing.run(members):
                for local in members:
                    packing.one(local)
        return packing.packed()


class _Packing:
    """One rank's pack in progress: its metadata, the values it sends, and what it read (to check)."""

    def __init__(self, rules, state: Mapping, placement: Placement, output_format: OutputFormat):
        layout, coords = placement.layout, placement.coords
        self.rules, self.state, self.format = rules, state, output_format
        self.taken: dict[int, bool] = {}  # id(rule) -> whether the format reads its role
        self.owner = {False: owns(coords, expert=False), True: owns(coords, expert=True)}
        self.compared = {False: replicated(layout, expert=False), True: replicated(layout, expert=True)}
        self.meta = empty_meta(placement)
        self.values: list[torch.Tensor] = []
        self.read: list[tuple[str, torch.Tensor, str | None]] = []  # (name, value, role): for check_values
        self.globalize = globalizer(layout, coords)
        self.shared_name = getattr(state, "shared_name", None)  # a state whose weights every process can read

    def one(self, local: str) -> None:
        """Claim, read and pack one local name."""
        meta = self.meta
        name, local_layer, local_expert, _ = self.globalize(local)
        _note_indices(meta, local_layer, local_expert)
        match = self.rules.to_hf(name)
        if match is None:
            meta.unclaimed.append(name)
            return
        expert = is_expert(name)
        if not self._takes(match.rule):
            meta.weights += self.owner[expert]
            return
        rule = self.rules.number(match.rule)
        role = self.rules.role(rule)
        if role in MODEL_ROLES:  # read when its output file is written, never here (see the module's docstring)
            if self.owner[expert]:
                dtype, shape = self._spec(local)
                if self.shared_name is not None:
                    meta.shared[len(self.values)] = self.shared_name(local)
                self._append(name, Deferred(self.state, local), dtype, shape, rule)
                meta.experts += expert
            return
        if not (self.owner[expert] or self.compared[expert]):
            return
        value = self._value(local)
        self.read.append((name, value, role))
        if self.compared[expert]:
            meta.copies[name] = copy_digest(value)
        if self.owner[expert]:
            self._append(name, value, value.dtype, tuple(value.shape), rule)
            meta.experts += expert

    def run(self, members: list[str]) -> bool:
        """Claim, read and pack a group of local names (experts ``0..n-1`` of one quantizer, see
        :func:`expert_groups`) as one run; ``False``, with nothing done, where the index cannot prove
        one template for them or their values are not one-element tensors of one dtype."""
        meta = self.meta
        name, local_layer, _, span = self.globalize(members[0])
        found = template(self.rules, name, span)
        if found is None:
            return False
        expert = is_expert(name)
        if not self._takes(found.rule):
            meta.weights += self.owner[expert] * len(members)
        elif found.rule.kind == WEIGHT:  # a run folds one-element quantizer state; weights go one by one
            return False
        elif self.owner[expert] or self.compared[expert]:
            values = [self._value(local) for local in members]
            dtype, shape = values[0].dtype, tuple(values[0].shape)
            if any(value.dtype != dtype or tuple(value.shape) != shape for value in values) or math.prod(shape) != 1:
                return False
            stacked = torch.stack(values).reshape(len(values))
            run = found.run(int(name[span[0]:span[1]]), len(members), shape)
            rule = self.rules.number(found.rule)
            role = self.rules.role(rule)
            names = None
            if not quiet(stacked, role):  # checked one by one: the messages name each
                names = run.megatron_names()
                self.read += ((member, value, role) for member, value in zip(names, values))
            if self.compared[expert]:
                names = names or run.megatron_names()
                meta.copies.update(zip(names, scalar_digests(stacked, shape)))
            if self.owner[expert]:
                meta.runs[len(self.values)] = run
                self._append(name, stacked, dtype, (run.count,), rule)
                meta.experts += run.count
        _note_indices(meta, local_layer, len(members) - 1)
        return True

    def _takes(self, rule) -> bool:
        """Whether the format reads the tensors ``rule`` claims (asked once per rule: 10^5 names share a few)."""
        taken = self.taken.get(id(rule))
        if taken is None:
            taken = self.taken[id(rule)] = self.format.reads(rule.role)
        return taken

    def _value(self, local: str) -> torch.Tensor:
        return read_tensor(self.state, local)

    def _spec(self, local: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """A model tensor's dtype and shape: from the state's ``tensor_spec`` where it has one (no data
        read), else from the tensor itself, which is dropped again (a live state holds it anyway)."""
        spec = getattr(self.state, "tensor_spec", None)
        if spec is None:
            value = self._value(local)
            return value.dtype, tuple(value.shape)
        with reading(local):
            dtype, shape = spec(local)
        return dtype, tuple(shape)

    def _append(self, name: str, value: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], rule: int) -> None:
        self.values.append(value)
        self.meta.claim(name, dtype, shape, rule)

    def packed(self) -> Packed:
        meta = self.meta
        meta.uncalibrated = check_values(self.read)
        meta.offsets, meta.size = offsets(meta, range(len(self.values)))
        return Packed(meta, self.values)


def read_tensor(state: Mapping, local: str) -> torch.Tensor:
    """``state[local]``, detached; a failing read or a value that is no tensor is an error naming it."""
    with reading(local):
        value = state[local]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{local!r} is a {type(value).__name__}, not a tensor; pass the model's state_dict() "
                        f"or a safetensors shard")
    return value.detach() if value.requires_grad else value  # a live model's parameter


@contextmanager
def reading(local: str):
    """Any failure of reading ``local`` from its state as one error naming it."""
    try:
        yield
    except Exception as error:
        raise ExecutorError(f"reading {local!r} failed: {type(error).__name__}: {error}") from error


def offsets(meta: RankMeta, entries) -> tuple[array, int]:
    """Where entries ``entries`` lie in a buffer that holds just them, in that order (each aligned to
    its element size), and the buffer's size. Sender and writer both compute it from ``meta``."""
    starts, offset = array("q"), 0
    for entry in entries:
        dtype = meta.dtypes[entry]
        width = dtype.itemsize
        offset = -(-offset // width) * width
        starts.append(offset)
        offset += math.prod(meta.shapes[entry]) * width
    return starts, offset


LARGE = 1 << 16  # bytes: an entry this large travels from its own tensor, not through a copy


def _large(meta: RankMeta, entry: int) -> bool:
    return math.prod(meta.shapes[entry]) * meta.dtypes[entry].itemsize >= LARGE


def transfer_order(meta: RankMeta, entries) -> list[int]:
    """``entries`` as they lie in a transfer buffer: the small ones first, then the large ones (each
    group in the given order)."""
    return [e for e in entries if not _large(meta, e)] + [e for e in entries if _large(meta, e)]


def receiving(meta: RankMeta, entries: list[int], buffer: torch.Tensor) -> list[torch.Tensor]:
    """The views of ``buffer`` (laid out for ``entries``, in :func:`transfer_order`) that receive the
    pieces :meth:`Packed.pieces` sends: the small block, then each large entry in its place."""
    starts, _ = offsets(meta, entries)
    small = sum(1 for e in entries if not _large(meta, e))
    views = [buffer[:offsets(meta, entries[:small])[1]]] if small else []
    for start, entry in zip(starts[small:], entries[small:]):
        views.append(buffer[start:start + math.prod(meta.shapes[entry]) * meta.dtypes[entry].itemsize])
    return views


def sent(meta: RankMeta, entries) -> list[int]:
    """Of ``entries``, those that travel to a writer: all but the shared ones (``meta.shared``), which the
    writer reads itself (:func:`read_shared`)."""
    return [e for e in entries if e not in meta.shared] if meta.shared else list(entries)


def read_shared(state, meta: RankMeta, entries, buffer: torch.Tensor, later=None) -> None:
    """Another rank's shared entries ``entries`` read by this process's own ``state`` of the same source (its
    ``read_shared(name, out)``), each straight into its place in ``buffer`` (laid out by :func:`rebase`):
    now, or by ``later`` (as :meth:`Packed.take`)."""
    if entries and getattr(state, "read_shared", None) is None:
        raise ExecutorError(f"{meta.names[entries[0]]!r} is to be read by its writer, whose state cannot read "
                            f"another rank's tensors; every rank must export the same source")
    for entry in entries:
        _read_now_or_later(entry, meta.shared[entry], state.read_shared, unpack(buffer, meta, entry), later)


def _read_now_or_later(entry: int, name: str, read_into, out: torch.Tensor, later) -> None:
    def read():
        with reading(name):
            read_into(name, out)

    read() if later is None else later(entry, read)


def rebase(meta: RankMeta, entries) -> int:
    """Point ``meta``'s offsets for ``entries`` into a buffer of just them (as :meth:`Packed.take`
    builds it), so that :func:`unpack` reads them there; the buffer's size. A writer that receives a
    shard's entries does this on its own copy of the metadata."""
    starts, size = offsets(meta, entries)
    for entry, start in zip(entries, starts):
        meta.offsets[entry] = start
    return size


def _note_indices(meta: RankMeta, layer: int | None, expert: int | None) -> None:
    """Keep the highest local layer and expert index seen: the writer checks them against the layout,
    which would otherwise renumber a model with fewer layers or experts than it says, silently."""
    if layer is not None and (meta.top_layer is None or layer > meta.top_layer):
        meta.top_layer = layer
    if expert is not None and (meta.top_expert is None or expert > meta.top_expert):
        meta.top_expert = expert


def unpack(buffer: torch.Tensor, meta: RankMeta, index: int) -> torch.Tensor:
    """Entry ``index`` of a rank's buffer, as a view with its dtype and shape."""
    dtype, shape, start = meta.dtypes[index], meta.shapes[index], meta.offsets[index]
    return buffer[start:start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)


def unpack_scalars(buffers: dict[int, torch.Tensor], metas: list[RankMeta], ranks: torch.Tensor, entries: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """The values of one-element entries ``entries[k]`` of rank ``ranks[k]`` (all of ``dtype``), in order:
    one gather per rank instead of a view per entry (a SequentialMLP export has 10^5 scalars)."""
    width = dtype.itemsize
    out = torch.empty(len(entries), dtype=dtype)
    for rank in ranks.unique().tolist():
        here = (ranks == rank).nonzero().flatten()
        starts = torch.frombuffer(metas[rank].offsets, dtype=torch.int64)[entries[here]]
        buffer = buffers[rank]
        out[here] = buffer[:buffer.numel() // width * width].view(dtype)[starts // width]  # offsets are aligned
    return out
