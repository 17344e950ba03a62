"""How Megatron lays a non-scalar quantizer tensor over tensor-parallel ranks, in one place for
export (combine the ranks' copies) and import (cut the HF tensor for a rank).

Per-tensor amax is a scalar, identical on every rank, and needs none of this. Beyond that only
two layouts are known to be right today:

* ``SPLIT_DIM0``: a weight quantizer's per-channel or block amax on a column-parallel 1:1 layer
  follows the weight's output rows, which Megatron splits on dim 0 (``[out, 1]``, or the
  flattened ``[rows * blocks, 1]``);
* ``WHOLE``: every rank holds the whole tensor (a replicated layer).

Everything else (a fused group's parts, which need the GQA interleave; row-parallel layers, whose
block amax is split along the input; ``_pre_quant_scale`` of column-parallel layers, searched per
rank) needs the shape-aware fan-out on the roadmap, and is refused rather than written wrong.
"""

from __future__ import annotations

import torch

from quantmap.rules import FANOUT, MOE_FANOUT, Rule

SPLIT_DIM0 = "split_dim0"
WHOLE = "whole"


def tensor_parallel_layout(rule: Rule) -> str | None:
    """``SPLIT_DIM0``, ``WHOLE``, or ``None`` when quantmap cannot yet place the tensor correctly."""
    if rule.kind in (FANOUT, MOE_FANOUT):
        return None
    if rule.parallel == "replicated":
        return WHOLE
    if rule.parallel == "column" and rule.buffer is not None and rule.buffer.startswith("weight_quantizer"):
        return SPLIT_DIM0
    return None


def not_supported(name: str, shape, rule: Rule) -> str:
    """The error for a tensor :func:`tensor_parallel_layout` cannot place: names the tensor and why."""
    where = ("the parts of a fused group" if rule.kind in (FANOUT, MOE_FANOUT)
             else f"the tensor-parallel ranks of a {rule.parallel or 'undeclared'}-parallel layer ({rule.buffer})")
    return (f"{name} has shape {list(shape)}: placing per-channel or block quantizer state across {where} "
            f"needs shape-aware fan-out, which quantmap does not support yet (per-tensor amax works)")


def max_of_copies(parts: list[torch.Tensor], labels: list[str]) -> tuple[torch.Tensor, str | None]:
    """Copies that should agree (tensor-parallel replicas on export, fused parts or experts on import)
    combine by elementwise max; the second value describes them when they do not agree."""
    stacked = torch.stack(parts)
    out = stacked.amax(0)
    if bool((stacked == out).all()):
        return out, None
    spread = ", ".join(f"{label}: {part.flatten()[0].item():g}" for label, part in zip(labels[:4], parts[:4]))
    return out, spread + (", ..." if len(parts) > 4 else "")
