"""Expert runs: a rank's per-expert scalar quantizers that differ only in their expert, moved as one entry.

A SequentialMLP layer holds one quantizer per local expert (``...local_experts.{e}.linear_fc1.
weight_quantizer._amax``; ModelOpt 0.47 gives a grouped linear the same, ``weight_quantizer.{e}``),
so a DeepSeek-V3-sized export has 10^5 one-element tensors where the grouped layout has 10^3
blocks. Every name costs the rank a rename and a lookup, and the writer a plan item, a header record
and an index line, all in Python; a run costs one of each. A rank groups its local names that
differ only in their expert index and hold each of its experts once (:func:`expert_groups`), and
resolves a group once: the index proves that one match, with the expert left as ``*``, serves every
member (:meth:`quantmap.ruleset.RuleSet.to_hf_template`), or the group's names go one by one. Each
member's names are then the run's templates filled in, by construction, and the writer rebuilds
every name from them, never by guessing.

What is checked per name (values, DP replica digests, expert counts) is still checked per name.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from quantmap.executor.naming import expert_span
from quantmap.rules import AMAX, FANOUT, WEIGHT, Rule
from quantmap.untrusted import MAX_DIGITS

_MIN_RUN = 2


class Run(NamedTuple):
    """One folded entry: member ``k`` is expert ``first + k``; its names fill each ``(head, tail)``."""

    first: int
    count: int
    megatron: tuple[str, str]  # the Megatron name around the expert index
    hf: tuple[tuple[str, str], ...]  # each HF name (in the rule's part order) around the expert index
    shape: tuple[int, ...]  # each member's own shape (one element)

    def megatron_names(self) -> list[str]:
        head, tail = self.megatron
        return [f"{head}{e}{tail}" for e in range(self.first, self.first + self.count)]

    def hf_names(self) -> list[str]:
        """Expert by expert, each expert's parts in rule order (the order a moe_fanout item writes)."""
        return [f"{head}{e}{tail}" for e in range(self.first, self.first + self.count) for head, tail in self.hf]


def expert_groups(names: Iterable[str], experts: int | None) -> tuple[list[list[str]], list[str]]:
    """``names`` (a rank's local names) split into groups that differ only in their local expert index
    and hold each of the rank's ``experts`` exactly once (each in expert order), and the rest. A rank
    short of one expert of a group keeps its names one by one, so that the writer names exactly what
    is missing."""
    if experts is None or experts < _MIN_RUN:
        return [], list(names)
    groups: dict[tuple[str, str], dict[int, str]] = {}
    rest = []
    for name in names:
        span = expert_span(name)
        if span is None:
            rest.append(name)
            continue
        start, end = span
        if (name[start] == "0" and end - start > 1) or end - start > MAX_DIGITS:  # not a name a run rebuilds
            rest.append(name)
            continue
        groups.setdefault((name[:start], name[end:]), {})[int(name[start:end])] = name
    out = []
    for members in groups.values():
        if len(members) == experts and all(expert in members for expert in range(experts)):
            out.append([members[expert] for expert in range(experts)])
        else:
            rest += members.values()
    return out, rest


class Template(NamedTuple):
    """How every member of a group resolves: its rule and each name around the expert index."""

    rule: Rule
    megatron: tuple[str, str]
    hf: tuple[tuple[str, str], ...]  # in the rule's part order; empty for a weight

    @property
    def kind(self) -> str:
        return self.rule.kind

    def run(self, first: int, count: int, shape: tuple[int, ...]) -> Run:
        return Run(first, count, self.megatron, self.hf, shape)


def template(rules, name: str, span: tuple[int, int]) -> Template | None:
    """The template of the group whose first member's global name is ``name`` (its expert index at
    ``span``), or ``None`` where the index cannot prove one, or its rule does not move one value per
    expert and name (a fan-in combines its sources; a grouped block's quantizer has no expert index)."""
    match = rules.to_hf_template(name, span)
    if match is None or match.kind not in (AMAX, FANOUT, WEIGHT):
        return None
    start, end = span
    around = tuple(tuple(hf.split("*")) for hf in match.hf)
    if match.kind != WEIGHT and any(len(parts) != 2 for parts in around):  # the expert once in each HF name
        return None
    return Template(match.rule, (name[:start], name[end:]), () if match.kind == WEIGHT else around)
