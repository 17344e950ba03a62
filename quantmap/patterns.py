"""The wildcard engine: one parser and matcher for every name pattern in quantmap.

A pattern is a dotted weight name in which some parts are captures:

* ``*`` captures one run of ASCII digits (a layer or expert index). It is either a whole
  segment (``layers.*``) or glued to the end of a word that ends in a letter or ``_``
  (``weight*``, Megatron's grouped-expert ``weight0..N``).
* ``**`` is a whole segment that captures any non-empty text, dots included.
* ``{i}`` is a labelled digit capture and ``{num_layers + i}`` one shifted by a run-time
  parameter (Hugging Face numbers DeepSeek's MTP layer after the decoder layers). The label is
  documentation today; braces are reserved for the named captures on the roadmap.
* ``{a|b}`` is a whole segment that is literal text with alternatives (Megatron-Core <= 0.16's
  ``transformer_layer`` for ``mtp_model_layer``): a name may hold any of them, but it is not a
  capture, and a name built from the pattern (:meth:`Pattern.fill`, a reverse lookup's target)
  holds the first, the canonical one.

Captures are positional: the n-th capture of one side of a mapping fills the n-th capture of
the other, whatever mix of ``*`` and ``**`` the pattern has. Matching is anchored at both
ends, and ``*`` never matches empty text, a non-ASCII digit or a trailing newline.

Matching takes time linear in the name's length, whatever the pattern: every name of an
untrusted checkpoint reaches it. A pattern with at most one ``**`` is one anchored regex, which
can only try each place the ``**`` could end once. Two or more ``**`` would make a backtracking
regex try every combination of their ends (``a.**.**.**.weight`` took over a minute on a 6 KB
name), so such a pattern is matched segment by segment instead (:class:`_Segments`), with the
same captures the regex would give: each ``**`` as long as the rest of the pattern allows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from quantmap.untrusted import MAX_DIGITS

DIGITS = "digits"
ANY = "any"

_WORD = re.compile(r"[A-Za-z0-9_\-]+")
_GLUED = re.compile(r"[A-Za-z0-9_\-]*[A-Za-z_]\*")
_BRACED = re.compile(r"\{\s*(?:(?P<param>[A-Za-z_]\w*)\s*\+\s*)?(?P<label>[A-Za-z_]\w*|\*)\s*\}")
_CHOICE = re.compile(r"\{\s*[A-Za-z0-9_\-]+\s*(?:\|\s*[A-Za-z0-9_\-]+\s*)+\}")


class PatternError(ValueError):
    """A malformed pattern; ``offset`` is the character where the problem starts."""

    def __init__(self, message: str, offset: int = 0):
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Capture:
    """One capture of a pattern: its kind, an optional label and an optional index offset.

    ``offset`` is an ``int`` once parameters are bound, or the parameter's name before.
    """

    kind: str
    label: str | None = None
    offset: int | str | None = None


@dataclass(frozen=True, slots=True)
class Pattern:
    """A parsed, immutable name pattern. ``literals`` interleave with ``captures``.

    With alternatives (``{a|b}``) ``literals`` hold the canonical text and ``choices`` the text
    of every variant: the pattern matches what any of :meth:`variants` matches.
    """

    text: str
    literals: tuple[str, ...]
    captures: tuple[Capture, ...]
    raw: Callable[[str], tuple[str, ...] | None] = field(repr=False, compare=False, hash=False)
    choices: tuple[str, ...] = ()  # the text of each alternative-free variant, canonical first

    @property
    def arity(self) -> int:
        return len(self.captures)

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the run-time parameters this pattern needs."""
        return tuple(c.offset for c in self.captures if isinstance(c.offset, str))

    def bind(self, params: Mapping[str, int]) -> Pattern:
        """Replace parameter offsets by their values (``KeyError`` names a missing one)."""
        if not self.params:
            return self
        captures = tuple(
            Capture(c.kind, c.label, params[c.offset]) if isinstance(c.offset, str) else c
            for c in self.captures
        )
        return Pattern(self.text, self.literals, captures, self.raw, self.choices)

    def variants(self) -> tuple[Pattern, ...]:
        """The alternative-free patterns this one stands for, canonical first (itself if none).
        Alternatives are not captures, so every variant has this pattern's captures."""
        if not self.choices:
            return (self,)
        return tuple(Pattern(v.text, v.literals, self.captures, v.raw) for v in map(parse, self.choices))

    def match(self, name: str) -> tuple[str, ...] | None:
        """The captures of ``name``, or ``None`` when the pattern does not match it."""
        found = self.raw(name)
        if found is None:
            return None
        return unshift(self.captures, found)

    def fill(self, values: Sequence[str]) -> str:
        """The concrete name with ``values`` (one per capture, in order) filled in."""
        if len(values) != len(self.captures):
            raise ValueError(f"{self.text!r} takes {len(self.captures)} captures, got {len(values)}")
        out = [self.literals[0]]
        for capture, value, literal in zip(self.captures, values, self.literals[1:]):
            out.append(shift(capture, value))
            out.append(literal)
        return "".join(out)

    def __str__(self) -> str:
        return self.text


