"""Invertible tensor operations: how a quantizer tensor's elements move between layouts.

A rule's shaped layout is a short pipeline of these values (see :mod:`quantmap.element_layout`). Each op
maps a list of tensors to a list of tensors and knows its exact inverse (:meth:`reverse`), so an
import is the export run backwards and no model needs code of its own (the idea of transformers
v5's conversion ops with their ``reverse_op``). The values are plain data: ``compile --format json``
prints them, and building them never imports torch; only applying them does.

``Split`` / ``Concat`` cover the cuts quantmap needs, all along one dimension ``dim``:

* contiguous parts in proportion to ``units`` (``[gate; up]`` is ``units=(1, 1)``, Phi-3's
  ``[Q; K; V]`` is ``units=(heads, groups, groups)``);
* the same parts repeated in ``groups`` equal groups (Megatron's QKV interleave: for each of
  ``num_query_groups`` groups, ``heads/groups`` query heads, one key head, one value head, so
  ``units=(heads/groups, 1, 1), groups=num_query_groups``);
* ``groups=0``: as many groups as fit, one element per unit (a strided interleave, ``x[0::2]`` and
  ``x[1::2]``).

``Each`` runs one op per run of consecutive parts (Gated DeltaNet's in_proj: six row components into two
HF tensors; tensor-parallel ranks that each hold a slice of every component).

Sizes are proportions, never element counts, so one op serves a per-channel ``[out, 1]`` and a
flattened per-block ``[out * blocks, 1]`` amax alike (row-major flattening keeps a row's blocks
together). Tensor-parallel ranks are parts too: the ranks' shards of a ``[gate; up]`` tensor
(``[gate_r; up_r]`` each) are ``Concat(dim=0, units=(1,) * tp, groups=2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

STRIDED = 0


class OpError(ValueError):
    """A tensor whose shape the operation cannot cut as declared; the message says why."""


def _grouping(size: int, units: Sequence[int], groups: int, multiple: int, what: str) -> tuple[int, int]:
    """``(groups, unit)`` for a dimension of ``size`` elements cut into ``units`` within ``groups``,
    each unit a whole number of ``multiple`` elements."""
    total = sum(units)
    groups = size // total if groups == STRIDED else groups
    if groups < 1 or size % (groups * total * multiple):
        granule = f" of {multiple} element(s) each" if multiple > 1 else ""
        raise OpError(f"{what}: a dimension of {size} elements cannot be cut into {groups or 'strided'} group(s) "
                      f"of parts in proportion {list(units)}{granule}")
    return groups, size // (groups * total)


@dataclass(frozen=True, slots=True)
class Split:
    """One tensor → ``len(units)`` parts along ``dim`` (see the module docstring)."""

    dim: int
    units: tuple[int, ...]
    groups: int = 1
    multiple: int = 1  # each unit is a whole number of this many elements (GQA: head_dim rows)

    def __call__(self, tensors: list) -> list:
        if len(tensors) != 1:
            raise OpError(f"split takes one tensor, got {len(tensors)}")
        (tensor,) = tensors
        shape = tuple(tensor.shape)
        if self.dim >= len(shape):
            raise OpError(f"split on dim {self.dim} of a tensor of shape {list(shape)}")
        groups, unit = _grouping(shape[self.dim], self.units, self.groups, self.multiple, "split")
        grouped = tensor.reshape(shape[:self.dim] + (groups, sum(self.units) * unit) + shape[self.dim + 1:])
        pieces = grouped.split([u * unit for u in self.units], dim=self.dim + 1)
        return [piece.reshape(shape[:self.dim] + (groups * u * unit,) + shape[self.dim + 1:])
                for piece, u in zip(pieces, self.units)]

    @property
    def takes(self) -> int:
        return 1

    def reverse(self) -> "Concat":
        return Concat(self.dim, self.units, self.groups, self.multiple)

    def to_json(self) -> dict:
        return {"op": "split", "dim": self.dim, "units": list(self.units), "groups": self.groups,
                "multiple": self.multiple}


@dataclass(frozen=True, slots=True)
class Concat:
    """``len(units)`` parts → one tensor along ``dim``: the exact inverse of :class:`Split`."""

    dim: int
    units: tuple[int, ...]
    groups: int = 1
    multiple: int = 1

    def __call__(self, tensors: list) -> list:
        import torch

        if len(tensors) != len(self.units):
            raise OpError(f"concat of {len(self.units)} parts got {len(tensors)} tensor(s)")
        shapes = [tuple(t.shape) for t in tensors]
        rest = {s[:self.dim] + s[self.dim + 1:] for s in shapes}
        if len(rest) != 1 or any(self.dim >= len(s) for s in shapes):
            raise OpError(f"concat on dim {self.dim} of parts shaped {[list(s) for s in shapes]}")
        size = sum(s[self.dim] for s in shapes)
        groups, unit = _grouping(size, self.units, self.groups, self.multiple, "concat")
        if any(s[self.dim] != groups * u * unit for s, u in zip(shapes, self.units)):
            raise OpError(f"concat: parts shaped {[list(s) for s in shapes]} are not in proportion {list(self.units)} "
                          f"on dim {self.dim}")
        lead, tail = shapes[0][:self.dim], shapes[0][self.dim + 1:]
        grouped = [t.reshape(lead + (groups, u * unit) + tail) for t, u in zip(tensors, self.units)]
        return [torch.cat(grouped, dim=self.dim + 1).reshape(lead + (size,) + tail)]

    @property
    def takes(self) -> int:
        return len(self.units)

    def reverse(self) -> Split:
        return Split(self.dim, self.units, self.groups, self.multiple)

    def to_json(self) -> dict:
        return {"op": "concat", "dim": self.dim, "units": list(self.units), "groups": self.groups,
                "multiple": self.multiple}


@dataclass(frozen=True, slots=True)
class Select:
    """Reorder a list of parts: output ``i`` is input ``order[i]`` (an HF tensor that fuses the parts
    in another order than Megatron's group)."""

    order: tuple[int, ...]

    def __call__(self, tensors: list) -> list:
        if len(tensors) != len(self.order):
            raise OpError(f"select of {len(self.order)} parts got {len(tensors)} tensor(s)")
        return [tensors[i] for i in self.order]

    @property
    def takes(self) -> int:
        return len(self.order)

    def reverse(self) -> "Select":
        inverse = [0] * len(self.order)
        for position, source in enumerate(self.order):
            inverse[source] = position
        return Select(tuple(inverse))

    def to_json(self) -> dict:
        return {"op": "select", "order": list(self.order)}


@dataclass(frozen=True, slots=True)
class Transpose:
    """Swap two dimensions of every tensor; its own inverse."""

    dim0: int
    dim1: int

    def __call__(self, tensors: list) -> list:
        return [t.transpose(self.dim0, self.dim1).contiguous() for t in tensors]

    @property
    def takes(self) -> int:
        return 1  # any number, one at a time; inside :class:`Each`, one

    def reverse(self) -> "Transpose":
        return self

    def to_json(self) -> dict:
        return {"op": "transpose", "dims": [self.dim0, self.dim1]}


@dataclass(frozen=True, slots=True)
class Offset:
    """Add ``value`` to every element: a norm weight Megatron stores zero-centred (``w - 1``,
    ``layernorm_zero_centered_gamma``) and Hugging Face plainly (``w``). Its inverse subtracts it; the sum is
    rounded in the tensor's dtype, so only values that hold it exactly come back bit for bit."""

    value: float

    def __call__(self, tensors: list) -> list:
        return [t + self.value for t in tensors]

    @property
    def takes(self) -> int:
        return 1  # any number, one at a time; inside :class:`Each`, one

    def reverse(self) -> "Offset":
        return Offset(-self.value)

    def to_json(self) -> dict:
        return {"op": "offset", "value": self.value}


@dataclass(frozen=True, slots=True)
class Stack:
    """``count`` tensors (one per expert) → one tensor with the experts on axis ``dim``."""

    dim: int
    count: int

    def __call__(self, tensors: list) -> list:
        import torch

        if len(tensors) != self.count:
            raise OpError(f"stack of {self.count} experts got {len(tensors)} tensor(s)")
        return [torch.stack(list(tensors), dim=self.dim)]

    @property
    def takes(self) -> int:
        return self.count

    def reverse(self) -> "Unstack":
        return Unstack(self.dim, self.count)

    def to_json(self) -> dict:
        return {"op": "stack", "dim": self.dim, "count": self.count}


@dataclass(frozen=True, slots=True)
class Unstack:
    """One tensor with ``count`` experts on axis ``dim`` → one tensor per expert."""

    dim: int
    count: int

    def __call__(self, tensors: list) -> list:
        (tensor,) = tensors
        if tensor.shape[self.dim] != self.count:
            raise OpError(f"unstack: axis {self.dim} of shape {list(tensor.shape)} does not hold {self.count} experts")
        return [t.contiguous() for t in tensor.unbind(self.dim)]

    @property
    def takes(self) -> int:
        return 1

    def reverse(self) -> Stack:
        return Stack(self.dim, self.count)

    def to_json(self) -> dict:
        return {"op": "unstack", "dim": self.dim, "count": self.count}


@dataclass(frozen=True, slots=True)
class Copy:
    """One tensor → the same tensor for each of ``count`` names that share it (the input side of a
    fused group: q, k and v see the same input). The inverse, :class:`Max`, checks that they agree."""

    count: int

    def __call__(self, tensors: list) -> list:
        (tensor,) = tensors
        return [tensor] * self.count

    @property
    def takes(self) -> int:
        return 1

    def reverse(self) -> "Max":
        return Max(self.count)

    def to_json(self) -> dict:
        return {"op": "copy", "count": self.count}


@dataclass(frozen=True, slots=True)
class Max:
    """Copies that should be equal → their elementwise max (disagreement is the caller's to report:
    :func:`quantmap.executor.sharding.max_of_copies`)."""

    count: int

    def __call__(self, tensors: list) -> list:
        import torch

        if len(tensors) != self.count:
            raise OpError(f"max of {self.count} copies got {len(tensors)} tensor(s)")
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise OpError(f"copies that should be equal have different shapes {sorted(map(list, shapes))}")
        return [torch.stack(list(tensors)).amax(0)]

    @property
    def takes(self) -> int:
        return self.count

    def reverse(self) -> Copy:
        return Copy(self.count)

    def to_json(self) -> dict:
        return {"op": "max", "count": self.count}


@dataclass(frozen=True, slots=True)
class Each:
    """Runs of consecutive parts, each through its own op: ``ops[0]`` takes the first ``ops[0].takes``
    parts, ``ops[1]`` the next, and so on, their outputs in order. Gated DeltaNet's in_proj needs it twice:
    its six row components join into two HF tensors (Qwen3-Next's ``[q k v z]`` and ``[b a]`` per key
    head), and each tensor-parallel rank holds a slice of every component, so the ranks are cut into
    components and the slices of each joined (:meth:`quantmap.element_layout.TensorParallel.gather`)."""

    ops: tuple["Op", ...]

    def __call__(self, tensors: list) -> list:
        if len(tensors) != self.takes:
            raise OpError(f"each of {len(self.ops)} op(s) over {self.takes} parts got {len(tensors)} tensor(s)")
        out, at = [], 0
        for op in self.ops:
            out += op(tensors[at:at + op.takes])
            at += op.takes
        return out

    @property
    def takes(self) -> int:
        return sum(op.takes for op in self.ops)

    def reverse(self) -> "Each":
        return Each(tuple(op.reverse() for op in self.ops))

    def to_json(self) -> dict:
        return {"op": "each", "ops": [op.to_json() for op in self.ops]}


Op = Union[Split, Concat, Select, Transpose, Offset, Stack, Unstack, Copy, Max, Each]


def apply(ops: Sequence[Op], tensors: list) -> list:
    """Run ``ops`` in order."""
    for op in ops:
        tensors = op(tensors)
    return tensors


def reverse(ops: Sequence[Op]) -> tuple[Op, ...]:
    """The pipeline that undoes ``ops``: each op's inverse, last op first."""
    return tuple(op.reverse() for op in reversed(ops))
