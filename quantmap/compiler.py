"""Resolved spec → rules: each weight mapping becomes a weight rule plus derived buffer rules.

Derivations, per mapping:

* the weight itself (kind ``weight``);
* per quantizer buffer, when both sides name a ``.weight``: ``amax`` (one HF name), ``fanout``
  (a fused group) or, for a grouped-MoE ``weight*`` mapping, ``moe_fanout``;
* for a grouped-MoE ``weight*`` mapping, also ModelOpt 0.47's per-expert weight quantizers
  (``linear_fc1.weight_quantizer.{E}._amax``) next to the older shared one, and for a mapping onto a
  transformers v5 fused-experts tensor (``fused_experts``) its quantizers as ModelOpt names them
  (:mod:`quantmap.moe_rules`);
* per weight quantizer buffer, the same rule for each stage of ModelOpt's sequential weight quantizer
  (W4A8: ``weight_quantizer.{S}._amax``, :mod:`quantmap.stages`), in every form above but a grouped
  block's shared one;
* for attention mappings, the KV-cache ``k_bmm``/``v_bmm`` amax rules of the module that holds
  the weight.

A mapping with ``hf_naming`` is compiled only under that HF naming (``on-disk``, the default, or
``in-memory``); one without it under both, with the spec's ``in_memory_renames`` applied to its HF
names in memory.

What cannot be derived is reported as a warning with the reason, never dropped silently; what
is wrong is an error at the spec location that caused it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

from quantmap.diagnostics import Diagnostic, Location, SpecError
from quantmap.index import Index
from quantmap.limits import over, param_limit
from quantmap.element_layout import (GDN_CONV1D, GROUP_PARTS, INTERLEAVED, TRANSPOSED, ZERO_CENTERED, ElementLayout,
                                     derive)
from quantmap.patterns import PatternError, Pattern, parse
from quantmap.moe_rules import WEIGHT_QUANTIZER, Derived, fused_expert_buffers, grouped_weight_buffers, with_stages
from quantmap.rules import AMAX, FAN_IN, FANOUT, MOE_FANOUT, WEIGHT, Origin, Rule
from quantmap.ruleset import RuleSet
from quantmap.spec.loader import ResolvedSpec, SourcedMapping

_QKV_PARTS = ({"q", "k", "v"}, {"q", "k", "v", "g"})
_KV_BUFFERS = (("k_bmm_quantizer._amax", "core_attention.k_bmm_quantizer._amax"),
               ("v_bmm_quantizer._amax", "core_attention.v_bmm_quantizer._amax"))


@dataclass
class _Context:
    spec: ResolvedSpec
    params: dict[str, int | None]
    errors: list[Diagnostic]
    warnings: list[Diagnostic]
    unbound: set[str] = field(default_factory=set)  # missing parameters already reported


@dataclass(frozen=True)
class RuleSource:
    """What a :class:`RuleSet` was compiled from: the resolved spec (plain data: its files already read),
    the run-time parameters given, and the HF naming.

    A rule set pickles as its source and unpickling compiles it again (:meth:`compile`): the index's
    lookup functions are generated code, which pickle cannot carry, and a spawned worker must get the
    very rules its command compiled without reading the spec's files again (they may have changed or
    gone since the command started)."""

    spec: ResolvedSpec
    params: dict[str, int]
    hf_naming: str

    def compile(self) -> RuleSet:
        return compile_spec(self.spec, self.params, self.hf_naming)


HF_NAMINGS = ("on-disk", "in-memory")


def compile_spec(spec: ResolvedSpec, params: dict[str, int] | None = None, hf_naming: str = "on-disk") -> RuleSet:
    """Compile a resolved spec with run-time ``params`` for one HF naming (``on-disk``: the names
    ``save_pretrained`` writes; ``in-memory``: transformers v5's fused experts, as ModelOpt names a
    live model's quantizers); raises :class:`SpecError` on any error."""
    if hf_naming not in HF_NAMINGS:
        raise ValueError(f"hf_naming must be 'on-disk' or 'in-memory', not {hf_naming!r}")
    source = RuleSource(spec, dict(params or {}), hf_naming)
    if hf_naming == "in-memory" and spec.in_memory_renames:
        spec = _renamed_in_memory(spec)
    context = _Context(spec, _bind_params(spec, params or {}), [], [])
    rules: list[Rule] = []
    for mapping in spec.mappings:
        if mapping.spec.hf_naming in (None, hf_naming):
            rules.extend(_compile_mapping(mapping, context))
    _check_exclusions(spec, context)
    if context.errors:
        raise SpecError(context.errors)
    rules = _dedupe_kv(rules)
    index = Index(rules)
    _check_conflicts(index, context)
    if context.errors:
        raise SpecError(context.errors)
    return RuleSet(source, spec, tuple(rules), index, tuple(context.warnings), context.params)


def _renamed_in_memory(spec: ResolvedSpec) -> ResolvedSpec:
    """The spec as a live transformers v5 model names it: its ``in_memory_renames`` applied to the HF
    side of every mapping that serves both namings, and of every HF exclusion (a mapping marked
    ``hf_naming: in-memory`` is written in those names already)."""
    def renamed(name: str) -> str:
        old = next((old for old in spec.in_memory_renames if name.startswith(old)), None)
        return name if old is None else spec.in_memory_renames[old] + name[len(old):]

    mappings = tuple(m if m.spec.hf_naming is not None
                     else replace(m, hf=tuple((part, renamed(text)) for part, text in m.hf)) for m in spec.mappings)
    return replace(spec, mappings=mappings, exclude_hf=tuple(map(renamed, spec.exclude_hf)))


def infer_kind(mapping: SourcedMapping) -> str:
    """The mapping's kind: given explicitly, or from the part names of its fused group."""
    if mapping.spec.kind:
        return mapping.spec.kind
    parts = {part for part, _ in mapping.hf}
    if parts == {""}:
        return "plain"
    if parts in _QKV_PARTS:
        return "qkv"
    if parts == {"k", "v"}:
        return "kv"
    if parts == {"gate", "up"}:
        return "gated_mlp"
    return "fused"


def _bind_params(spec: ResolvedSpec, given: dict[str, int]) -> dict[str, int | None]:
    problems = []
    for name, value in given.items():
        if name not in spec.params:
            close = difflib.get_close_matches(name, list(spec.params), n=1)
            known = ", ".join(spec.params) or "none"
            problems.append(Diagnostic("QM050", f"spec {spec.name!r} has no parameter {name!r}",
                                       Location(spec.files[-1]),
                                       f"did you mean {close[0]!r}?" if close else f"its parameters: {known}"))
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(Diagnostic("QM050", f"parameter {name!r} must be a whole number >= 0, got {value!r}",
                                       Location(spec.files[-1])))
    bound = {**spec.params, **given}
    problems += [Diagnostic("QM050", too_big, Location(spec.files[-1]), "check the value (--param, --config or the "
                            "spec's 'params'); no real model comes near it")
                 for name, value in bound.items() if isinstance(value, int) and name in spec.params
                 and (too_big := over(f"parameter {name!r}", value, param_limit(name)))]
    if problems:
        raise SpecError(problems)
    return bound


def _parse(text: str, mapping: SourcedMapping, field: str, context: _Context, prefix_length: int) -> Pattern | None:
    try:
        pattern = parse(text)
    except PatternError as exc:
        shift = max(exc.offset - prefix_length, 0)
        context.errors.append(Diagnostic("QM020", f"malformed pattern {text!r}: {exc}",
                                         mapping.where(field).shifted(shift),
                                         "see docs/authoring.md#wildcards"))
        return None
    missing = [name for name in pattern.params if context.params.get(name) is None]
    if missing:
        # One error per parameter, at its first use: a spec may use it in dozens of patterns.
        if missing[0] not in context.unbound:
            context.unbound.add(missing[0])
            context.errors.append(Diagnostic(
                "QM050", f"spec {context.spec.name!r} needs the run-time parameter {missing[0]!r} "
                f"(first used by pattern {text!r})", mapping.where(field),
                f"pass --param {missing[0]}=N (or compile(spec, {missing[0]}=N)), or give it a default under 'params'",
            ))
        return None
    return pattern.bind(context.params)


def _compile_mapping(mapping: SourcedMapping, context: _Context) -> list[Rule]:
    if not mapping.hf:
        context.errors.append(Diagnostic("QM022", "empty fused group: 'hf' names no part", mapping.where("hf"),
                                         "list the parts in Megatron's order, e.g. {q: ..., k: ..., v: ...}"))
        return []
    kind = infer_kind(mapping)
    if kind == "plain" and len(mapping.hf) != 1:
        context.errors.append(Diagnostic("QM011", "a plain mapping takes one HF name, not a group",
                                         mapping.where("kind"), "drop 'kind' or set it to 'fused'"))
        return []
    if mapping.spec.hf_parts is not None and not _check_hf_parts(mapping, kind, context):
        return []
    if mapping.spec.hf_layout and not _check_hf_layout(mapping, kind, context):
        return []
    if not _check_fused_module(mapping, kind, context) or not _check_kind_has_effect(mapping, context):
        return []
    if mapping.spec.quantized_parts is not None and not _check_quantized_parts(mapping, context):
        return []
    megatron = _parse(mapping.megatron, mapping, "megatron", context, mapping.prefix_lengths[0])
    hf = [_parse(text, mapping, f"hf.{part}" if part else "hf", context, mapping.prefix_lengths[1])
          for part, text in mapping.hf]
    if megatron is None or None in hf:
        return []
    grouped = is_grouped(megatron)
    fused = mapping.spec.fused_experts is not None
    if not (_check_fused_experts(mapping, megatron, hf, context) if fused
            else _check_arity(mapping, megatron, hf, grouped, context)):
        return []
    origin = Origin(mapping.location, mapping.megatron, WEIGHT)
    parts = tuple(part for part, _ in mapping.hf)
    common = dict(parallel=mapping.spec.parallel, priority=mapping.spec.priority)
    hf_parts = None if mapping.spec.hf_parts is None else tuple(mapping.spec.hf_parts)
    hf_layout = tuple(mapping.spec.hf_layout or ())
    experts = _expert_count(mapping, context) if fused or grouped else None
    quantized = None if mapping.spec.quantized_parts is None else tuple(mapping.spec.quantized_parts)

    def layout(buffer: str | None, stacked: int | None = None):
        return derive(buffer, mapping.spec.parallel, kind, parts, hf_parts, context.params, hf_layout, stacked,
                      None if buffer is None else quantized)

    # A fused-experts tensor stands for every expert (its dim 0): the Megatron expert capture has no HF
    # counterpart, and the weight's layout stacks the experts.
    rules = [Rule(WEIGHT, megatron, tuple(hf), parts, origin, layout=layout(None, (experts or 0) if fused else None),
                  expert_capture=megatron.arity - 1 if fused else None, quantized_parts=quantized, **common)]
    # The quantizers of a partly quantized group fan out to its quantized parts only.
    kept = [i for i, part in enumerate(parts) if quantized is None or part in quantized]
    rules += _quantizer_rules(mapping, megatron, [hf[i] for i in kept], tuple(parts[i] for i in kept), grouped,
                              context, common, layout, experts)
    # KV-cache buffers belong to the attention module of a weight; a bias or other tensor derives none.
    wants_kv = mapping.spec.kv_cache or (mapping.spec.kv_cache is None and kind == "qkv")
    if wants_kv and megatron.text.endswith(".weight"):
        rules += _kv_rules(mapping, kind, megatron, hf, context)
    return rules


def _check_hf_parts(mapping: SourcedMapping, kind: str, context: _Context) -> bool:
    """``hf_parts`` names the parts of a Megatron group that one fused HF tensor holds, so the group
    must be a known one (``kind: qkv`` or ``gated_mlp``, given explicitly) and the HF side one name."""
    expected = GROUP_PARTS.get(kind)
    problem = None
    if len(mapping.hf) != 1 or mapping.hf[0][0]:
        problem = "hf_parts describes one fused HF tensor, but 'hf' is a group of names"
    elif expected is None:
        problem = f"hf_parts needs 'kind: qkv' or 'kind: gated_mlp' (got {kind!r})"
    elif sorted(mapping.spec.hf_parts) != sorted(expected):
        problem = f"hf_parts {mapping.spec.hf_parts} must list each of {list(expected)} once"
    if problem:
        context.errors.append(Diagnostic("QM024", problem, mapping.where("hf_parts"),
                                         "e.g. {hf: model.layers.*.self_attn.qkv_proj.weight, kind: qkv, "
                                         "hf_parts: [q, k, v]}"))
    return problem is None


def _check_quantized_parts(mapping: SourcedMapping, context: _Context) -> bool:
    """``quantized_parts`` picks some parts of the mapping's HF group, each once: all of them is the
    default, none is ``quantizers: []``."""
    declared = mapping.spec.quantized_parts
    parts = [part for part, _ in mapping.hf]
    unknown = [part for part in declared if part not in parts]
    problem = hint = None
    if parts == [""]:
        problem, hint = "quantized_parts picks parts of an HF group, but 'hf' is one name", "remove quantized_parts"
    elif unknown or len(set(declared)) != len(declared):
        problem = (f"quantized_parts {declared} must name parts of the group {parts}, each once"
                   + (f" ({unknown[0]!r} is none)" if unknown else ""))
        hint = f"e.g. quantized_parts: [{parts[0]}]"
    elif not declared:
        problem, hint = "quantized_parts is empty", "for a weight without quantizers write 'quantizers: []'"
    elif len(declared) == len(parts):
        problem, hint = f"quantized_parts lists every part of {parts}", "remove it: every part is the default"
    if problem:
        context.errors.append(Diagnostic("QM029", problem, mapping.where("quantized_parts"), hint))
    return problem is None


def _check_hf_layout(mapping: SourcedMapping, kind: str, context: _Context) -> bool:
    """``hf_layout`` says how one HF tensor's elements lie: each entry once, ``interleaved`` only for the
    parts of a gate/up tensor (equal halves, one row of each in turn), ``transposed`` only for a weight
    (a bias has one dimension), ``zero_centered`` only for a norm (no quantizers)."""
    declared = mapping.spec.hf_layout
    twice = sorted({entry for entry in declared if declared.count(entry) > 1})
    problem = hint = None
    if twice:
        problem, hint = f"hf_layout lists {twice[0]!r} twice", "give each entry once"
    elif INTERLEAVED in declared and (kind != "gated_mlp" or mapping.spec.hf_parts is None):
        problem = (f"hf_layout 'interleaved' says how one HF tensor holds the gate and up parts, so it needs "
                   f"'kind: gated_mlp' and 'hf_parts' (got kind {kind!r}"
                   f"{', no hf_parts' if mapping.spec.hf_parts is None else ''})")
        hint = "e.g. {kind: gated_mlp, hf_parts: [gate, up], hf_layout: [interleaved]}"
    elif TRANSPOSED in declared and mapping.megatron.rsplit(".", 1)[-1].rstrip("*") != "weight":
        problem = f"hf_layout 'transposed' swaps a weight's [out, in], but {mapping.megatron!r} is not a weight"
        hint = "drop 'transposed' for a bias or other one-dimensional tensor"
    elif ZERO_CENTERED in declared and mapping.spec.quantizers != []:
        problem = (f"hf_layout 'zero_centered' shifts a norm's weight by 1, but {mapping.megatron!r} may carry "
                   f"quantizers, as a linear does")
        hint = "a norm has none: add 'quantizers: []', or drop 'zero_centered'"
    if problem:
        context.errors.append(Diagnostic("QM028", problem, mapping.where("hf_layout"), hint))
    return problem is None


# Megatron modules whose weight is a fused group by construction (SwiGLU's linear_fc1 is; a plain
# MLP's is not, so there the kind must be said).
_FUSED_MODULES = ("linear_qkv", "linear_fc1")


def _check_fused_module(mapping: SourcedMapping, kind: str, context: _Context) -> bool:
    """A 1:1 mapping of ``linear_qkv`` or ``linear_fc1`` whose kind was inferred would put Megatron's
    interleaved rows into the HF tensor unchanged; that must be said, never assumed."""
    segments = mapping.megatron.split(".")
    if kind != "plain" or mapping.spec.kind is not None or len(segments) < 2 or segments[-2] not in _FUSED_MODULES \
            or segments[-1] not in ("weight", "bias"):
        return True
    context.errors.append(Diagnostic(
        "QM025", f"{mapping.megatron!r} is one of Megatron's fused tensors mapped to one HF name without a 'kind'",
        mapping.location, "for a fused HF tensor give 'kind: qkv' or 'kind: gated_mlp' and 'hf_parts'; for a "
        "Megatron tensor the HF side holds as is (a non-gated MLP's linear_fc1) give 'kind: plain'"))
    return False


def _check_kind_has_effect(mapping: SourcedMapping, context: _Context) -> bool:
    """An explicit ``kind`` on one HF name must change something. On one of Megatron's fused tensors
    (``linear_qkv``/``linear_fc1``) it says how the HF tensor holds the group (QM025 asks for it);
    with ``hf_parts`` it names the group. Anywhere else it does nothing the compiler uses well, or it
    is a group the author meant to write and did not."""
    given = mapping.spec.kind
    if given is None or len(mapping.hf) != 1 or mapping.hf[0][0] or mapping.spec.hf_parts is not None:
        return True
    leaf = mapping.megatron.split(".")
    if len(leaf) >= 2 and leaf[-2] in _FUSED_MODULES and leaf[-1].rstrip("*") in ("weight", "bias"):
        return True
    if given == GDN_CONV1D:
        return True  # it says how the channels lie over TP ranks
    hint = ("remove 'kind': a single HF name is a plain mapping" if given == "plain" else
            "for separate HF tensors write 'hf' as a group {part: name, ...}; for one HF tensor holding the "
            "parts give 'hf_parts'; for KV-cache rules set 'kv_cache: true'")
    context.errors.append(Diagnostic("QM027", f"'kind: {given}' has no effect on the single HF name of "
                                     f"{mapping.megatron!r}", mapping.where("kind"), hint))
    return False


def is_grouped(megatron: Pattern) -> bool:
    """Megatron's grouped experts: the last segment is a word glued to the expert index (``weight*``)."""
    return bool(megatron.captures) and megatron.literals[-1] == "" and not megatron.literals[-2].endswith(".") \
        and megatron.literals[-2].rsplit(".", 1)[-1] in ("weight", "bias")


def _check_arity(mapping: SourcedMapping, megatron: Pattern, hf: list[Pattern], grouped: bool, context: _Context) -> bool:
    for (part, text), pattern in zip(mapping.hf, hf):
        where = mapping.where(f"hf.{part}" if part else "hf")
        if pattern.arity != megatron.arity:
            if grouped and pattern.arity == megatron.arity - 1:
                context.errors.append(Diagnostic(
                    "QM023", f"grouped-MoE mapping {mapping.megatron!r}: HF name {text!r} has no expert wildcard",
                    where, "name the expert on the HF side, e.g. 'model.layers.*.mlp.experts.*.gate_proj.weight'",
                ))
            else:
                context.errors.append(Diagnostic(
                    "QM021", f"{text!r} has {pattern.arity} wildcard(s) but {mapping.megatron!r} has {megatron.arity}",
                    where, "both sides need the same captures, in the same order",
                ))
            return False
        kinds = [c.kind for c in pattern.captures], [c.kind for c in megatron.captures]
        labels = [c.label for c in pattern.captures], [c.label for c in megatron.captures]
        if kinds[0] != kinds[1]:
            context.errors.append(Diagnostic(
                "QM021", f"{text!r} and {mapping.megatron!r} put '*' and '**' in different positions", where,
                "a '*' captures digits and a '**' any text: use the same kind at the same position on both sides",
            ))
            return False
        if any(a and b and a != b for a, b in zip(*labels)):
            context.errors.append(Diagnostic("QM021", f"{text!r} and {mapping.megatron!r} label captures differently",
                                             where, "captures are positional: use the same labels in the same order"))
            return False
    return True


def _check_fused_experts(mapping: SourcedMapping, megatron: Pattern, hf: list[Pattern], context: _Context) -> bool:
    """A fused-experts mapping: one HF name with the Megatron side's captures but the last, the expert."""
    problem = None
    if len(hf) != 1:
        problem = "its HF side is a group; a fused-experts tensor is one name"
    elif not (is_grouped(megatron) or (megatron.captures and megatron.literals[-2].endswith("local_experts.")
                                        and megatron.captures[-1].kind == "digits")):
        problem = f"{mapping.megatron!r} does not end in the expert index (local_experts.* or weight*)"
    elif [c.kind for c in hf[0].captures] != [c.kind for c in megatron.captures[:-1]]:
        problem = (f"{hf[0].text!r} must have the captures of {mapping.megatron!r} but the last (the expert, which "
                   f"is the tensor's first dimension)")
    if problem:
        context.errors.append(Diagnostic("QM026", f"fused-experts mapping: {problem}", mapping.where("fused_experts"),
                                         "e.g. megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight, "
                                         "hf: model.layers.*.mlp.experts.gate_up_proj"))
    return problem is None


def _quantizer_rules(mapping, megatron, hf, parts, grouped, context, common, layout, experts) -> list[Rule]:
    buffers = mapping.spec.quantizers if mapping.spec.quantizers is not None else context.spec.quantizers
    if not buffers or not (megatron.text.endswith(".weight") or (grouped and megatron.literals[-2].endswith(".weight"))):
        return []
    imported = mapping.spec.grouped_weight_quantizer or "per-expert"
    if mapping.spec.fused_experts is not None:
        return _derive(mapping, context, common, layout, experts, fused_expert_buffers(
            megatron, hf[0], buffers, grouped, mapping.spec.fused_experts, imported))
    if not all(p.text.endswith(".weight") for p in hf):
        context.warnings.append(Diagnostic(
            "QM060", f"no quantizer rules for {mapping.megatron!r}: its HF side does not end in '.weight'",
            mapping.location, "quantizers belong to a module's weight; map the HF module's '.weight'",
            severity="warning",
        ))
        return []
    if grouped:
        return _derive(mapping, context, common, layout, experts,
                       grouped_weight_buffers(megatron, hf, buffers, parts, imported))
    module = megatron.text.rsplit(".", 1)[0]
    hf_modules = [p.text.rsplit(".", 1)[0] for p in hf]
    kind = FANOUT if parts != ("",) else AMAX
    derived = [Derived(kind, f"{module}.{buffer}", tuple(f"{m}.{buffer}" for m in hf_modules), parts, buffer)
               for buffer in buffers]
    of_weight = [d.buffer.partition(".")[0] == WEIGHT_QUANTIZER for d in derived]
    return _derive(mapping, context, common, layout, experts,
                   [form for d, staged in zip(derived, of_weight) for form in (with_stages(d) if staged else [d])])


def _derive(mapping: SourcedMapping, context: _Context, common: dict, layout, experts: int | None,
            derived) -> list[Rule]:
    """Rules from :mod:`quantmap.moe_rules` derivations, with the mapping's origin, TP split, priority,
    expert count and layout: a one-to-one rule's is the mapping's; a block or fan-in of experts has no
    per-element one."""
    placed = {MOE_FANOUT: _GROUPED_LAYOUT, FAN_IN: _FAN_IN_LAYOUT}
    return [Rule(d.kind, _derived(d.megatron, context), tuple(_derived(t, context) for t in d.hf), d.parts,
                 Origin(mapping.location, mapping.megatron, d.buffer), buffer=d.buffer, parallel=common["parallel"],
                 priority=common["priority"], expert_capture=d.expert_capture,
                 num_experts=experts if d.kind in (MOE_FANOUT, FAN_IN) else None,
                 layout=placed.get(d.kind) or layout(d.buffer), reversible=d.reversible, staged=d.staged)
            for d in derived]


# A grouped-MoE block shares one quantizer among its experts: its per-tensor amax goes to every
# expert, but a non-scalar one says nothing about which expert owns which element.
_GROUPED_LAYOUT = ElementLayout(None, None, "one quantizer covers a whole block of experts; its non-scalar state has no "
                                     "per-expert layout")
# Many experts' quantizers meet in one HF tensor: a max of their per-channel state is no one's.
_FAN_IN_LAYOUT = ElementLayout(None, None, "several Megatron quantizers meet in one HF tensor; only per-tensor amax combines")


def _derived(text: str, context: _Context) -> Pattern:
    return parse(text).bind(context.params)


def _expert_count(mapping: SourcedMapping, context: _Context) -> int | None:
    declared = mapping.spec.experts
    if isinstance(declared, int):
        return declared
    name = declared or "num_experts"
    if name not in context.params and declared is not None:
        context.errors.append(Diagnostic("QM050", f"'experts: {name}' names no parameter of the spec",
                                         mapping.where("experts"), f"declare it under 'params: {{{name}: null}}'"))
    return context.params.get(name)


def _kv_rules(mapping: SourcedMapping, kind: str, megatron: Pattern, hf: list[Pattern], context: _Context) -> list[Rule]:
    if not context.spec.kv_cache:
        return []
    skip = set(context.spec.kv_skip_segments)
    segments = {segment for p in (megatron, *hf) for v in p.variants() for segment in v.text.split(".")}
    reason = None
    if skip & segments:
        reason = f"it lies under {sorted(skip & segments)[0]!r}, listed in kv_skip_segments"
    elif is_grouped(megatron):
        reason = "a grouped-MoE weight is not an attention projection"
    parents = {p.text.rsplit(".", 2)[0] for p in hf}
    if reason is None and kind == "qkv":
        leaves = [p.text.rsplit(".", 2)[-2] for p in hf]
        names = [part for part, _ in mapping.hf]
        if len(parents) != 1 or any(not leaf.endswith(f"{part}_proj") for leaf, part in zip(leaves, names)):
            reason = "its q/k/v names do not share one parent module ending in q_proj/k_proj/v_proj"
    elif reason is None and len(parents) != 1:
        reason = "its HF names do not share one parent module"
    if reason:
        context.warnings.append(Diagnostic("QM061", f"no KV-cache rules for {mapping.megatron!r}: {reason}",
                                           mapping.location, severity="warning"))
        return []
    attention = megatron.text.rsplit(".", 2)[0]
    hf_attention = parents.pop()
    origin = Origin(mapping.location, mapping.megatron, "kv_cache")
    return [
        Rule(AMAX, _derived(f"{attention}.{megatron_buffer}", context), (_derived(f"{hf_attention}.{hf_buffer}", context),),
             ("",), origin, buffer=hf_buffer, priority=mapping.spec.priority,
             layout=derive(hf_buffer, None, "plain", ("",), None, context.params))
        for hf_buffer, megatron_buffer in _KV_BUFFERS
    ]


def _check_exclusions(spec: ResolvedSpec, context: _Context) -> None:
    """``exclude`` patterns are only used by ``quantmap check``; a typo must not wait until then."""
    for side, patterns in (("megatron", spec.exclude_megatron), ("hf", spec.exclude_hf)):
        for text in patterns:
            try:
                parse(text)
            except PatternError as exc:
                context.errors.append(Diagnostic("QM020", f"malformed exclude.{side} pattern {text!r}: {exc}",
                                                 Location(spec.files[-1]), "see docs/authoring.md#wildcards"))


def _dedupe_kv(rules: list[Rule]) -> list[Rule]:
    """Two mappings of one attention module derive the same KV rules; keep the first."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    out = []
    for rule in rules:
        key = (rule.megatron.text, tuple(p.text for p in rule.hf))
        if rule.origin.derived == "kv_cache" and key in seen:
            continue
        seen.add(key)
        out.append(rule)
    return out


def _check_conflicts(index: Index, context: _Context) -> None:
    for side, name in ((index.forward, "Megatron"), (index.reverse, "HF")):
        for a, b in side.conflicts():
            same = a.pattern.literals == b.pattern.literals and a.pattern.captures == b.pattern.captures
            if same and name == "HF":
                code, what = "QM032", f"two rules produce the same HF target {b.pattern.text!r}"
            elif same:
                code, what = "QM030", f"two rules claim the same Megatron name {b.pattern.text!r}"
            else:
                code, what = "QM031", f"{a.pattern.text!r} and {b.pattern.text!r} can match the same {name} name"
            context.errors.append(Diagnostic(
                code, f"{what} (from {a.rule.origin.mapping!r} at {a.rule.origin.location} "
                      f"and {b.rule.origin.mapping!r})",
                b.rule.origin.location,
                "give the mapping that should win a higher 'priority', or remove one",
            ))
