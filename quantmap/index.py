"""The resolver: concrete names → matches, in both directions, without scanning the rules.

A name is split once, by one C-level regex, into the text between its index-like digit runs
and the runs themselves. The text parts form a key shared by every pattern that splits the
same way, so one dict lookup finds the candidate rules. Two stages cut names: the first only at
whole-segment numbers (``layers.12.``), the cheap and common case; the second also takes off an
index glued to the end of the name (Megatron's grouped experts, ``weight12``). The few patterns
neither can describe (``**``, a literal number where an index would be, an index glued inside a
name) are tried with their own regex, in priority order, after a miss. A pattern with
alternatives (``{a|b}``) is entered once per variant, each with the rule's resolver, so that every
alternative is still found in one probe and the name built is always the canonical one.

A pattern found at one stage may be shadowed by a higher-priority pattern of a later stage
that matches the same names; such pairs are found once, at build time, and checked first. The
same facts let the index answer for a whole family of names at once (:meth:`_Side.template`):
where one unshadowed entry serves a key, every name of that key that differs only in one index
resolves by that entry's text substitution, so a rank resolves a SequentialMLP layer's experts
with one call instead of one per expert.

Where the time goes (``benchmarks/bench_lookup.py``, DeepSeek-V3 name set, one core): about
0.45 µs for the split, 0.25 µs to build the key and probe the dict, and 0.5 µs in the generated
resolver, half of it building the ``Match``. That is near the floor for CPython; reaching
1 M lookups/s over a cold name set would take the split and key into native code.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

from quantmap.patterns import ANY, Pattern, intersects, shift
from quantmap.rules import MOE_FANOUT, Match, Rule
from quantmap.untrusted import MAX_DIGITS

Resolver = Callable[[str, Sequence[str]], "Match | None"]
_new_match = tuple.__new__  # a NamedTuple built without its keyword-handling __new__


class _Entry:
    """One pattern of one side, with a specialised function that builds its match."""

    __slots__ = ("pattern", "rule", "resolve", "verbatim", "shadowed_by")

    def __init__(self, pattern: Pattern, rule: Rule, resolve: Resolver, verbatim: frozenset[int] = frozenset()):
        self.pattern = pattern
        self.rule = rule
        self.resolve = resolve  # (name, raw captures) -> Match | None
        self.verbatim = verbatim  # the captures whose text the resolver only copies into the names it builds
        self.shadowed_by: tuple[_Entry, ...] = ()

    def try_pattern(self, name: str) -> Match | None:
        found = self.pattern.raw(name)
        return None if found is None else self.resolve(name, found)


_WHOLE_SEGMENT_INDEX = r"\.([0-9]+)(?![^.])"
_DIGITS = "0123456789"


class _Stage:
    """A way of cutting names into a key and captures, and the dict of patterns it cuts exactly.

    The base stage cuts at whole-segment numbers (``layers.12.``); the dot before each is
    consumed, which keeps the key unambiguous.
    """

    def __init__(self):
        compiled = re.compile(_WHOLE_SEGMENT_INDEX)
        self.split = compiled.split
        self._finditer = compiled.finditer
        self.table: dict[tuple[str, ...], tuple[_Entry, ...]] = {}
        self.resolvers: dict[tuple[str, ...], Resolver] = {}

    def key(self, pattern: Pattern) -> tuple[str, ...] | None:
        """The pattern's key, or ``None`` when this stage does not cut it at its captures."""
        if any(c.kind == ANY for c in pattern.captures):
            return None
        sample, spans = _sample(pattern)
        return self._key_of(sample, spans)

    def _key_of(self, sample: str, spans: list[tuple[int, int]]) -> tuple[str, ...] | None:
        if [found.span(1) for found in self._finditer(sample)] != spans:
            return None
        return tuple(self.split(sample)[0::2])


