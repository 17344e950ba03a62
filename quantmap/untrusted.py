"""Numbers and JSON read from files and flags that anyone may have written.

A path named on the command line or in a file may also be a named pipe or a device, which a read would
wait on forever: :func:`special_file` says so before anything opens it.

Python's own parsers fail on such text with errors no user should see: ``int()`` refuses 4300+
digits (a ``ValueError`` about ``sys.set_int_max_str_digits``) and takes ``'²'``, which
``str.isdigit()`` lets through, for no number at all; ``json.loads`` does the same to a long
integer and recurses once per nesting level (``RecursionError``). Every reader of a count, an
index or a JSON file uses these two functions and names its own source in its own error.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

MAX_DIGITS = 18  # every index and size of a model fits (and int64 holds it); int() refuses 4300+ digits


def decimal(text: str) -> int | None:
    """``text`` as a non-negative integer when it is 1 to :data:`MAX_DIGITS` ASCII digits, else ``None``
    (``'²'``, ``'٣'``, ``'+1'``, ``' 1'`` and a 5000-digit number are not counts a checkpoint or a flag holds)."""
    if 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None


def parse_json(text: str | bytes, object_pairs_hook=None):
    """``json.loads(text)``; every way it can fail is a ``ValueError`` whose message says why (invalid
    JSON, an integer too long to convert, nesting too deep), for the caller to prefix with the file.
    ``object_pairs_hook`` is ``json``'s (a reader that refuses duplicate keys passes one)."""
    try:
        return json.loads(text, parse_int=_json_int, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise ValueError("it is nested too deeply to be read") from None


def _json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > sys.get_int_max_str_digits():
        raise ValueError(f"it holds an integer of {digits} digits")
    return int(text)


def special_file(path: str | Path) -> str | None:
    """What ``path`` is when it exists but is no regular file (``"a named pipe"``, ``"a directory"``, ``"a
    device or socket"``), for an error that says so instead of blocking on it; ``None`` otherwise."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    return describe_special(mode)


def describe_special(mode: int) -> str | None:
    """:func:`special_file` for a mode already read (``os.fstat`` of an open descriptor)."""
    if stat.S_ISREG(mode):
        return None
    return "a named pipe" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a device or socket"
