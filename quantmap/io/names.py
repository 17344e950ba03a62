"""Tensor names from wherever a user has them, without loading a single tensor.

``quantmap check`` compares a spec with the names of a real checkpoint, and checkpoints are big:
a safetensors file starts with an 8-byte length and a JSON header that lists every tensor, so
reading that header is enough; a sharded checkpoint's ``model.safetensors.index.json`` lists
them all in one file. A plain text file (one name per line) covers everything else, such as
the keys of a Megatron ``state_dict`` dumped by a script.
"""

from __future__ import annotations

import struct
from pathlib import Path

from quantmap.untrusted import parse_json, special_file

INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # safetensors itself refuses headers over 100 MB


class NamesFileError(ValueError):
    """Names that cannot be read; the message says which file and what to do."""


def read_names(source: str | Path) -> list[str]:
    """The tensor names in ``source``, in file order, each once.

    ``source`` is a text file (one name per line; blank lines and ``#`` comments skipped), a
    ``*.safetensors.index.json``, a ``*.safetensors`` file, or a directory holding an index or
    safetensors files (an index wins: it is one small file instead of every shard's header).
    """
    path = Path(source)
    if path.is_dir():
        names = _read_directory(path)
    elif not path.is_file():
        special = special_file(path)
        raise NamesFileError(f"{path}: is {special}, not a file (reading it could block forever); give a names file, "
                         f"safetensors file, index or directory" if special else f"{path}: no such file or directory")
    elif path.name.endswith(INDEX_SUFFIX):
        names = _read_index(path)
    elif path.suffix == ".safetensors":
        names = _read_header(path)
    else:
        names = _read_text(path)
    return list(dict.fromkeys(names))


#: Where a model directory exported with ``--format hf`` keeps its quantizer state (quantmap.formats.hf).
QUANTIZER_STATE = "quantizer_state"


def _read_directory(path: Path) -> list[str]:
    """The names of a checkpoint directory, and of its quantizer state where it keeps that beside the model
    (``quantizer_state/``, as ``quantmap export --format hf`` writes it)."""
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}")) + sorted((path / QUANTIZER_STATE).glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        return [name for index in indexes for name in _read_index(index)]
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise NamesFileError(f"{path}: the directory holds no *.safetensors file and no *{INDEX_SUFFIX}; "
                         "point at a checkpoint directory, a safetensors file or a text file of names")
    return [name for shard in shards for name in _read_header(shard)]


def _read_index(path: Path) -> list[str]:
    return list(read_weight_map(path))


def read_weight_map(path: Path) -> dict[str, str]:
    """A ``*.safetensors.index.json``'s ``weight_map`` (tensor name → shard file).

    A name listed twice is refused rather than left to ``json`` (where the last entry wins): the two
    entries may name different shards, and picking one silently would read a tensor from the wrong file."""
    try:
        data = parse_json(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as duplicate:
        raise NamesFileError(f"{path}: {duplicate.key!r} is listed twice in one JSON object; an index lists each "
                         f"tensor once (in weight_map, with the one shard file that holds it): remove the "
                         f"duplicate entry") from None
    except OSError as exc:
        raise NamesFileError(f"{path}: cannot read the index: {exc.strerror}") from None
    except ValueError as exc:  # not UTF-8, not JSON, an integer too long (total_size), nesting too deep
        raise NamesFileError(f"{path}: not a safetensors index: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise NamesFileError(f"{path}: not a safetensors index: it has no 'weight_map' object")
    return weight_map


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json``'s ``object_pairs_hook`` that refuses a key written twice in one object."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _read_header(path: Path) -> list[str]:
    """The tensor names of one safetensors file, from its header alone."""
    return [name for name in read_header(path) if name != "__metadata__"]


def read_header(path: Path) -> dict:
    """One safetensors file's header: each tensor's ``dtype``, ``shape`` and ``data_offsets``, and
    ``__metadata__`` if any."""
    try:
        with path.open("rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise NamesFileError(f"{path}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, path.stat().st_size - 8):
                raise NamesFileError(f"{path}: not a safetensors file (header length {length} is impossible)")
            header = parse_json(stream.read(length).decode("utf-8"))
    except NamesFileError:
        raise
    except OSError as exc:
        raise NamesFileError(f"{path}: cannot read it: {exc.strerror}") from None
    except ValueError:  # not UTF-8, not JSON, an integer too long, nesting too deep
        raise NamesFileError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise NamesFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header


def _read_text(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise NamesFileError(f"{path}: not UTF-8 text; give a text file of names, a safetensors file, "
                         f"a *{INDEX_SUFFIX} or a checkpoint directory") from None
    except OSError as exc:
        raise NamesFileError(f"{path}: cannot read it: {exc.strerror}") from None
    stripped = (line.strip() for line in lines)
    return [name for name in stripped if name and not name.startswith("#")]