def shift(capture: Capture, value: str) -> str:
    """A capture's value as it appears in a name (adds the capture's offset)."""
    if capture.offset is None:
        return value
    return str(int(value) + _int_offset(capture))


def unshift(captures: Sequence[Capture], raw: Sequence[str]) -> tuple[str, ...] | None:
    """Values from the text a name holds at each capture; ``None`` if an offset goes negative, or the
    index is longer than any model's (``int()`` refuses thousands of digits, and names come from files)."""
    values = []
    for capture, text in zip(captures, raw):
        if capture.offset is not None:
            if len(text) > MAX_DIGITS:
                return None
            index = int(text) - _int_offset(capture)
            if index < 0:
                return None
            text = str(index)
        values.append(text)
    return tuple(values)


def _int_offset(capture: Capture) -> int:
    if isinstance(capture.offset, str):
        raise ValueError(f"parameter {capture.offset!r} is not bound; compile with it set")
    return capture.offset


def parse(text: str) -> Pattern:
    """Parse a pattern, raising :class:`PatternError` that points at the bad character."""
    if not isinstance(text, str) or not text:
        raise PatternError("a pattern must be a non-empty string")
    literals: list[str] = []
    captures: list[Capture] = []
    regex: list[str] = []
    current: list[str] = []  # literal text since the last capture
    choices: list[list[str]] = [[]]  # the text of every variant, segment by segment
    segments: list[str | None] = []  # each segment's regex; None for '**'

    def add_capture(capture: Capture) -> None:
        literals.append("".join(current))
        current.clear()
        captures.append(capture)
        regex.append("(.+)" if capture.kind == ANY else "([0-9]+)")

    offset = 0
    for index, segment in enumerate(text.split(".")):
        if index:
            current.append(".")
            regex.append(r"\.")
        written = len(regex)
        if not segment:
            raise PatternError("empty segment: two dots in a row, or a leading or trailing dot", offset)
        braced = _BRACED.fullmatch(segment)
        alternatives = [word.strip() for word in segment[1:-1].split("|")] if _CHOICE.fullmatch(segment) else []
        choices = [done + [alternative] for done in choices for alternative in alternatives or [segment]]
        if alternatives:
            if len(set(alternatives)) != len(alternatives):
                raise PatternError(f"an alternative is listed twice in {segment!r}", offset)
            current.append(alternatives[0])
            regex.append("(?:" + "|".join(map(re.escape, alternatives)) + ")")
        elif segment == "**":
            add_capture(Capture(ANY))
        elif segment == "*":
            add_capture(Capture(DIGITS))
        elif braced:
            label = braced["label"]
            add_capture(Capture(DIGITS, None if label == "*" else label, braced["param"]))
        elif "{" in segment or "}" in segment:
            raise PatternError(
                f"malformed capture {segment!r}: write '{{i}}', '{{param + i}}' or alternatives '{{a|b}}' "
                "as a whole segment", offset
            )
        elif "**" in segment:
            raise PatternError(f"malformed wildcard in {segment!r}: '**' must be a whole segment", offset)
        elif _GLUED.fullmatch(segment):
            word = segment[:-1]
            current.append(word)
            regex.append(re.escape(word))
            add_capture(Capture(DIGITS))
        elif "*" in segment:
            raise PatternError(
                f"malformed wildcard in {segment!r}: '*' is a whole segment or ends a word "
                "that ends in a letter, like 'weight*'",
                offset + segment.index("*"),
            )
        elif not _WORD.fullmatch(segment):
            bad = next(i for i, ch in enumerate(segment) if not _WORD.fullmatch(ch))
            raise PatternError(f"unexpected character {segment[bad]!r} in {segment!r}", offset + bad)
        else:
            current.append(segment)
            regex.append(re.escape(segment))
        segments.append(None if segment == "**" else "".join(regex[written:]))
        offset += len(segment) + 1
    literals.append("".join(current))
    variants = tuple(".".join(segments) for segments in choices) if len(choices) > 1 else ()
    if sum(capture.kind == ANY for capture in captures) > 1:
        raw = _Segments(segments).captures
    else:
        raw = _regex_captures(re.compile("".join(regex)))
    return Pattern(text, tuple(literals), tuple(captures), raw, variants)


def _regex_captures(regex: re.Pattern) -> Callable[[str], tuple[str, ...] | None]:
    fullmatch = regex.fullmatch

    def captures(name: str) -> tuple[str, ...] | None:
        found = fullmatch(name)
        return None if found is None else found.groups()

    return captures


