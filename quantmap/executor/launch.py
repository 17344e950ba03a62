"""Running an export or import from files: under ``torchrun``, on N gloo workers spawned here, or in
one process that plays every rank (machines without many cores). The CLI calls these.

``rules`` are compiled once, by the caller; spawned workers get them pickled
(:class:`quantmap.compiler.RuleSource`: compiled again from the resolved spec, never from its files).
``options`` are the run's :class:`~quantmap.executor.options.RunOptions`."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
import traceback
from contextlib import nullcontext
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from quantmap.executor.options import RunOptions
from quantmap.processes import mode, start_fork_server, start_method, usable_cores
from quantmap.executor.report import ExecutorError, Report
from quantmap.io import staging

GRACE_S = 5.0  # how long the other workers get to finish once one has failed
# Open files a gloo worker needs: ~40 of its own (measured: 64 at the peak of a 4-rank export), and a few
# sockets per rank (the rendezvous store's and gloo's own connections to every other rank).
_FILES_PER_WORKER, _FILES_PER_RANK = 64, 8


class Interrupted(KeyboardInterrupt):
    """The command got a terminating signal (SIGINT, SIGTERM, SIGHUP); raised where it was running so
    that every cleanup on the way out runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def export_from(rules, megatron: str | Path, out: str | Path, options: RunOptions = RunOptions(), *,
                iteration: int | None = None) -> Report:
    """Export a Megatron shard directory (``layout.json`` + ``rank_NNNNN.safetensors``) or a torch_dist
    checkpoint (told apart by their files, :func:`~quantmap.executor.sources.open_source`) to ``out``:
    in one process, on ``--nproc`` workers or under torchrun, the same path."""
    from quantmap.executor.sources import open_source

    source = open_source(megatron, iteration)
    if options.output_format.modules is not None:
        options = replace(options, recipe=_recipe(source, options.recipe))
    how = mode(options.nproc)
    world = source.world(options.nproc if how == "spawn" else None)
    _prepare_output(out)
    return _with_contents(out, _guarded(out, how, lambda: _export_from(source, world, how, rules, out, options)))


def _recipe(source, given: list | None) -> list | None:
    """The recipe a deployable export follows: the one the source records, or the one given (``--recipe``)
    where it records none; both, differing, is an error (the amax were calibrated for the recorded one)."""
    recorded = source.recipe()
    if given is not None and recorded is not None and given != recorded:
        raise ExecutorError("the recipe given (--recipe) differs from the one the checkpoint records (ModelOpt's "
                            "quant_cfg in its modelopt_state/ or recipe.json), for which its amax were calibrated; "
                            "drop --recipe to export with the checkpoint's own")
    return recorded if recorded is not None else given


def _export_from(source, world: int, how: str, rules, out, options: RunOptions) -> Report:
    with nullcontext() if how == "torchrun" else source.lock():
        if how != "offline":
            cores = usable_cores() if how == "spawn" else None  # spawned workers share this machine's cores
            return launch_ranks(how, _export_rank, (rules, source, str(out), options, cores), options)
        from quantmap.executor.export import export_offline

        layout, states = None, []
        for rank in range(world):
            layout, state = source.read(world, rank, rules, options.output_format)
            states.append(state)
        report = export_offline(rules, states, layout, out=out, options=options).report
        source.annotate(report)
        return report


def _with_contents(out, report: Report) -> Report:
    """The report, with what the published output holds read back from its files (and its quantizer state
    from its own directory, where the format writes one: ``hf``)."""
    from quantmap.formats.hf import QUANTIZER_STATE
    from quantmap.io.hf import contents

    report.output = contents(out)
    if (Path(out) / QUANTIZER_STATE).is_dir():
        report.quantizer_output = contents(Path(out) / QUANTIZER_STATE)
    return report


def import_checkpoint(rules, hf: str | Path, layout_path: str | Path, out: str | Path,
                      options: RunOptions = RunOptions()) -> Report:
    """Import a Hugging Face checkpoint into a Megatron shard directory for ``layout_path``."""
    from quantmap.parallel import ParallelLayout

    layout = ParallelLayout.read(layout_path)
    how = _prepare(layout, options.nproc, out)
    if how == "offline":
        from quantmap.executor.importer import import_offline

        return _guarded(out, how, lambda: import_offline(rules, hf, layout, out, options=options))
    args = (rules, str(hf), str(layout_path), str(out), options)
    return _guarded(out, how, lambda: launch_ranks(how, _import_rank, args, options))


def import_checkpoint_into(rules, hf_dir, into, options: RunOptions = RunOptions(), *, out=None,
                           in_place: bool = False, iteration: int | None = None):
    """``quantmap import --into CKPT``: one process (the checkpoint's names are global; ``options.nproc``
    and ``options.timeout`` play no part)."""
    from quantmap.executor.torch_dist_checkpoint import import_into

    with nullcontext() if out is None else staging.command(out):
        return import_into(rules, hf_dir, into, options, out=out, in_place=in_place, iteration=iteration)


