"""Every concrete name a model of a given size has on one side, generated from a compiled spec's rules.

A user diffs this list against a real checkpoint (``quantmap names``) instead of writing names by
hand. It lists the names the rules *map*: weights, and the quantizer buffers derived for them;
what the spec excludes (``_extra_state``, rotary buffers) is not listed.

A spec maps several Megatron layouts at once, so the rules that compete for one HF name are
told apart from their own structure, never per model:

* ``te`` / ``local``: Transformer Engine fuses a norm into the next linear layer
  (``linear_qkv.layer_norm_weight``, Megatron-Core's TE layer specs); where such a mapping and a
  separate norm map the same HF name, ``te`` keeps the fused one and ``local`` the separate one.
  A norm with no fused competitor (MLA's input norm, an MoE layer's ``pre_mlp_layernorm``) is in both.
* ``grouped`` / ``sequential``: where a grouped-MoE mapping (``linear_fc1.weight*``, TEGroupedMLP)
  and a per-expert one (``local_experts.*``, SequentialMLP) map the same HF name, one is kept.

A layer's ``mlp`` is either a dense MLP (``mlp.linear_fc1``) or an MoE layer (``mlp.router``,
``mlp.experts``, ``mlp.shared_experts``), as Megatron-Core's GPT layers name them: the dense
mappings apply to the ``dense_layers`` only, the MoE ones to the other layers, and the layouts
are chosen per kind of layer (a TE dense layer fuses its pre-MLP norm into ``linear_fc1``, a TE
MoE layer keeps ``pre_mlp_layernorm``).

A hybrid spec (``hybrid`` in its YAML) declares kinds of decoder layer and the Megatron texts that
mark each kind's mappings; the size gives each layer's kind (from config.json, by the keys the spec
names). A marked mapping applies to the layers of its kinds only, whatever their MLP; an unmarked
one to every layer, by the dense/MoE rule above. The layouts are chosen per kind of layer too.

Captures take their values from the size: the last capture of a staged rule is the stage of ModelOpt's
sequential weight quantizer (W4A8's two, :mod:`quantmap.stages`), a capture is an expert when it is the expert of a
grouped block or follows an ``experts.`` segment or a per-expert weight quantizer's
``weight_quantizer.`` (``_weight_quantizers.`` in memory), an MTP layer when it follows Megatron-Core's
``mtp.layers.`` or either side shifts it by a parameter (``model.layers.{num_layers + i}``), and a
layer otherwise; a mapping of one MTP layer (``mtp.layers.0.eh_proj``) is listed when the model has
that layer. The MTP layers are a layer of their own: listed whatever the decoder layers' kinds, their
layouts chosen among their own mappings. A ``**`` capture matches names of any depth, which no size
gives: such mappings (Qwen2.5-VL's vision tower) are not listed, and :func:`unlisted` names them.
This module imports no torch.
"""

from __future__ import annotations

import heapq
import itertools
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from quantmap.compiler import is_grouped
from quantmap.patterns import ANY, Pattern
from quantmap.rules import MOE_FANOUT, WEIGHT, Rule
from quantmap.ruleset import RuleSet
from quantmap.stages import STAGES

MEGATRON = "megatron"
HF = "hf"
# The literal before an expert capture: an ``experts.`` segment, or a per-expert weight quantizer's
# index (ModelOpt 0.47's grouped ``linear_fc1.weight_quantizer.{E}``, transformers v5's in-memory
# ``gate_up_proj_weight_quantizers.{E}``).
_EXPERT_SEGMENT = re.compile(r"(?:^|\.)(?:local_)?experts\.$|[._]weight_quantizers?\.$")
_DENSE_MLP = re.compile(r"(?:^|\.)mlp\.linear_fc\d")
_MOE_MLP = re.compile(r"(?:^|\.)mlp\.(?:router|experts|shared_experts)\.")
_MTP_LAYERS = re.compile(r"(?:^|\.)mtp\.layers\.$")  # Megatron-Core's MultiTokenPredictionBlock.layers
_ONE_MTP_LAYER = re.compile(r"(?:^|\.)mtp\.layers\.([0-9]+)\.")
DENSE = "dense"
MOE = "moe"


@dataclass(frozen=True)
class ModelSize:
    """How many of each indexed thing the model has, and which Megatron layout it is built with."""

    layers: int
    experts: int | None = None
    mtp_layers: int = 0
    te: bool = True
    grouped: bool = True
    dense_layers: tuple[int, ...] | None = None  # None: every layer when the spec has no MoE mappings, else none
    kinds: tuple[str, ...] | None = None  # each layer's kind, for a hybrid spec


