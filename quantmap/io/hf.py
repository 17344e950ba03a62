"""The Hugging Face sharded safetensors layout: ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {name: file}}``),
as ``save_pretrained`` writes it. Reads are lazy (``safe_open``): a reader touches only the tensors
it asks for."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from quantmap.io import safetensors_stream
from quantmap.io.names import QUANTIZER_STATE, read_header, read_weight_map
from quantmap.io.safetensors_stream import Records, nbytes, quote

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_SIZE = 5 * 2**30


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def shard_bounds(records: Records, shard_size: int, indices: range | None = None) -> list[range]:
    """The records of each shard file, in order: a shard takes records while its data stays within
    ``shard_size`` bytes; a record is never split (one larger than ``shard_size`` gets a shard of its own).
    ``indices``: the records of one directory (default: all of them)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1 byte, got {shard_size}")
    indices = range(len(records)) if indices is None else indices
    bounds, start, filled = [], indices.start, 0
    for i in indices:
        size = record_bytes(records, i)
        if i > start and filled + size > shard_size:
            bounds.append(range(start, i))
            start, filled = i, 0
        filled += size
    bounds.append(range(start, indices.stop))
    return bounds


def directories(records: Records) -> list[tuple[str, range]]:
    """Each directory the records go to (relative to the output; ``""``: the output itself) with its
    records, which lie together. Records that say nothing of it (``destinations()``) all go to the output."""
    if hasattr(records, "destinations"):
        return records.destinations()
    return [("", range(len(records)))]


def record_bytes(records: Records, i: int) -> int:
    """Data bytes record ``i`` takes in its file (its tensor once per name)."""
    count, dtype, shape = records.spec(i)
    return nbytes(dtype, shape) * count


def write_shard(path: str | Path, records: Records, indices: range) -> Path:
    """Write the shard file ``path`` of records ``indices``."""
    safetensors_stream.write(path, records, indices)
    return Path(path)


def write_index(directory: str | Path, records: Records, bounds: list[range]) -> Path:
    """``model.safetensors.index.json`` for shards ``bounds``, from the records' names alone, streamed."""
    path = Path(directory) / INDEX
    total = sum(record_bytes(records, i) for indices in bounds for i in indices)
    with open(path, "w", encoding="utf-8") as index:
        index.write(f'{{\n  "metadata": {{\n    "total_size": {total}\n  }},\n  "weight_map": {{')
        separator = "\n    "
        for shard, indices in enumerate(bounds):
            entry = f": {quote(shard_name(shard, len(bounds)))}"
            for i in indices:
                quoted = [quote(name) for name in records.names(i)]
                if quoted:
                    index.write(separator + (entry + ",\n    ").join(quoted) + entry)
                    separator = ",\n    "
        index.write("\n  }\n}\n")
    return path


def write_checkpoint(directory: str | Path, records: Records, shard_size: int = DEFAULT_SHARD_SIZE,
                     on_record=None) -> list[Path]:
    """Write ``records`` as shards of at most ``shard_size`` data bytes (see :func:`shard_bounds`),
    then the index. One process writes every shard; :mod:`quantmap.executor.writers` spreads them."""
    bounds = shard_bounds(records, shard_size)
    files = []
    for shard in range(len(bounds)):
        files.append(write_shard(Path(directory) / shard_name(shard, len(bounds)), records, bounds[shard]))
        if on_record is not None:
            on_record(len(bounds[shard]))
    return files + [write_index(directory, records, bounds)]


#: What ``--like`` never copies: the weights (quantmap writes its own) and what lies in subdirectories.
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
CONFIG = "config.json"


def model_files(like: str | Path | None = None, config: str | Path | None = None) -> tuple[tuple[str, str], ...]:
    """The files a model export copies beside its weights, each ``(source path, name in the output)``: every
    regular file of the Hugging Face model directory ``like`` that is not a weight file (config, generation
    config, tokenizer files, chat template, ...; not its subdirectories), or ``config`` alone as ``config.json``."""
    if (like is None) == (config is None):
        raise ValueError("give the Hugging Face model directory (--like) or its config.json (--config), one of them")
    if config is not None:
        return ((str(config), CONFIG),)
    like = Path(like)
    if not like.is_dir():
        raise CheckpointError(f"--like {like} is not a directory; point it at the Hugging Face model the Megatron "
                              f"run started from (a directory holding config.json)")
    files = tuple((str(path), path.name) for path in sorted(like.iterdir())
                  if path.is_file() and not path.name.endswith(WEIGHT_FILES))
    if CONFIG not in {name for _, name in files}:
        raise CheckpointError(f"--like {like} holds no {CONFIG}; point it at a Hugging Face model directory, or "
                              f"pass --config config.json")
    return files


def copy_model_files(files: tuple[tuple[str, str], ...], directory: str | Path) -> list[str]:
    """Copy :func:`model_files` into ``directory`` (a staging directory: published with the weights or not
    at all); the names copied."""
    import shutil

    for source, name in files:
        shutil.copyfile(source, Path(directory) / name)  # a hub cache's symbolic link: its target's bytes
    return [name for _, name in files]


