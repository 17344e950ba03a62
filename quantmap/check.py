"""A spec against a real checkpoint's names: what a user runs before trusting a spec.

Given the Megatron names, the Hugging Face names, or both, :func:`check` reports

* ``QM101`` names on either side that no rule claims (less the spec's ``exclude`` patterns);
* ``QM102`` names a rule resolves to that do not exist on the other side;
* ``QM103`` HF names that two Megatron names resolve to (say a TE ``layer_norm_weight`` and a
  local ``input_layernorm.weight`` in one checkpoint);
* ``QM104`` fused groups with some parts present and others missing (``k_proj`` without ``v_proj``);
* ``QM107`` (a torch_dist checkpoint) a weight the checkpoint saves gated (SwiGLU ``weight_w`` and
  ``weight_v``) that the spec maps as one ungated tensor, or the reverse;
* ``QM106`` (both sides given) HF quantizer buffers whose reverse lookup wins a Megatron name the
  Megatron side does not have, although another Megatron name claims them (a TEGroupedMLP model's
  expert buffers resolving to SequentialMLP's ``local_experts``): an import would write them there.

A side that holds no weights at all holds quantizer state only (what ``quantmap export`` writes, and
what ``import`` reads): the other side's weights have no counterpart there by design, so their
targets are not expected (``CheckReport.state_only`` names such sides); a side with some weights is
a whole model, and each weight it lacks is a finding. So an export checked against its own source
is clean, and a quantizer buffer missing from it is still ``QM102``.

With both sides it also gives *notes*, which never fail ``--strict``: ``QM105`` dead rules, whose
patterns match no name on either side, among the kinds of names the sides hold (a checkpoint
without ``_pre_quant_scale`` buffers makes no AWQ rule dead), and ``QM106`` for weights (a TE
dense layer's ``post_attention_layernorm`` resolving to ``pre_mlp_layernorm``; import moves
quantizer state only). A spec serving several layouts and sizes has rules one model does not use.

With only HF names, a claimed HF name's whole group (its fused parts) must be present; with only
Megatron names, only what needs no other side is checked. Findings are grouped by code, side
and name shape (index segments as ``*``), so a problem in every layer reads as one line.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from quantmap.diagnostics import CODES, Location
from quantmap.patterns import Pattern, parse
from quantmap.rules import FAN_IN, MOE_FANOUT, WEIGHT, Match, Rule
from quantmap.ruleset import RuleSet
from quantmap.sizes import gating_contradiction

MEGATRON = "megatron"
HF = "hf"
_LABELS = {MEGATRON: "Megatron", HF: "HF"}
_INDEX = re.compile(r"(?<![^.])[0-9]+(?![^.])")  # a layer or expert index: a whole dotted segment


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem with one name: its code, the side the name is on, and what is wrong."""

    code: str
    side: str
    name: str
    message: str
    location: Location | None = None  # the spec mapping whose rule is involved, if any

    @property
    def shape(self) -> str:
        """The name with every index segment as ``*``: findings in every layer share it."""
        return _INDEX.sub("*", self.name)

    def to_json(self) -> dict:
        return {"code": self.code, "side": self.side, "name": self.name, "message": self.message,
                "location": str(self.location) if self.location else None}


@dataclass(frozen=True)
class CheckReport:
    """The findings of one check, and how many names each side had."""

    spec: str
    params: dict[str, int | None]
    names: dict[str, int | None]  # how many names each side had; None for a side not given
    findings: tuple[Finding, ...] = field(default=())
    notes: tuple[Finding, ...] = field(default=())  # QM105, and QM106 for weights; never make the report fail
    state_only: tuple[str, ...] = ()  # sides holding quantizer state only: the other side's weights not expected

    @property
    def ok(self) -> bool:
        return not self.findings

    def groups(self) -> dict[tuple[str, str, str], list[Finding]]:
        """Findings keyed by (code, side, shape), in code order."""
        out: dict[tuple[str, str, str], list[Finding]] = defaultdict(list)
        for finding in sorted(self.findings, key=lambda f: (f.code, f.side != MEGATRON)):
            out[(finding.code, finding.side, finding.shape)].append(finding)
        return dict(out)

    def to_json(self) -> dict:
        by_code: dict[str, int] = defaultdict(int)
        for finding in self.findings:
            by_code[finding.code] += 1
        return {
            "spec": self.spec,
            "params": self.params,
            "names": self.names,
            "ok": self.ok,
            "counts": dict(sorted(by_code.items())),
            "state_only": list(self.state_only),
            "groups": [
                {"code": code, "side": side, "shape": shape, "count": len(items),
                 "message": items[0].message, "names": [f.name for f in items]}
                for (code, side, shape), items in self.groups().items()
            ],
            "findings": [f.to_json() for f in self.findings],
            "notes": [f.to_json() for f in self.notes],
        }

    def to_text(self) -> str:
        sides = ", ".join(f"{n} {label} names" for label, n in
                          (("Megatron", self.names[MEGATRON]), ("HF", self.names[HF])) if n is not None)
        lines = [f"check {self.spec}: {sides}; {len(self.findings) or 'no'} finding(s)"]
        lines += [f"the {_LABELS[side]} names hold quantizer state only (no weights): the "
                  f"{_LABELS[MEGATRON if side == HF else HF]} weights' targets are not expected there"
                  for side in self.state_only]
        current = None
        for (code, side, shape), items in self.groups().items():
            if code != current:
                current = code
                total = sum(1 for f in self.findings if f.code == code)
                lines.append(f"{code} {CODES[code]}: {total}")
            example = f" ({len(items)} names), e.g. {items[0].name}" if len(items) > 1 else ""
            lines.append(f"  {side:<8} {shape}{example}: {items[0].message}")
        if self.notes:
            lines.append(f"notes (not findings): {len(self.notes)}")
            lines.extend(f"  {f.code} {f.side:<8} {f.name} [{f.location}]: {f.message}" for f in self.notes)
        return "\n".join(lines)


