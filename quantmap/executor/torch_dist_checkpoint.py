"""Export from and import into Megatron ``torch_dist`` checkpoints, on top of the existing executor.

A torch_dist checkpoint holds GLOBAL names, so its normalised state (:mod:`quantmap.io.torch_dist`)
is what one rank of a ``tp=1, pp=1`` layout holds, and goes through the ordinary export: its
quantizer state read in one batch, and, for a format that takes the model's tensors, its weights as
a :class:`CheckpointState` that reads each one only when the export asks for it. Run on several ranks (``torchrun``, ``--nproc N``), rank ``r`` plays pipeline
stage ``r`` of ``pp=N`` with the layers split as evenly as possible (``layers_per_stage``), reads
only its stage's quantizer tensors from the checkpoint (names outside the layers on the stage
Megatron builds them on) and sends them to the writer, so no rank reads what another reads. The weights
are not sent: each writer reads those its output file needs, whichever stage holds them, from the
checkpoint's files (:meth:`CheckpointState.read_shared`).
The commands that run these from files (locking, launching, staging) are in :mod:`quantmap.executor.launch`.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from collections.abc import Mapping

import torch

from quantmap.executor.placement import Placement
from quantmap.executor.values import converted
from quantmap.parallel import ParallelLayout
from quantmap.executor.naming import to_local
from quantmap.executor.options import RunOptions
from quantmap.executor.report import Report
from quantmap.io.torch_dist import CheckpointLocation, locate, model_size, quantizers, read_entries
from quantmap.gc_pause import paused_gc
from quantmap.io.torch_dist.keys import model_weights, not_quantizer_state, swiglu_weights, weight_shapes
from quantmap.io.torch_dist.files import TorchDistError
from quantmap.io.torch_dist.metadata import METADATA_FILE
from quantmap.io.torch_dist.modelopt import check_shapes
from quantmap.io.torch_dist.read import read_weight, state_tensors, stored_keys
from quantmap.io.locks import directory_lock
from quantmap.io.torch_dist.write import commit_reported, write_into
from quantmap.sizes import gating_contradiction, size_contradiction


def checkpoint_layout(entries, world: int = 1) -> ParallelLayout:
    """The layout a checkpoint is read as: one rank, or ``world`` pipeline stages splitting its layers."""
    layers, experts = model_size(entries)
    stages = [layers // world + (stage < layers % world) for stage in range(world)]
    return ParallelLayout(pp=world, num_layers=layers, num_experts=experts, layers_per_stage=stages if world > 1 else None)


def read_state(location: CheckpointLocation, world: int = 1, rank: int = 0,
               rules=None) -> tuple[ParallelLayout, dict[str, torch.Tensor]]:
    """The layout ``world`` ranks read the checkpoint as (:func:`checkpoint_layout`), and rank ``rank``'s
    local quantizer state under it; with ``rules``, their size parameters are checked against the
    checkpoint's shapes first (:func:`check_sizes`)."""
    layout, state, _ = read_checkpoint(location, world, rank, rules)
    return layout, state


def read_checkpoint(location: CheckpointLocation, world: int = 1, rank: int = 0, rules=None,
                    weights: bool = False) -> tuple[ParallelLayout, Mapping, tuple[int, int]]:
    """:func:`read_state`, and what it left out (:func:`~quantmap.io.torch_dist.keys.not_quantizer_state`)
    for the export's report. With ``weights``, the state also holds the model's tensors (a
    :class:`CheckpointState`, each read when asked for); without, it is the quantizer state alone.

    The cyclic collector stays off for the whole read, and the 10⁵-10⁶ objects of ``.metadata`` are
    freed before it runs again, so it never scans them (it would cost a fifth of the read)."""
    with paused_gc():
        return _read_state(location, world, rank, rules, weights)


def check_sizes(rules, location: CheckpointLocation, entries) -> None:
    """Refuse size parameters (heads, groups, head_dim, hidden_size) that the checkpoint's own weight shapes
    contradict, and a spec whose gating (one fc1 tensor, or gate and up) the checkpoint's keys contradict:
    both decide where the rows of a shaped quantizer go, and a wrong one can cut them cleanly into the
    wrong pieces (:mod:`quantmap.sizes`)."""
    shapes, halves = weight_shapes(entries), swiglu_weights(entries)
    problem = size_contradiction(rules, shapes) or \
        next(filter(None, (gating_contradiction(rules, name, name in halves) for name in shapes)), None)
    if problem:
        raise TorchDistError(f"{location.path / METADATA_FILE}: {problem}")


def _read_state(location: CheckpointLocation, world: int, rank: int, rules, weights: bool):
    entries = read_entries(location.path)
    if rules is not None:
        check_sizes(rules, location, entries)
    layout = checkpoint_layout(entries, world)
    local = _local(quantizers(entries), layout, world, rank)
    check_shapes(location.path, {quantizer.name: quantizer.shape for quantizer in local.values()})
    tensors = state_tensors(location.path, entries, list(local.values()))
    state = {name: tensors[quantizer.name] for name, quantizer in local.items()}
    if weights:
        every = model_weights(entries, layout.num_layers)
        held = _local(every, layout, world, rank)
        state = CheckpointState(location.path, state, held, stored_keys(location.path, entries, every),
                                {weight.name: weight for weight in every})
    return layout, state, not_quantizer_state(entries, weights)


