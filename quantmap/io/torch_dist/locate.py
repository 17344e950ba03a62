"""Finding the PyTorch Distributed Checkpoint inside what a user points at.

Megatron-LM's ``save_checkpoint`` writes a save directory holding ``latest_checkpointed_iteration.txt``
(an iteration number, or ``release``) beside ``iter_{N:07d}/`` or ``release/``; the DCP files
(``.metadata``, ``__<rank>_<thread>.distcp``) live in that iteration directory, with ``common.pt``,
``metadata.json`` and ``modelopt_state/``. quantmap's own shard directory holds ``layout.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantmap.io.torch_dist.files import TorchDistError
from quantmap.io.torch_dist.metadata import METADATA_FILE
from quantmap.limits import MAX_TRACKER_BYTES, over
from quantmap.parallel import LAYOUT_FILE
from quantmap.untrusted import MAX_DIGITS, decimal

TRACKER = "latest_checkpointed_iteration.txt"


@dataclass(frozen=True)
class CheckpointLocation:
    """The DCP directory to read, and the save directory and iteration it came from (if any)."""

    path: Path
    save_dir: Path | None = None
    tracker: str | None = None  # what the tracker file should say for this iteration


def is_shard_directory(path: str | Path) -> bool:
    return (Path(path) / LAYOUT_FILE).is_file()


def is_torch_dist(path: str | Path) -> bool:
    """Whether ``path`` looks like a torch_dist save or iteration directory (by its files)."""
    path = Path(path)
    return (path / METADATA_FILE).is_file() or (path / TRACKER).is_file() or \
        (path / "release").is_dir() or any(path.glob("iter_[0-9]*"))


def iteration_dir(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def _read_tracker(tracker: Path) -> str:
    """The tracker's text, of which no more than the limit is read (a 100 MB file is refused, not echoed)."""
    try:
        with tracker.open("rb") as stream:
            raw = stream.read(MAX_TRACKER_BYTES + 1)
    except OSError as error:
        raise TorchDistError(f"{tracker}: cannot read it: {error.strerror}") from None
    if len(raw) > MAX_TRACKER_BYTES:
        raise TorchDistError(f"{tracker}: {over('the file', tracker.stat().st_size, MAX_TRACKER_BYTES)} bytes; it "
                             f"should hold an iteration number or 'release' (or pass --iteration N)")
    return raw.decode("utf-8", errors="replace").strip()


def locate(path: str | Path, iteration: int | None = None) -> CheckpointLocation:
    """The iteration directory of a save directory (the tracker's, or ``iteration``), or ``path`` itself."""
    path = Path(path)
    if not path.is_dir():
        raise TorchDistError(f"{path}: no such directory; give a Megatron save directory, an iter_NNNNNNN/release "
                             f"directory or a quantmap shard directory")
    if is_shard_directory(path) and not (path / METADATA_FILE).is_file():
        raise TorchDistError(f"{path} is a quantmap shard directory ({LAYOUT_FILE}), not a torch_dist checkpoint; "
                             f"import into one with --layout, and export it without --iteration")
    if (path / METADATA_FILE).is_file():
        if iteration is not None:
            raise TorchDistError(f"{path} is one iteration's checkpoint already; --iteration picks an iteration of "
                                 f"a save directory (the one holding {TRACKER})")
        return CheckpointLocation(path)
    tracker = path / TRACKER
    if iteration is None:
        if not tracker.is_file():
            raise TorchDistError(f"{path}: not a Megatron checkpoint: it holds neither {METADATA_FILE} (an iteration "
                                 f"directory) nor {TRACKER} (a save directory) nor {LAYOUT_FILE} (a quantmap shard "
                                 f"directory)")
        text = _read_tracker(tracker)
        named = "release" if text == "release" else decimal(text)
        if named is None:
            shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text)} characters)"
            raise TorchDistError(f"{tracker}: says {shown}; it should hold an iteration number (at most "
                                 f"{MAX_DIGITS} digits) or 'release'")
    else:
        named = iteration
    target = path / iteration_dir(named)
    if not (target / METADATA_FILE).is_file():
        have = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / METADATA_FILE).is_file())
        source = f"--iteration {iteration}" if iteration is not None else f"{tracker} names iteration {named}"
        raise TorchDistError(f"{source}, but {target} holds no checkpoint ({METADATA_FILE} missing); "
                             f"iterations present: {', '.join(have) or 'none'}; pass --iteration N for one of them")
    return CheckpointLocation(target, path, str(named))
