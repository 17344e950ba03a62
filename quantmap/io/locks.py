"""Locks that keep two quantmap commands from writing the same checkpoint or output at once.

Two in-place imports into one checkpoint each read the old ``.metadata`` and rename their own over
it: the last one wins and the other's values are lost, or its cleanup deletes a file the winner's
``.metadata`` points at. Two commands publishing one output race to rename into it. So:

* a command that rewrites a checkpoint in place holds an exclusive lock on its directory, and one that
  reads it to copy or export holds a shared lock (many readers at once, never beside a writer);
* a command that publishes an output holds an exclusive lock on ``.<name>.quantmap-lock`` beside it
  (the output itself does not exist yet); the file is removed when the command ends.

The locks are ``flock(2)`` locks, taken without waiting: a second writer is refused at once with the
holder's pid, command line and host (from Linux's ``/proc/locks``). The kernel releases them when
the process ends, however it ends, so a killed command never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path


class LockError(OSError):
    """Another process holds the lock; the message names it."""


@contextmanager
def directory_lock(directory: str | Path, *, exclusive: bool, purpose: str):
    """Hold a lock on ``directory`` itself (``exclusive`` to write it, shared to read it)."""
    directory = Path(directory)
    descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _take(descriptor, exclusive, directory, purpose)
        yield
    finally:
        os.close(descriptor)  # releases the lock


@contextmanager
def output_lock(target: str | Path):
    """Hold the exclusive lock of the output ``target`` (a file beside it, removed on the way out)."""
    target = Path(target)
    path = target.parent / f".{target.name}.quantmap-lock"
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            raise LockError(f"cannot write the output {target}: {error.strerror} ({target.parent}); "
                            f"choose a writable --out") from None
        try:
            _take(descriptor, True, target, "publishing it")
            if _same_file(descriptor, path):
                break
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)  # locked a file its last holder had just removed: lock the new one
    try:
        yield
    finally:
        try:
            path.unlink()  # while still holding it: a command that opened it before retries on the new one
        except OSError:
            pass
        os.close(descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except OSError:
        return False
    held = os.fstat(descriptor)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _take(descriptor: int, exclusive: bool, what: Path, purpose: str) -> None:
    try:
        fcntl.flock(descriptor, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockError(f"{what} is in use by another process ({holders(descriptor)}), so it cannot be locked "
                        f"for {purpose}; wait for that command to finish and run this one again") from None
    except OSError as error:
        raise LockError(f"cannot lock {what} for {purpose}: {error.strerror}; quantmap needs a file system with "
                        f"flock(2) locks (a local disk)") from None


def holders(descriptor: int) -> str:
    """Who holds ``flock`` locks on the file open as ``descriptor``: pid, command line and host."""
    status = os.fstat(descriptor)
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    pids = []
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if "FLOCK" not in fields or "->" in fields:  # "->": a waiter, not a holder
            continue
        at = fields.index("FLOCK")
        if len(fields) > at + 4 and fields[at + 4] == device and fields[at + 3].isdigit():
            pids.append(int(fields[at + 3]))
    host = socket.gethostname()
    if not pids:
        return f"holder unknown, not listed in /proc/locks on host {host}"
    return "; ".join(f"pid {pid} on host {host}: {_command_line(pid)}" for pid in dict.fromkeys(pids))


def _command_line(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "command unknown"
    text = " ".join(word.decode("utf-8", "replace") for word in words)
    text = "".join(c if c.isprintable() else "?" for c in text)  # one line, whatever the arguments hold
    return text if len(text) <= 300 else text[:297] + "..."
