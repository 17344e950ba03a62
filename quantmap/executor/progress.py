"""The progress bar: tqdm on a terminal, silent in logs and with ``--quiet``."""

from __future__ import annotations

import sys


def bar(total: int, what: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="tensor", disable=not enabled or not sys.stderr.isatty(), leave=False)
