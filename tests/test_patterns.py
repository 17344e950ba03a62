"""The wildcard engine: grammar, matching laws, and overlap detection."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantmap.patterns import ANY, DIGITS, PatternError, intersects, parse

WORD = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
NUMBER = st.integers(0, 10_000).map(str)
ANY_TEXT = st.from_regex(r"[a-z0-9_]{1,5}(\.[a-z0-9_]{1,5}){0,2}", fullmatch=True)


@st.composite
def patterns(draw):
    """A random valid pattern: words, ``*`` and ``**`` segments, and glued ``word*``."""
    segments = []
    for _ in range(draw(st.integers(1, 6))):
        segments.append(draw(st.one_of(WORD, st.just("*"), st.just("**"), WORD.map(lambda w: w + "x*"))))
    return ".".join(segments)


def values_for(pattern):
    return st.tuples(*[ANY_TEXT if c.kind == ANY else NUMBER for c in pattern.captures])


@given(st.data(), patterns())
def test_fill_then_match_gives_back_the_captures(data, text):
    pattern = parse(text)
    values = data.draw(values_for(pattern))
    name = pattern.fill(values)
    found = pattern.match(name)
    assert found is not None
    # '**' may split differently from how it was filled, but the refilled name is the same
    assert pattern.fill(found) == name
    if all(c.kind == DIGITS for c in pattern.captures):
        assert found == values


@given(patterns(), st.data())
def test_no_pattern_matches_a_name_with_a_trailing_newline(text, data):
    pattern = parse(text)
    name = pattern.fill(data.draw(values_for(pattern)))
    assert pattern.match(name + "\n") is None


@given(st.sampled_from(["٣", "३", "１", "²"]))
def test_star_never_matches_non_ascii_digits(digit):
    assert parse("layers.*.mlp").match(f"layers.{digit}.mlp") is None


def test_star_never_matches_empty_text_or_letters():
    pattern = parse("layers.*.mlp")
    assert pattern.match("layers..mlp") is None
    assert pattern.match("layers.x.mlp") is None
    assert pattern.match("layers.12.mlp") == ("12",)


def test_double_star_spans_dots_and_captures_in_order():
    pattern = parse("a.**.b.*.c")
    assert pattern.match("a.x.y.z.b.7.c") == ("x.y.z", "7")
    assert pattern.fill(["p.q", "3"]) == "a.p.q.b.3.c"


def test_captures_fill_left_to_right_whatever_the_mix():
    pattern = parse("x.*.y.**.z.*")
    assert pattern.fill(["1", "mid.dle", "2"]) == "x.1.y.mid.dle.z.2"


def test_glued_star_captures_a_grouped_expert_index():
    pattern = parse("decoder.layers.*.mlp.experts.linear_fc1.weight*")
    assert pattern.match("decoder.layers.3.mlp.experts.linear_fc1.weight17") == ("3", "17")
    assert pattern.match("decoder.layers.3.mlp.experts.linear_fc1.weight") is None


def test_offset_capture_shifts_the_index_by_a_bound_parameter():
    pattern = parse("model.layers.{num_layers + i}.eh_proj.weight")
    assert pattern.params == ("num_layers",)
    bound = pattern.bind({"num_layers": 61})
    assert bound.fill(["0"]) == "model.layers.61.eh_proj.weight"
    assert bound.match("model.layers.62.eh_proj.weight") == ("1",)
    assert bound.match("model.layers.60.eh_proj.weight") is None


@pytest.mark.parametrize(
    "text, offset, fragment",
    [
        ("a.***.b", 2, "'**' must be a whole segment"),
        ("a.b**", 2, "'**' must be a whole segment"),
        ("a.li*near.b", 4, "'*' is a whole segment or ends a word"),
        ("a.*x", 2, "'*' is a whole segment or ends a word"),
        ("a.fc1*", 5, "ends a word"),
        ("a..b", 2, "empty segment"),
        (".a", 0, "empty segment"),
        ("a.", 2, "empty segment"),
        ("a.b c", 3, "unexpected character ' '"),
        ("a.{layer", 2, "malformed capture"),
    ],
)
def test_malformed_patterns_say_what_and_where(text, offset, fragment):
    with pytest.raises(PatternError, match=re.escape(fragment)) as raised:
        parse(text)
    assert raised.value.offset == offset


def _brute_force_overlap(a, b, alphabet="0a.", length=8):
    """Whether some name of up to ``length`` chars over a tiny alphabet matches both patterns."""
    from itertools import product

    return any(
        a.match(name) is not None and b.match(name) is not None
        for n in range(1, length + 1)
        for name in map("".join, product(alphabet, repeat=n))
    )


# At most two segments, so any common name has a witness of at most 8 characters ("a0.a0" ...).
SMALL = st.lists(st.sampled_from(["a", "0", "*", "**", "a*"]), min_size=1, max_size=2).map(".".join)


@settings(max_examples=40, deadline=None)
@given(SMALL, SMALL)
def test_intersects_agrees_with_brute_force_on_small_patterns(a, b):
    pa, pb = parse(a), parse(b)
    assert intersects(pa, pb) == _brute_force_overlap(pa, pb)


def test_intersects_separates_disjoint_literals_and_finds_wildcard_overlap():
    assert intersects(parse("model.layers.*.mlp.weight"), parse("model.layers.**.weight"))
    assert not intersects(parse("model.layers.*.mlp.weight"), parse("model.layers.*.attn.weight"))
    assert intersects(parse("model.layers.0.mlp"), parse("model.layers.*.mlp"))
    assert not intersects(parse("model.layers.x.mlp"), parse("model.layers.*.mlp"))


# Matching is linear in the name: every checkpoint name reaches it (issue 19, item 18).

def _reference_regex(text: str) -> re.Pattern:
    """The backtracking regex a pattern means, written out independently of the engine."""
    def segment(word: str) -> str:
        if word == "**":
            return "(.+)"
        if word == "*":
            return "([0-9]+)"
        if word.endswith("*"):
            return re.escape(word[:-1]) + "([0-9]+)"
        return re.escape(word)
    return re.compile(r"\.".join(map(segment, text.split("."))))


MANY_STARS = st.lists(st.sampled_from(["a", "b", "*", "**", "a*"]), min_size=1, max_size=6).map(".".join)
NAME_SEGMENTS = st.sampled_from(["a", "b", "1", "a12", "", "x\n", "ab"])


@settings(max_examples=300, deadline=None)
@given(MANY_STARS, st.lists(NAME_SEGMENTS, max_size=12).map(".".join))
def test_matching_gives_the_captures_of_the_backtracking_regex(text, name):
    found = _reference_regex(text).fullmatch(name)
    assert parse(text).match(name) == (None if found is None else found.groups())


def _steps(function, *args):
    """``function(*args)`` and the Python lines it ran inside quantmap/patterns.py: a step count
    that does not depend on how busy the machine is."""
    import sys

    import quantmap.patterns as engine

    count = 0

    def local(frame, event, arg):
        nonlocal count
        count += event == "line"
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == engine.__file__ else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        result = function(*args)
    finally:
        sys.settrace(previous)
    return result, count


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["a", "**", "*", "b"]), min_size=2, max_size=7).map(lambda s: ".".join(s + ["**"])),
       st.integers(200, 3000), st.sampled_from(["a", "1", "b", "a.1"]))
def test_several_double_stars_match_long_names_in_linear_steps(text, repeat, unit):
    pattern = parse(text)
    name = ".".join([unit] * repeat)
    segments, parts = name.count(".") + 1, text.count(".") + 1
    found, steps = _steps(pattern.match, name)
    assert steps <= 12 * (segments + 1) * (parts + 1)
    if found is not None:
        assert pattern.fill(found) == name


def test_the_reported_worst_case_is_refused_in_linear_steps():
    import signal

    def too_slow(signum, frame):
        raise AssertionError("matching a 7 KB name took over 20 s: it backtracks")

    pattern = parse("a.**.**.**.weight")
    name = "a." + ".".join(["layers"] * 1000) + ".bias"  # 7 KB, no match: a regex tried every '**' end
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)  # a guard against hanging (the step bound is the assertion): the regex took minutes
    try:
        found, steps = _steps(pattern.match, name)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert found is None
    assert steps <= 12 * 1003 * 6
    assert pattern.match("a.b.c.d.e.weight") == ("b.c", "d", "e")  # each '**' as long as the rest allows
