"""Write a directory under a temporary name and rename it into place, so that an interrupted or
failed run leaves no partial output behind.

A staging directory (``.<out>.tmp-<pid>-<token>-<random>`` beside the output, or the launcher's
``quantmap-spawn-<pid>-<random>`` scratch directory) holds an owner marker: the host, pid and
process start time of the command that made it, and a token drawn once per command. A run removes
its own by the marker or, for a directory whose maker was killed before it could write the marker,
by the pid and token in its name. A run that exits normally removes its own; a run
that was killed outright (SIGKILL) cannot, so the next run beside the same output removes every
staging directory whose owner process is provably gone (same host, pid no longer running or reused).
Spawned workers stage for their parent command (:func:`set_owner`), so the parent can remove what a
worker it killed left behind.

Inside :func:`command` (what the CLI's export and import run in), a published output keeps its owner
marker until the command has succeeded: a command that fails or is interrupted after its writer
published (a worker stopped or killed on its way out, Ctrl-C just then) removes the output it
published, so that "nothing was written" stays true; one that succeeds removes the marker.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import socket
import tempfile
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path

from quantmap.io.locks import output_lock

MARKER = ".quantmap-owner"
NAME_MAX = 255  # the longest file name POSIX file systems take (ext4, xfs, tmpfs, btrfs)
SCRATCH_PREFIX = "quantmap-spawn-"
SHORT_ROOT = Path("/tmp")  # where a process's scratch goes when the temporary directory's path is too long


class OutputError(OSError):
    """The output directory cannot be written."""


def _stat(pid: int) -> tuple[str, str] | None:
    """The process's state letter and start time (clock ticks since boot, which tells a reused pid
    apart) from Linux ``/proc``; ``None`` elsewhere or when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    stat = _stat(pid)
    return stat and stat[1]


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "token": uuid.uuid4().hex[:8]}


_owner = _this_process()


def set_owner(owner: dict) -> None:
    """Stage for ``owner`` (a :func:`current_owner` of the parent command) instead of this process."""
    global _owner
    _owner = dict(owner)


def current_owner() -> dict:
    return dict(_owner)


def _alive(owner: dict) -> bool:
    """Whether the owner may still be running; ``True`` when that cannot be proven otherwise."""
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process (a shared file system): not ours to judge
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    stat = _stat(pid)
    if stat is None:
        return True  # no /proc: the pid is taken, which is all that can be known
    state, start = stat
    return state != "Z" and (owner.get("start") is None or start == owner.get("start"))


def _make_owned(path: Path) -> None:
    path.mkdir(parents=True)
    try:
        (path / MARKER).write_text(json.dumps(_owner), encoding="utf-8")
    except BaseException:  # an interrupt between the two steps must not leave an unowned directory
        shutil.rmtree(path, ignore_errors=True)
        raise


def _owner_of(path: Path) -> dict | None:
    try:
        owner = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _remove_where(parent: Path, prefix: str, condition) -> list[Path]:
    """Remove the directories in ``parent`` named ``prefix...`` for which ``condition(path, owner)``
    holds (``owner``: the marker's content, ``None`` when there is none)."""
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    removed = [path for path in candidates if condition(path, _owner_of(path))]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _own_staging_prefix(target: Path) -> str:
    """The name every staging directory of this command beside ``target`` starts with."""
    return f"{_staging_prefix(target)}{_owner['pid']}-{_owner['token']}-"


def remove_stale(target: str | Path) -> list[Path]:
    """Remove the staging directories beside ``target`` and the scratch directories in the temporary
    directory that were left by commands that are no longer running (killed outright)."""
    target = Path(target)
    dead = lambda path, owner: owner is not None and not _alive(owner)  # noqa: E731
    roots = dict.fromkeys([Path(tempfile.gettempdir()), SHORT_ROOT])  # process_scratch may use either
    return (_remove_where(target.parent, _staging_prefix(target), dead)
            + [path for root in roots for path in _remove_where(root, SCRATCH_PREFIX, dead)])


def remove_owned(target: str | Path) -> list[Path]:
    """Remove the staging directories beside ``target`` owned by this command (what its killed
    workers, or an interrupted write, left behind). One whose maker was killed before it wrote the
    marker is told by this command's pid and token in its name."""
    target = Path(target)
    own = _own_staging_prefix(target)
    mine = lambda path, owner: owner == _owner or (owner is None and path.name.startswith(own))  # noqa: E731
    return _remove_where(target.parent, _staging_prefix(target), mine)