def check(rules: RuleSet, megatron: Iterable[str] | None = None, hf: Iterable[str] | None = None,
          swiglu: set[str] | None = None) -> CheckReport:
    """Check ``rules`` against the names of a real model, on one side or both. ``swiglu``: the Megatron
    weights the checkpoint saves as SwiGLU halves, where the source says (a torch_dist checkpoint)."""
    if megatron is None and hf is None:
        raise ValueError("check needs Megatron names, HF names, or both")
    megatron_names = list(dict.fromkeys(megatron)) if megatron is not None else None
    hf_names = list(dict.fromkeys(hf)) if hf is not None else None
    hf_present = _Present(hf_names) if hf_names is not None else None
    state_only = tuple(side for side, names in ((MEGATRON, megatron_names), (HF, hf_names))
                       if megatron_names is not None and hf_names is not None and not _holds_weights(names))
    findings: list[Finding] = []
    claimed: dict[str, list[str]] = defaultdict(list)  # HF name -> the Megatron names resolving to it
    fanned_in: set[str] = set()  # HF names many Megatron names resolve to by design (fan-in rules)
    if megatron_names is not None:
        excluded = Excluded(rules.spec.exclude_megatron, rules.params)
        for name in megatron_names:
            match = rules.to_hf(name)
            if match is None:
                if not excluded(name):
                    findings.append(Finding("QM101", MEGATRON, name, "no rule claims this Megatron name"))
                continue
            gating = None if swiglu is None or match.kind != WEIGHT else \
                gating_contradiction(rules, name, name in swiglu)
            if gating:
                findings.append(Finding("QM107", MEGATRON, name, gating, match.rule.origin.location))
            targets = _targets(match, hf_present)
            for target in targets:
                claimed[target].append(name)
            if match.rule.fans_in or match.kind == FAN_IN:
                fanned_in.update(targets)
            if hf_present is not None and not (match.kind == WEIGHT and HF in state_only):
                findings += _missing_targets(name, match, targets, hf_present)
        findings += [
            Finding("QM103", HF, target, f"claimed by {len(sources)} Megatron names: {', '.join(sources)}")
            for target, sources in claimed.items() if len(sources) > 1 and target not in fanned_in
        ]
    notes: list[Finding] = []
    if hf_names is not None:
        findings += _check_hf(rules, hf_names, hf_present, claimed, megatron_names, MEGATRON in state_only)
    if megatron_names is not None and hf_names is not None:
        for finding, weight in _reverse_winners(rules, claimed, set(megatron_names), hf_present):
            (notes if weight else findings).append(finding)
        notes += _dead_rules(rules, megatron_names, hf_names)
    sizes = {MEGATRON: None if megatron_names is None else len(megatron_names),
             HF: None if hf_names is None else len(hf_names)}
    return CheckReport(rules.spec.name, dict(rules.params), sizes, tuple(findings), tuple(notes), state_only)


def _reverse_winners(rules: RuleSet, claimed: dict[str, list[str]], megatron: set[str],
                     present: _Present) -> list[tuple[Finding, bool]]:
    """Claimed HF names that exist and whose reverse lookup does not give back a Megatron name that
    exists, each with whether it is a weight."""
    out = []
    for name, sources in claimed.items():
        match = rules.to_megatron(name) if name in present else None
        if match is not None and match.megatron not in megatron:
            out.append((Finding("QM106", HF, name, f"reverse lookup gives {match.megatron}, which the Megatron "
                                f"names lack (claimed forward by {sources[0]})", match.rule.origin.location),
                        match.kind == WEIGHT))
    return out


