"""The compiled rule set: the public, queryable result of compiling a spec."""

from __future__ import annotations

from typing import Iterator, TYPE_CHECKING

from quantmap.diagnostics import Diagnostic
from quantmap.rules import Match, Rule

if TYPE_CHECKING:
    from quantmap.index import Index
    from quantmap.spec.loader import ResolvedSpec


class RuleSet:
    """Immutable rules of one spec with their two-way index.

    ``to_hf`` and ``to_megatron`` resolve concrete names; iterating gives the rules in spec
    order; ``warnings`` lists what the compiler could not derive, and why.
    """

    __slots__ = ("spec", "rules", "warnings", "params", "_index")

    def __init__(self, spec: ResolvedSpec, rules: tuple[Rule, ...], index: Index,
                 warnings: tuple[Diagnostic, ...], params: dict[str, int | None]):
        self.spec = spec
        self.rules = rules
        self.warnings = warnings
        self.params = dict(params)
        self._index = index

    def to_hf(self, megatron_name: str) -> Match | None:
        """The match for a concrete Megatron name (weight or quantizer buffer), or ``None``."""
        return self._index.to_hf(megatron_name)

    def to_megatron(self, hf_name: str) -> Match | None:
        """The match for a concrete HF name, or ``None``."""
        return self._index.to_megatron(hf_name)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def to_json(self) -> list[dict]:
        return [rule.to_json() for rule in self.rules]

    def __repr__(self) -> str:
        return f"<RuleSet {self.spec.name!r}: {len(self.rules)} rules>"
