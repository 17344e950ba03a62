"""A streaming safetensors writer: the header from metadata, then each tensor's bytes as it is built.

``safetensors.torch.save_file`` needs every tensor in memory at once (and refuses tensors that
share storage, as fanned-out amax do). Here a *record* is one tensor written under one or more
names; its names are generated when its header entries are written and its tensor when its bytes
are, so a writer holds one record at a time plus the header.
"""

from __future__ import annotations

import ctypes
import json
import math
from typing import Iterator, Protocol, Sequence

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


class Records(Protocol):
    """What the writer needs to know about record ``i``; the names and tensor are built on demand.

    Records that are cheaper to build in bulk (10^5 scalars) may also offer ``data(indices)``: the
    data section of records ``indices`` as byte strings, record after record, each ``count`` times."""

    def __len__(self) -> int: ...
    def spec(self, i: int) -> tuple[int, torch.dtype, tuple[int, ...]]: ...  # (name count, dtype, shape)
    def names(self, i: int) -> Sequence[str]: ...
    def tensor(self, i: int) -> torch.Tensor: ...


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order, without a copy on the CPU (``Tensor.numpy().tobytes()`` would
    copy them twice). Valid while ``tensor`` lives."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():  # a contiguous tensor's memory is its flat order
        tensor = tensor.contiguous().cpu()
    size = tensor.nbytes
    if size < 1 << 16:  # small (quantizer scalars, mostly): one copy is cheaper than a view's bookkeeping
        return memoryview(ctypes.string_at(tensor.data_ptr(), size))
    view = memoryview((ctypes.c_ubyte * size).from_address(tensor.data_ptr()))
    view.obj._tensor = tensor  # the view does not own the memory: keep the tensor alive with it  # noqa: SLF001
    return view


def quote(name: str) -> str:
    """A JSON string literal for a tensor name (names are almost always plain ASCII)."""
    if name.isascii() and name.isprintable() and '"' not in name and "\\" not in name:
        return f'"{name}"'
    return json.dumps(name)


class StateRecords:
    """A ``{name: tensor}`` mapping as records, one name each (``safetensors.torch.save_file``'s input,
    which that function copies through numpy)."""

    def __init__(self, state):
        self._items = list(state.items())

    def __len__(self) -> int:
        return len(self._items)

    def spec(self, i: int):
        tensor = self._items[i][1]
        return 1, tensor.dtype, tuple(tensor.shape)

    def names(self, i: int):
        return [self._items[i][0]]

    def tensor(self, i: int) -> torch.Tensor:
        return self._items[i][1]


def write_state(path, state, metadata: dict[str, str] | None = None) -> int:
    """Write a ``{name: tensor}`` mapping as one safetensors file (``save_file`` without its numpy copies)."""
    return write(path, StateRecords(state), range(len(state)), metadata=metadata)


def write(path, records: Records, indices: range, on_names=None, metadata: dict[str, str] | None = None) -> int:
    """Write records ``indices`` to ``path``; ``on_names(quoted)`` sees each record's names, JSON-quoted,
    as their entries are written. Returns the data bytes written. ``metadata`` (strings) joins
    ``{"format": "pt"}`` in the header's ``__metadata__``. A failed write (a full disk) raises an
    :class:`OSError` that names ``path``.

    The header streams to the file behind an 8-byte placeholder that is filled in at the end, so it
    is never held in memory (for quantizer state it is most of the file)."""
    try:
        return _write(path, records, indices, on_names, {"format": "pt", **(metadata or {})})
    except OSError as error:
        raise OSError(error.errno, f"{error.strerror} while writing {path}") from None


_HEADER_BLOCK = 4096  # header entries written at once


def _write(path, records: Records, indices: range, on_names, metadata: dict[str, str]) -> int:
    with open(path, "wb") as out:
        out.write(bytes(8))
        length = out.write(('{"__metadata__":' + json.dumps(metadata, separators=(",", ":"))).encode())
        offset = 0
        kinds: dict[tuple, tuple[int, str]] = {}  # (dtype, shape) -> data size, header text after the name
        pending: list[str] = []  # header text not yet written: written in blocks, not per record
        for i in indices:
            count, dtype, shape = records.spec(i)
            kind = kinds.get((dtype, shape))
            if kind is None:
                if dtype not in DTYPES:
                    raise ValueError(f"{records.names(i)[0]}: safetensors has no dtype for {dtype}")
                kind = kinds[dtype, shape] = (nbytes(dtype, shape), f':{{"dtype":"{DTYPES[dtype]}","shape":'
                                                                    f'[{",".join(map(str, shape))}],"data_offsets":[')
            size, tail = kind
            quoted = [quote(name) for name in records.names(i)]
            if len(quoted) != count:  # the data below is written ``count`` times: the header must agree
                raise ValueError(f"record {i}: {len(quoted)} names but {count} planned copies")
            for q in quoted:
                pending.append(f",{q}{tail}{offset},{offset + size}]}}")
                offset += size
            if len(pending) >= _HEADER_BLOCK:
                length += out.write("".join(pending).encode())
                pending.clear()
            if on_names is not None:
                on_names(quoted)
        length += out.write("".join(pending).encode())
        length += out.write(b"}" + b" " * (-(length + 1) % 8))
        for data in (records.data(indices) if hasattr(records, "data") else each_record(records, indices)):
            out.write(data)
        out.seek(0)
        out.write(length.to_bytes(8, "little"))
    return offset


def each_record(records: Records, indices) -> Iterator[bytes]:
    """The data of records ``indices``, one record (and one copy of it) at a time, each checked against its spec."""
    for i in indices:
        count, dtype, shape = records.spec(i)
        tensor = records.tensor(i)
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"record {i}: built {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}")
        data = raw_bytes(tensor)
        for _ in range(count):
            yield data
        del tensor, data  # before the next record is built: a writer holds one record at a time
