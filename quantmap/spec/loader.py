"""YAML text → validated, merged spec, with every value's file, line and column kept.

Loading never executes anything from the file: the C safe loader when present, no aliases,
a size limit, strict UTF-8. Problems are collected and raised together as one
:class:`~quantmap.diagnostics.SpecError` so that a user sees all of them at once.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from quantmap.diagnostics import Diagnostic, Location, SpecError
from quantmap.limits import MAX_SPEC_BYTES
from quantmap.spec.library import display_path, find_spec
from quantmap.spec.schema import BlockUse, Exclusions, Hybrid, KindSource, MappingSpec, Sides, SpecFile, marks

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MODELS_AT = {(): SpecFile, ("mappings", int): MappingSpec, ("prefix",): Sides, ("exclude",): Exclusions,
              ("blocks", str, int): MappingSpec, ("use", int): BlockUse, ("use", int, "prefix"): Sides,
              ("hybrid",): Hybrid, ("hybrid", "config", int): KindSource}


@dataclass(frozen=True, slots=True)
class SourcedMapping:
    """A mapping with prefixes applied, and where each of its fields was written."""

    spec: MappingSpec
    megatron: str
    hf: tuple[tuple[str, str], ...]  # (part, pattern); part is "" for a single HF name
    location: Location
    field_locations: tuple[tuple[str, Location], ...]
    prefix_lengths: tuple[int, int] = (0, 0)  # (megatron, hf): columns to take off pattern offsets

    def where(self, name: str) -> Location:
        return dict(self.field_locations).get(name, self.location)

    @property
    def key(self) -> tuple[str, str | None]:
        """What makes a mapping one of its spec: its Megatron pattern and the HF naming it serves (one
        Megatron weight may map to per-expert names on disk and to a fused-experts tensor in memory)."""
        return self.megatron, self.spec.hf_naming


@dataclass(frozen=True, slots=True)
class ResolvedSpec:
    """A spec after ``extends`` and prefixes: the compiler's only input."""

    name: str
    description: str
    architectures: tuple[str, ...]
    metadata: dict[str, Any]
    params: dict[str, int | None]
    quantizers: tuple[str, ...]
    kv_cache: bool
    kv_skip_segments: tuple[str, ...]
    mappings: tuple[SourcedMapping, ...]
    exclude_megatron: tuple[str, ...]
    exclude_hf: tuple[str, ...]
    files: tuple[str, ...] = field(default=())
    blocks: dict[str, tuple[SourcedMapping, ...]] = field(default_factory=dict)  # as written, no prefix
    hybrid: Hybrid | None = None  # the kinds of decoder layer of a hybrid model
    in_memory_renames: dict[str, str] = field(default_factory=dict)  # on-disk HF prefix -> in-memory prefix


def load_spec(spec: str | Path) -> ResolvedSpec:
    """Load a spec by path or shipped name, following ``extends``."""
    return _resolve(find_spec(spec), ())


def read_spec_file(path: Path) -> tuple[SpecFile, dict[tuple, Location], dict[tuple, Location]]:
    """Parse and validate one file. Returns the model and the locations of values and keys."""
    file = display_path(path)
    text = _read_text(path, file)
    data, values, keys = _compose(text, file)
    try:
        return SpecFile.model_validate(data), values, keys
    except pydantic.ValidationError as exc:
        raise SpecError([_from_pydantic(err, file, values, keys) for err in exc.errors()]) from None


def _read_text(path: Path, file: str) -> str:
    where = Location(file)
    try:  # never more than the limit is read: a huge file is refused by its size, not loaded first
        with path.open("rb") as stream:
            raw = stream.read(MAX_SPEC_BYTES + 1)
            size = max(len(raw), os.fstat(stream.fileno()).st_size)
    except OSError as exc:
        raise SpecError([Diagnostic("QM006", f"cannot read the spec: {exc.strerror}", where)]) from None
    if size > MAX_SPEC_BYTES:
        raise SpecError([Diagnostic(
            "QM004", f"the spec is {size:,} bytes, over the {MAX_SPEC_BYTES:,}-byte limit (quantmap/limits.py)",
            where, "split it with 'extends', or check that this is the right file",
        )])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError([Diagnostic(
            "QM002", f"byte 0x{raw[exc.start]:02x} is not valid UTF-8", Location(file, line, column),
            "save the file as UTF-8",
        )]) from None
    if not text.strip() or not _has_content(text):
        raise SpecError([Diagnostic(
            "QM003", "the spec is empty", Location(file, 1, 1),
            "a spec needs at least 'name' and 'mappings'; see docs/authoring.md",
        )])
    return text


def _has_content(text: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines())