class _GluedTail(_Stage):
    """Names ending in an index glued to a word (Megatron's grouped experts: ``linear_fc1.weight17``).
    ``rstrip`` cuts the trailing digits off, and the rest is cut like the base stage."""

    def parts(self, name: str) -> tuple[tuple[str, ...], list[str]] | None:
        """The key and captures of ``name``, or ``None`` when it does not end in a glued index."""
        head = name.rstrip(_DIGITS)
        if len(head) == len(name) or head.endswith("."):
            return None
        pieces = self.split(head)
        return tuple(pieces[0::2]), pieces[1::2] + [name[len(head):]]

    def key(self, pattern: Pattern) -> tuple[str, ...] | None:
        glued_at_end = (pattern.captures and pattern.literals[-1] == "" and not pattern.literals[-2].endswith(".")
                        and pattern.captures[-1].offset is None)
        if not glued_at_end or any(c.kind == ANY for c in pattern.captures):
            return None
        sample, spans = _sample(pattern)
        return self._key_of(sample[:spans[-1][0]], spans[:-1])


def _sample(pattern: Pattern) -> tuple[str, list[tuple[int, int]]]:
    """A name the pattern matches (every capture at its smallest value), and each capture's span."""
    text, spans = pattern.literals[0], []
    for capture, literal in zip(pattern.captures, pattern.literals[1:]):
        value = shift(capture, "0")
        spans.append((len(text), len(text) + len(value)))
        text += value + literal
    return text, spans


class _Side:
    """Lookup structures for one direction."""

    def __init__(self, entries: list[_Entry]):
        self.stages = [_Stage(), _GluedTail()]
        self.slow: list[_Entry] = []
        by_priority = sorted(entries, key=lambda e: -e.rule.priority)
        placed: dict[int, int] = {}  # id(entry) -> stage index (len(stages) for slow)
        for entry in by_priority:
            for number, stage in enumerate(self.stages):
                key = stage.key(entry.pattern)
                if key is not None:
                    stage.table[key] = stage.table.get(key, ()) + (entry,)
                    placed[id(entry)] = number
                    break
            else:
                self.slow.append(entry)
                placed[id(entry)] = len(self.stages)
        self._later = {number: [e for e in by_priority if placed[id(e)] > number] for number in range(len(self.stages))}
        for entry in by_priority:
            later = self._later.get(placed[id(entry)], [])
            entry.shadowed_by = tuple(other for other in later if other.rule.priority > entry.rule.priority
                                      and intersects(other.pattern, entry.pattern))
        kept = [{key: _kept(candidates) for key, candidates in stage.table.items()} for stage in self.stages]
        for stage, winners in zip(self.stages, kept):
            stage.resolvers = {key: _combined(entries) for key, entries in winners.items()}
        self._split = self.stages[0].split
        self._resolvers = self.stages[0].resolvers
        # First-stage keys that one entry alone serves, no other entry shadowing it: every name of such
        # a key resolves by that entry's text substitution (see template()).
        self._sole = {key: entries[0] for key, entries in kept[0].items()
                      if len(entries) == 1 and not entries[0].shadowed_by}
        self._tail = self.stages[1]
        self.lookup = self._first_stage_lookup()

    def conflicts(self) -> list[tuple[_Entry, _Entry]]:
        """Pairs of entries that can match one name with neither preferred by priority."""
        pairs = []
        for number, stage in enumerate(self.stages):
            for candidates in stage.table.values():
                pairs += [(a, b) for i, a in enumerate(candidates) for b in candidates[i + 1:]
                          if a.rule.priority == b.rule.priority]
                for a in candidates:
                    pairs += [(a, b) for b in self._later[number]
                              if a.rule.priority == b.rule.priority and intersects(a.pattern, b.pattern)]
        pairs += [(a, b) for i, a in enumerate(self.slow) for b in self.slow[i + 1:]
                  if a.rule.priority == b.rule.priority and intersects(a.pattern, b.pattern)]
        return pairs

    def template(self, name: str, span: tuple[int, int]) -> Match | None:
        """The match of every name made from ``name`` by writing another index in place of its
        whole-segment index at ``span`` (its characters), with that index left as ``*``; ``None``
        where the index cannot prove that one match serves them all.

        It can where the name's first-stage key is served by one entry that no other entry shadows,
        whose resolver only copies that capture's text into the names it builds (no offset on either
        side, not read as a number): the lookup of every such name reaches that resolver. A rank folds
        10^4 per-expert names into runs with one template each instead of one lookup each."""
        parts = self._split(name)
        capture, at = None, len(parts[0])
        for number, digits in enumerate(parts[1::2]):
            at += 1  # the dot the split consumes before each index
            if (at, at + len(digits)) == span:
                capture = number
                break
            at += len(digits) + len(parts[2 * number + 2])
        entry = None if capture is None else self._sole.get(tuple(parts[0::2]))
        if entry is None or capture not in entry.verbatim:
            return None
        raw = parts[1::2]
        raw[capture] = "*"
        start, end = span
        return entry.resolve(f"{name[:start]}*{name[end:]}", raw)

    def _first_stage_lookup(self) -> Callable[[str], Match | None]:
        """The lookup function: the first stage (which serves almost every name) inlined, with
        everything it touches bound to locals, since this runs once per tensor name."""
        split, resolvers, rest = self._split, self._resolvers.get, self._lookup_rest

        def lookup(name: str) -> Match | None:
            parts = split(name)
            resolve = resolvers(tuple(parts[0::2]))
            if resolve is not None:
                found = resolve(name, parts[1::2])
                if found is not None:
                    return found
            return rest(name)

        return lookup

    def _lookup_rest(self, name: str) -> Match | None:
        cut = self._tail.parts(name)
        resolve = cut and self._tail.resolvers.get(cut[0])
        if resolve:
            found = resolve(name, cut[1])
            if found is not None:
                return found
        for entry in self.slow:
            found = entry.try_pattern(name)
            if found is not None:
                return found
        return None