def _dead_rules(rules: RuleSet, megatron: list[str], hf: list[str]) -> list[Finding]:
    """Rules no name of either side matches, for the kinds of names present (weights, each buffer).
    Lookup winners are alive; only the other rules are matched pattern by pattern."""
    kinds = {_name_kind(n) for n in megatron} | {_name_kind(n) for n in hf}
    alive = {id(m.rule) for m in map(rules.to_hf, megatron) if m is not None}
    alive |= {id(m.rule) for m in map(rules.to_megatron, hf) if m is not None}
    dead = []
    for rule in rules:
        if id(rule) in alive or _rule_kind(rule) not in kinds:
            continue
        if any(rule.megatron.match(n) is not None for n in megatron):
            continue
        if any(p.match(n) is not None for p in rule.hf for n in hf):
            continue
        dead.append(Finding("QM105", "rule", rule.megatron.text, "matches no Megatron name, and its HF side "
                            f"({', '.join(p.text for p in rule.hf)}) no HF name", rule.origin.location))
    return dead


def _holds_weights(names: list[str]) -> bool:
    return any(_name_kind(name) == WEIGHT for name in names)


def _name_kind(name: str) -> str:
    """``weight`` for a weight (or other module tensor), else the quantizer buffer (``weight_quantizer._amax``)."""
    return ".".join(name.rsplit(".", 2)[-2:]) if "_quantizer." in name else WEIGHT


def _rule_kind(rule: Rule) -> str:
    return WEIGHT if rule.kind == WEIGHT else rule.buffer


def _missing_targets(name: str, match: Match, targets: list[str], present: _Present) -> list[Finding]:
    where = match.rule.origin.location
    missing = [t for t in targets if t not in present]
    if not targets or len(missing) == len(targets):
        shown = ", ".join(missing or match.hf)
        return [Finding("QM102", MEGATRON, name, f"resolves to {shown}, not among the HF names", where)]
    return [Finding("QM104", HF, target, f"part of the group of Megatron {name}, whose other parts exist", where)
            for target in missing]


def _check_hf(rules: RuleSet, names: list[str], present: _Present, claimed: dict[str, list[str]],
              megatron_names: list[str] | None, megatron_state_only: bool = False) -> list[Finding]:
    excluded = Excluded(rules.spec.exclude_hf, rules.params)
    findings: list[Finding] = []
    groups_seen: set[str] = set()
    for name in names:
        if name in claimed:
            continue
        match = rules.to_megatron(name)
        if match is None:
            if not excluded(name):
                findings.append(Finding("QM101", HF, name, "no rule claims this HF name"))
            continue
        where = match.rule.origin.location
        if megatron_names is not None:
            if match.kind == WEIGHT and megatron_state_only:
                continue
            findings.append(Finding("QM102", HF, name, f"resolves to {match.megatron}, not among the Megatron names",
                                    where))
            continue
        if match.megatron in groups_seen or match.rule.fans_in:  # a fan-in target is one tensor: no group
            continue
        groups_seen.add(match.megatron)
        group = rules.to_hf(match.megatron)  # a reverse match's Megatron name always resolves forward
        findings += [Finding("QM104", HF, target, f"part of the group of Megatron {match.megatron}, "
                                                  f"of which {name} exists", where)
                     for target in _targets(group, present) if target not in present]
    return findings


def _targets(match: Match, present: _Present | None) -> list[str]:
    """The concrete HF names a forward match stands for.

    A grouped-MoE buffer stands for every expert: all ``num_experts`` of them when the spec was
    compiled with the count, otherwise the experts that the HF names hold.
    """
    if match.kind != MOE_FANOUT:
        return list(match.hf)
    expanded = match.expanded
    if expanded is not None:
        return list(expanded)
    if present is None:
        return list(match.hf)
    return [name for template in match.hf for name in present.matching(parse(template))]


class _Present:
    """A set of names that also finds, without a scan, the names matching an expert template."""

    def __init__(self, names: list[str]):
        self._names = set(names)
        self._by_shape: dict[str, list[str]] = defaultdict(list)
        for name in names:
            self._by_shape[_INDEX.sub("*", name)].append(name)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def matching(self, pattern: Pattern) -> list[str]:
        return [n for n in self._by_shape.get(_INDEX.sub("*", pattern.text), ()) if pattern.match(n) is not None]


class Excluded:
    """Whether a name matches one of the spec's ``exclude`` patterns."""

    def __init__(self, patterns: Iterable[str], params: dict[str, int | None]):
        bound = {k: v for k, v in params.items() if v is not None}
        self._patterns = [parse(p).bind(bound) for p in patterns]

    def __call__(self, name: str) -> bool:
        return any(p.match(name) is not None for p in self._patterns)
