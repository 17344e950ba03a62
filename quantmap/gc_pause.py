"""Python's cyclic garbage collector, paused while a phase builds many acyclic objects."""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def paused_gc():
    """The collector off while 10^4-10^6 acyclic objects are built (names, tuples, metadata): it would
    otherwise scan them again and again as they accumulate (two thirds of the time of unpickling a
    big ``.metadata``, a third of a rank's pack). Reference counting still frees them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