def _local(tensors: list, layout: ParallelLayout, world: int, rank: int) -> dict:
    """Local name → each of ``tensors`` (named globally) that rank ``rank`` holds: all of them on one rank,
    where a checkpoint's global names are the local ones; a pipeline stage's otherwise."""
    if world == 1:
        return {tensor.name: tensor for tensor in tensors}
    coords, local = layout.coords(rank), {}
    for tensor in tensors:
        name = to_local(tensor.name, layout, coords)
        if name is not None:
            local[name] = tensor
    return local


class CheckpointState(Mapping):
    """One rank's state of a torch_dist checkpoint: its quantizer tensors, read already (10⁵ scalars are read
    in one batch), and its model weights, each read from its own byte ranges when it is asked for and not
    kept, so that a process holds only the weights the export has in flight. Its names come without a read.

    Its weights are *shared*: the checkpoint's files are there for every process of the run, so each state
    also indexes the whole checkpoint's weights (``checkpoint``: global name → weight, from ``.metadata``
    alone) and reads any of them by its global name (:meth:`read_shared`). A writer of several thus reads
    the weights its file needs, whichever stage holds them, instead of receiving them from that stage
    (:mod:`quantmap.executor.writers`)."""

    def __init__(self, directory, quantizer_state: dict[str, torch.Tensor], weights: dict, stored: dict,
                 checkpoint: dict):
        self.directory, self.quantizers, self.weights, self.stored = directory, quantizer_state, weights, stored
        self.checkpoint = checkpoint

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.quantizers.get(name)
        if tensor is not None:
            return tensor
        return read_weight(self.directory, self.stored, self.weights[name])

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Weight ``name`` read straight into ``out`` (of its dtype and shape: a slice of the buffer of the
        output file that holds it), with no tensor of its own in between (:func:`read_weight`)."""
        read_weight(self.directory, self.stored, self.weights[name], out)

    def shared_name(self, name: str) -> str:
        """The global name any process's state of this checkpoint reads weight ``name`` (local) by."""
        return self.weights[name].name

    def read_shared(self, name: str, out: torch.Tensor) -> None:
        """The checkpoint's weight of global name ``name`` (any stage's) read straight into ``out``, as
        :meth:`read_into` reads one of this state's own."""
        read_weight(self.directory, self.stored, self.checkpoint[name], out)

    def tensor_spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """A weight's dtype and shape from ``.metadata`` alone: the export plans it from these and reads it
        only when its output file is written."""
        weight = self.weights[name]
        return getattr(torch, weight.dtype), weight.shape

    def __iter__(self):
        yield from self.quantizers
        yield from self.weights

    def __len__(self) -> int:
        return len(self.quantizers) + len(self.weights)

    def __contains__(self, name) -> bool:
        return name in self.quantizers or name in self.weights


def import_into(rules, hf_dir: str | Path, into: str | Path, options: RunOptions = RunOptions(), *,
                out: str | Path | None = None, in_place: bool = False, iteration: int | None = None) -> Report:
    """HF weights and quantizer state written into the torch_dist checkpoint ``into`` (a new copy, or in
    place): the model's own tensors the HF checkpoint holds (unless ``options.only`` says quantizers) and
    its quantizer state (``quantizer_state/`` of a model directory, or the directory itself).

    The checkpoint is locked from the read of its ``.metadata`` to the end of the write (exclusively in
    place, shared for a copy): two in-place imports at once would each rewrite the ``.metadata`` they
    read, and one import would be lost."""
    from quantmap.executor.comm import Offline
    from quantmap.executor.importer import run_import

    location = locate(into, iteration)
    purpose = "an in-place import" if in_place else "a copy into --out"
    with directory_lock(location.path, exclusive=in_place, purpose=purpose), \
            commit_reported(location.path) if in_place else nullcontext():
        target = TorchDistTarget(rules, location, out, in_place)
        return run_import(Offline(1), rules, hf_dir, {0: Placement.offline(target.layout, 0)}, target, options)


class TorchDistTarget:
    """Where an import writes: the weights and quantizer state of a torch_dist checkpoint, in a copy (``out``)
    or in place. Its names are global, so one rank of a ``tp=1, pp=1`` layout holds all of them; the state
    is written when the run publishes, after every check has passed (the copy is staged by
    :func:`~quantmap.io.torch_dist.write.write_into`)."""

    takes_weights = True

    def __init__(self, rules, location: CheckpointLocation, out, in_place: bool):
        self.location, self.out, self.in_place = location, out, in_place
        self.entries = read_entries(location.path)
        check_sizes(rules, location, self.entries)
        self.layout = checkpoint_layout(self.entries)
        # Each tensor it holds that the spec maps (and the import reads back) must get a value, or it would
        # keep its old one silently.
        self.holds = (*(quantizer.name for quantizer in quantizers(self.entries)),
                      *(weight.name for weight in model_weights(self.entries, self.layout.num_layers)))
        self.staged: str | None = None
        self.state: dict[str, torch.Tensor] = {}

    def open(self, path: str | None = None) -> str:
        self.staged = str(self.location.path)
        return self.staged

    def write(self, placement: Placement, state: dict) -> None:
        self.state = state

    def publish(self, report) -> None:
        check_shapes(self.location.path, {name: tuple(tensor.shape) for name, tensor in self.state.items()})
        write_into(self.location, self.state, convert=converted, out=self.out, in_place=self.in_place,
                   entries=self.entries)

    def discard(self) -> None:
        """Nothing to remove: :func:`write_into` stages its copy, and leaves nothing when it fails."""
