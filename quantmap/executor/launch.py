"""Running an export or import from files: under ``torchrun``, on N gloo workers spawned here, or in
one process that plays every rank (machines without many cores). The CLI calls these.

``params`` are the keyword arguments of ``quantmap.compile``: the spec's run-time parameters, and
``hf_naming`` when it is not the default."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

from quantmap.executor.report import ExecutorError, Report


def mode(nproc: int | None) -> str:
    """``"torchrun"`` when launched by it, ``"spawn"`` with ``--nproc``, else ``"offline"``."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "RANK" in os.environ):
        return "torchrun"
    return "spawn" if nproc else "offline"


def export_shards(spec: str, params: dict, megatron: str | Path, out: str | Path, *, shard_size: int,
                  nproc: int | None = None, progress: bool = False, timeout: timedelta = timedelta(minutes=10),
                  strict: bool = False, allow_partial: bool = False, iteration: int | None = None) -> Report:
    """Export a Megatron shard directory (``layout.json`` + ``rank_NNNNN.safetensors``) or a torch_dist
    checkpoint (told apart by their files) to ``out``."""
    from quantmap.executor.layout import Layout
    from quantmap.io.shards import check_rank_files
    from quantmap.io.torch_dist import is_shard_directory

    if iteration is not None or not is_shard_directory(megatron):
        from quantmap.executor.torch_dist import export_checkpoint

        return export_checkpoint(spec, params, megatron, out, shard_size=shard_size, nproc=nproc, progress=progress,
                                 timeout=timeout, iteration=iteration)
    layout = Layout.read(megatron)
    check_rank_files(megatron, layout)
    args = (spec, params, str(megatron), str(out), shard_size, progress, timeout, strict, allow_partial)
    how = mode(nproc)
    if how == "offline":
        import quantmap
        from quantmap.executor.export import export_offline
        from quantmap.io.shards import LazyShard, rank_file

        states = [LazyShard(rank_file(megatron, rank)) for rank in range(layout.world_size)]
        return export_offline(quantmap.compile(spec, **params), states, layout, out=out, shard_size=shard_size,
                              progress=progress, strict=strict, allow_partial=allow_partial).report
    if how == "spawn":
        layout.check_world(nproc)
    return _run(how, nproc, _export_rank, args, timeout)


def import_checkpoint(spec: str, params: dict, hf: str | Path, layout_path: str | Path, out: str | Path, *,
                      strict: bool = False, nproc: int | None = None, progress: bool = False,
                      timeout: timedelta = timedelta(minutes=10)) -> Report:
    """Import a Hugging Face checkpoint into a Megatron shard directory for ``layout_path``."""
    from quantmap.executor.layout import Layout

    layout = Layout.read(layout_path)
    how = mode(nproc)
    if how == "offline":
        import quantmap
        from quantmap.executor.importer import import_offline

        return import_offline(quantmap.compile(spec, **params), hf, layout, out, strict=strict, progress=progress)
    if how == "spawn":
        layout.check_world(nproc)
    return _run(how, nproc, _import_rank, (spec, params, str(hf), str(layout_path), str(out), strict, timeout), timeout)


def _export_rank(spec, params, megatron, out, shard_size, progress, timeout, strict, allow_partial):
    import quantmap
    from quantmap.executor.export import export
    from quantmap.executor.groups import Placement
    from quantmap.executor.layout import Layout
    from quantmap.io.shards import LazyShard, rank_file

    placement = Placement.from_world(Layout.read(megatron))
    state = LazyShard(rank_file(megatron, placement.coords.rank))
    result = export(quantmap.compile(spec, **params), state, placement, out=out, shard_size=shard_size,
                    timeout=timeout, progress=progress, strict=strict, allow_partial=allow_partial)
    return result.report if result.is_writer else None


def _import_rank(spec, params, hf, layout_path, out, strict, timeout):
    import quantmap
    from quantmap.executor.groups import Placement
    from quantmap.executor.importer import import_
    from quantmap.executor.layout import Layout

    placement = Placement.from_world(Layout.read(layout_path))
    return import_(quantmap.compile(spec, **params), hf, placement, out, strict=strict, timeout=timeout)


def _run(how: str, nproc: int | None, fn, args, timeout: timedelta) -> Report:
    if how == "torchrun":
        import torch
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        try:
            report = fn(*args)
            return report if report is not None and dist.get_rank() == 0 else Report()  # rank 0 speaks for all
        finally:
            if owned:
                dist.destroy_process_group()
    outcomes = spawn(nproc, fn, args, timeout)
    failed = [o for o in outcomes if o[0] == "error"]
    if failed:
        raise ExecutorError(failed[0][1])
    return outcomes[0][1]


def spawn(nproc: int, fn, args=(), timeout: timedelta = timedelta(minutes=10)) -> list[tuple]:
    """Run ``fn(*args)`` on ``nproc`` fresh gloo processes; each rank's ``("ok", value)`` or
    ``("error", message, traceback)``. A failing rank does not hang the others: the executor's
    collectives carry the failure, and the group's ``timeout`` bounds anything else."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="quantmap-spawn-") as scratch:
        try:
            mp.start_processes(_worker, args=(nproc, _free_port(), fn, args, scratch, timeout), nprocs=nproc,
                               join=True, start_method="spawn")
        except mp.ProcessExitedException as error:  # a worker died outright; the others were stopped
            raise ExecutorError(f"worker process {error.error_index} died ({error}); the other workers were "
                                f"stopped") from None
        outcomes = []
        for rank in range(nproc):
            with open(Path(scratch) / f"rank{rank}.pkl", "rb") as handle:
                outcomes.append(pickle.load(handle))
    return outcomes


def _worker(rank: int, world: int, port: int, fn, args, scratch: str, timeout: timedelta) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout)
    try:
        outcome = ("ok", fn(*args))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
        outcome = ("error", str(error) if isinstance(error, ExecutorError) else f"{type(error).__name__}: {error}",
                   traceback.format_exc())
    with open(Path(scratch) / f"rank{rank}.pkl", "wb") as handle:
        pickle.dump(outcome, handle)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