def _kept(candidates: tuple[_Entry, ...]) -> tuple[_Entry, ...]:
    """The candidates of a key that can win, in priority order: one whose pattern equals a
    higher-priority one's never can (a canonical name was chosen for it)."""
    kept: list[_Entry] = []
    for entry in candidates:  # in priority order
        if not any(_same(entry.pattern, winner.pattern) for winner in kept):
            kept.append(entry)
    return tuple(kept)


def _combined(candidates: tuple[_Entry, ...]) -> Resolver:
    """One resolver for the (kept) candidates of a key: shadowing patterns first, then by priority."""
    if len(candidates) == 1 and not candidates[0].shadowed_by:
        return candidates[0].resolve

    def resolve(name: str, raw: Sequence[str]) -> Match | None:
        for entry in candidates:
            for other in entry.shadowed_by:
                found = other.try_pattern(name)
                if found is not None:
                    return found
            found = entry.resolve(name, raw)
            if found is not None:
                return found
        return None

    return resolve


def _concat(pattern: Pattern, sources: Sequence[int | None]) -> str:
    """Source of an f-string building a name of ``pattern`` from the values ``w``: capture i is
    ``w[sources[i]]`` (plus its offset), or a literal ``*`` where ``sources[i]`` is None. Pattern
    literals are word characters, dots and dashes, so they need no escaping inside the f-string."""
    pieces = [pattern.literals[0]]
    for capture, source, literal in zip(pattern.captures, sources, pattern.literals[1:]):
        if source is None:
            pieces.append("*")
        elif capture.offset:
            pieces.append(f"{{int(w[{source}]) + {capture.offset}}}")
        else:
            pieces.append(f"{{w[{source}]}}")
        pieces.append(literal)
    return 'f"' + "".join(pieces) + '"'


def _values(pattern: Pattern, numeric: Iterable[int]) -> str:
    """Source turning the raw captured text ``v`` into values ``w`` (undoing offsets), rejecting a name
    whose shifted index would be negative, or whose index in a capture read as a number (``numeric``)
    is longer than any model's (``int()`` refuses thousands of digits, and names come from files)."""
    guards = [f"len(v[{i}]) <= {MAX_DIGITS}" for i in sorted(numeric)]
    guards += [f"int(v[{i}]) >= {c.offset}" for i, c in enumerate(pattern.captures) if c.offset]
    check = f"    if not ({' and '.join(guards)}):\n        return None\n" if guards else ""
    if not any(c.offset for c in pattern.captures):
        return check + "    w = v\n"
    values = "".join(f"str(int(v[{i}]) - {c.offset}), " if c.offset else f"v[{i}], "
                     for i, c in enumerate(pattern.captures))
    return check + f"    w = ({values})\n"


