"""Hostile inputs and hostile processes against ``quantmap export`` / ``import``: each must end with one
clear ``error:`` line (or a usage error), leave nothing behind beside the output or in the temporary
directory, and never hang.

The input cases are DATA: one ``Case`` row each (how to spoil a fresh workspace, the command, the exit
code, a phrase of the message), so a new hostile input is one line. The process cases (a stopped,
killed or failing worker; SIGINT, SIGTERM, SIGKILL of the command) run the real CLI as a subprocess
and send real signals to real processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
from typer.testing import CliRunner

from executor_support import SPECS, global_state, shard
from quantmap.cli import app
from quantmap.executor import ParallelLayout
from quantmap.io.hf import INDEX
from quantmap.io.shards import save_shard

SPEC = str(SPECS / "moe_seq.yaml")
LAYOUT = ParallelLayout(pp=2, num_layers=2, num_experts=2)  # two ranks: --nproc 2
SHARD = "model-00001-of-00001.safetensors"


class Workspace(NamedTuple):
    """A fresh copy of a good shard directory (``meg``) and its export (``hf``); ``out`` does not exist."""

    root: Path
    meg: Path
    hf: Path
    out: Path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    for rank, state in enumerate(shard(global_state("seq", 2, 2), LAYOUT)):
        save_shard(state, LAYOUT, root / "meg", rank=rank)
    done = CliRunner().invoke(app, ["export", SPEC, "--megatron", str(root / "meg"), "--out", str(root / "hf"), "-q"])
    assert done.exit_code == 0, done.output
    return root


@pytest.fixture
def ws(pristine, tmp_path) -> Workspace:
    for name in ("meg", "hf"):
        shutil.copytree(pristine / name, tmp_path / name)
    return Workspace(tmp_path, tmp_path / "meg", tmp_path / "hf", tmp_path / "out")


# -- how to spoil a workspace ---------------------------------------------------------------------

def layout_text(text: str | bytes) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        path = ws.meg / "layout.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return build


def layout_keys(**changes) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        path = ws.meg / "layout.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return build


def weight_map(change: Callable[[dict], None]) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        path = ws.hf / INDEX
        data = json.loads(path.read_text())
        change(data["weight_map"])
        path.write_text(json.dumps(data))
    return build


def first_name_twice(ws: Workspace) -> None:
    """The index lists its first tensor a second time, at the end (JSON allows it; the last entry would win)."""
    path = ws.hf / INDEX
    data = json.loads(path.read_text())
    pairs = [*data["weight_map"].items(), (next(iter(data["weight_map"])), SHARD)]
    entries = ", ".join(f"{json.dumps(name)}: {json.dumps(file)}" for name, file in pairs)
    path.write_text(f'{{"metadata": {json.dumps(data["metadata"])}, "weight_map": {{{entries}}}}}')


def first_value(value) -> Callable[[dict], None]:
    return lambda wm: wm.__setitem__(next(iter(wm)), value)


def shard_bytes(change: Callable[[bytes], bytes]) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        path = ws.hf / SHARD
        path.write_bytes(change(path.read_bytes()))
    return build


def shard_is_a_directory(ws: Workspace) -> None:
    (ws.hf / SHARD).unlink()
    (ws.hf / SHARD).mkdir()


def out_is_a_symlink(ws: Workspace) -> None:
    (ws.root / "real").mkdir()
    ws.out.symlink_to(ws.root / "real")


def layout_is_a_fifo(ws: Workspace) -> None:
    (ws.meg / "layout.json").unlink()
    os.mkfifo(ws.meg / "layout.json")


def unpadded_rank_file(ws: Workspace) -> None:
    shutil.copy(ws.meg / "rank_00001.safetensors", ws.meg / "rank_1.safetensors")


def names_file(ws: Workspace) -> None:
    (ws.root / "names.txt").write_bytes(b"decoder.layers.0.self_attention.linear_qkv.input_quantizer._amax\n\xff\xfe\n")


def nothing(ws: Workspace) -> None:
    pass


HUGE_LAYER = "model.layers." + "9" * 5000 + ".self_attn.k_proj.input_quantizer._amax"
IMPORT = ["import", SPEC, "--hf", "{hf}", "--layout", "{meg}", "--out", "{out}"]
EXPORT = ["export", SPEC, "--megatron", "{meg}", "--out", "{out}"]
LONG = ["--out", "{root}/" + "o" * 245]  # a valid name, too long once ".<name>.tmp-<pid>-<token>-<random>" is made of it


class Case(NamedTuple):
    id: str
    build: Callable[[Workspace], None]
    argv: list[str]
    rc: int
    phrase: str
    env: dict | None = None


CASES = [
    Case("layout is [1]", layout_text("[1]"), IMPORT, 1, "a layout must be a JSON object"),
    Case("layout is null", layout_text("null"), EXPORT, 1, "a layout must be a JSON object"),
    Case("layout is a string", layout_text('"tp=2"'), IMPORT, 1, "a layout must be a JSON object"),
    Case("layout not UTF-8", layout_text(b'{"tp": 1\xff}'), EXPORT, 1, "is not UTF-8 text"),
    Case("layout 5000-digit size", layout_text('{"tp": 1' + "0" * 5000 + ', "pp": 1, "dp": 1, "num_layers": 2}'),
         IMPORT, 1, "cannot be read as a layout"),
    Case("layout is a named pipe", layout_is_a_fifo, IMPORT, 1, "is not a regular file"),
    Case("rank file not named with five digits", unpadded_rank_file, EXPORT, 1, "rank_1.safetensors: a rank file is"),
    Case("layers_per_stage: 5", layout_keys(layers_per_stage=5), IMPORT, 1, "layers_per_stage must be a list"),
    Case("absurd layout (import)", layout_keys(tp=10_000_000, dp=1_000_000_000), IMPORT, 1,
         "exceeds quantmap's bound of 131072 ranks"),
    Case("absurd layout (export)", layout_keys(tp=10_000_000, dp=1_000_000_000), EXPORT, 1,
         "exceeds quantmap's bound of 131072 ranks"),
    Case("truncated HF shard", shard_bytes(lambda b: b[: len(b) // 2]), IMPORT, 1, "corrupt or truncated"),
    Case("garbage HF shard", shard_bytes(lambda b: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b[24:]),
         IMPORT, 1, "corrupt or truncated"),
    Case("HF shard is a directory", shard_is_a_directory, IMPORT, 1, "is not a file"),
    Case("weight_map value a number", weight_map(first_value(7)), IMPORT, 1, "each value must be the name of a shard"),
    Case("weight_map value a list", weight_map(first_value([SHARD])), IMPORT, 1, "each value must be the name"),
    Case("weight_map value null", weight_map(first_value(None)), IMPORT, 1, "each value must be the name"),
    Case("weight_map escapes --hf", weight_map(first_value("../meg/rank_00000.safetensors")), IMPORT, 1,
         "inside"),
    Case("weight_map lists a tensor twice", first_name_twice, IMPORT, 1, "is listed twice"),
    Case("weight_map absolute", weight_map(first_value("/etc/passwd")), IMPORT, 1, "inside"),
    Case("5000-digit layer index", weight_map(lambda wm: wm.__setitem__(HUGE_LAYER, SHARD)), IMPORT + ["--strict"],
         1, "no rank of the layout holds"),
    Case("output is a symlink", out_is_a_symlink, EXPORT, 1, "is a symbolic link"),
    Case("output is a symlink (import)", out_is_a_symlink, IMPORT, 1, "is a symbolic link"),
    Case("output name too long", nothing, EXPORT[:-2] + LONG, 1, "too long: with quantmap's staging suffix"),
    Case("lookup --from-file not UTF-8", names_file, ["lookup", SPEC, "--from-file", "{root}/names.txt"], 1,
         "line 2 is not UTF-8"),
    Case("--timeout 1e15", nothing, EXPORT + ["--timeout", "1000000000000000"], 2,
         "Invalid value for '--timeout'"),
    Case("stray WORLD_SIZE/RANK, offline", nothing, EXPORT, 1, "cannot join the torchrun process group",
         {"WORLD_SIZE": "2", "RANK": "0"}),
    Case("stray WORLD_SIZE/RANK with --nproc", nothing, IMPORT + ["--nproc", "2", "-q"], 0, "",
         {"WORLD_SIZE": "8", "RANK": "3"}),
]


def staging_left(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.root.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if "--nproc" in c.argv else c for c in CASES],
                         ids=[c.id for c in CASES])  # a case that starts gloo workers is slow
def test_a_hostile_input_gets_one_clear_error_and_leaves_nothing(ws, case):
    case.build(ws)
    argv = [a.format(**ws._asdict()) for a in case.argv]
    result = CliRunner().invoke(app, argv, env=case.env)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == case.rc, result.output
    assert case.phrase in result.output
    assert "Traceback" not in result.output
    if case.rc == 1:
        assert sum(line.startswith("error:") for line in result.output.splitlines()) == 1, result.output
    if case.rc:
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        assert out is None or not out.exists() or out.is_symlink() and not any(out.iterdir())
    assert staging_left(ws) == []


# -- a full disk: a real, tiny tmpfs ------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("command", ["import", "export"])
def test_a_full_disk_gets_one_clear_error_and_leaves_nothing(ws, tiny_disk, command):
    (tiny_disk / "filler").write_bytes(b"\0" * 12 * 1024)  # what is left cannot hold the output
    argv = [a.format(**ws._asdict()) for a in (IMPORT if command == "import" else EXPORT)]
    argv[argv.index("--out") + 1] = str(tiny_disk / "out")
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error:") and result.output.count("\n") == 1, result.output
    assert "No space left on device" in result.output
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


# -- numpy: only torch's object collectives need it ---------------------------------------------

@pytest.mark.slow
def test_export_and_import_run_without_numpy(ws):
    """quantmap's own code never goes through numpy (torch.distributed's object collectives do, so it
    is a declared dependency): one process exports and imports where importing numpy fails."""
    program = ("import sys; sys.modules['numpy'] = None\n"
               "from quantmap.cli import main; sys.argv = ['quantmap'] + sys.argv[1:]; main()")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for argv in (EXPORT[:-1] + [str(ws.root / "hf2")], IMPORT[:-1] + [str(ws.root / "meg2")]):
        argv = [a.format(**{**ws._asdict(), "hf": ws.root / "hf2" if "import" in argv else ws.hf}) for a in argv]
        done = subprocess.run([sys.executable, "-c", program, *argv, "-q"], capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (ws.root / "meg2").iterdir()) == sorted(p.name for p in ws.meg.iterdir())


# -- hostile processes: real CLI subprocesses, real signals --------------------------------------

TIMEOUT_S = 4
SLOW_NAMES = 40_000  # rank 1's shard carries this many unclaimed names: its pack takes seconds


@pytest.fixture(scope="module")
def slow_meg(pristine, tmp_path_factory) -> Path:
    """The good shard directory, except that rank 1's file also holds many names no rule claims, so
    that rank 1 is still packing while the writer has created its staging directory."""
    from quantmap.io.safetensors_stream import write_state
    from quantmap.io.shards import LazyShard

    directory = tmp_path_factory.mktemp("slow") / "meg"
    shutil.copytree(pristine / "meg", directory)
    rank1 = LazyShard(directory / "rank_00001.safetensors")
    state = {name: rank1[name] for name in rank1}
    zero = torch.zeros(1)
    state.update({f"decoder.layers.0.mlp.extra_{i}.weight": zero for i in range(SLOW_NAMES)})
    write_state(directory / "rank_00001.safetensors", state)
    return directory


@pytest.fixture
def slow(slow_meg, ws) -> Workspace:
    shutil.rmtree(ws.meg)
    shutil.copytree(slow_meg, ws.meg)
    (ws.root / "tmp").mkdir()
    return ws


def start(ws: Workspace, *extra: str, program: str | None = None, path: tuple[str, ...] = (),
          command: list[str] = EXPORT) -> subprocess.Popen:
    """``quantmap export`` (or ``command``) of ``ws`` to ``ws.out`` on 2 spawned workers, its temporary
    directory in ``ws.root/tmp`` (so that leftovers there can be seen); ``path``: directories put before the
    checkout on every process's PYTHONPATH."""
    argv = [a.format(**ws._asdict()) for a in command] + ["--nproc", "2", "--timeout", str(TIMEOUT_S), "-q", *extra]
    head = ["-c", program] if program else ["-m", "quantmap"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, os.getcwd()]), "TMPDIR": str(ws.root / "tmp")}
    # As a foreground command gets it: a suite started in the background of a script inherits SIGINT
    # ignored, and so would the command, which then (rightly) ignores Ctrl-C.
    foreground = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return subprocess.Popen([sys.executable, *head, *argv], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=foreground)