def _prepare(layout, nproc: int | None, out) -> str:
    """Checks that need no work: the launch against the layout, the output path; and the removal of
    staging that killed earlier runs left beside the output. Returns the launch mode."""
    how = mode(nproc)
    if how == "spawn":
        layout.check_world(nproc)
    _prepare_output(out)
    return how


def _prepare_output(out) -> None:
    """The output path checked before any work, and stale staging of killed earlier runs removed."""
    staging.check_target(out)
    staging.remove_stale(out)


def _guarded(out, how: str, run):
    """``run()``, holding the output's lock; whatever ends it early (a failure, a signal, a killed
    worker), no staging directory of this command stays beside ``out``, nor an output it had already
    published (:func:`quantmap.io.staging.command`). Under torchrun every rank runs this: none locks."""
    with staging.command(out, lock=how != "torchrun"):
        return run()


def _export_rank(rules, source, out, options: RunOptions, cores: int | None = None):
    """One worker's export: its rank's part of the source, under the layout the source is read as. With
    ``cores`` (workers spawned on one machine), no more writers than that: one per pipeline stage would
    put more processes than cores to copying bytes at once, which only makes them wait on each other
    (measured on 2 cores, a 4.1 GB export at --nproc 4: 7.5-7.7 s with 2 writers, 8.1-12.5 s with 4)."""
    import torch.distributed as dist

    from quantmap.executor.export import export
    from quantmap.executor.placement import Placement

    layout, state = source.read(dist.get_world_size(), dist.get_rank(), rules, options.output_format)
    writers = min(layout.pp, cores) if cores else None
    result = export(rules, state, Placement.from_world(layout), out=out, writers=writers, options=options)
    if not result.is_writer:
        return None
    source.annotate(result.report)  # the whole source's, said by the writer
    return result.report


def _import_rank(rules, hf, layout_path, out, options: RunOptions):
    from quantmap.executor.placement import Placement
    from quantmap.executor.importer import import_
    from quantmap.parallel import ParallelLayout

    placement = Placement.from_world(ParallelLayout.read(layout_path))
    return import_(rules, hf, placement, out, options=options)


def launch_ranks(how: str, fn, args, options: RunOptions) -> Report:
    """``fn(*args)`` on every rank, under torchrun or on ``options.nproc`` spawned gloo workers; rank 0's report."""
    if how == "torchrun":
        import torch
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            try:
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=options.timeout)
            except (RuntimeError, ValueError) as error:
                raise ExecutorError(f"cannot join the torchrun process group (WORLD_SIZE={os.environ.get('WORLD_SIZE')}, "
                                    f"RANK={os.environ.get('RANK')}): {str(error).splitlines()[0]}; launch with "
                                    f"torchrun, or unset WORLD_SIZE and RANK (or pass --nproc)") from None
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        try:
            report = fn(*args)
            return report if report is not None and dist.get_rank() == 0 else Report()  # rank 0 speaks for all
        finally:
            if owned:
                dist.destroy_process_group()
    outcomes = spawn(options.nproc, fn, args, options.timeout)
    failed = [o[1] for o in outcomes if o[0] == "error" and o[2] is not None]
    stopped = [o[1] for o in outcomes if o[0] == "error" and o[2] is None]
    if failed or stopped:
        raise ExecutorError("; ".join(failed[:1] + stopped))
    return outcomes[0][1]


def spawn(nproc: int, fn, args=(), timeout: timedelta = timedelta(minutes=10)) -> list[tuple]:
    """Run ``fn(*args)`` on ``nproc`` fresh gloo processes; each rank's ``("ok", value)`` or
    ``("error", message, traceback)`` (traceback ``None``: the worker was killed after another failed).

    Every wait has a deadline. A worker stopped (SIGSTOP) for longer than ``timeout`` is killed; once
    one worker has failed or died the others get ``GRACE_S`` to report, and once one has succeeded
    ``timeout`` more (a hung worker's peers time out in their collective, which starts that clock).
    A worker that had to be killed, or that died, raises :class:`ExecutorError` naming its rank;
    an interrupt kills every worker. No worker outlives this call."""
    import torch.multiprocessing as mp

    need = _open_files_needed(nproc)
    start_fork_server(nproc)  # where the command has not started it already
    with staging.scratch_directory() as scratch:
        context = mp.start_processes(_worker, args=(nproc, _free_port(), fn, args, str(scratch), timeout,
                                                    staging.current_owner(), need),
                                     nprocs=nproc, join=False, start_method=start_method())
        try:
            failure = _supervise(context.processes, scratch, timeout.total_seconds())
        finally:
            for process in context.processes:  # the stragglers, or everyone on an interrupt
                if process.exitcode is None:
                    process.kill()
                process.join()
        if failure:
            raise ExecutorError(failure)
        return [_outcome(scratch, rank) or ("error", f"worker rank {rank} (pid {process.pid}) had not finished "
                                                     f"{GRACE_S:g} s after another rank failed; it was killed", None)
                for rank, process in enumerate(context.processes)]