class ModelSizeError(ValueError):
    """The size does not say enough to generate the names (an expert count, the layers' kinds); ``option``
    is the command-line option that would say it."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


def model_names(rules: RuleSet, side: str, size: ModelSize, buffers: Iterable[str] | None = None,
                omit: Iterable[str] = ()) -> list[str]:
    """:func:`iter_model_names` as a list."""
    return list(iter_model_names(rules, side, size, buffers, omit))


def iter_model_names(rules: RuleSet, side: str, size: ModelSize, buffers: Iterable[str] | None = None,
                     omit: Iterable[str] = ()) -> Iterator[str]:
    """The concrete names on ``side`` (``"megatron"`` or ``"hf"``), each once, in natural order
    (``layers.2`` before ``layers.10``) so that a diff against a sorted checkpoint listing is short.

    ``buffers`` limits the quantizer buffers listed (e.g. ``["weight_quantizer._amax"]``; ``[]``
    lists weights only); ``None`` lists every buffer the spec derives. ``omit`` leaves out the
    mappings whose Megatron pattern ends with one of its texts (``self_attention.linear_q_proj.weight``):
    a form the model's config does not build, which no rule competes with. A grouped-MoE weight
    quantizer is listed in the one form an import writes (rules that are not ``reversible`` are the
    other ModelOpt form of the same quantizer, export-only). A hybrid spec needs ``size.kinds``;
    :class:`ModelSizeError` says what the size lacks, before the first name.

    The names stream out: each pattern's names come in natural order already (its captures count
    up), so merging the patterns' streams sorts them all while holding one name per pattern, and
    ``quantmap names --layers 100000 | head`` prints at once.
    """
    wanted = None if buffers is None else set(buffers)
    kept = [r for r in _mapped(rules, omit) if r.reversible and not _any_depth(r) and _built(r, size)
            and (r.kind == WEIGHT or wanted is None or r.buffer in wanted)]
    hybrid = rules.spec.hybrid
    kinds = _layer_kinds(rules.spec.name, hybrid, size)
    marked = {r.origin.mapping: hybrid.kinds_of(r.origin.mapping) for r in rules} if hybrid else {}
    dense = size.dense_layers
    if dense is None:
        moe = any(_mlp_kind(r) == MOE for r in rules if not marked.get(r.origin.mapping))
        dense = () if moe else tuple(range(size.layers))
    dense = set(dense)
    mlp = [DENSE if i in dense else MOE for i in range(size.layers)]
    decoder = [r for r in kept if not _of_mtp(r)]
    groups = [([r for r in decoder if _applies(marked.get(r.origin.mapping), r, kind, mlp_kind)],
               [i for i in range(size.layers) if kinds[i] == kind and mlp[i] == mlp_kind])
              for kind in (hybrid.kinds if hybrid else (None,)) for mlp_kind in (DENSE, MOE)]
    # The MTP layers are one layer of their own, whatever the decoder layers' kinds and MLPs: their
    # layouts are chosen among their own mappings (a dense MTP layer under TE fuses its pre-MLP norm).
    groups.append(([r for r in kept if _of_mtp(r)], []))
    streams = []
    for active, layers in groups:
        dropped = _other_layouts(active, size)
        for rule in active:
            if rule.origin.mapping in dropped:
                continue
            for pattern in [rule.megatron] if side == MEGATRON else rule.hf:
                streams.append(map(pattern.fill, _values(rule, pattern, side, size, layers)))
    merged = heapq.merge(*streams, key=_natural)
    return (name for name, _ in itertools.groupby(merged))  # a name two rules build, once


def unlisted(rules: RuleSet, omit: Iterable[str] = ()) -> list[str]:
    """The Megatron patterns of the mappings :func:`model_names` cannot list: a ``**`` capture matches
    names of any depth, which a size does not give (``--omit`` one to leave it out on purpose)."""
    return sorted({r.origin.mapping for r in _mapped(rules, omit) if _any_depth(r)})


def _mapped(rules: RuleSet, omit: Iterable[str]) -> list[Rule]:
    omit = tuple(omit)
    return [r for r in rules if not (omit and r.origin.mapping.endswith(omit))]


def _any_depth(rule: Rule) -> bool:
    return any(capture.kind == ANY for capture in rule.megatron.captures)


def _built(rule: Rule, size: ModelSize) -> bool:
    """A mapping of one MTP layer (``mtp.layers.0.eh_proj.weight``) exists when the model has that layer."""
    layer = _ONE_MTP_LAYER.search(rule.megatron.text)
    return layer is None or int(layer[1]) < size.mtp_layers


def _of_mtp(rule: Rule) -> bool:
    """Whether a rule belongs to the MTP layers: it names one (``mtp.layers.0.eh_proj``) or captures their index."""
    return _ONE_MTP_LAYER.search(rule.megatron.text) is not None or any(
        _capture_kind(rule, rule.megatron, position, MEGATRON) == "mtp" for position in range(rule.megatron.arity))


def _layer_kinds(spec: str, hybrid, size: ModelSize) -> tuple[str | None, ...]:
    """Each layer's kind: the size's, checked against the spec's declared kinds (``None`` for a spec without)."""
    if hybrid is None:
        if size.kinds is not None:
            raise ModelSizeError(f"{spec} declares no kinds of layer (no 'hybrid' section): leave out the layer kinds",
                             "--layer-kind")
        return (None,) * size.layers
    declared = ", ".join(hybrid.kinds)
    if size.kinds is None:
        raise ModelSizeError(f"{spec}'s decoder layers are of different kinds ({declared}): give the model's config.json "
                         "(--config) or each layer's kind (--layer-kind KIND=LAYERS)", "--layer-kind")
    if len(size.kinds) != size.layers:
        raise ModelSizeError(f"{len(size.kinds)} layer kinds for {size.layers} layers: give one kind per layer",
                         "--layer-kind")
    unknown = sorted(set(size.kinds) - set(hybrid.kinds))
    if unknown:
        raise ModelSizeError(f"{spec} has no layer kind {', '.join(map(repr, unknown))}; its kinds: {declared}",
                         "--layer-kind")
    return size.kinds


