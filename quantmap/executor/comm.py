"""The executor's only door to ``torch.distributed``: a handful of calls, counted, with timeouts.

An export exchanges every rank's metadata, broadcasts the planner's verdict (go, or the error every
rank raises), moves packed byte buffers in batches of point-to-point operations (one batch in all,
or one per round of shard files), and gathers and broadcasts the final status; see
:mod:`quantmap.executor.export` for the count.
"""

from __future__ import annotations

import pickle
from datetime import timedelta

import torch
import torch.distributed as dist

WRITER = 0


class Comm:
    """Collectives over one group; ``calls`` and ``bytes`` are what this rank did."""

    def __init__(self, group=None, timeout: timedelta = timedelta(minutes=10)):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
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

    def gather_objects(self, obj) -> list | None:
        """Every rank's ``obj`` on the writer (``None`` elsewhere)."""
        self.calls += 1
        self.bytes += len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        out = [None] * self.size if self.is_writer else None
        dist.gather_object(obj, out, dst=self._global(WRITER), group=self.group)
        return out

    def all_gather_objects(self, obj) -> list:
        """Every rank's ``obj`` on every rank."""
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

    def gather_buffers(self, buffer: torch.Tensor, sizes: list[int]) -> dict[int, torch.Tensor] | None:
        """Byte buffers of the ranks with a non-zero size, on the writer, in one batch."""
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
