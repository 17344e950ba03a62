"""A ``torch_dist`` checkpoint's ``.metadata``, read without torch and without unpickling anything arbitrary.

``.metadata`` is a plain pickle of ``torch.distributed.checkpoint.metadata.Metadata`` (written by
``FileSystemWriter.finish``): every key with its dtype, global shape and chunks, and for every
chunk the file, byte offset and length of its bytes (``storage_data``). torch's own reader calls
``pickle.load`` on it, which runs whatever the file names. :class:`_Unpickler` accepts only the
handful of classes that file format uses and refuses anything else, so ``quantmap check`` can read
names and shapes of a checkpoint from any source, and never imports torch.

The same allow-list is used with the real torch classes (``real=True``) when quantmap rewrites a
checkpoint's metadata (:mod:`quantmap.io.torch_dist.write`).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import NamedTuple

from quantmap.gc_pause import paused_gc
from quantmap.io.torch_dist.files import TorchDistError, open_regular, regular_file

METADATA_FILE = ".metadata"

_DCP = "torch.distributed.checkpoint"
_RECORDS = {  # the classes a DCP .metadata pickles as objects (dataclasses and enums)
    (f"{_DCP}.metadata", "Metadata"), (f"{_DCP}.metadata", "TensorStorageMetadata"),
    (f"{_DCP}.metadata", "BytesStorageMetadata"), (f"{_DCP}.metadata", "ChunkStorageMetadata"),
    (f"{_DCP}.metadata", "TensorProperties"), (f"{_DCP}.metadata", "StorageMeta"),
    (f"{_DCP}.metadata", "MetadataIndex"), (f"{_DCP}.filesystem", "_StorageInfo"),
    (f"{_DCP}.planner", "SavePlan"), (f"{_DCP}.planner", "WriteItem"), (f"{_DCP}.planner", "TensorWriteData"),
}
_ENUMS = {(f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"), (f"{_DCP}.planner", "WriteItemType")}
_DTYPES = {"float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
           "float8_e4m3fn", "float8_e5m2", "complex64", "complex128", "uint16", "uint32", "uint64"}
_PATHS = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}  # checkpoint_id
_TORCH = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")} | \
         {("torch", name) for name in _DTYPES} | _PATHS


class _Record:
    """Stand-in for a DCP dataclass: pickle puts its state dict into the instance's ``__dict__`` (in C)."""

    offset = None  # MetadataIndex leaves a bytes entry's offset at the class default


class _Properties(list):
    """Stand-in for ``TensorProperties``, pickled as a 5-tuple ``(dtype, layout, requires_grad, memory
    format, pin_memory)``; ``list.extend`` as ``__setstate__`` keeps the 10⁵ calls out of Python."""

    __setstate__ = list.extend

    @property
    def dtype(self):
        return self[0] if self else None


def _stand_in(module: str, name: str):
    if name == "TensorProperties":
        return _Properties
    if (module, name) in _RECORDS:
        return type(name, (_Record,), {})
    if (module, name) in _ENUMS:
        return lambda value: value
    if (module, name) == ("torch", "Size"):
        return tuple
    if (module, name) == ("torch.serialization", "_get_layout"):
        return lambda layout: layout
    if (module, name) == ("collections", "OrderedDict"):
        return dict
    if (module, name) in _PATHS:
        return lambda *parts: "/".join(parts)
    return name  # a dtype, as its name


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream, path: Path, real: bool):
        super().__init__(stream)
        self._path, self._real, self._classes = path, real, {}

    def find_class(self, module, name):
        key = (module, name)
        if key not in _RECORDS and key not in _ENUMS and key not in _TORCH:
            raise TorchDistError(f"{self._path}: not a PyTorch Distributed Checkpoint .metadata: it names "
                                 f"{module}.{name}, which that format never holds; quantmap refuses to unpickle it")
        if self._real:
            return super().find_class(module, name)
        if key not in self._classes:
            self._classes[key] = _stand_in(module, name)
        return self._classes[key]