def _compose(text: str, file: str) -> tuple[Any, dict[tuple, Location], dict[tuple, Location]]:
    """YAML nodes → plain data, recording each value's and key's location by path."""
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow in a file (NUL, other controls)
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise SpecError([Diagnostic("QM001", f"YAML syntax error: control character U+{exc.character:04X}, which "
                                    f"YAML does not allow in a file", Location(file, line, column),
                                    "remove it: no tensor name holds one")]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError([Diagnostic("QM001", f"YAML syntax error: {problem}", where,
                                    "check indentation, colons and quotes on this line")]) from None
    values: dict[tuple, Location] = {}
    keys: dict[tuple, Location] = {}
    problems: list[Diagnostic] = []
    seen: set[int] = set()

    def at(node: yaml.Node) -> Location:
        return Location(file, node.start_mark.line + 1, node.start_mark.column + 1)

    def build(node: yaml.Node, path: tuple) -> Any:
        if id(node) in seen or getattr(node, "anchor", None):
            problems.append(Diagnostic("QM005", "YAML anchors and aliases are not allowed in specs", at(node),
                                       "write the value out, or share mappings with 'extends'"))
            return None
        seen.add(id(node))
        values[path] = at(node)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    problems.append(Diagnostic("QM005", "YAML merge keys ('<<') are not allowed in specs",
                                               at(key_node), "write the keys out"))
                    continue
                key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    problems.append(Diagnostic("QM011", "mapping keys must be plain strings", at(key_node)))
                    continue
                if key in out:
                    problems.append(Diagnostic("QM030", f"key {key!r} appears twice in this mapping",
                                               at(key_node), "keep one of them"))
                keys[path + (key,)] = at(key_node)
                out[key] = build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, path + (i,)) for i, item in enumerate(node.value)]
        return loader.construct_object(node)

    try:
        data = build(root, ()) if root is not None else None
    finally:
        loader.dispose()
    if problems:
        raise SpecError(problems)
    if not isinstance(data, dict):
        raise SpecError([Diagnostic("QM011", "a spec must be a YAML mapping of keys to values",
                                    Location(file, 1, 1), "start with 'name: <spec name>'")])
    return data, values, keys


