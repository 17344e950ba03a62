"""Opening the files of a torch_dist checkpoint, confined to the checkpoint directory.

Every path quantmap reads in a checkpoint comes from the checkpoint itself: ``.metadata``'s
``relative_path`` of each chunk, the files of the iteration directory an import copies,
``modelopt_state/``. A hostile or odd checkpoint must not make quantmap read (or publish a copy
that refers to) files elsewhere, nor hang it, so every such path is checked here:

* it is relative and has no ``..`` (the ``.metadata`` text itself);
* once its symbolic links are resolved it still lies inside the checkpoint directory (a ``.distcp``
  linked to a sibling file, or ``modelopt_state/`` linked to a directory beside it, is read as what
  it points to; one that leads out of the checkpoint is refused);
* it is a regular file: reading a named pipe or a device would block forever. The file is opened
  with ``O_NONBLOCK`` and checked again on the open descriptor, so a pipe put there after the check
  cannot hang the read either.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from quantmap.untrusted import describe_special


class TorchDistError(ValueError):
    """A torch_dist checkpoint that cannot be read or written; the message names the file and the fix."""


def is_relative_inside(relative) -> bool:
    """Whether ``relative`` (a path a checkpoint records) names something under its directory, by its text."""
    if not isinstance(relative, str) or not relative or "\0" in relative or relative.startswith("\\"):
        return False
    path = PurePosixPath(relative)
    return not path.is_absolute() and ".." not in path.parts


def resolve_inside(root: str | Path, relative: str | Path) -> Path:
    """The real path of ``root / relative``, links resolved, which must exist and lie inside ``root``."""
    root, path = Path(root), Path(root) / relative
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise TorchDistError(f"{path}: missing (or a symbolic link to nothing); the checkpoint names it, so "
                             f"restore it from the original checkpoint") from None
    except (OSError, RuntimeError) as error:  # a link loop: RuntimeError before Python 3.13
        raise TorchDistError(f"{path}: cannot resolve it ({getattr(error, 'strerror', None) or error}); "
                             f"replace the symbolic link with the file") from None
    if not real.is_relative_to(root.resolve()):
        raise TorchDistError(f"{path}: leads outside the checkpoint directory {root} (to {real}); quantmap reads "
                             f"only files inside the checkpoint: copy the file in place of the link")
    return real


def regular_file(root: str | Path, relative: str | Path) -> Path:
    """The real path of the regular file ``relative`` names inside ``root`` (see :func:`resolve_inside`)."""
    real = resolve_inside(root, relative)
    try:
        mode = real.stat().st_mode
    except OSError as error:
        raise TorchDistError(f"{Path(root) / relative}: cannot read it: {error.strerror}") from None
    _require_regular(Path(root) / relative, mode)
    return real


def open_regular(root: str | Path, relative: str | Path, buffering: int = -1):
    """``root / relative`` opened for reading in binary mode, once it is known to be a regular file inside
    ``root``; never blocks on a named pipe or a device."""
    real = regular_file(root, relative)
    try:
        descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise TorchDistError(f"{Path(root) / relative}: cannot read it: {error.strerror}") from None
    try:
        _require_regular(Path(root) / relative, os.fstat(descriptor).st_mode)  # swapped after the check
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb", buffering=buffering)
    except BaseException:
        os.close(descriptor)
        raise


def _require_regular(path: Path, mode: int) -> None:
    kind = describe_special(mode)
    if kind:
        raise TorchDistError(f"{path}: is {kind}, not a regular file; a checkpoint's files are plain files "
                             f"(reading this one could block forever): replace it with the real file")
