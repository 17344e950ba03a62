"""A streaming safetensors writer: the header from metadata, then each tensor's bytes as it is built.

``safetensors.torch.save_file`` needs every tensor in memory at once (and refuses tensors that
share storage, as fanned-out amax do). Here a *record* is one tensor written under one or more
names; its names are generated when its header entries are written and its tensor when its bytes
are, so a writer holds one record at a time plus the header.
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol, Sequence

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
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


def quote(name: str) -> str:
    """A JSON string literal for a tensor name (names are almost always plain ASCII)."""
    if name.isascii() and name.isprintable() and '"' not in name and "\\" not in name:
        return f'"{name}"'
    import json

    return json.dumps(name)


def write(path, records: Records, indices: range, on_names=None) -> int:
    """Write records ``indices`` to ``path``; ``on_names(quoted)`` sees each record's names, JSON-quoted,
    as their entries are written. Returns the data bytes written.

    The header streams to the file behind an 8-byte placeholder that is filled in at the end, so it
    is never held in memory (for quantizer state it is most of the file)."""
    with open(path, "wb") as out:
        out.write(bytes(8))
        length = out.write(b'{"__metadata__":{"format":"pt"}')
        offset = 0
        for i in indices:
            count, dtype, shape = records.spec(i)
            size = nbytes(dtype, shape)
            tail = f':{{"dtype":"{DTYPES[dtype]}","shape":[{",".join(map(str, shape))}],"data_offsets":['
            quoted = [quote(name) for name in records.names(i)]
            if len(quoted) != count:  # the data below is written ``count`` times: the header must agree
                raise ValueError(f"record {i}: {len(quoted)} names but {count} planned copies")
            length += out.write("".join(f",{q}{tail}{offset + k * size},{offset + (k + 1) * size}]}}"
                                        for k, q in enumerate(quoted)).encode())
            offset += size * len(quoted)
            if on_names is not None:
                on_names(quoted)
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


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes in flat order."""
    return tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()
