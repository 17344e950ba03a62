"""Lists of tensor names as people read them: grouped by shape (layer and expert numbers as ``*``), and sorted
with layer 10 after layer 9. Torch-free: the executor's reports and the formats' summaries both use it."""

from __future__ import annotations

import re
from collections import Counter

_NUMBER = re.compile(r"(\d+)")
_DIGITS = re.compile(r"(?<=\.)\d+(?=\.|$)|(?<=weight)\d+|(?<=bias)\d+")


def group_names(names: list[str]) -> list[tuple[str, int]]:
    """``decoder.layers.3.x`` and ``decoder.layers.7.x`` → ``("decoder.layers.*.x", 2)``, most common first."""
    return Counter(_DIGITS.sub("*", name) for name in names).most_common()


def natural(name: str) -> tuple:
    """Sort key that puts layer 10 after layer 9 (for lists people read); numbers compare by length,
    then digits, so a hostile 5000-digit index sorts without ``int()`` (which refuses it)."""
    return tuple((len(part), part) if part.isdigit() else part for part in _NUMBER.split(name))