def _same(a: Pattern, b: Pattern) -> bool:
    return a.literals == b.literals and a.captures == b.captures


def _generated(body: str, **names) -> Resolver:
    """Compile a resolver: straight-line code with the rule's literals inlined, because string
    concatenation beats ``str.format`` and generic loops several times over on the hot path."""
    namespace = {"_new": _new_match, "Match": Match, **names}
    source = "def resolve(name, raw):\n    v = tuple(raw)\n" + body
    exec(compile(source, "<quantmap.index>", "exec"), namespace)  # built only from validated patterns
    return namespace["resolve"]


def _forward(rule: Rule) -> _Entry:
    sources: list[int | None] = list(range(rule.megatron.arity))
    expert = "None"
    if rule.kind == MOE_FANOUT:
        sources.insert(rule.expert_capture, None)  # the expert stays a wildcard
    elif rule.fans_in:
        del sources[rule.expert_capture]  # one HF name for every expert: the match says which source this is
        expert = f"int(w[{rule.expert_capture}])"
    targets = "".join(f"{_concat(p, sources)}, " for p in rule.hf)
    shifted = {i for i, c in enumerate(rule.megatron.captures) if c.offset}
    shifted |= {source for p in rule.hf for c, source in zip(p.captures, sources) if c.offset and source is not None}
    if rule.fans_in:
        shifted.add(rule.expert_capture)  # read as the source's expert number
    body = _values(rule.megatron, shifted) + f"    return _new(Match, (kind, name, ({targets}), rule, None, {expert}, w))\n"
    verbatim = frozenset(range(rule.megatron.arity)) - shifted
    return _Entry(rule.megatron, rule, _generated(body, kind=rule.kind, rule=rule), verbatim)


def _reverse(rule: Rule, index: int) -> _Entry:
    pattern = rule.hf[index]
    slot = rule.expert_capture if rule.kind == MOE_FANOUT else None
    kept: list[int | None] = [i for i in range(pattern.arity) if i != slot]
    if rule.fans_in:
        kept.insert(rule.expert_capture, None)  # every expert is a source: it stays a wildcard
    megatron = _concat(rule.megatron, kept)
    captures = "(" + "".join(f"w[{i}], " for i in kept if i is not None) + ")"
    expert = "None" if slot is None else f"int(w[{slot}])"
    numeric = {i for i, c in enumerate(pattern.captures) if c.offset} | ({slot} if slot is not None else set())
    numeric |= {source for c, source in zip(rule.megatron.captures, kept) if c.offset and source is not None}
    body = _values(pattern, numeric) + f"    return _new(Match, (kind, {megatron}, (name,), rule, part, {expert}, {captures}))\n"
    return _Entry(pattern, rule, _generated(body, kind=rule.kind, rule=rule, part=rule.parts[index] or None))


def _per_variant(entry: _Entry) -> list[_Entry]:
    """One entry per alternative-free variant of the entry's pattern, sharing its resolver."""
    if not entry.pattern.choices:
        return [entry]
    return [_Entry(variant, entry.rule, entry.resolve, entry.verbatim)
            for variant in entry.pattern.variants()]


class Index:
    """Both directions of lookup over a fixed list of rules."""

    def __init__(self, rules: Iterable[Rule]):
        rules = list(rules)
        by_rule = [_forward(r) for r in rules]
        self.forward = _Side([v for entry in by_rule for v in _per_variant(entry)])
        self._by_rule = tuple(entry.try_pattern for entry in by_rule)
        self.reverse = _Side([v for r in rules if r.reversible for i in range(len(r.hf)) for v in _per_variant(_reverse(r, i))])

    def forward_by(self, number: int, name: str) -> Match | None:
        """The forward match of ``name`` by rule ``number`` (its position in the rules given), without
        looking for the rule: the rule's own pattern and resolver, as a lookup that chose it builds it."""
        return self._by_rule[number](name)