class _Segments:
    """A pattern with several ``**``, matched in O(segments x pattern segments) steps.

    Every part of a pattern but ``**`` matches exactly one segment of a name (literals, digit
    runs and alternatives hold no dot), and ``**`` matches a run of whole segments: the text of
    one or more, not empty and without a newline (what the regex ``.+`` between dots matches).
    ``tail[j][i]`` says whether pattern segments ``j:`` match name segments ``i:``; filled from
    the right, a ``**`` needs only whether some later position works, kept as a running flag. The
    captures are then read off from the left, each ``**`` taking the longest run that leaves the
    rest matchable: the choice a backtracking regex makes first.
    """

    __slots__ = ("parts",)

    def __init__(self, segment_regexes: Sequence[str | None]):
        # None for '**', else the fullmatch of one name segment (its groups are the captures)
        self.parts = tuple(None if rx is None else re.compile(rx).fullmatch for rx in segment_regexes)

    def captures(self, name: str) -> tuple[str, ...] | None:
        if "\n" in name:  # no part of a pattern matches a newline
            return None
        words = name.split(".")
        tail = self._tails(words)
        if not tail[0][0]:
            return None
        out: list[str] = []
        at = 0
        for j, part in enumerate(self.parts):
            if part is None:
                end = next(k for k in range(len(words), at, -1) if tail[j + 1][k] and (k > at + 1 or words[at]))
                out.append(".".join(words[at:end]))
                at = end
            else:
                out.extend(part(words[at]).groups())
                at += 1
        return tuple(out)

    def _tails(self, words: list[str]) -> list[list[bool]]:
        n = len(words)
        tail = [[False] * (n + 1) for _ in range(len(self.parts) + 1)]
        tail[-1][n] = True
        for j in range(len(self.parts) - 1, -1, -1):
            part, here, after = self.parts[j], tail[j], tail[j + 1]
            if part is None:
                beyond = False  # some k >= i + 2 with after[k]: a run of two or more segments
                for i in range(n - 1, -1, -1):
                    here[i] = beyond or (after[i + 1] and words[i] != "")
                    beyond = beyond or after[i + 1]
            else:
                for i in range(n):
                    here[i] = after[i + 1] and part(words[i]) is not None
        return tail


def intersects(a: Pattern, b: Pattern) -> bool:
    """Whether some name matches both patterns (offsets ignored: they only bound an index below).

    Patterns are tiny automata over characters (a literal, a run of digits, a run of anything),
    so this walks their product breadth-first. Fixed prefixes and suffixes rule most pairs out
    before that. Patterns with alternatives intersect when some pair of their variants does.
    """
    if a.choices or b.choices:
        return any(intersects(x, y) for x in a.variants() for y in b.variants())
    head_a, head_b = a.literals[0], b.literals[0]
    tail_a, tail_b = a.literals[-1], b.literals[-1]
    if not (head_a.startswith(head_b) or head_b.startswith(head_a)):
        return False
    if not (tail_a.endswith(tail_b) or tail_b.endswith(tail_a)):
        return False
    atoms_a, atoms_b = _atoms(a), _atoms(b)
    alphabet = {ch for atom in atoms_a + atoms_b if len(atom) == 1 for ch in atom} | set("0123456789") | {"\x01"}
    start = (_closure(atoms_a, (0, False)), _closure(atoms_b, (0, False)))
    seen = {start}
    frontier = [start]
    while frontier:
        states_a, states_b = frontier.pop()
        if (len(atoms_a), False) in states_a and (len(atoms_b), False) in states_b:
            return True
        for ch in alphabet:
            next_a = _step(atoms_a, states_a, ch)
            next_b = _step(atoms_b, states_b, ch) if next_a else frozenset()
            if next_a and next_b and (next_a, next_b) not in seen:
                seen.add((next_a, next_b))
                frontier.append((next_a, next_b))
    return False


def _atoms(pattern: Pattern) -> list[str]:
    """Characters of literals, and DIGITS / ANY for captures."""
    atoms: list[str] = list(pattern.literals[0])
    for capture, literal in zip(pattern.captures, pattern.literals[1:]):
        atoms.append(capture.kind)
        atoms.extend(literal)
    return atoms


def _closure(atoms: list[str], state: tuple[int, bool]) -> frozenset:
    # (i, True) means "inside the run of atom i, at least one character consumed"
    return frozenset({state, (state[0] + 1, False)} if state[1] else {state})


def _step(atoms: list[str], states: frozenset, ch: str) -> frozenset:
    out: set = set()
    for index, inside in states:
        if index == len(atoms):
            continue
        atom = atoms[index]
        if atom == DIGITS:
            if "0" <= ch <= "9":
                out |= _closure(atoms, (index, True))
        elif atom == ANY:
            if ch != "\n":
                out |= _closure(atoms, (index, True))
        elif not inside and atom == ch:
            out.add((index + 1, False))
    return frozenset(out)