def _open_files_needed(nproc: int) -> int:
    """The open files and sockets a worker of ``nproc`` needs (it raises its own soft ``ulimit -n`` to that,
    :func:`_raise_open_files`); :class:`ExecutorError` before any worker starts when the hard limit is too
    low. A worker short of descriptors does not fail: gloo's rendezvous retries its socket until
    ``--timeout``, and prints hundreds of lines of C++ warnings meanwhile."""
    import resource

    need = _FILES_PER_WORKER + _FILES_PER_RANK * nproc
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ExecutorError(f"--nproc {nproc} needs about {need} open files per worker (its sockets to the other "
                            f"ranks, the checkpoint's files), but ulimit -n allows {hard}; raise it (ulimit -n 4096), "
                            f"or run without --nproc (one process plays every rank). Nothing was written")
    return need


def _raise_open_files(need: int) -> None:
    """This worker's soft ``ulimit -n`` raised to ``need`` (within the hard limit, checked before it started)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))


def _supervise(processes, scratch: Path, timeout: float) -> str | None:
    """Wait for every worker, within the deadlines :func:`spawn` describes; the reason a worker had to
    be killed (it is, here) or died, else ``None``."""
    ended: dict[int, float] = {}
    stopped_since: dict[int, float] = {}
    failed_at = None
    while True:
        now = time.monotonic()
        for rank, process in enumerate(processes):
            if rank in ended or process.exitcode is None:
                continue
            ended[rank] = now
            if process.exitcode != 0 or _outcome(scratch, rank) is None:
                return _died(rank, process)
            if _outcome(scratch, rank)[0] == "error" and failed_at is None:
                failed_at = now
        if len(ended) == len(processes):
            return None
        for rank, process in enumerate(processes):
            if rank in ended:
                continue
            if _is_stopped(process.pid):
                since = stopped_since.setdefault(rank, now)
                if now - since > timeout:
                    process.kill()
                    return (f"worker rank {rank} (pid {process.pid}) was stopped for more than --timeout {timeout:g} s "
                            f"(SIGSTOP or a debugger); it was killed, and so were the other workers. Nothing was written")
            else:
                stopped_since.pop(rank, None)
            if failed_at is not None and now - failed_at > GRACE_S:
                return None  # the failure is reported by the ranks that saw it; the stragglers are killed
            if ended and now - min(ended.values()) > timeout + GRACE_S:
                process.kill()
                return (f"worker rank {rank} (pid {process.pid}) did not finish within --timeout {timeout:g} s of the "
                        f"others (hung); it was killed. Nothing was written")
        time.sleep(0.05)


def _is_stopped(pid: int) -> bool:
    """Whether the process is stopped (state ``T``/``t`` in Linux ``/proc``; elsewhere never known)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _died(rank: int, process) -> str:
    code = process.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return (f"worker process {rank} died ({how}, pid {process.pid}) before reporting; the other workers were "
            f"stopped. Nothing was written")


def _outcome(scratch: Path, rank: int) -> tuple | None:
    try:
        with open(scratch / f"rank{rank}.pkl", "rb") as handle:
            return pickle.load(handle)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def _worker(rank: int, world: int, port: int, fn, args, scratch: str, timeout: timedelta, owner: dict,
            open_files: int) -> None:
    import threading

    import torch.distributed as dist
    from tqdm import tqdm

    staging.set_owner(owner)  # what this worker stages belongs to the command, which cleans up after it
    _raise_open_files(open_files)
    _end_with_the_command()
    # tqdm's default lock is a multiprocessing semaphore, created with the first bar (even a disabled one);
    # one left by a worker that had to be killed makes the resource tracker warn after the command's error.
    # A worker's bars are its own: a thread lock does.
    tqdm.set_lock(threading.RLock())
    (Path(scratch) / f"rank{rank}.pid").write_text(str(os.getpid()))  # which process is which rank, for people
    joined = False
    try:
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                    timeout=timeout)
        except Exception as error:  # noqa: BLE001 - a start-up failure is this rank's outcome
            raise ExecutorError(f"rank {rank} could not join the process group: {str(error).splitlines()[0]}") from None
        joined = True
        outcome = ("ok", fn(*args))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
        outcome = ("error", str(error) if isinstance(error, ExecutorError) else f"{type(error).__name__}: {error}",
                   traceback.format_exc())
    partial = Path(scratch) / f"rank{rank}.pkl.partial"
    with open(partial, "wb") as handle:
        pickle.dump(outcome, handle)
    os.replace(partial, Path(scratch) / f"rank{rank}.pkl")  # the parent never reads half an outcome
    if joined:
        dist.destroy_process_group()


def _end_with_the_command() -> None:
    """SIGINT to this worker when the command that started it ends, however it ends (SIGKILL included), so
    that a worker never goes on to publish for a command that is gone. torch sets the kernel's parent-death
    signal (SIGINT, which its wrapper takes as a quiet exit) for the workers it starts, but a forked worker's
    parent is the fork server, which outlives the command while any worker lives; multiprocessing's sentinel
    of the process that started this one becomes ready when the command ends, and a thread waits on it."""
    import multiprocessing
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="quantmap-command-watch", daemon=True).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