def load_metadata(directory: str | Path, *, real: bool = False):
    """The unpickled ``.metadata`` of a DCP directory (stand-in objects, or torch's with ``real``)."""
    path = Path(directory) / METADATA_FILE
    if not path.exists() and not path.is_symlink():
        raise TorchDistError(f"{path}: missing; a torch_dist checkpoint directory holds .metadata beside its "
                             f"*.distcp files")
    try:
        with open_regular(directory, METADATA_FILE) as stream:
            metadata = _Unpickler(stream, path, real).load()
    except OSError as error:
        raise TorchDistError(f"{path}: cannot read it: {error.strerror}") from None
    except TorchDistError:
        raise
    except Exception as error:  # a truncated or corrupt pickle: any of pickle's many errors
        raise TorchDistError(f"{path}: not a readable PyTorch Distributed Checkpoint .metadata "
                             f"({type(error).__name__}: {error}); the checkpoint is damaged or incomplete") from None
    if not hasattr(metadata, "state_dict_metadata") or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise TorchDistError(f"{path}: not a PyTorch Distributed Checkpoint .metadata (no state_dict_metadata "
                             f"and storage_data)")
    return metadata


class Chunk(NamedTuple):
    """One saved piece of a tensor: where it sits in the global tensor and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # relative to the checkpoint directory
    offset: int
    length: int
    transformed: bool  # saved through a DCP stream extension (compression, ...)


class Entry:
    """One key of the checkpoint: a tensor (dtype name, global shape, chunks) or opaque bytes.

    ``chunks`` is resolved on first use: ``quantmap check`` needs names and shapes only, and building
    10⁵ chunk records it would not look at costs more than reading the pickle."""

    __slots__ = ("key", "dtype", "shape", "_record", "_storage", "_chunks")

    def __init__(self, key: str, dtype: str | None, shape: tuple[int, ...] | None, record, storage: "_Storage"):
        self.key = key
        self.dtype = dtype  # None for a bytes entry (``_extra_state``, ``rng_state``)
        self.shape = shape
        self._record, self._storage, self._chunks = record, storage, None

    @property
    def chunks(self) -> tuple[Chunk, ...]:
        """The chunks, verified to tile the global shape exactly (see :func:`check_tiling`)."""
        if self._chunks is None:
            chunks = self._storage.chunks(self.key, self._record, self.shape)
            if self.shape is not None:
                self._storage.check_tiling(self.key, self.shape, chunks)
            self._chunks = chunks
        return self._chunks

    @property
    def dim0_splits(self) -> int:
        """How many pieces dim 0 is saved in (a column-parallel tensor's saving TP size)."""
        return len({chunk.offsets[0] for chunk in self.chunks}) if self.shape else 1


class _Storage:
    """``storage_data`` of a ``.metadata``: where each chunk's bytes are, indexed on first use."""

    def __init__(self, directory: Path, storage_data: dict):
        self._directory, self._data, self._index = directory, storage_data, None
        self._files: set[str] = set()  # the relative paths checked to lie inside the directory

    def chunks(self, key: str, record, shape: tuple[int, ...] | None) -> tuple[Chunk, ...]:
        if self._index is None:
            self._index = {}
            for index, info in self._data.items():
                fqn, offset = getattr(index, "fqn", None), getattr(index, "offset", None)
                if not isinstance(fqn, str) or not (offset is None or _is_shape(offset)):
                    raise damaged(self._directory, f"a storage_data key is {_shown(index)}, not a MetadataIndex of a "
                                                   f"key name and a chunk offset")
                self._index[fqn, offset] = info
        pieces = getattr(record, "chunks", None)
        if shape is None:  # BytesStorageMetadata
            return (self._chunk(key, None, None),)
        if not isinstance(pieces, list):
            raise damaged(self._directory, f"{key}: its chunks are {_shown(pieces)}, not a list")
        chunks = []
        for piece in pieces:
            offsets, sizes = getattr(piece, "offsets", None), getattr(piece, "sizes", None)
            if not (_is_shape(offsets) and _is_shape(sizes) and len(offsets) == len(sizes) == len(shape)):
                raise damaged(self._directory, f"{key}: a chunk has offsets {_shown(offsets)} and sizes "
                                               f"{_shown(sizes)}, not {len(shape)} integers >= 0 each")
            chunks.append(self._chunk(key, offsets, sizes))
        return tuple(chunks)

    def check_tiling(self, key: str, shape: tuple[int, ...], chunks: tuple[Chunk, ...]) -> None:
        problem = tiling_problem(shape, [(chunk.offsets, chunk.sizes) for chunk in chunks])
        if problem:
            raise TorchDistError(f"{self._directory / METADATA_FILE}: the chunks of {key} (global shape "
                                 f"{list(shape)}) do not tile it: {problem}; the .metadata is damaged (a tensor "
                                 f"assembled from it would hold bytes no chunk wrote): copy the checkpoint again")

    def _chunk(self, key: str, offsets, sizes) -> Chunk:
        info = self._index.get((key, offsets))
        if info is None:
            raise TorchDistError(f"{self._directory / METADATA_FILE}: {key} (chunk at {list(offsets or [])}) has no "
                                 f"storage record; the .metadata is damaged")
        path, start, length = (getattr(info, field, None) for field in ("relative_path", "offset", "length"))
        if not (isinstance(path, str) and _is_count(start) and _is_count(length)):
            raise damaged(self._directory, f"{key}: its storage record names file {_shown(path)} at byte offset "
                                           f"{_shown(start)}, length {_shown(length)}: not a file name and two "
                                           f"integers >= 0")
        if path not in self._files:
            from quantmap.io.torch_dist.files import is_relative_inside

            if not is_relative_inside(path):
                raise TorchDistError(f"{self._directory / METADATA_FILE}: {key} is stored in "
                                     f"{path!r}, which is not a file name inside the checkpoint "
                                     f"directory (absolute, or with '..'); the .metadata is damaged or hostile: "
                                     f"quantmap reads only files inside the checkpoint")
            self._files.add(path)
        return Chunk(offsets or (), sizes or (), path, start, length, bool(info.__dict__.get("transform_descriptors")))


def damaged(directory: Path, problem: str) -> TorchDistError:
    """The error for a ``.metadata`` that unpickled (only allowed classes) into the wrong structure."""
    return TorchDistError(f"{directory / METADATA_FILE}: not a valid PyTorch Distributed Checkpoint .metadata: "
                          f"{problem}; the checkpoint is damaged or was not written by torch.distributed.checkpoint")


def _is_count(value) -> bool:
    return type(value) is int and value >= 0  # not bool, not float: what DCP writes


def _is_shape(value) -> bool:
    """A tuple of integers >= 0 (``torch.Size`` unpickles to a tuple here)."""
    return type(value) is tuple and all(type(n) is int and n >= 0 for n in value)


def _shown(value) -> str:
    text = repr(value) if not isinstance(value, _Record) else type(value).__name__
    return text if len(text) <= 60 else f"{text[:60]}..."


def tiling_problem(shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> str | None:
    """What keeps ``boxes`` (offsets, sizes) from covering ``shape`` exactly once, or ``None``.

    Every box inside the shape, no two boxes sharing an element, and their volumes summing to the
    shape's: together that is an exact tiling. Anything less leaves elements that no chunk wrote (a
    reader assembling the tensor would return whatever memory held) or that two chunks disagree on."""
    if len(boxes) == 1 and tuple(boxes[0][1]) == shape and len(boxes[0][0]) == len(shape) and not any(boxes[0][0]):
        return None  # the usual case, one chunk of the whole tensor: decided without the general walk
    total = math.prod(shape)
    for index, (offsets, sizes) in enumerate(boxes):
        if len(offsets) != len(shape) or len(sizes) != len(shape) or \
                any(o < 0 or z < 0 or o + z > extent for o, z, extent in zip(offsets, sizes, shape)):
            return f"chunk {index} (offsets {list(offsets)}, sizes {list(sizes)}) lies outside it"
    nonempty = [(i, box) for i, box in enumerate(boxes) if math.prod(box[1])]
    nonempty.sort(key=lambda item: item[1][0])
    for n, (i, (a_offsets, a_sizes)) in enumerate(nonempty):  # sorted: only later boxes can start inside this one
        for j, (b_offsets, b_sizes) in nonempty[n + 1:]:
            if shape and b_offsets[0] >= a_offsets[0] + a_sizes[0]:
                break
            if all(bo < ao + az and ao < bo + bz for ao, az, bo, bz in zip(a_offsets, a_sizes, b_offsets, b_sizes)):
                return (f"chunks {min(i, j)} and {max(i, j)} overlap (offsets {list(a_offsets)} and "
                        f"{list(b_offsets)})")
    covered = sum(math.prod(sizes) for _, sizes in boxes)
    if covered != total:
        return f"they cover {covered} of its {total} elements, leaving a gap"
    return None


def check_files(directory: str | Path, entries: dict[str, Entry]) -> None:
    """Every byte range ``.metadata`` records lies within its file (sizes only, no data read): what an import
    keeps by reference must be there, or it would publish a broken checkpoint."""
    directory, ends = Path(directory), {}
    for entry in entries.values():
        for chunk in entry.chunks:
            ends[chunk.file] = max(ends.get(chunk.file, 0), chunk.offset + chunk.length)
    for file, end in ends.items():
        path = directory / file
        try:
            size = regular_file(directory, file).stat().st_size
        except OSError as error:
            raise TorchDistError(f"{path}: cannot read it: {error.strerror}") from None
        if size < end:
            raise truncated(path, end, size)


def truncated(path: Path, end: int, size: int) -> TorchDistError:
    """The error for a file shorter than the byte ranges ``.metadata`` records in it."""
    return TorchDistError(f"{path}: .metadata records bytes up to offset {end}, but the file has {size}: the file is "
                          f"truncated (copy the checkpoint again) or this .metadata belongs to another checkpoint")


def read_entries(directory: str | Path) -> dict[str, Entry]:
    """Every key of a DCP directory's ``.metadata``, in file order, without reading tensor data."""
    with paused_gc():
        return _read_entries(Path(directory))


def _read_entries(directory: Path) -> dict[str, Entry]:
    """Every field read here, and every chunk's where :class:`_Storage` reads it, is checked for its type:
    the unpickler admits only DCP's classes, but a hostile file can still put a string where a shape goes."""
    metadata = load_metadata(directory)
    if not isinstance(metadata.state_dict_metadata, dict):
        raise damaged(directory, f"state_dict_metadata is {_shown(metadata.state_dict_metadata)}, not a dict")
    storage = _Storage(directory, metadata.storage_data)
    entries = {}
    for key, value in metadata.state_dict_metadata.items():
        if not isinstance(key, str):
            raise damaged(directory, f"a key is {_shown(key)}, not a name")
        properties = getattr(value, "properties", None)
        if properties is None and type(value).__name__ == "BytesStorageMetadata":
            entries[key] = Entry(key, None, None, value, storage)
            continue
        dtype, size = properties.dtype if isinstance(properties, _Properties) else None, getattr(value, "size", None)
        if not (isinstance(dtype, str) and dtype in _DTYPES and _is_shape(size)):
            raise damaged(directory, f"{key}: dtype {_shown(dtype)} and size {_shown(size)}, not a tensor's dtype "
                                     f"and shape")
        entries[key] = Entry(key, dtype, size, value, storage)
    return entries
