"""The rank-local half of an export: claim, rename and pack this rank's tensors into one buffer.

Only names the rule set claims are packed, under their global names; the rest are listed for the
report. Data-parallel replicas hold copies, so only the first replica of each view packs: dense
tensors on ``dp == cp == 0``, expert tensors on ``edp == 0``; where a view has replicas, every copy's
digest goes into the metadata for the writer to compare. Every tensor read is checked for values
that cannot be right (:mod:`quantmap.executor.values`). The buffer is one flat byte tensor
(each tensor aligned to its element size), so any mix of dtypes travels in a single transfer.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Mapping

import torch

from quantmap.executor.groups import Placement
from quantmap.executor.naming import is_expert, local_indices, to_global
from quantmap.executor.report import ExecutorError
from quantmap.executor.values import check_values, copy_digest, owns, replicated
from quantmap.io.shards import LazyShard
from quantmap.rules import WEIGHT


@dataclass
class Packed:
    """What one rank sends: ``meta`` (small, to the writer first) and the bytes it describes."""

    meta: dict
    buffer: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))


def empty_meta(placement: Placement, error: str | None = None) -> dict:
    return {"coords": placement.coords, "error": error, "names": [], "dtypes": [], "shapes": [], "offsets": array("q"),
            "size": 0, "unclaimed": [], "weights": 0, "experts": 0, "top_layer": None, "top_expert": None,
            "copies": {}, "uncalibrated": []}


def pack(rules, state: Mapping, placement: Placement) -> Packed:
    """Claim and pack ``state`` (local names → tensors); exceptions propagate to the caller."""
    layout, coords = placement.layout, placement.coords
    if isinstance(state, LazyShard):
        state.check_coordinates(layout, coords)
    owner = {False: owns(coords, expert=False), True: owns(coords, expert=True)}
    compared = {False: replicated(layout, expert=False), True: replicated(layout, expert=True)}
    meta = empty_meta(placement)
    tensors, read, offset = [], [], 0
    for local in state.keys():
        name = to_global(local, layout, coords)
        _note_indices(meta, local)
        match = rules.to_hf(name)
        if match is None:
            meta["unclaimed"].append(name)
            continue
        expert = is_expert(name)
        if match.kind == WEIGHT:
            meta["weights"] += owner[expert]
            continue
        if not (owner[expert] or compared[expert]):
            continue
        try:
            value = state[local]
        except Exception as error:
            raise ExecutorError(f"reading {local!r} failed: {type(error).__name__}: {error}") from error
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{local!r} is a {type(value).__name__}, not a tensor; pass the model's state_dict() "
                            f"or a safetensors shard")
        value = value.detach()
        read.append((name, value))
        if compared[expert]:
            meta["copies"][name] = copy_digest(value)
        if not owner[expert]:
            continue
        width = value.element_size()
        offset = -(-offset // width) * width
        tensors.append((offset, value))
        meta["names"].append(name)
        meta["experts"] += is_expert(name)
        meta["dtypes"].append(value.dtype)
        meta["shapes"].append(tuple(value.shape))
        meta["offsets"].append(offset)
        offset += value.numel() * width
    meta["uncalibrated"] = check_values(read)
    buffer = torch.empty(offset, dtype=torch.uint8)
    for start, value in tensors:
        flat = value.reshape(-1).contiguous().cpu().view(torch.uint8)
        buffer[start:start + flat.numel()] = flat
    meta["size"] = offset
    return Packed(meta, buffer)


def _note_indices(meta: dict, local: str) -> None:
    """Keep the highest local layer and expert index seen: the writer checks them against the layout,
    which would otherwise renumber a model with fewer layers or experts than it says, silently."""
    layer, expert = local_indices(local)
    if layer is not None and (meta["top_layer"] is None or layer > meta["top_layer"]):
        meta["top_layer"] = layer
    if expert is not None and (meta["top_expert"] is None or expert > meta["top_expert"]):
        meta["top_expert"] = expert


def unpack(buffer: torch.Tensor, meta: dict, index: int) -> torch.Tensor:
    """Entry ``index`` of a rank's buffer, as a view with its dtype and shape."""
    dtype, shape, start = meta["dtypes"][index], meta["shapes"][index], meta["offsets"][index]
    return buffer[start:start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
