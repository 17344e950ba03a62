"""The resolver: concrete names → matches, in both directions, without scanning the rules.

A name is split once, by one C-level regex, into the literal text between its index-like digit
runs and the runs themselves. The literal parts form a key that equals the literal parts of
every "regular" pattern that can match the name, so a dict lookup finds the candidates. The
few patterns the key cannot describe (``**``, or a literal number where an index would be) are
"irregular" and are tried with their own regex, in priority order, after a miss or before a
hit they could shadow.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

from quantmap.patterns import ANY, Pattern, intersects, unshift
from quantmap.rules import MOE_FANOUT, Match, Rule

Resolver = Callable[[str, Sequence[str]], "Match | None"]


class _Entry:
    """One pattern of one side, with a specialised function that builds its match."""

    __slots__ = ("pattern", "rule", "resolve", "shadowed_by")

    def __init__(self, pattern: Pattern, rule: Rule, resolve: Resolver):
        self.pattern = pattern
        self.rule = rule
        self.resolve = resolve  # (name, raw captures) -> Match | None
        self.shadowed_by: tuple[_Entry, ...] = ()


class _Side:
    """Lookup structures for one direction."""

    def __init__(self, entries: list[_Entry], overlaps: Callable[[Pattern, Pattern], bool]):
        glued = sorted({lit.rsplit(".", 1)[-1] for e in entries for lit, cap in
                        zip(e.pattern.literals, e.pattern.captures) if lit and not lit.endswith(".")})
        lookbehinds = "".join(f"|(?<=\\.{re.escape(word)})" for word in glued if word)
        self.split = re.compile(f"(?:(?<![^.]){lookbehinds})([0-9]+)(?![^.])").split
        self._overlaps = overlaps
        by_priority = sorted(entries, key=lambda e: -e.rule.priority)
        self.fast: dict[tuple[str, ...], tuple[_Entry, ...]] = {}
        self.slow: list[_Entry] = []
        for entry in by_priority:
            if self._is_regular(entry.pattern):
                self.fast[entry.pattern.literals] = self.fast.get(entry.pattern.literals, ()) + (entry,)
            else:
                self.slow.append(entry)
        for entry in by_priority:
            entry.shadowed_by = tuple(
                other for other in self.slow
                if other is not entry and other.rule.priority > entry.rule.priority
                and overlaps(other.pattern, entry.pattern)
            )

    def _is_regular(self, pattern: Pattern) -> bool:
        if any(c.kind == ANY for c in pattern.captures):
            return False
        parts = self.split(pattern.fill(["0"] * pattern.arity))
        return tuple(parts[0::2]) == pattern.literals

    def conflicts(self) -> list[tuple[_Entry, _Entry]]:
        """Pairs of entries that can match one name with neither preferred by priority."""
        pairs = []
        for candidates in self.fast.values():
            pairs += [(a, b) for i, a in enumerate(candidates) for b in candidates[i + 1:]
                      if a.rule.priority == b.rule.priority]
        for i, a in enumerate(self.slow):
            others = self.slow[i + 1:] + [e for group in self.fast.values() for e in group]
            pairs += [(a, b) for b in others if a.rule.priority == b.rule.priority and self._overlaps(a.pattern, b.pattern)]
        return pairs

    def lookup(self, name: str) -> Match | None:
        parts = self.split(name)
        candidates = self.fast.get(tuple(parts[0::2]))
        if candidates:
            raw = parts[1::2]
            for entry in candidates:
                for other in entry.shadowed_by:
                    found = _try_regex(other, name)
                    if found is not None:
                        return found
                found = entry.resolve(name, raw)
                if found is not None:
                    return found
        for entry in self.slow:
            found = _try_regex(entry, name)
            if found is not None:
                return found
        return None


def _try_regex(entry: _Entry, name: str) -> Match | None:
    found = entry.pattern._regex.fullmatch(name)
    return None if found is None else entry.resolve(name, found.groups())


def _formatter(pattern: Pattern, hole: int | None = None) -> Callable[[Sequence[str]], str]:
    """A fast ``fill`` for ``pattern``; capture ``hole`` (if any) stays a ``*``."""
    if any(c.offset is not None for c in pattern.captures):
        if hole is None:
            return pattern.fill
        return lambda values: pattern.fill_partial(list(values[:hole]) + [None] + list(values[hole:]))
    pieces = [pattern.literals[0]]
    for index, literal in enumerate(pattern.literals[1:]):
        pieces.append("*" if index == hole else "{}")
        pieces.append(literal)
    template = "".join(pieces).format  # patterns cannot hold braces outside captures
    return lambda values: template(*values)


def _values(pattern: Pattern) -> Callable[[Sequence[str]], Sequence[str] | None]:
    """Raw captured text → capture values (undoing offsets; ``None`` if out of range)."""
    if any(c.offset is not None for c in pattern.captures):
        return lambda raw: unshift(pattern.captures, raw)
    return lambda raw: raw


def _forward(rule: Rule) -> _Entry:
    values_of = _values(rule.megatron)
    hole = rule.expert_capture if rule.kind == MOE_FANOUT else None
    fills = [_formatter(p, hole) for p in rule.hf]
    kind = rule.kind

    def resolve(name: str, raw: Sequence[str]) -> Match | None:
        values = values_of(raw)
        if values is None:
            return None
        return Match(kind, name, tuple([fill(values) for fill in fills]), rule, None, None, tuple(values))

    return _Entry(rule.megatron, rule, resolve)


def _reverse(rule: Rule, index: int) -> _Entry:
    pattern = rule.hf[index]
    values_of = _values(pattern)
    target = _formatter(rule.megatron)
    part = rule.parts[index] or None
    kind = rule.kind
    if rule.kind == MOE_FANOUT:
        slot = rule.expert_capture

        def resolve(name: str, raw: Sequence[str]) -> Match | None:
            values = values_of(raw)
            if values is None:
                return None
            rest = tuple(values[:slot]) + tuple(values[slot + 1:])
            return Match(kind, target(rest), (name,), rule, part, int(values[slot]), rest)
    else:

        def resolve(name: str, raw: Sequence[str]) -> Match | None:
            values = values_of(raw)
            if values is None:
                return None
            return Match(kind, target(values), (name,), rule, part, None, tuple(values))

    return _Entry(pattern, rule, resolve)


class Index:
    """Both directions of lookup over a fixed list of rules."""

    def __init__(self, rules: Iterable[Rule]):
        rules = list(rules)
        self.forward = _Side([_forward(r) for r in rules], intersects)
        self.reverse = _Side([_reverse(r, i) for r in rules for i in range(len(r.hf))], intersects)

    def to_hf(self, megatron_name: str) -> Match | None:
        return self.forward.lookup(megatron_name)

    def to_megatron(self, hf_name: str) -> Match | None:
        return self.reverse.lookup(hf_name)
