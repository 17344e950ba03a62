"""Where a run's processes come from: torchrun's, workers started here (``--nproc``), or this one alone;
and the fork server that workers started here are forked from.

A worker started from nothing (multiprocessing's ``spawn``) runs a new Python that imports torch and the
executor: ~2 s of CPU each, so ``--nproc 4`` on a 2-core machine spent ~5 s starting its workers before
reading a byte. Forked from a server that has imported them once, a worker starts in milliseconds. The
server is a fresh process that has imported modules and run nothing, so forking it is safe where forking
the command would not be: a fork of a process that has run torch's parallel kernels can hang in the child
(its OpenMP threads are not copied), and would inherit its open files, locks and signal handlers.
:func:`start_fork_server` starts the server as the command begins (the CLI calls it before its own imports),
so that the server's imports overlap the command's.

Torch-free, so that the CLI can start the server first thing.
"""

from __future__ import annotations

import os
import sys

_SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, less its terminating NUL)
# What every worker imports before its first tensor: imported once, by the fork server.
WORKER_MODULES = ["torch", "torch.distributed", "quantmap.executor.launch", "quantmap.executor.export",
                  "quantmap.executor.importer", "quantmap.executor.sources", "quantmap.executor.torch_dist_checkpoint"]


def mode(nproc: int | None) -> str:
    """``"torchrun"`` when launched by it, ``"spawn"`` with ``--nproc``, else ``"offline"``.

    ``--nproc`` wins over stray ``WORLD_SIZE``/``RANK`` variables (left in a shell by an earlier job):
    only torchrun's own ``TORCHELASTIC_RUN_ID`` means the ranks are already launched."""
    if _under_torchrun():
        if nproc:
            from quantmap.executor.report import ExecutorError  # imports torch (the executor package does)

            raise ExecutorError("--nproc cannot be used under torchrun, whose processes are already the ranks; "
                                "drop --nproc")
        return "torchrun"
    if nproc:
        return "spawn"
    return "torchrun" if "WORLD_SIZE" in os.environ and "RANK" in os.environ else "offline"


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset narrows), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def start_method() -> str:
    """How workers are started: forked from the fork server on Linux; elsewhere (macOS, where forking a
    process that has loaded system frameworks is unsafe) each started from nothing."""
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


def start_fork_server(nproc: int | None) -> None:
    """Start the fork server, with :data:`WORKER_MODULES` imported, where the run spawns workers (``--nproc``,
    not under torchrun) and none runs yet (once per process).

    Its socket lies in multiprocessing's temporary directory, which is made one of quantmap's scratch
    directories (:func:`quantmap.io.staging.process_scratch`): a command killed outright would otherwise
    leave a ``pymp-*`` directory behind that nothing removes; a scratch directory, the next run removes.
    The server keeps the environment it started with: a worker sees the variables of the moment the first
    workers were started, not later changes."""
    if start_method() != "forkserver" or not nproc or _under_torchrun():  # no workers to start here
        return
    import multiprocessing
    from multiprocessing import forkserver, process

    from quantmap.io.staging import process_scratch

    config = process.current_process()._config  # multiprocessing's own per-process settings; no public setter
    if config.get("tempdir") is None:
        config["tempdir"] = str(process_scratch(longest=_SOCKET_PATH_MAX - len("/listener-12345678")))
    multiprocessing.set_forkserver_preload(WORKER_MODULES)
    forkserver.ensure_running()
