"""The progress bar: tqdm on a terminal, silent in logs and with ``--quiet``."""

from __future__ import annotations

import sys


def bar(total: int, what: str, enabled: bool, unit: str = "tensor"):
    """A bar over ``total`` ``unit``s; over bytes (``unit="B"``) it counts in kB, MB, GB."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                disable=not enabled or not sys.stderr.isatty(), leave=False)
