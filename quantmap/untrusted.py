"""Numbers and JSON read from files and flags that anyone may have written.

Python's own parsers fail on such text with errors no user should see: ``int()`` refuses 4300+
digits (a ``ValueError`` about ``sys.set_int_max_str_digits``) and takes ``'²'``, which
``str.isdigit()`` lets through, for no number at all; ``json.loads`` does the same to a long
integer and recurses once per nesting level (``RecursionError``). Every reader of a count, an
index or a JSON file uses these two functions and names its own source in its own error.
"""

from __future__ import annotations

import json
import sys

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
