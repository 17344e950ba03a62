"""The Megatron shard directory: ``layout.json`` plus ``rank_{global_rank:05d}.safetensors`` per rank,
each holding that rank's quantizer tensors under its LOCAL names (what its ``state_dict()`` says)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from quantmap.executor.layout import Layout
from quantmap.io.safetensors_stream import write_state


def rank_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank_{rank:05d}.safetensors"


class LazyShard(Mapping):
    """One rank's shard as a mapping; the file is opened on first use and a tensor is read only when
    asked for (so an unreadable file fails inside the export, where every rank hears of it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handle = None

    def _open(self):
        if self._handle is None:
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path} does not exist; a shard directory needs one "
                                        f"rank_NNNNN.safetensors per rank of its layout.json")
            self._handle = safe_open(self.path, "pt")
        return self._handle

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._open().get_tensor(name)

    def __iter__(self):
        return iter(self._open().keys())

    def __len__(self) -> int:
        return len(self._open().keys())

    def keys(self):
        return self._open().keys()


def write_rank(directory: str | Path, rank: int, state: Mapping[str, torch.Tensor]) -> Path:
    """Write one rank's tensors (temporary name, then rename)."""
    path = rank_file(directory, rank)
    partial = path.with_suffix(".partial")
    write_state(partial, state)  # not safetensors' save_file, which needs numpy (no dependency of quantmap)
    os.replace(partial, path)
    return path


def save_shard(state_dict: Mapping, layout: Layout, directory: str | Path, rank: int | None = None) -> Path:
    """Write this rank's quantizer state from a live model's ``state_dict()``; call it on every rank.

    Keeps the tensors whose name contains ``quantizer`` (``_amax``, ``_pre_quant_scale``, ...); rank 0
    also writes ``layout.json``. ``rank`` is this rank's position in Megatron-Core's default order
    (``tp-cp-ep-dp-pp``, the order ``layout.json`` declares); it defaults to the global rank of the
    default process group, which is that position when Megatron built its groups in the default
    order. A run with another order must pass the position, or export renumbers the wrong ranks.
    """
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        layout.write(directory)
    quantizers = {name: value for name, value in state_dict.items()
                  if "quantizer" in name and isinstance(value, torch.Tensor)}
    return write_rank(directory, rank, quantizers)
