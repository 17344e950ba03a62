"""Writing tensors (quantizer state, and the model's weights) into an existing torch_dist checkpoint,
leaving everything else as it is.

The original ``*.distcp`` files are kept unchanged (hard-linked into a new directory, or left where
they are with ``in_place``); the tensors written go into one new ``__quantmap_<id>.distcp`` and a
new ``.metadata`` points each of their keys at it, so every other entry keeps its exact bytes. Each
key keeps the global shape, dtype and chunks it was saved with (a new quantizer key gets the shape
Megatron + ModelOpt declare for it, in one chunk; DCP reshards on load; a weight is never added). A
weight is stored as the checkpoint stores it: SwiGLU's ``linear_fc1.weight`` as its ``weight_w`` (gate)
and ``weight_v`` (up) rows, a stacked key's layers at their index on its leading axis, all of a key's
layers in one write. A SwiGLU ``linear_fc1`` weight amax is written in ModelOpt's own TP-interleaved
row order, so that Megatron + ModelOpt load it as
they would their own checkpoint. The result is read back and compared before it is published:
``.metadata`` is replaced by a rename (in place), or the whole directory is (new output).
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import uuid
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantmap.io.staging import Staged
from quantmap.io.torch_dist.files import TorchDistError, regular_file, resolve_inside
from quantmap.io.torch_dist.keys import (CHECKPOINT_EXPERTS, FC1_WEIGHT_AMAX, STATE_EXPERTS, Quantizer, Weight,
                                        model_size, model_weights, prefix_of, quantizers)
from quantmap.io.torch_dist.locate import TRACKER, CheckpointLocation
from quantmap.io.torch_dist.metadata import (METADATA_FILE, Entry, check_files, load_metadata,
                                            read_entries)
from quantmap.io.torch_dist.read import interleave, read_tensors

OWN_FILES = "__quantmap_"  # the prefix of the .distcp files quantmap writes


@dataclass
class Written:
    """What an import into a checkpoint did."""

    path: Path  # the iteration directory written
    replaced: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # checkpoint quantizers the state did not give


Convert = Callable[..., torch.Tensor]  # (name, tensor, dtype, *, exact=False) -> the tensor in dtype


def write_into(location: CheckpointLocation, state: dict[str, torch.Tensor], *, convert: Convert,
               out: str | Path | None = None, in_place: bool = False,
               entries: dict[str, Entry] | None = None) -> Written:
    """Write ``state`` (global state_dict names → tensors) into the checkpoint at ``location``
    (``entries``: its ``.metadata`` as the caller read it already). ``convert(name, tensor, dtype, exact=...)``
    gives each tensor in the dtype the checkpoint stores it in, or refuses a conversion that changes its
    value (``exact``, asked for weights: any value at all): which values are acceptable is the caller's
    policy (:func:`quantmap.executor.values.converted`), not the file format's."""
    if (out is None) == (not in_place):
        raise TorchDistError("give either an output directory (--out) or --in-place")
    source = location.path
    entries = read_entries(source) if entries is None else entries
    check_files(source, entries)  # every entry not written is kept by reference
    stored, written = _stored_tensors(source, entries, state, convert)
    if in_place:
        written.path = source
        _publish_in_place(source, entries, stored)
        return written
    if Path(out).resolve().is_relative_to(source.resolve()):
        raise TorchDistError(f"--out {out} lies inside the checkpoint {source} that it would be a copy of (the copy "
                             f"would contain itself); choose an output outside {source}")
    staged = Staged(out)
    try:
        target = staged.path / source.name if location.save_dir is not None else staged.path
        copied = _link_tree(source, target)
        if location.save_dir is not None:
            (staged.path / TRACKER).write_text(f"{location.tracker}\n", encoding="utf-8")
        _check_copy(source, target, copied)
        _write(target, entries, stored)
        staged.publish()
    except BaseException:
        staged.discard()
        raise
    written.path = Path(out) / source.name if location.save_dir is not None else Path(out)
    return written


