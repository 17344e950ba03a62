"""The rule IR: small immutable values that say how one family of names maps across.

A rule pairs one Megatron pattern with the Hugging Face pattern(s) it becomes. The kinds:

``weight``      a weight itself (``linear_qkv.weight`` ↔ ``q_proj.weight`` + ...), so that one index
                serves weights and quantizer buffers alike.
``amax``        one quantizer buffer ↔ one HF buffer (1:1 renames, KV-cache ``k_bmm``/``v_bmm``).
``fanout``      one Megatron buffer of a fused weight ↔ the same buffer on every HF part, in the
                group's order; on import the parts fan back in.
``moe_fanout``  the single quantizer of a grouped-MoE block ↔ that buffer on every HF expert the
                block holds; the HF side has one more capture, the expert.
``fan_in``      many Megatron buffers ↔ one HF buffer (transformers v5 fused experts: one
                ``gate_up_proj_input_quantizer`` per layer). The mirror of ``moe_fanout``: the
                Megatron side has one more capture, the expert (SequentialMLP
                ``local_experts.{E}``), or none when the sources are one grouped block's name held
                by every expert-parallel rank. Export takes the max of the sources, import copies
                the HF tensor to every source.

Every kind carries a ``layout`` (:mod:`quantmap.element_layout`): how a non-scalar tensor lies over
tensor-parallel ranks and the invertible tensor ops that cut it into the HF names, so that
per-channel and per-block state go exactly where their rows go; a ``weight`` rule's layout says the
same of the weight's elements (a fused-experts tensor's stack, interleave and transpose). New kinds
are new values of ``kind`` plus the fields they need; nothing dispatches on a class hierarchy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from quantmap.diagnostics import Location
from quantmap.element_layout import ElementLayout
from quantmap.patterns import Pattern
from quantmap.roles import role_of

WEIGHT = "weight"
AMAX = "amax"
FANOUT = "fanout"
MOE_FANOUT = "moe_fanout"
FAN_IN = "fan_in"


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
    # The capture only one side has, the expert: moe_fanout an HF capture, fan_in a Megatron capture
    # (None for a fan_in whose sources are one name held by every expert-parallel rank).
    expert_capture: int | None = None
    num_experts: int | None = None  # moe_fanout, fan_in: the model's expert count, when known
    layout: ElementLayout | None = None  # where a non-scalar tensor's elements go (quantmap.element_layout)
    # False for a rule whose HF names another rule of the same mapping resolves back exactly (ModelOpt
    # <= 0.46's shared grouped weight quantizer, under 0.47's per-expert one): forward lookups only.
    reversible: bool = True
    # A weight rule of a fused group only some of whose HF parts are quantized (ModelOpt disables the
    # others: Gated DeltaNet's in_proj_a / in_proj_b): the parts that carry quantizers. None: every part.
    quantized_parts: tuple[str, ...] | None = None
    # True for a stage of ModelOpt's sequential weight quantizer (W4A8): the last capture of each side
    # is the stage (quantmap.stages).
    staged: bool = False

    @property
    def fans_in(self) -> bool:
        """Whether many Megatron names meet one HF name: a ``fan_in`` rule over experts, or the weight
        rule of a fused-experts tensor. The expert is then a Megatron capture only."""
        return self.kind != MOE_FANOUT and self.expert_capture is not None

    @property
    def role(self) -> str:
        """What the rule's tensors are (:mod:`quantmap.roles`): ``weight_amax``, ``norm``, ..."""
        return role_of(self.buffer, self.hf[0].text)

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
            "reversible": self.reversible,
            "quantized_parts": None if self.quantized_parts is None else list(self.quantized_parts),
            "staged": self.staged,
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
    ``*`` and :attr:`expanded` lists the names per expert; for ``fan_in`` ``expert`` says which
    source the name is. Reverse (HF → Megatron): ``part`` says which part of a fused group the HF
    name is, ``expert`` which expert of a grouped block; for ``fan_in`` the expert of ``megatron``
    stays a ``*`` and :attr:`expanded` lists every source.
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
        """The names a ``*`` stands for, when the expert count is known: a forward ``moe_fanout``
        match's HF names expert by expert (a reverse one's: its block's), a reverse ``fan_in`` match's
        Megatron sources."""
        if self.rule.num_experts is None or self.rule.expert_capture is None:
            return None
        if self.kind == MOE_FANOUT:
            return self.expert_names(range(self.rule.num_experts))
        if self.rule.fans_in and "*" in self.megatron:
            return self.source_names(range(self.rule.num_experts))
        return None

    def expert_names(self, experts) -> tuple[str, ...]:
        """The HF names for the given experts (each expert's parts in group order)."""
        slot = self.rule.expert_capture
        out = []
        for expert in experts:
            values = self.captures[:slot] + (str(expert),) + self.captures[slot:]
            out.extend(p.fill(values) for p in self.rule.hf)
        return tuple(out)

    def source_names(self, experts) -> tuple[str, ...]:
        """For a reverse match of a rule that :attr:`~Rule.fans_in`: the Megatron names of the given experts."""
        slot = self.rule.expert_capture
        return tuple(self.rule.megatron.fill(self.captures[:slot] + (str(expert),) + self.captures[slot:])
                     for expert in experts)

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
