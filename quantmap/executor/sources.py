"""Where an export's tensors come from: a source says how many ranks read it, and gives one rank its layout
and its local tensors (local names → tensors, read lazily or by byte range). The export that follows is
the same whatever the source (:func:`quantmap.executor.export.run_export`); a live model's ``state_dict()``
per rank is the third source, handed straight to :func:`~quantmap.executor.export.export` by its caller.

A source is pickled to each spawned worker, so it holds paths and small values only; what it reads, it
reads in the process that uses it.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Mapping

from quantmap.parallel import ParallelLayout


class ShardDirectory:
    """quantmap's Megatron shard directory: ``layout.json`` and one safetensors file per rank, read as the
    layout it declares (exactly that many ranks)."""

    def __init__(self, path: str | Path):
        from quantmap.io.shards import check_rank_files

        self.path = Path(path)
        self.layout = ParallelLayout.read(path)
        check_rank_files(path, self.layout)

    def world(self, nproc: int | None) -> int:
        if nproc is not None:
            self.layout.check_world(nproc)
        return self.layout.world_size

    def read(self, world: int, rank: int, rules, output_format) -> tuple[ParallelLayout, Mapping]:
        """Rank ``rank``'s file, read lazily: the export reads only the tensors ``output_format`` takes."""
        from quantmap.io.shards import LazyShard, rank_file

        return self.layout, LazyShard(rank_file(self.path, rank))

    def lock(self):
        return nullcontext()

    def recipe(self) -> list | None:
        """The ModelOpt ``quant_cfg`` the directory records (``recipe.json``), or ``None`` without one."""
        from quantmap.io.shards import read_recipe

        return read_recipe(self.path)

    def annotate(self, report) -> None:
        """Nothing to add: every tensor of a shard file is claimed or reported by the export itself."""


class TorchDistCheckpoint:
    """A Megatron ``torch_dist`` checkpoint. Its names are global: one rank reads it as ``tp=1, pp=1``;
    ``world`` ranks read it as that many pipeline stages, each reading only its stage's tensors
    (:func:`quantmap.executor.torch_dist_checkpoint.read_checkpoint`). Locked (shared) while it is read."""

    def __init__(self, path: str | Path, iteration: int | None = None):
        from quantmap.io.torch_dist import locate

        self.location = locate(path, iteration)
        self.left_out: tuple[int, int] | None = None  # what the read left out, for the report

    def world(self, nproc: int | None) -> int:
        return nproc or 1

    def read(self, world: int, rank: int, rules, output_format) -> tuple[ParallelLayout, Mapping]:
        """Rank ``rank``'s quantizer state, read by byte range, and where ``output_format`` takes any of the
        model's roles, its weights too, each read when the export asks for it."""
        from quantmap.executor.torch_dist_checkpoint import read_checkpoint
        from quantmap.roles import MODEL_ROLES

        weights = any(output_format.reads(role) for role in MODEL_ROLES)
        layout, state, self.left_out = read_checkpoint(self.location, world, rank, rules, weights)
        return layout, state

    def recipe(self) -> list | None:
        """ModelOpt's ``quant_cfg`` as the checkpoint's ``modelopt_state/`` records it (read as plain data), or
        ``None`` without one."""
        from quantmap.io.torch_dist.modelopt import quant_cfg

        return quant_cfg(self.location.path)

    def lock(self):
        from quantmap.io.locks import directory_lock

        return directory_lock(self.location.path, exclusive=False, purpose="an export")

    def annotate(self, report) -> None:
        """The checkpoint's tensors the export did not read (its weights, or with them its optimizer's), and its
        entries that hold no tensor, counted."""
        report.weights, report.entries = self.left_out


def open_source(path: str | Path, iteration: int | None = None):
    """The source at ``path``: a shard directory (it has ``layout.json``), else a torch_dist checkpoint."""
    from quantmap.io.torch_dist import is_shard_directory

    if iteration is None and is_shard_directory(path):
        return ShardDirectory(path)
    return TorchDistCheckpoint(path, iteration)