def _applies(kinds: frozenset[str] | None, rule: Rule, kind: str | None, mlp_kind: str) -> bool:
    """Whether a rule belongs to layers of ``kind`` whose MLP is ``mlp_kind``: a mapping marked by layer
    kinds by those alone, any other by its MLP kind."""
    if kinds:
        return kind in kinds
    return _mlp_kind(rule) in (None, mlp_kind)


def _natural(name: str) -> list:
    return [int(piece) if piece.isdigit() else piece for piece in re.split(r"([0-9]+)", name)]


def _mlp_kind(rule: Rule) -> str | None:
    """Whether a rule belongs to a dense MLP, an MoE layer, or neither (attention, norms, ...)."""
    if _DENSE_MLP.search(rule.megatron.text):
        return DENSE
    return MOE if _MOE_MLP.search(rule.megatron.text) else None


def _other_layouts(rules: list[Rule], size: ModelSize) -> set[str]:
    """The mappings (by Megatron pattern) of the layouts not chosen, from the weight rules that
    compete for one HF name; of those the layout flags leave, the lower priorities (other names of
    one module, such as Megatron-Core's older ``final_layernorm`` beside ``final_norm``)."""
    competing: dict[str, list[Rule]] = {}
    for rule in rules:
        if rule.kind == WEIGHT:
            for pattern in rule.hf:
                competing.setdefault(pattern.text, []).append(rule)
    dropped: set[str] = set()
    for group in competing.values():
        if len(group) < 2:
            continue
        grouped = [r for r in group if is_grouped(r.megatron)]
        fused = [r for r in group if r.megatron.text.rsplit(".", 1)[-1].startswith("layer_norm_")]
        for chosen in (grouped, fused):
            if chosen:
                keep_chosen = size.grouped if chosen is grouped else size.te
                dropped |= {r.origin.mapping for r in group if (r in chosen) != keep_chosen}
        left = [r for r in group if r.origin.mapping not in dropped]
        dropped |= {r.origin.mapping for r in left if r.priority < max(r.priority for r in left)}
    return dropped


def _values(rule: Rule, pattern: Pattern, side: str, size: ModelSize,
            layers: list[int]) -> Iterable[tuple[str, ...]]:
    ranges = []
    for position in range(pattern.arity):
        kind = _capture_kind(rule, pattern, position, side)
        if kind == "stage":
            ranges.append([str(i) for i in range(STAGES)])
        elif kind == "expert":
            if size.experts is None:
                raise ModelSizeError(f"{pattern.text!r} names an expert: give the expert count (--experts E)", "--experts")
            ranges.append([str(i) for i in range(size.experts)])
        else:
            ranges.append([str(i) for i in (range(size.mtp_layers) if kind == "mtp" else layers)])
    return itertools.product(*ranges)


def _capture_kind(rule: Rule, pattern: Pattern, position: int, side: str) -> str:
    if rule.staged and position == pattern.arity - 1:
        return "stage"  # a sequential weight quantizer's (W4A8), named like a per-expert quantizer's expert
    expert = rule.expert_capture if rule.kind == MOE_FANOUT else None  # the HF side's extra capture
    if side == HF and position == expert:
        return "expert"
    glued = side == MEGATRON and position == pattern.arity - 1 and is_grouped(pattern)
    fanned_in = side == MEGATRON and rule.fans_in and position == rule.expert_capture  # the Megatron side's extra one
    if glued or fanned_in or _EXPERT_SEGMENT.search(pattern.literals[position]):
        return "expert"
    megatron = position if side == MEGATRON or expert is None or position < expert else position - 1
    if _MTP_LAYERS.search(rule.megatron.literals[megatron]):
        return "mtp"
    hf = megatron if expert is None or megatron < expert else megatron + 1
    offsets = [rule.megatron.captures[megatron].offset] + [p.captures[hf].offset for p in rule.hf]
    return "mtp" if any(offsets) else "layer"