def _from_pydantic(err: dict, file: str, values: dict, keys: dict) -> Diagnostic:
    loc = tuple(err["loc"])
    dotted = ".".join(str(part) for part in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
        return Diagnostic("QM010", f"unknown key {loc[-1]!r} at {dotted}", _nearest(loc, keys, values, file), hint)
    if kind == "missing":
        return Diagnostic("QM012", f"missing required field {loc[-1]!r} at {dotted}",
                          _nearest(loc[:-1], values, values, file), f"add '{loc[-1]}: ...'")
    return Diagnostic("QM011", f"{dotted}: {err['msg']}", _nearest(loc, values, values, file),
                      f"got {err.get('input')!r}")


def _nearest(loc: tuple, first: dict, second: dict, file: str) -> Location:
    """The location of the longest prefix of ``loc`` (Pydantic adds union member names)."""
    for end in range(len(loc), -1, -1):
        found = first.get(loc[:end]) or second.get(loc[:end])
        if found:
            return found
    return Location(file, 1, 1)


def _allowed_fields(parent: tuple) -> list[str]:
    shape = tuple(int if isinstance(part, int) else part for part in parent)
    if shape[:1] == ("blocks",) and len(shape) == 3:
        shape = ("blocks", str, int)  # a block's name is the user's
    model = _MODELS_AT.get(shape)
    return sorted(model.model_fields) if model else []


def _resolve(path: Path, chain: tuple[Path, ...]) -> ResolvedSpec:
    model, values, keys = read_spec_file(path)
    file = display_path(path)
    parent: ResolvedSpec | None = None
    if model.extends is not None:
        parent = _resolve_parent(model.extends, path, chain, values.get(("extends",), Location(file)))
    blocks = {**(parent.blocks if parent else {}), **{
        name: tuple(_sourced(m, ("blocks", name, i), file, values, Sides()) for i, m in enumerate(block))
        for name, block in model.blocks.items()}}
    own = tuple(_sourced(m, ("mappings", i), file, values, model.prefix) for i, m in enumerate(model.mappings))
    own += _instances(model, blocks, values, file)
    _reject_duplicates(own)
    return _merge(model, own, parent, file, blocks, values)


def _instances(model: SpecFile, blocks: dict[str, tuple[SourcedMapping, ...]], values: dict,
               file: str) -> tuple[SourcedMapping, ...]:
    """The mappings of every ``use``: the block's, under the spec's prefix and then the instance's."""
    out: list[SourcedMapping] = []
    problems = []
    for index, use in enumerate(model.use):
        prefix = Sides(megatron=model.prefix.megatron + use.prefix.megatron, hf=model.prefix.hf + use.prefix.hf)
        names = [use.block] if isinstance(use.block, str) else use.block
        for position, name in enumerate(names):
            if name not in blocks:
                where = values.get(("use", index, "block") + (() if isinstance(use.block, str) else (position,)))
                close = difflib.get_close_matches(name, list(blocks), n=1)
                problems.append(Diagnostic(
                    "QM043", f"'use' names no block {name!r}", where or Location(file),
                    f"did you mean {close[0]!r}?" if close else f"declared blocks: {', '.join(blocks) or 'none'}"))
                continue
            out += [_prefixed(m, prefix, use.priority) for m in blocks[name]]
    if problems:
        raise SpecError(problems)
    return tuple(out)


def _resolve_parent(ref: str, path: Path, chain: tuple[Path, ...], where: Location) -> ResolvedSpec:
    # A file next to the extending spec first, then a shipped spec or base ("base/gqa"); never the
    # working directory, so that a spec compiles to the same rules wherever it is run.
    try:
        target = find_spec(ref, beside=path.parent)
    except SpecError as exc:
        raise SpecError([Diagnostic("QM040", f"'extends: {ref}' names no spec: {d.message}", where, d.hint)
                         for d in exc.diagnostics]) from None
    seen = chain + (path.resolve(),)
    if target.resolve() in seen:
        cycle = " -> ".join(p.name for p in seen + (target.resolve(),))
        raise SpecError([Diagnostic("QM041", f"extends cycle: {cycle}", where, "remove one of the 'extends'")])
    return _resolve(target, seen)


def _sourced(m: MappingSpec, base: tuple, file: str, values: dict, prefix: Sides) -> SourcedMapping:
    parts = (("", m.hf),) if isinstance(m.hf, str) else tuple(m.hf.items())
    fields = [(name, values[base + (name,)]) for name in MappingSpec.model_fields if base + (name,) in values]
    fields += [(f"hf.{part}", values[base + ("hf", part)]) for part, _ in parts if base + ("hf", part) in values]
    return SourcedMapping(
        spec=m,
        megatron=prefix.megatron + m.megatron,
        hf=tuple((part, prefix.hf + pattern) for part, pattern in parts),
        location=values.get(base, Location(file)),
        field_locations=tuple(fields),
        prefix_lengths=(len(prefix.megatron), len(prefix.hf)),
    )


def _reject_duplicates(mappings: tuple[SourcedMapping, ...]) -> None:
    seen: dict[str, list[SourcedMapping]] = {}
    problems = []
    for m in mappings:
        # A mapping without hf_naming serves both namings, so it clashes with a mapping of either.
        clash = next((other for other in seen.get(m.megatron, ())
                      if None in (other.spec.hf_naming, m.spec.hf_naming) or other.key == m.key), None)
        if clash is not None:
            problems.append(Diagnostic(
                "QM030", f"duplicate mapping for {m.megatron!r}; the first is at {clash.location}",
                m.where("megatron"), "remove one, or merge their HF names into one fused group (or give each "
                "its own hf_naming)",
            ))
        else:
            seen.setdefault(m.megatron, []).append(m)
    if problems:
        raise SpecError(problems)


def _kept(model: SpecFile, parent: ResolvedSpec | None, values: dict, file: str) -> list[SourcedMapping]:
    """The inherited mappings less those ``drop`` names; a pattern that drops nothing is an error."""
    inherited = list(parent.mappings) if parent else []
    known = {m.megatron for m in inherited}
    problems = []
    for index, pattern in enumerate(model.drop):
        if pattern not in known:
            close = difflib.get_close_matches(pattern, sorted(known), n=1)
            hint = (f"did you mean {close[0]!r}?" if close else "write the inherited mapping's Megatron pattern as "
                    "the extended spec resolves it") if parent else "'drop' removes mappings of the spec in 'extends'"
            problems.append(Diagnostic("QM042", f"'drop' names no inherited mapping: {pattern!r}",
                                       values.get(("drop", index), Location(file)), hint))
    if problems:
        raise SpecError(problems)
    dropped = set(model.drop)
    return [m for m in inherited if m.megatron not in dropped]


def _merge(model: SpecFile, own: tuple[SourcedMapping, ...], parent: ResolvedSpec | None, file: str,
           blocks: dict[str, tuple[SourcedMapping, ...]], values: dict) -> ResolvedSpec:
    """Child overrides parent: same Megatron pattern and HF naming replaces in place, new mappings append. Prefixes
    apply to mappings only: ``exclude`` patterns are taken as written."""
    explicit = model.model_fields_set
    mappings = [_prefixed(m, model.prefix) for m in _kept(model, parent, values, file)]
    position = {m.key: i for i, m in enumerate(mappings)}
    for m in own:
        if m.key in position:
            mappings[position[m.key]] = m
        else:
            mappings.append(m)

    def pick(name: str, own_value: Any, inherited: Any) -> Any:
        return own_value if parent is None or name in explicit else inherited

    if model.hybrid is not None:
        _check_hybrid(model.hybrid, mappings, values, file)
    return ResolvedSpec(
        name=model.name,
        description=model.description or (parent.description if parent else ""),
        architectures=tuple(model.architectures or (parent.architectures if parent else ())),
        metadata={**(parent.metadata if parent else {}), **model.metadata},
        params={**(parent.params if parent else {}), **model.params},
        quantizers=tuple(pick("quantizers", model.quantizers, parent and parent.quantizers)),
        kv_cache=pick("kv_cache", model.kv_cache, parent and parent.kv_cache),
        kv_skip_segments=tuple(pick("kv_skip_segments", model.kv_skip_segments, parent and parent.kv_skip_segments)),
        mappings=tuple(mappings),
        exclude_megatron=(parent.exclude_megatron if parent else ()) + tuple(model.exclude.megatron),
        exclude_hf=(parent.exclude_hf if parent else ()) + tuple(model.exclude.hf),
        files=(parent.files if parent else ()) + (file,),
        blocks=blocks,
        hybrid=pick("hybrid", model.hybrid, parent and parent.hybrid),
        in_memory_renames=pick("in_memory_renames", _renames(model, values, file), parent and parent.in_memory_renames),
    )


def _renames(model: SpecFile, values: dict, file: str) -> dict[str, str]:
    """``in_memory_renames``, checked: each prefix non-empty, and none the start of another (which one
    would apply to a name would depend on the order they are written in)."""
    renames = model.in_memory_renames
    where = values.get(("in_memory_renames",), Location(file))
    problems = [Diagnostic("QM045", f"in_memory_renames: {old!r} -> {new!r} has an empty prefix", where,
                           "write both prefixes out, e.g. 'backbone.: model.'")
                for old, new in renames.items() if not old or not new]
    problems += [Diagnostic("QM045", f"in_memory_renames: {short!r} is the start of {long!r}, so both would "
                            f"rename {long}...", where, "keep one of the two, or write them so neither starts the other")
                 for short in renames for long in renames if short != long and short and long.startswith(short)]
    if problems:
        raise SpecError(problems)
    return dict(renames)


def _check_hybrid(hybrid: Hybrid, mappings: list[SourcedMapping], values: dict, file: str) -> None:
    """Every kind is marked by texts that mark a mapping of the spec, and the config's values name declared kinds."""
    problems = []

    def problem(message: str, path: tuple, hint: str) -> None:
        problems.append(Diagnostic("QM044", message, values.get(("hybrid",) + path, Location(file)), hint))

    declared = ", ".join(hybrid.kinds)
    if not hybrid.kinds:
        problem("hybrid declares no layer kind", ("kinds",), "list each kind with the Megatron texts of its mappings")
    for kind, texts in hybrid.kinds.items():
        if not texts:
            problem(f"layer kind {kind!r} lists no Megatron text", ("kinds", kind),
                    "list texts of its mappings' Megatron patterns, e.g. 'self_attention.in_proj.'")
        for index, text in enumerate(texts):
            if not any(marks(text, m.megatron) for m in mappings):
                problem(f"{text!r} (layer kind {kind!r}) marks no mapping: no Megatron pattern contains it at a "
                        "segment start", ("kinds", kind, index), "copy a part of a mapping's Megatron pattern that "
                        "begins after a dot, e.g. 'mixer.' or 'self_attention.linear_qkv.'")
    for index, source in enumerate(hybrid.config):
        named = [(("values", value), kind) for value, kind in (source.values or {}).items()]
        named += [((name,), getattr(source, name)) for name in ("every", "others") if getattr(source, name)]
        for path, kind in named:
            if kind not in hybrid.kinds:
                close = difflib.get_close_matches(kind, list(hybrid.kinds), n=1)
                problem(f"config {source.key!r} gives layer kind {kind!r}, which hybrid.kinds does not declare",
                        ("config", index) + path, f"did you mean {close[0]!r}?" if close else f"declared: {declared}")
    if problems:
        raise SpecError(problems)


def _prefixed(m: SourcedMapping, prefix: Sides, priority: int = 0) -> SourcedMapping:
    """``m`` with ``prefix`` put before its names and ``priority`` added to its own."""
    if not (prefix.megatron or prefix.hf or priority):
        return m
    return SourcedMapping(
        spec=m.spec.model_copy(update={"priority": m.spec.priority + priority}) if priority else m.spec,
        megatron=prefix.megatron + m.megatron,
        hf=tuple((part, prefix.hf + pattern) for part, pattern in m.hf),
        location=m.location,
        field_locations=m.field_locations,
        prefix_lengths=(m.prefix_lengths[0] + len(prefix.megatron), m.prefix_lengths[1] + len(prefix.hf)),
    )
