"""Megatron ``torch_dist`` checkpoints (PyTorch Distributed Checkpoint) as quantmap input and output.

Importing this package does not import torch: ``quantmap check`` reads names and shapes from
``.metadata`` alone. Reading tensors (:mod:`.read`) and writing (:mod:`.write`) need torch.
Format facts and the ModelOpt linear_fc1 fix: docs/checkpoints.md.
"""

from __future__ import annotations

from pathlib import Path

from quantmap.gc_pause import paused_gc
from quantmap.io.torch_dist.keys import Quantizer, model_size, quantizers, state_names, swiglu_weights
from quantmap.io.torch_dist.locate import CheckpointLocation, is_shard_directory, is_torch_dist, locate
from quantmap.io.torch_dist.files import TorchDistError
from quantmap.io.torch_dist.metadata import Entry, read_entries

__all__ = ["Entry", "CheckpointLocation", "Quantizer", "TorchDistError", "checkpoint_names", "is_shard_directory",
           "is_torch_dist", "locate", "model_size", "names_and_swiglu", "quantizers", "read_entries", "state_names"]


def checkpoint_names(path: str | Path, iteration: int | None = None) -> list[str]:
    """The state_dict names of a torch_dist checkpoint's tensors, from ``.metadata`` alone (the cyclic
    collector off until the metadata's 10⁵-10⁶ objects are freed, so that it never scans them)."""
    return names_and_swiglu(path, iteration)[0]


def names_and_swiglu(path: str | Path, iteration: int | None = None) -> tuple[list[str], set[str]]:
    """:func:`checkpoint_names`, and which of those weights the checkpoint saves as SwiGLU halves
    (``quantmap check`` compares that with the spec's gating)."""
    with paused_gc():
        entries = read_entries(locate(path, iteration).path)
        return state_names(entries), swiglu_weights(entries)