def _stored_tensors(source: Path, entries: dict[str, Entry], state: dict[str, torch.Tensor], convert: Convert):
    """Checkpoint key → (global tensor as the checkpoint stores it, chunks) for every key ``state`` touches."""
    by_name = {q.name: q for q in quantizers(entries)}
    model = {w.name: w for w in model_weights(entries, model_size(entries)[0])}
    prefix = prefix_of(entries)
    written = Written(source)
    pieces: dict[str, torch.Tensor] = {}  # checkpoint key → its stored value; a stacked key's layers gathered
    layers: dict[str, dict[tuple, torch.Tensor]] = {}  # stacked key → its pieces written, by stacked index
    for name, tensor in state.items():
        if name in model:
            for key, index, value in _weight_pieces(source, model[name], tensor, convert):
                _place(pieces, layers, key, index, value)
            written.replaced.append(name)
            continue
        if "quantizer" not in name:
            raise TorchDistError(f"{name}: the checkpoint {source} holds no such tensor, and an import adds "
                                 f"quantizer state only, never a weight; the HF model and this Megatron checkpoint "
                                 f"are not the same model (tied embeddings on one side only?)")
        quantizer = by_name.get(name) or _new_quantizer(name, prefix, entries, tensor)
        if tuple(tensor.shape) != quantizer.shape:
            raise TorchDistError(f"{name}: the imported tensor has shape {list(tensor.shape)}, but the checkpoint "
                                 f"{source} holds it as {list(quantizer.shape)} (stored {list(quantizer.stored)}); "
                                 f"the HF checkpoint and this Megatron checkpoint are not the same model or config")
        entry = entries.get(quantizer.key)
        dtype = getattr(torch, entry.dtype) if entry is not None else tensor.dtype
        value = convert(name, tensor, dtype).reshape(quantizer.stored)
        if quantizer.interleaved > 1:
            value = interleave(value, quantizer.interleaved)
        _place(pieces, layers, quantizer.key, () if quantizer.layer is None else (quantizer.layer,), value)
        (written.replaced if entry is not None else written.added).append(name)
    written.kept = [name for name in by_name if name not in state]
    _fill_stacked(source, entries, pieces, layers)
    stored = {}
    for key, value in pieces.items():
        entry = entries.get(key)
        chunks = [(c.offsets, c.sizes) for c in entry.chunks] if entry is not None else \
            [((0,) * value.dim(), tuple(value.shape))]
        stored[key] = (value.contiguous(), chunks)
    return stored, written


def _weight_pieces(source: Path, held: Weight, tensor: torch.Tensor, convert: Convert):
    """``(key, index, value)`` for each stored part of the weight ``held`` (its key, its index on the key's
    stacked axes), its rows cut out of ``tensor`` (SwiGLU: the gate rows into ``weight_w``, the up rows into
    ``weight_v``) in the stored dtype, which must hold every value exactly."""
    if tuple(tensor.shape) != held.shape:
        raise TorchDistError(f"{held.name}: the imported tensor has shape {list(tensor.shape)}, but the checkpoint "
                             f"{source} holds it as {list(held.shape)}; the HF checkpoint and this Megatron "
                             f"checkpoint are not the same model or config")
    value = convert(held.name, tensor, getattr(torch, held.dtype), exact=True)
    if len(held.parts) == 1:
        yield held.parts[0].key, held.parts[0].index, value
        return
    row = 0
    for part in held.parts:
        yield part.key, part.index, value.narrow(0, row, part.shape[0])
        row += part.shape[0]


def _place(pieces: dict[str, torch.Tensor], stacked: dict[str, dict[tuple, torch.Tensor]], key: str, index: tuple,
           value: torch.Tensor) -> None:
    """``value`` as key ``key``'s stored value, or (``index`` given) as its piece at ``index`` on a stacked key's
    leading axes (a layer, or a layer and an expert)."""
    if not index:
        pieces[key] = value
        return
    stacked.setdefault(key, {})[index] = value


