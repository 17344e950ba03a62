"""Fan-in rules in the executor: many Megatron quantizers meet one HF quantizer.

transformers v5 keeps one ``gate_up_proj_input_quantizer`` per layer where Megatron has one input
quantizer per expert (SequentialMLP ``local_experts.{E}``) or one per grouped linear on each
expert-parallel rank (the same global name on every EP rank). Export gathers every source of one HF
tensor, across experts and EP ranks, into one plan item combined by ``max``; the sources differing is
reported once per HF tensor. Import copies the HF tensor to every source a rank holds. Only
per-tensor (scalar) amax is combined: a max over per-channel or block state of different experts is
not the model's tensor, so such a tensor is refused.

The weight of a fused-experts HF tensor (``gate_up_proj``: every expert's weight stacked) is gathered
the same way, one source per expert, and refused by name when an expert is missing; the plan stacks
it as its rule's layout says (:mod:`quantmap.executor.sharding`).
"""

from __future__ import annotations

import torch

from quantmap.parallel import ParallelLayout
from quantmap.executor.naming import expert_count
from quantmap.executor.report import ExecutorError
from quantmap.name_groups import natural
from quantmap.executor.sharding import is_scalar, stacks_experts


def sources(match, layout: ParallelLayout) -> list[str]:
    """The global Megatron names a reverse match stands for: every expert of a fan-in over experts,
    otherwise the match's one name (a grouped block's, held by every expert-parallel rank)."""
    if not (match.rule.fans_in and "*" in match.megatron):
        return [match.megatron]
    return list(match.source_names(range(expert_count(match.megatron, match.rule, layout))))


def not_scalar(name: str, shape, target: str) -> str:
    """The refusal for a non-scalar source: which tensor, its shape, and why."""
    return (f"{name} has shape {list(shape)}: it is one of several Megatron quantizers that meet in {target}, and "
            f"combining per-channel or block quantizer state of several sources is not supported (per-tensor amax "
            f"works)")


class Gathered:
    """Export: the sources of each fan-in HF tensor, gathered over the plan's names."""

    def __init__(self):
        self._by_target: dict[str, list[tuple[str, list[tuple[int, int]]]]] = {}
        self._expected: dict[str, int | None] = {}
        self._stacked: dict[str, list[int]] = {}  # a fused-experts weight's target: the experts gathered

    def add(self, name: str, match, peers: list[tuple[int, int]], experts: int | None) -> None:
        """One source name and its (rank, entry) copies; ``experts``: how many source names to expect."""
        target = match.hf[0]
        self._by_target.setdefault(target, []).append((name, peers))
        self._expected[target] = experts
        if stacks_experts(match.rule):
            self._stacked.setdefault(target, []).append(match.expert)

    def targets(self) -> list[tuple[str, list[str], list[tuple[int, int]], tuple[str, ...]]]:
        """Per HF tensor, in name order: its target, its source names, every copy of them and each
        copy's label for a report (its source name and rank)."""
        out = []
        for target in sorted(self._by_target, key=natural):
            named = sorted(self._by_target[target], key=lambda pair: natural(pair[0]))
            copies = [(name, copy) for name, peers in named for copy in peers]
            out.append((target, [name for name, _ in named], [copy for _, copy in copies],
                        tuple(f"{name} (rank {rank})" for name, (rank, _) in copies)))
        return out

    def short(self, target: str, names: list[str]) -> str | None:
        """A problem when a fan-in over experts lacks some: the max of fewer sources is not the model's."""
        expected = self._expected[target]
        if expected is None or len(names) == expected:
            return None
        if target in self._stacked:
            lacking = sorted(set(range(expected)) - set(self._stacked[target]))
            return (f"{target} stacks the weights of {expected} experts but the shards hold {len(names)} of them "
                    f"(lacking expert(s) {', '.join(map(str, lacking[:8]))}{', ...' if len(lacking) > 8 else ''}); "
                    f"check that every expert-parallel rank's state is complete")
        return (f"{target} is the max over {expected} experts' quantizers but the shards hold {len(names)} of them "
                f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); check that every rank's state is complete")


def check_scalar(name: str, shape, target: str) -> str | None:
    return None if is_scalar(shape) else not_scalar(name, shape, target)


def copy_to_source(megatron: str, target: str, value: torch.Tensor) -> torch.Tensor:
    """Import: the HF tensor as one of its Megatron sources (a scalar only)."""
    if not is_scalar(value.shape):
        raise ExecutorError(not_scalar(megatron, value.shape, target))
    return value.clone()