class Contents(NamedTuple):
    """What a written checkpoint directory holds, as its files say (for the closing summary)."""

    path: Path
    files: int  # safetensors shard files
    tensors: int
    bytes: int  # tensor data bytes
    dtypes: dict[str, int]  # safetensors dtype (F32, BF16, ...) -> tensors of it, most common first


def contents(directory: str | Path) -> Contents:
    """Read back from the shard headers alone (no tensor loaded): a summary that cannot drift from
    what was written, whichever writer ranks wrote the shards."""
    directory = Path(directory)
    shards = sorted(directory.glob("*.safetensors"))
    entries = [entry for shard in shards for name, entry in read_header(shard).items() if name != "__metadata__"]
    dtypes = Counter(entry["dtype"] for entry in entries)
    size = sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in entries)
    return Contents(directory, len(shards), len(entries), size, dict(dtypes.most_common()))


class CheckpointError(ValueError):
    """A Hugging Face checkpoint that cannot be read; the message names the file and what to do."""


class Checkpoint:
    """A Hugging Face checkpoint directory, read lazily: sharded (with an index) or one file, and with its
    ``quantizer_state/`` subdirectory when it has one (a model quantmap wrote: the weights where
    ``from_pretrained`` finds them, the quantizer state beside them), read as one set of names.

    Every shard the index names must be a relative path inside the directory (no ``..``, not
    absolute): a hostile index must not make quantmap read files elsewhere."""

    def __init__(self, directory: str | Path, *, nested: bool = True):
        self.directory = Path(directory)
        index = self.directory / INDEX
        self._open: dict[str, object] = {}
        self.quantizer_state: Checkpoint | None = None
        if index.is_file():
            self.weight_map: dict[str, str] = read_weight_map(index)
            bad = {name: file for name, file in self.weight_map.items() if not _inside(file)}
            if bad:
                name, file = next(iter(bad.items()))
                raise CheckpointError(f"{index}: weight_map[{name!r}] is {json.dumps(file)}; each value must be the "
                                      f"name of a shard file inside {self.directory} (e.g. \"{shard_name(0, 1)}\"); "
                                      f"{len(bad)} value(s) are not")
        elif (self.directory / SINGLE).is_file():
            self.weight_map = dict.fromkeys(self._shard(SINGLE).keys(), SINGLE)
        else:
            raise FileNotFoundError(f"{self.directory} has neither {INDEX} nor {SINGLE}; point --hf at a Hugging Face "
                                    f"checkpoint directory")
        if nested and (self.directory / QUANTIZER_STATE).is_dir():
            self.quantizer_state = Checkpoint(self.directory / QUANTIZER_STATE, nested=False)
            both = [name for name in self.quantizer_state.weight_map if name in self.weight_map]
            if both:
                raise CheckpointError(f"{self.directory}: {len(both)} tensor name(s) are both in the model files and "
                                      f"in {QUANTIZER_STATE}/ (e.g. {both[0]}); each tensor belongs in one place")

    def names(self) -> list[str]:
        if self.quantizer_state is None:
            return list(self.weight_map)
        return [*self.weight_map, *self.quantizer_state.weight_map]

    def _shard(self, file: str):
        """The open shard ``file``, opened on first use."""
        if file not in self._open:
            from safetensors import SafetensorError, safe_open

            path = self.directory / file
            if not path.is_file():
                raise CheckpointError(f"{path} is not a file (the shard {file} that the index names); "
                                      f"restore the checkpoint's shard files")
            try:
                self._open[file] = safe_open(path, "pt")
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"{path} cannot be read as safetensors ({error}); the shard is corrupt or "
                                      f"truncated: download or copy it again") from None
        return self._open[file]

    def get(self, name: str, expert: int | None = None):
        """One tensor, read from its shard on first use of that shard; with ``expert``, only that slice
        ``[expert:expert + 1]`` of its dim 0 (one expert of a fused-experts tensor, read alone)."""
        if self.quantizer_state is not None and name not in self.weight_map:
            return self.quantizer_state.get(name, expert)
        if expert is None:
            return self._read(name, lambda shard: shard.get_tensor(name))
        return self._read(name, lambda shard: shard.get_slice(name)[expert:expert + 1])

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its shard's header alone."""
        if self.quantizer_state is not None and name not in self.weight_map:
            return self.quantizer_state.shape(name)
        return tuple(self._read(name, lambda shard: shard.get_slice(name).get_shape()))

    def dtype(self, name: str) -> str:
        """A tensor's safetensors dtype code (``F8_E4M3``), from its shard's header alone."""
        if self.quantizer_state is not None and name not in self.weight_map:
            return self.quantizer_state.dtype(name)
        return self._read(name, lambda shard: shard.get_slice(name).get_dtype())

    def _read(self, name: str, read):
        from safetensors import SafetensorError

        file = self.weight_map[name]
        try:
            return read(self._shard(file))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{self.directory / file}: cannot read {name} ({error}); the shard is corrupt or "
                                  f"truncated: download or copy it again") from None


def _inside(file) -> bool:
    """Whether an index value names a file inside the checkpoint directory (lexically: the hub cache's
    shards are symbolic links into a blob store, which is fine)."""
    if not isinstance(file, str) or not file or "\0" in file:
        return False
    path = PurePosixPath(file)
    return not path.is_absolute() and ".." not in path.parts and not file.startswith("\\")
