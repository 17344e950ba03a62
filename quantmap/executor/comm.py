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
            received = self.exchange({}, {rank: size for rank, size in enumerate(sizes) if rank != WRITER})
            return {**received, WRITER: buffer}
        self.exchange({WRITER: buffer} if sizes[self.rank] else {}, {})
        return None

    def exchange(self, sends: dict[int, torch.Tensor], receives: dict[int, int]) -> dict[int, torch.Tensor]:
        """One batch of point-to-point transfers: send byte buffer ``sends[rank]`` to each rank, and
        receive ``receives[rank]`` bytes from each; the received buffers, on the CPU. Every rank calls
        it in step with its peers (a rank with nothing to move returns at once)."""
        self.calls += 1
        ops, received = [], {}
        for rank, size in receives.items():
            if size:
                received[rank] = torch.empty(size, dtype=torch.uint8, device=self.device)
                ops.append(dist.P2POp(dist.irecv, received[rank], self._global(rank), self.group))
                self.bytes += size
        for rank, buffer in sends.items():
            if buffer.numel():
                ops.append(dist.P2POp(dist.isend, buffer.to(self.device), self._global(rank), self.group))
                self.bytes += buffer.numel()
        if ops:
            for work in dist.batch_isend_irecv(ops):
                if not work.wait(self.timeout):
                    raise TimeoutError(f"a tensor transfer did not finish within {self.timeout}")
        return {rank: tensor.cpu() for rank, tensor in received.items()}