def wait_for(condition, what: str, limit: float = 120.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


def worker_pids(ws: Workspace) -> dict[int, int]:
    """Rank → pid of the running command's workers, from the files the launcher keeps for that."""
    pids = {}
    for file in (ws.root / "tmp").glob("quantmap-spawn-*/rank*.pid"):
        text = file.read_text()
        if text:
            pids[int(file.name[4:-4])] = int(text)
    return pids


def staging_appeared(ws: Workspace) -> dict[int, int] | None:
    """The workers, once the writer has made its staging directory (rank 1 is still packing then)."""
    pids = worker_pids(ws)
    return pids if len(pids) == 2 and staging_left(ws) else None


def process_state(pid: int) -> str | None:
    """The process's state letter (``T``: stopped, ``Z``: a zombie), or ``None`` once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def ended(command: subprocess.Popen, pids, timeout: float = 60) -> str:
    """The command's stderr once it has ended; any worker still alive then is killed."""
    try:
        return command.communicate(timeout=timeout)[1]
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def with_hook(ws: Workspace, sitecustomize: str) -> tuple[str]:
    """A directory holding ``sitecustomize``, for :func:`start`'s ``path``: every process of the command runs it."""
    hook = ws.root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(sitecustomize)
    (ws.root / "tmp").mkdir()
    return (str(hook),)


def assert_nothing_left(ws: Workspace, pids) -> None:
    assert not ws.out.exists(), "a run that failed published its output"
    assert staging_left(ws) == [], "a staging directory was left beside the output"
    assert list((ws.root / "tmp").iterdir()) == [], "the launcher's temporary directory was left behind"
    assert not any(alive(pid) for pid in pids), "a worker outlived the command"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked from a fork server on Linux")
def test_workers_are_forked_from_one_fork_server_the_command_started_and_it_leaves_nothing(slow):
    """Not started each from nothing (a new Python importing torch, ~2 s of CPU per worker): forked from
    multiprocessing's fork server, which imported torch once; it and its socket go with the command."""
    command = start(slow)
    pids = wait_for(lambda: staging_appeared(slow), "the staging directory")
    servers = {parent_of(pid) for pid in pids.values()}
    assert len(servers) == 1 and command.pid not in servers, "each worker's parent is the one fork server"
    server = servers.pop()
    assert parent_of(server) == command.pid
    assert "multiprocessing.forkserver" in Path(f"/proc/{server}/cmdline").read_bytes().decode()
    _, stderr = command.communicate(timeout=120)
    assert command.returncode == 0, stderr
    wait_for(lambda: not alive(server), "the fork server to end with the command", 30)
    assert (slow.out / INDEX).is_file() and staging_left(slow) == []
    for root in (slow.root / "tmp", Path("/tmp")):  # the socket's scratch is in /tmp where TMPDIR's path is long
        assert not list(root.glob(f"quantmap-spawn-{command.pid}-*")), "the fork server's scratch was left"


@pytest.mark.parametrize("rank", [0, 1], ids=["writer stopped", "other rank stopped"])
@pytest.mark.slow
def test_a_stopped_worker_is_killed_and_named_within_the_timeout(slow, rank):
    command = start(slow)
    pids = wait_for(lambda: staging_appeared(slow), "the staging directory")
    os.kill(pids[rank], signal.SIGSTOP)
    assert_stopped_rank_killed_and_named(command, pids, rank)
    assert_nothing_left(slow, pids.values())


def assert_stopped_rank_killed_and_named(command: subprocess.Popen, pids: dict[int, int], rank: int) -> None:
    """The command, whose worker ``rank`` is stopped now, ends within --timeout + a few seconds with one
    error that names that worker and says it was killed."""
    stopped = time.monotonic()
    stderr = ended(command, pids.values(), TIMEOUT_S + 60)
    assert time.monotonic() - stopped < TIMEOUT_S + 10, "not ended within --timeout + a few seconds"
    assert command.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"worker rank {rank} (pid {pids[rank]})" in last and "killed" in last, stderr
    assert "Traceback" not in stderr


# A sitecustomize that every process of the command runs (workers inherit it from the fork server): in a
# worker (a process multiprocessing started), rank {rank} stops itself as it starts its part of an import.
STOP_AT_IMPORT = """\
import multiprocessing, os, signal

from quantmap.executor import importer

import_rank = importer.import_rank

def stop_then_import(catalog, checkpoint, placement):
    if multiprocessing.parent_process() is not None and placement.coords.rank == {rank}:
        os.kill(os.getpid(), signal.SIGSTOP)
    return import_rank(catalog, checkpoint, placement)

importer.import_rank = stop_then_import
"""


@pytest.mark.parametrize("rank", [0, 1], ids=["writer stopped", "other rank stopped"])
@pytest.mark.slow
def test_a_stopped_worker_of_an_import_is_killed_and_named_within_the_timeout(ws, rank):
    command = start(ws, path=with_hook(ws, STOP_AT_IMPORT.format(rank=rank)), command=IMPORT)
    pids = wait_for(lambda: (p := worker_pids(ws)) and len(p) == 2 and p, "the workers")
    wait_for(lambda: process_state(pids[rank]) == "T", f"rank {rank}, stopped at its import")
    assert_stopped_rank_killed_and_named(command, pids, rank)
    assert_nothing_left(ws, pids.values())


@pytest.mark.slow
def test_a_worker_that_dies_ends_the_command_with_its_rank_and_leaves_nothing(slow):
    command = start(slow)
    pids = wait_for(lambda: staging_appeared(slow), "the staging directory")
    os.kill(pids[1], signal.SIGKILL)
    _, stderr = command.communicate(timeout=60)
    assert command.returncode == 1, stderr
    assert f"error: worker process 1 died (killed by SIGKILL, pid {pids[1]})" in stderr
    assert_nothing_left(slow, pids.values())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_a_signal_to_the_command_aborts_without_publishing_and_leaves_nothing(slow, signum):
    command = start(slow)
    pids = wait_for(lambda: staging_appeared(slow), "the staging directory")
    os.kill(pids[1], signal.SIGSTOP)  # the run cannot finish on its own before the signal is handled
    os.kill(command.pid, signum)  # the command alone, as Ctrl-C in another terminal or a job scheduler does
    stderr = ended(command, pids.values())
    assert command.returncode == 128 + signum, stderr
    assert stderr.strip() == f"error: interrupted by {signal.Signals(signum).name}; nothing was written"
    assert_nothing_left(slow, pids.values())


@pytest.mark.slow
def test_the_workers_of_a_command_killed_outright_end_on_their_own_and_publish_nothing(slow):
    """SIGKILL to the command alone: nothing of it runs to clean up, and its workers' parent is the fork server,
    not the command; each worker still sees the command end and stops before it can publish."""
    command = start(slow)
    pids = wait_for(lambda: staging_appeared(slow), "the staging directory")
    os.kill(command.pid, signal.SIGKILL)
    command.wait()
    wait_for(lambda: not any(alive(pid) for pid in pids.values()), "the workers to end on their own", 30)
    time.sleep(1)  # anything a worker had left to do would be done by now
    assert not slow.out.exists(), "a worker published the output of a command that was gone"


@pytest.mark.slow
def test_a_later_run_removes_what_a_killed_command_left_and_only_that(slow):
    command = start(slow)
    pids = wait_for(lambda: staging_appeared(slow), "the staging directory")
    os.kill(command.pid, signal.SIGKILL)  # nothing of the command runs any more
    command.wait()
    for pid in pids.values():  # the workers hear of it (parent-death signal) but may not clean up: be sure
        os.kill(pid, signal.SIGKILL) if alive(pid) else None
    left, scratch = staging_left(slow), list((slow.root / "tmp").iterdir())
    assert left and scratch, "precondition: a SIGKILLed command leaves staging behind"
    live = slow.root / f".out.tmp-{os.getpid()}-live"  # staging of a command that is still running (this one)
    live.mkdir()
    (live / ".quantmap-owner").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "start": None}))
    again = start(slow)
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert staging_left(slow) == [live.name], "the dead command's staging stays, or a live one's was removed"
    assert list((slow.root / "tmp").iterdir()) == []
    assert (slow.out / INDEX).is_file() and not (slow.out / ".quantmap-owner").exists()


