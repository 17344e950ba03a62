"""The Hugging Face sharded safetensors layout: ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {name: file}}``),
as ``save_pretrained`` writes it. Reads are lazy (``safe_open``): a reader touches only the tensors
it asks for."""

from __future__ import annotations

from pathlib import Path

from quantmap.io import safetensors_stream
from quantmap.io.names import read_weight_map
from quantmap.io.safetensors_stream import Records, nbytes, quote

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_SIZE = 5 * 2**30


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def shard_bounds(records: Records, shard_size: int) -> list[range]:
    """The records of each shard file, in order: a shard takes records while its data stays within
    ``shard_size`` bytes; a record is never split (one larger than ``shard_size`` gets a shard of its own)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1 byte, got {shard_size}")
    bounds, start, filled = [], 0, 0
    for i in range(len(records)):
        size = record_bytes(records, i)
        if i > start and filled + size > shard_size:
            bounds.append(range(start, i))
            start, filled = i, 0
        filled += size
    bounds.append(range(start, len(records)))
    return bounds


def record_bytes(records: Records, i: int) -> int:
    """Data bytes record ``i`` takes in its file (its tensor once per name)."""
    count, dtype, shape = records.spec(i)
    return nbytes(dtype, shape) * count


def write_shard(directory: str | Path, records: Records, bounds: list[range], shard: int) -> Path:
    """Write shard file ``shard`` of ``bounds`` into ``directory``."""
    path = Path(directory) / shard_name(shard, len(bounds))
    safetensors_stream.write(path, records, bounds[shard])
    return path


def write_index(directory: str | Path, records: Records, bounds: list[range]) -> Path:
    """``model.safetensors.index.json`` for shards ``bounds``, from the records' names alone, streamed."""
    path = Path(directory) / INDEX
    total = sum(record_bytes(records, i) for i in range(len(records)))
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
        files.append(write_shard(directory, records, bounds, shard))
        if on_record is not None:
            on_record(len(bounds[shard]))
    return files + [write_index(directory, records, bounds)]


class Checkpoint:
    """A Hugging Face checkpoint directory, read lazily: sharded (with an index) or one file."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            self.weight_map: dict[str, str] = read_weight_map(index)
        elif (self.directory / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(self.directory / SINGLE, "pt") as handle:
                self.weight_map = dict.fromkeys(handle.keys(), SINGLE)
        else:
            raise FileNotFoundError(f"{self.directory} has neither {INDEX} nor {SINGLE}; point --hf at a Hugging Face "
                                    f"checkpoint directory")
        self._open: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str):
        """One tensor, read from its shard on first use of that shard."""
        from safetensors import safe_open

        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(self.directory / file, "pt")
        return self._open[file].get_tensor(name)
