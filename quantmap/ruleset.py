"""The compiled rule set: the public, queryable result of compiling a spec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from quantmap.diagnostics import Diagnostic
from quantmap.rules import WEIGHT, Match, Rule

if TYPE_CHECKING:
    from quantmap.compiler import RuleSource
    from quantmap.index import Index
    from quantmap.spec.loader import ResolvedSpec


class RuleSet:
    """Immutable rules of one spec with their two-way index.

    ``to_hf(megatron_name)`` and ``to_megatron(hf_name)`` resolve a concrete name (a weight or
    a quantizer buffer) to a :class:`~quantmap.rules.Match`, or ``None``. They are the index's
    lookup functions themselves, bound at construction: a lookup runs once per tensor name, and
    a wrapper method would add a call to each. ``to_hf_template(megatron_name, span)`` is the forward
    match of every name that differs from the given one only in the index at ``span``, that index
    left as ``*`` (``None`` where the index cannot prove one match serves them all); ``to_hf_by(number,
    name)`` the forward match of a name by a rule already chosen (:meth:`number`). Iterating gives the
    rules in spec order; ``warnings`` lists what the compiler could not derive, and why. ``source`` is
    what it was compiled from (and how it pickles); ``hf_naming`` the HF naming its names are in.
    """

    __slots__ = ("source", "spec", "rules", "warnings", "params", "to_hf", "to_hf_template", "to_megatron",
                 "to_hf_by", "_numbers", "_roles")

    def __init__(self, source: RuleSource, spec: ResolvedSpec, rules: tuple[Rule, ...], index: Index,
                 warnings: tuple[Diagnostic, ...], params: dict[str, int | None]):
        self.source = source
        self.spec = spec
        self.rules = rules
        self.warnings = warnings
        self.params = dict(params)
        self.to_hf: Callable[[str], Match | None] = index.forward.lookup
        self.to_hf_template: Callable[[str, tuple[int, int]], Match | None] = index.forward.template
        self.to_megatron: Callable[[str], Match | None] = index.reverse.lookup
        self.to_hf_by: Callable[[int, str], Match | None] = index.forward_by
        self._numbers = {id(rule): number for number, rule in enumerate(rules)}
        self._roles = tuple(map(_role, rules))

    def number(self, rule: Rule) -> int:
        """``rule``'s position in the set: the same on every rank (one spec compiles to the same rules in
        the same order), so a rank names the rule that claimed a tensor by it, and the writer gets the
        match back with ``to_hf_by(number, name)``, without looking for the rule again."""
        return self._numbers[id(rule)]

    def role(self, number: int) -> str | None:
        """What the tensors of rule ``number`` are (:mod:`quantmap.roles`), decided once per rule."""
        return self._roles[number]

    def unquantized_part(self, hf_name: str) -> Match | None:
        """For an HF quantizer buffer no rule maps: the weight match of its module when that module is a
        part of a fused group that carries no quantizers (a mapping's ``quantized_parts`` leaves it out,
        as ModelOpt leaves Gated DeltaNet's ``in_proj_a`` / ``in_proj_b`` unquantized), so that a lookup
        can say why the name is not mapped instead of only that it is not. ``None`` otherwise."""
        module = hf_name
        while "." in module:
            module = module.rsplit(".", 1)[0]
            match = self.to_megatron(f"{module}.weight")
            if match is not None and match.kind == WEIGHT:
                quantized = match.rule.quantized_parts
                return match if quantized is not None and match.part not in quantized else None
        return None

    @property
    def hf_naming(self) -> str:
        return self.source.hf_naming

    def __reduce__(self):
        # the source's own ``compile`` (quantmap.compiler, which imports this module: never the other way)
        return type(self.source).compile, (self.source,)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def to_json(self) -> list[dict]:
        return [rule.to_json() for rule in self.rules]

    def __repr__(self) -> str:
        return f"<RuleSet {self.spec.name!r}: {len(self.rules)} rules>"


def _role(rule: Rule) -> str | None:
    """``rule.role``; ``None`` for a quantizer buffer that has none: a spec may list any buffer of a
    quantizer, whose tensors are then moved as they are, not checked as an amax."""
    try:
        return rule.role
    except ValueError:
        return None