def check_target(target: str | Path) -> Path:
    """Refuse an output that cannot be staged and published, before any work is done."""
    target = Path(target)
    if target.is_symlink():
        raise OutputError(f"the output {target} is a symbolic link; quantmap replaces the output directory as a "
                          f"whole, so give the real path (or remove the link)")
    probe = f"{_own_staging_prefix(target)}{'0' * 8}"
    if len(probe.encode()) > NAME_MAX:
        raise OutputError(f"the output name {target.name[:40]}... is too long: with quantmap's staging suffix it "
                          f"exceeds {NAME_MAX} bytes; choose a --out name of at most "
                          f"{NAME_MAX - len(probe.encode()) + len(target.name.encode())} bytes")
    try:
        exists = target.exists()
    except OSError as error:
        raise OutputError(f"cannot use the output {target}: {error.strerror}; choose another --out") from None
    if exists and (not target.is_dir() or any(target.iterdir())):
        raise OutputError(f"the output {target} already exists and is not an empty directory; "
                          f"remove it or choose another --out")
    return target


class Staged:
    """A fresh sibling directory of ``target``; :meth:`publish` renames it to ``target``."""

    def __init__(self, target: str | Path, path: str | Path | None = None):
        self.target = Path(target)
        if path is not None:  # another rank created it
            self.path = Path(path)
            return
        check_target(self.target)
        self.path = self.target.parent / f"{_own_staging_prefix(self.target)}{uuid.uuid4().hex[:8]}"
        try:
            _make_owned(self.path)
        except OSError as error:
            shutil.rmtree(self.path, ignore_errors=True)
            raise OutputError(f"cannot write the output {self.target}: {error.strerror} ({self.target.parent}); "
                              f"choose a writable --out") from None

    def publish(self) -> Path:
        if not _owner.get("command"):  # inside command(): the marker stays until the command has succeeded
            (self.path / MARKER).unlink(missing_ok=True)
        try:
            if self.target.is_dir():
                self.target.rmdir()  # empty, checked above
            os.replace(self.path, self.target)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise OutputError(f"the output {self.target} was created by another process while this command ran "
                              f"(it is not empty now); nothing was written: remove it or choose another --out, "
                              f"and do not run two commands with one --out") from None
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def command(target: str | Path, *, lock: bool = True):
    """Run a command that publishes ``target``: on success its owner marker is removed from the output; on
    any failure or interrupt an output this command published is removed with its staging directories.
    The command holds the output's lock (:func:`quantmap.io.locks.output_lock`) throughout, unless
    ``lock`` is false (torchrun's ranks each run the command: the writer's publish is the only one)."""
    target = Path(target)
    with output_lock(target) if lock else nullcontext():
        with _cleaning_up(target):
            yield


@contextmanager
def _cleaning_up(target: Path):
    was_empty_directory = target.is_dir() and not target.is_symlink()  # check_target: absent or empty
    _owner["command"] = True
    try:
        yield
    except BaseException:
        remove_owned(target)
        if _published_here(target):
            shutil.rmtree(target, ignore_errors=True)
            if was_empty_directory:
                target.mkdir()
        raise
    else:
        if _published_here(target):
            (target / MARKER).unlink(missing_ok=True)
    finally:
        _owner.pop("command", None)


def _published_here(target: Path) -> bool:
    """Whether ``target`` is an output this command published (it still carries the command's marker)."""
    return target.is_dir() and not target.is_symlink() and _owner_of(target) == _owner


@contextmanager
def scratch_directory():
    """A temporary directory owned by this command (removed on exit, or by a later run if killed)."""
    path = _new_scratch()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


_process_scratch: Path | None = None


def process_scratch(longest: int) -> Path:
    """A temporary directory owned by this process for as long as it runs: removed when it exits, or by a
    later run if it was killed (as :func:`scratch_directory`'s are). Its path is at most ``longest``
    characters (a socket's path must fit in 107 bytes): where the temporary directory's is too long (a test
    runner's ``TMPDIR``), it lies in ``/tmp``, as Python 3.13's multiprocessing puts its own."""
    global _process_scratch
    if _process_scratch is None:
        root = Path(tempfile.gettempdir())
        if len(str(_scratch_path(root))) > longest and SHORT_ROOT.is_dir():
            root = SHORT_ROOT
        _process_scratch = _new_scratch(root)
        atexit.register(shutil.rmtree, _process_scratch, True)
    return _process_scratch


def _scratch_path(root: Path) -> Path:
    return root / f"{SCRATCH_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _new_scratch(root: Path | None = None) -> Path:
    path = _scratch_path(root or Path(tempfile.gettempdir()))
    _make_owned(path)
    return path