@pytest.mark.slow
def test_a_worker_failing_at_start_up_gives_one_clear_error(slow):
    """The rendezvous port is taken (by this test) between its choice and its use."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        program = ("import sys; import quantmap.executor.launch as launch\n"
                   f"launch._free_port = lambda: {taken.getsockname()[1]}\n"
                   "from quantmap.cli import main; sys.argv = ['quantmap'] + sys.argv[1:]; main()")
        command = start(slow, program=program)
        _, stderr = command.communicate(timeout=60)
    assert command.returncode == 1, stderr
    assert stderr.startswith("error: rank 0 could not join the process group") and stderr.count("\n") == 1, stderr
    assert_nothing_left(slow, [])


# A sitecustomize that every process of the command runs (workers inherit it from the fork server): in a
# worker (alone), the writer stops itself just after publishing the output, before it has told the command
# that it succeeded.
STOP_AFTER_PUBLISH = """\
import multiprocessing, os, signal

from quantmap.io import staging

publish = staging.Staged.publish

def publish_then_stop(self):
    published = publish(self)
    if multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGSTOP)
    return published

staging.Staged.publish = publish_then_stop
"""


@pytest.mark.parametrize("ending", ["killed after --timeout", "SIGINT"])
@pytest.mark.slow
def test_a_command_that_fails_after_its_writer_published_leaves_no_output(ws, ending):
    """"Nothing was written" must stay true when the writer is stopped (or the command interrupted) between
    publishing the output and reporting success: the command removes the output it published."""
    command = start(ws, path=with_hook(ws, STOP_AFTER_PUBLISH))
    pids = wait_for(lambda: (p := worker_pids(ws)) and len(p) == 2 and p, "the workers")
    wait_for(lambda: ws.out.is_dir() and process_state(pids[0]) == "T", "the writer, stopped after publishing")
    if ending == "SIGINT":
        os.kill(command.pid, signal.SIGINT)
    stderr = ended(command, pids.values(), TIMEOUT_S + 60)
    if ending == "SIGINT":
        assert command.returncode == 128 + signal.SIGINT, stderr
        assert stderr.strip() == "error: interrupted by SIGINT; nothing was written"
    else:
        assert command.returncode == 1, stderr
        assert f"worker rank 0 (pid {pids[0]}) was stopped for more than --timeout" in stderr, stderr
        assert stderr.strip().endswith("Nothing was written"), stderr
    assert_nothing_left(ws, pids.values())


@pytest.mark.slow
def test_a_command_that_succeeds_leaves_no_owner_marker_in_its_output(ws):
    for argv in (EXPORT, IMPORT, IMPORT + ["--nproc", "2"]):
        out = ws.root / f"out-{len(list(ws.root.iterdir()))}"
        argv = [a.format(**{**ws._asdict(), "out": out}) for a in argv]
        result = CliRunner().invoke(app, argv + ["-q"])
        assert result.exit_code == 0, result.output
        assert out.is_dir() and not (out / ".quantmap-owner").exists(), sorted(p.name for p in out.iterdir())
