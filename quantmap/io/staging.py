"""Write a directory under a temporary name and rename it into place, so that an interrupted or
failed run leaves no partial output behind."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


class OutputError(OSError):
    """The output directory cannot be written."""


class Staged:
    """A fresh sibling directory of ``target``; :meth:`publish` renames it to ``target``."""

    def __init__(self, target: str | Path, path: str | Path | None = None):
        self.target = Path(target)
        if path is not None:  # another rank created it
            self.path = Path(path)
            return
        if self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir())):
            raise OutputError(f"the output {self.target} already exists and is not an empty directory; "
                              f"remove it or choose another --out")
        self.path = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.path.mkdir(parents=True)
        except OSError as error:
            raise OutputError(f"cannot write the output {self.target}: {error.strerror} ({self.target.parent}); "
                              f"choose a writable --out") from None

    def publish(self) -> Path:
        if self.target.is_dir():
            self.target.rmdir()  # empty, checked above
        os.replace(self.path, self.target)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
