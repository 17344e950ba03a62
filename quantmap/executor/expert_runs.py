"""Expert runs: a rank's per-expert scalar quantizers that differ only in their expert, moved as one entry.

A SequentialMLP layer holds one quantizer per local expert (``...local_experts.{e}.linear_fc1.
weight_quantizer._amax``; ModelOpt 0.47 gives a grouped linear the same, ``weight_quantizer.{e}``),
so a DeepSeek-V3-sized export has 10^5 one-element tensors where the grouped layout has 10^3
blocks. Every name costs the writer a plan item, a header record and an index line in Python; a run
costs one of each. On the rank, the scalars of one rule that differ only in their expert index and
cover the rank's experts exactly are stacked into one ``[count]`` entry, named after its first
expert. The rank has resolved every member already, so a run is formed only where each member's
Megatron and HF names are exactly what the run's templates give for its expert: the writer then
rebuilds every name from the templates, never by guessing.

What is checked per name (values, DP replica digests, expert counts) is checked before folding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from quantmap.rules import AMAX, FANOUT

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


def fold_expert_runs(meta: dict, values: list[torch.Tensor], matches: list, experts: range | None
                     ) -> list[torch.Tensor]:
    """Fold the runs among ``meta``'s entries (see the module docstring), in place; the new values.
    ``matches``: each entry's rule match and where its expert index lies in its name (or ``None``).
    ``experts``: the global experts this rank holds; a run covers all of them (a rank short of one
    keeps its names one by one, so that the writer names exactly what is missing)."""
    if experts is None or len(experts) < _MIN_RUN:
        return values
    groups: dict[tuple, list[tuple[int, int]]] = {}  # (rule, name around the expert, dtype, shape) -> members
    shapes = meta["shapes"]
    for entry, (name, (match, span)) in enumerate(zip(meta["names"], matches)):
        if span is None or match.kind not in (AMAX, FANOUT) or math.prod(shapes[entry]) != 1:
            continue
        start, end = span
        if name[start] == "0" and end - start > 1:  # a leading zero: not the name a run rebuilds
            continue
        key = (id(match.rule), name[:start], name[end:], meta["dtypes"][entry], shapes[entry])
        groups.setdefault(key, []).append((int(name[start:end]), entry))
    runs, resolved = {}, [match for match, _ in matches]
    for (_, head, tail, _, shape), members in groups.items():
        members.sort()
        if [expert for expert, _ in members] != list(experts):
            continue
        run = _run(head, tail, shape, members, resolved)
        if run is not None:
            runs[members[0][1]] = (run, [entry for _, entry in members])
    if not runs:
        return values
    folded = {entry for _, entries in runs.values() for entry in entries}
    out_values, out = [], {key: [] for key in ("names", "dtypes", "shapes")}
    for entry in range(len(values)):
        if entry in runs:
            run, entries = runs[entry]
            meta["runs"][len(out_values)] = run
            out_values.append(torch.stack([values[e] for e in entries]).reshape(run.count))  # one shape (the key)
            out["shapes"].append((run.count,))
        elif entry in folded:
            continue
        else:
            out_values.append(values[entry])
            out["shapes"].append(meta["shapes"][entry])
        out["names"].append(meta["names"][entry])
        out["dtypes"].append(meta["dtypes"][entry])
    meta.update(out)
    return out_values


def entry_names(meta: dict) -> list[str]:
    """Every Megatron name a rank's metadata holds, runs unfolded (in entry order)."""
    runs = meta["runs"]
    if not runs:
        return meta["names"]
    out = []
    for entry, name in enumerate(meta["names"]):
        if entry in runs:
            out += runs[entry].megatron_names()
        else:
            out.append(name)
    return out


def _run(head: str, tail: str, shape, members: list[tuple[int, int]], matches: list) -> Run | None:
    """The run of ``members`` ((expert, entry), by expert, at least two, each named ``head`` + its
    expert + ``tail``), or ``None`` where their HF names are not exactly what one template per HF
    name gives for each expert."""
    (first, one), (second, two) = members[0], members[1]
    templates = []
    for this, other in zip(matches[one].hf, matches[two].hf):
        found = _around(this, str(first), other, str(second))
        if found is None:
            return None
        templates.append(found)
    run = Run(first, len(members), (head, tail), tuple(templates), tuple(shape))
    # A member's Megatron name is head + its digits + tail by construction (no leading zeros: see
    # fold_expert_runs); its HF names, as the rank resolved them, must be the templates filled in.
    sized = [(h, t, len(h) + len(t)) for h, t in templates]
    for expert, entry in members:
        digits, hf = str(expert), matches[entry].hf
        if len(hf) != len(sized):
            return None
        for name, (h, t, fixed) in zip(hf, sized):
            if not (len(name) == fixed + len(digits) and name.startswith(h) and name.endswith(t)
                    and name.startswith(digits, len(h))):
                return None
    return run


def _around(this: str, digits: str, other: str, other_digits: str) -> tuple[str, str] | None:
    """``this`` split around its expert index: the one place holding ``digits`` (bounded by non-digits)
    where putting ``other_digits`` instead gives ``other``, the same name for another expert."""
    places = []
    for i in range(len(this)):
        end = i + len(digits)
        if (this.startswith(digits, i) and (i == 0 or not this[i - 1].isdigit())
                and not this[end:end + 1].isdigit() and this[:i] + other_digits + this[end:] == other):
            places.append((this[:i], this[end:]))
    return places[0] if len(places) == 1 else None
