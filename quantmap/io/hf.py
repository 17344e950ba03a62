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


def write_checkpoint(directory: str | Path, records: Records, shard_size: int = DEFAULT_SHARD_SIZE,
                     on_record=None) -> list[Path]:
    """Write ``records`` as shards of at most ``shard_size`` data bytes (a record is never split; a
    record larger than ``shard_size`` gets a shard of its own), streaming the index as it goes."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1 byte, got {shard_size}")
    directory = Path(directory)
    bounds, start, filled, total = [], 0, 0, 0
    for i in range(len(records)):
        count, dtype, shape = records.spec(i)
        size = nbytes(dtype, shape) * count
        if i > start and filled + size > shard_size:
            bounds.append(range(start, i))
            start, filled = i, 0
        filled += size
        total += size
    bounds.append(range(start, len(records)))
    names = [shard_name(i, len(bounds)) for i in range(len(bounds))]
    with open(directory / INDEX, "w", encoding="utf-8") as index:
        index.write(f'{{\n  "metadata": {{\n    "total_size": {total}\n  }},\n  "weight_map": {{')
        separator = ["\n    "]
        for file, indices in zip(names, bounds):
            entry = f": {quote(file)}"

            def listed(quoted: list[str]) -> None:
                if not quoted:
                    return
                index.write(separator[0] + (entry + ",\n    ").join(quoted) + entry)
                separator[0] = ",\n    "

            safetensors_stream.write(directory / file, records, indices, on_names=listed)
            if on_record is not None:
                on_record(len(indices))
        index.write("\n  }\n}\n")
    return [directory / name for name in names] + [directory / INDEX]


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
