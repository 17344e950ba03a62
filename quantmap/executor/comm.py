"""The executor's only door to ``torch.distributed``: a handful of calls, counted, with timeouts.

An export exchanges every rank's metadata, broadcasts the planner's verdict (go, or the error every
rank raises), moves packed byte buffers in batches of point-to-point operations (one batch in all,
or one per round of shard files), and gathers and broadcasts the final status; see
:mod:`quantmap.executor.export` for the count.

A process plays one rank of a group (:class:`Comm`) or every rank of a layout (:class:`Offline`, for
machines without many cores, and the Python API's ``*_offline``): both take and give values keyed by
the ranks this process plays, so an export or import is one piece of code whichever runs it.
"""

from __future__ import annotations

import pickle
from datetime import timedelta

import torch
import torch.distributed as dist

WRITER = 0


class Comm:
    """Collectives over one group, for the one rank this process plays; ``calls`` and ``bytes`` are what
    it did. Values go in as ``{rank: value}`` (:attr:`mine` is that rank)."""

    def __init__(self, group=None, timeout: timedelta = timedelta(minutes=10)):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.mine = (self.rank,)
        self.processes = self.size  # the processes that can share the writing
        self.timeout = timeout
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
            else torch.device("cpu")
        self.calls = 0
        self.bytes = 0

    @property
    def is_writer(self) -> bool:
        return self.rank == WRITER

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def gather_objects(self, objs: dict) -> list | None:
        """Every rank's object on the writer (``None`` elsewhere)."""
        obj = objs[self.rank]
        self.calls += 1
        self.bytes += len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        out = [None] * self.size if self.is_writer else None
        dist.gather_object(obj, out, dst=self._global(WRITER), group=self.group)
        return out

    def all_gather_objects(self, objs: dict) -> list:
        """Every rank's object on every rank."""
        obj = objs[self.rank]
        self.calls += 1
        self.bytes += len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj):
        """The writer's ``obj`` on every rank."""
        self.calls += 1
        box = [obj]
        dist.broadcast_object_list(box, src=self._global(WRITER), group=self.group, device=self.device)
        self.bytes += len(pickle.dumps(box[0], protocol=pickle.HIGHEST_PROTOCOL))
        return box[0]

    def gather_buffers(self, buffers: dict[int, torch.Tensor], sizes: list[int]) -> dict[int, torch.Tensor] | None:
        """Byte buffers of the ranks with a non-zero size, on the writer, in one batch."""
        buffer = buffers[self.rank]
        if self.is_writer:
            received = {rank: self.empty(size) for rank, size in enumerate(sizes) if rank != WRITER and size}
            self.exchange([], list(received.items()))
            return {**{rank: tensor.cpu() for rank, tensor in received.items()}, WRITER: buffer}
        self.exchange([(WRITER, buffer)] if sizes[self.rank] else [], [])
        return None

    def empty(self, size: int) -> torch.Tensor:
        """A byte buffer to receive into, on the group's device."""
        return torch.empty(size, dtype=torch.uint8, device=self.device)

    def exchange(self, sends: list[tuple[int, torch.Tensor]], receives: list[tuple[int, torch.Tensor]]) -> None:
        """One batch of point-to-point transfers: send each ``(rank, bytes)`` of ``sends``, and receive
        into each ``(rank, bytes)`` of ``receives`` (contiguous byte tensors, views allowed: a buffer is
        received piece by piece in place). Every rank calls it in step with its peers."""
        self.calls += 1
        ops = []
        for rank, tensor in receives:
            ops.append(dist.P2POp(dist.irecv, tensor, self._global(rank), self.group))
            self.bytes += tensor.numel()
        for rank, tensor in sends:
            ops.append(dist.P2POp(dist.isend, tensor.to(self.device), self._global(rank), self.group))
            self.bytes += tensor.numel()
        if ops:
            for work in dist.batch_isend_irecv(ops):
                if not work.wait(self.timeout):
                    raise TimeoutError(f"a tensor transfer did not finish within {self.timeout}")


class Offline:
    """One process playing every rank of a layout: each collective is the identity over the ranks' values
    (all of them are here), nothing moves and no call is made. The writer is rank 0."""

    processes = 1
    calls = bytes = 0

    def __init__(self, size: int):
        self.size = size
        self.rank = WRITER
        self.mine = tuple(range(size))
        self.is_writer = True

    def gather_objects(self, objs: dict) -> list:
        return [objs[rank] for rank in self.mine]

    all_gather_objects = gather_objects

    def broadcast_object(self, obj):
        return obj

    def gather_buffers(self, buffers: dict[int, torch.Tensor], sizes: list[int]) -> dict[int, torch.Tensor]:
        return buffers

    def exchange(self, sends: list, receives: list) -> None:
        assert not sends and not receives, "one process holds every rank's tensors: nothing moves"
