"""The rule IR: small immutable values that say how one family of names maps across.

A rule pairs one Megatron pattern with the Hugging Face pattern(s) it becomes. The kinds:

``weight``      a weight itself (``linear_qkv.weight`` ↔ ``q_proj.weight`` + ...), so that one index
                serves weights and quantizer buffers alike.
``amax``        one quantizer buffer ↔ one HF buffer (1:1 renames, KV-cache ``k_bmm``/``v_bmm``).
``fanout``      one Megatron buffer of a fused weight ↔ the same buffer on every HF part, in the
                group's order; on import the parts fan back in.
``moe_fanout``  the single quantizer of a grouped-MoE block ↔ that buffer on every HF expert the
                block holds; the HF side has one more capture, the expert.

Every kind carries a ``layout`` (:mod:`quantmap.layouts`): how a non-scalar tensor lies over
tensor-parallel ranks and the invertible tensor ops that cut it into the HF names, so that
per-channel and per-block state (and, later, weights) go exactly where their rows go. New kinds
(fan-in reductions) are new values of ``kind`` plus the fields they need; nothing dispatches on a
class hierarchy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from quantmap.diagnostics import Location
from quantmap.layouts import Layout
from quantmap.patterns import Pattern

WEIGHT = "weight"
AMAX = "amax"
FANOUT = "fanout"
MOE_FANOUT = "moe_fanout"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a rule came from: the mapping's place in its spec and what was derived from it."""

    location: Location
    mapping: str  # the mapping's Megatron pattern
    derived: str  # "weight", a quantizer buffer such as "input_quantizer._amax", or "kv_cache"


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule. ``hf`` has one pattern per part, in the fused group's order."""

    kind: str
    megatron: Pattern
    hf: tuple[Pattern, ...]
    parts: tuple[str, ...]
    origin: Origin
    buffer: str | None = None  # quantizer buffer relative to its module; None for weight rules
    parallel: str | None = None  # how Megatron splits the weight over TP ranks
    priority: int = 0
    expert_capture: int | None = None  # moe_fanout: index of the HF capture that is the expert
    num_experts: int | None = None  # moe_fanout: the model's expert count, when known
    layout: Layout | None = None  # where a non-scalar tensor's elements go (quantmap.layouts)

    def to_json(self) -> dict:
        place = self.origin.location
        return {
            "kind": self.kind,
            "megatron": self.megatron.text,
            "hf": [p.text for p in self.hf],
            "parts": list(self.parts),
            "buffer": self.buffer,
            "parallel": self.parallel,
            "priority": self.priority,
            "expert_capture": self.expert_capture,
            "num_experts": self.num_experts,
            "layout": None if self.layout is None else self.layout.to_json(),
            "source": {
                "file": place.file,
                "line": place.line,
                "column": place.column,
                "mapping": self.origin.mapping,
                "derived": self.origin.derived,
            },
        }


class Match(NamedTuple):
    """A concrete name resolved by a rule.

    Forward (Megatron → HF): ``hf`` holds every target; for ``moe_fanout`` the expert stays a
    ``*`` and :attr:`expanded` lists the names per expert. Reverse (HF → Megatron): ``part``
    says which part of a fused group the HF name is, ``expert`` which expert of a grouped block.
    """

    kind: str
    megatron: str
    hf: tuple[str, ...]
    rule: Rule
    part: str | None = None
    expert: int | None = None
    captures: tuple[str, ...] = ()  # the Megatron-side captures

    @property
    def expanded(self) -> tuple[str, ...] | None:
        """For a forward ``moe_fanout`` match: every expert's HF names, expert by expert."""
        if self.kind != MOE_FANOUT or self.rule.num_experts is None:
            return None
        return self.expert_names(range(self.rule.num_experts))

    def expert_names(self, experts) -> tuple[str, ...]:
        """The HF names for the given experts (each expert's parts in group order)."""
        slot = self.rule.expert_capture
        out = []
        for expert in experts:
            values = self.captures[:slot] + (str(expert),) + self.captures[slot:]
            out.extend(p.fill(values) for p in self.rule.hf)
        return tuple(out)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (("part", self.part), ("expert", self.expert)) if v is not None)
        return f"Match({self.kind}: {self.megatron!r} -> {list(self.hf)!r}{extra})"

    def to_json(self, name: str) -> dict:
        out = {"name": name, "kind": self.kind, "megatron": self.megatron, "hf": list(self.hf)}
        if self.part:
            out["part"] = self.part
        if self.expert is not None:
            out["expert"] = self.expert
        if self.expanded is not None:
            out["expanded"] = list(self.expanded)
        return out
