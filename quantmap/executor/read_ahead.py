"""A writer's reads of its file's weights, done on a second thread while the file is written.

A writer reads the weights of the file it writes straight into their places in its buffers
(:meth:`~quantmap.executor.pack.Packed.take`, :func:`~quantmap.executor.pack.read_shared`), then builds
and writes the file's tensors in order. Done one after the other, the two take the sum of their times;
both are copies the kernel does with the GIL released (``readinto`` from the page cache, ``write`` into it),
so with the reads on a thread of their own, in the order the file needs them, a tensor waits only for its
own entries and the file takes little more than the longer of the two. The buffers are the same and are
allocated as before: memory does not change.

:meth:`ReadAhead.later` takes reads instead of their being done; :meth:`ReadAhead.running` runs them while its
``with`` block writes; :meth:`ReadAhead.wait` (what :meth:`quantmap.executor.plan.Plan.tensors` calls)
returns once the given entries are read, or raises the error a read raised.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterable

Key = tuple[int, int]  # (rank, entry): an entry of a rank's metadata


class ReadAhead:
    """Reads keyed by the entry they fill, run in need order on a thread while :meth:`running`."""

    def __init__(self):
        self._reads: dict[Key, Callable[[], None]] = {}
        self._position: dict[Key, int] = {}  # where in the run order each read is
        self._done = 0  # reads finished, in run order
        self._error: BaseException | None = None
        self._stop = False
        self._changed = threading.Condition()

    def later(self, rank: int) -> Callable[[int, Callable[[], None]], None]:
        """What takes rank ``rank``'s reads, each as ``(entry, read)``."""
        def add(entry: int, read: Callable[[], None]) -> None:
            self._reads[rank, entry] = read

        return add

    @contextmanager
    def running(self, need: Iterable[Iterable[Key]]):
        """Run the reads on a thread, those of ``need``'s first record first (each record's keys, in the order
        the file is written; reads no record names run last), for the ``with`` block. Leaving it stops the reads
        not started (the write failed) and waits for the one in progress: none outlives the block."""
        if not self._reads:  # nothing deferred (quantizer state alone): no thread
            yield self
            return
        order = [key for keys in need for key in keys if key in self._reads]
        order = list(dict.fromkeys(order + list(self._reads)))
        self._position = {key: k for k, key in enumerate(order)}
        thread = threading.Thread(target=self._run, args=(order,), name="quantmap-read-ahead", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            with self._changed:
                self._stop = True
            thread.join()

    def _run(self, order: list[Key]) -> None:
        for key in order:
            with self._changed:
                if self._stop:
                    return
            try:
                self._reads[key]()
            except BaseException as error:  # noqa: BLE001 - handed to the writer, which raises it
                with self._changed:
                    self._error = error
                    self._changed.notify_all()
                return
            with self._changed:
                self._done += 1
                self._changed.notify_all()

    def wait(self, keys: Iterable[Key]) -> None:
        """Return once every read of ``keys`` is done (keys without a read are ready already); raise the
        error of a read that failed before them."""
        last = max((self._position[key] for key in keys if key in self._position), default=-1)
        if last < 0:
            return
        with self._changed:
            self._changed.wait_for(lambda: self._done > last or self._error is not None)
            if self._done <= last:
                raise self._error