def _fill_stacked(source: Path, entries: dict[str, Entry], pieces: dict[str, torch.Tensor],
                  stacked: dict[str, dict[tuple, torch.Tensor]]) -> None:
    """Each stacked key written as one tensor: its pieces given, the others as the checkpoint holds them
    (read only when some piece is not given)."""
    partial = [key for key, given in stacked.items()
               if len(given) < math.prod(entries[key].shape[:len(next(iter(given)))])]
    current = read_tensors(source, entries, partial) if partial else {}
    for key, given in stacked.items():
        entry = entries[key]
        first = next(iter(given.values()))
        whole = current[key].clone() if key in current else torch.empty(entry.shape, dtype=first.dtype)
        for index, value in given.items():
            whole[index] = value
        pieces[key] = whole


def _new_quantizer(name: str, prefix: str, entries: dict[str, Entry], tensor: torch.Tensor) -> Quantizer:
    """A quantizer the checkpoint lacks, keyed and shaped as Megatron + ModelOpt save it."""
    key = prefix + name.replace(STATE_EXPERTS, CHECKPOINT_EXPERTS)
    shape = tuple(tensor.shape)
    module = key.rsplit("_quantizer.", 1)[0].rsplit(".", 1)[0]
    halves = [entries.get(f"{module}.weight_{half}") for half in "wv"]  # SwiGLU's gate and up weights
    weight = entries.get(f"{module}.weight")
    if all(halves):
        rows = halves[0].shape[0] + halves[1].shape[0]
    else:
        rows = weight.shape[0] if weight is not None and weight.shape else None
    interleaved = 1
    if shape == ():
        stored = () if "_bmm_quantizer." in key else (1,)
    elif len(shape) == 2 and shape[1] == 1 and rows and shape[0] > rows and shape[0] % rows == 0 and \
            ".weight_quantizer." in key:
        stored = (rows, shape[0] // rows)  # block amax
    else:
        stored = shape
    if all(halves) and FC1_WEIGHT_AMAX.search(key) and len(stored) == 2:
        interleaved = halves[0].dim0_splits
    return Quantizer(name, key, None, shape, stored, interleaved)


def _write(directory: Path, entries: dict[str, Entry], stored: dict) -> None:
    """Write the new .distcp and the new .metadata (via a temporary name) into ``directory``, check them."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                       TensorStorageMetadata)

    metadata = load_metadata(directory, real=True)
    file_name = f"{OWN_FILES}{uuid.uuid4().hex[:12]}.distcp"
    records = {}
    with open(directory / file_name, "wb") as stream:
        for key, (value, chunks) in stored.items():
            for index, (offsets, sizes) in enumerate(chunks):
                piece = value
                for dim, (offset, size) in enumerate(zip(offsets, sizes)):
                    piece = piece.narrow(dim, offset, size)
                start = stream.tell()
                torch.save(piece.clone(), stream)
                records[MetadataIndex(key, offsets, index)] = _StorageInfo(file_name, start, stream.tell() - start)
        stream.flush()
        os.fsync(stream.fileno())
    storage = {index: info for index, info in metadata.storage_data.items() if index.fqn not in stored}
    storage.update(records)
    metadata.storage_data = storage
    for key, (value, chunks) in stored.items():
        old = metadata.state_dict_metadata.get(key)
        properties = old.properties if old is not None else TensorProperties(dtype=value.dtype)
        metadata.state_dict_metadata[key] = TensorStorageMetadata(
            properties, torch.Size(value.shape),
            [ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)) for offsets, sizes in chunks])
    partial = directory / f"{METADATA_FILE}.quantmap-partial"
    with open(partial, "wb") as stream:
        pickle.dump(metadata, stream)
        stream.flush()
        os.fsync(stream.fileno())
    _verify(directory, partial, stored)
    os.replace(partial, directory / METADATA_FILE)  # published: nothing after this may fail
    referenced = {info.relative_path for info in storage.values()}
    for stale in directory.glob(f"{OWN_FILES}*.distcp"):  # an earlier import's tensors, now replaced
        if stale.name not in referenced:
            try:
                stale.unlink()
            except OSError:
                pass  # an unreferenced file left behind is harmless


def _verify(directory: Path, partial: Path, stored: dict) -> None:
    """Read the new metadata and tensors back with quantmap's reader before anything is published."""
    shadow = directory / f".quantmap-verify-{uuid.uuid4().hex[:8]}"
    shadow.mkdir()
    try:
        shutil.copy2(partial, shadow / METADATA_FILE)
        entries = read_entries(shadow)
        check_files(directory, entries)  # every entry's bytes, in a regular file inside the checkpoint
        back = read_tensors(directory, entries, list(stored))
    finally:
        shutil.rmtree(shadow, ignore_errors=True)
    for key, (value, _) in stored.items():
        if not torch.equal(back[key], value):
            raise TorchDistError(f"{directory}: {key} read back differently from what was written; nothing was "
                                 f"published")


def _publish_in_place(directory: Path, entries: dict[str, Entry], stored: dict) -> None:
    before = set(os.listdir(directory))
    metadata = _identity(directory)
    try:
        _write(directory, entries, stored)
    except BaseException:
        if _identity(directory) != metadata:
            raise  # already published (interrupted while tidying up): the new files are in use
        for name in set(os.listdir(directory)) - before:  # the new .distcp and the partial .metadata
            path = directory / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise


@contextmanager
def commit_reported(directory: str | Path):
    """Mark what ends an in-place write after its commit point (the rename of the new ``.metadata``)
    with ``error.written = directory``: the checkpoint holds the new values then, and the command must
    not say that nothing was written. Told from the disk, not a flag, so that a signal arriving
    between the rename and the next statement is reported right too."""
    directory = Path(directory)
    before = _identity(directory)
    try:
        yield
    except BaseException as error:
        if _identity(directory) != before:
            error.written = directory
        raise


def _identity(directory: Path) -> tuple[int, int] | None:
    """Which file ``directory/.metadata`` is (a rename replaces it with another)."""
    try:
        status = (directory / METADATA_FILE).stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _link_tree(source: Path, target: Path) -> dict[Path, int]:
    """``target`` as a copy of ``source`` whose files are hard links (copies across file systems), except
    ``.metadata``, which is rewritten, so nothing written later can change the original. A symbolic link
    is copied as what it points to, which must be a directory or regular file inside ``source``
    (:mod:`quantmap.io.torch_dist.files`): a copy must not be empty or dangling where the original
    had a link. Returns each file copied (relative path) with its size, for :func:`_check_copy`."""
    copied: dict[Path, int] = {}

    def copy(relative: Path, ancestors: frozenset) -> None:
        real = resolve_inside(source, relative)
        if real.is_dir():
            if real in ancestors:
                raise TorchDistError(f"{source / relative}: a symbolic link to a directory that contains it (a "
                                     f"loop); replace the link with the directory's files")
            (target / relative).mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(real)):
                copy(relative / name, ancestors | {real})
            return
        real = regular_file(source, relative)
        destination = target / relative
        if relative == Path(METADATA_FILE):
            shutil.copy2(real, destination)
        else:
            try:
                os.link(real, destination)
            except OSError:
                shutil.copy2(real, destination)
        copied[relative] = real.stat().st_size

    copy(Path(), frozenset())
    return copied


def _check_copy(source: Path, target: Path, copied: dict[Path, int]) -> None:
    """Every file of the source is in the copy, a regular file of the same size (checked before the new
    ``.metadata`` is written, whose entries :func:`_verify` checks in turn)."""
    for relative, size in copied.items():
        if relative == Path(METADATA_FILE):
            continue  # rewritten, and read back by _verify
        if regular_file(target, relative).stat().st_size != size:
            raise TorchDistError(f"{target / relative}: the copy of {source / relative} has another size; "
                                 f"nothing was published")
