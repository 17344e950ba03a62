"""Local ↔ global Megatron names.

Each pipeline stage numbers its layers from 0 (``TransformerBlock`` builds ``decoder.layers.{i}``
locally; the global index is ``get_transformer_layer_offset + i``), and each expert-parallel rank
numbers its experts from 0 (``SequentialMLP`` ``local_experts.{i}``, ``TEGroupedLinear``
``weight{i}``/``bias{i}``, and ModelOpt 0.47's per-expert quantizers of a grouped linear,
``...experts.linear_fc1.weight_quantizer.{i}._amax``; the global index is
``ep_rank * experts_per_rank + i``, as in ``BaseMoELayer``). Rules are written against global names.
A grouped block's shared quantizer (``...experts.linear_fc1.input_quantizer._amax``, and ModelOpt
<= 0.46's ``...experts.linear_fc1.weight_quantizer._amax``) has no expert index and is never renumbered.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

from quantmap.parallel import Coords, ParallelLayout
from quantmap.untrusted import decimal

_LAYER = re.compile(r"(?:^|(?<=\.))(decoder\.layers\.)(\d+)(?=\.)")
_EDGE = re.compile(r"(?:^|(?<=\.))(?:(embedding)|output_layer|decoder\.final_layernorm|mtp)\.")
_EXPERT = re.compile(r"(\.local_experts\.)(\d+)(?=\.)|(?<=\.experts\.)(linear_fc\d+\.(?:weight|bias))(\d+)(?=$|\.)"
                     r"|(?<=\.experts\.)(linear_fc\d+\.weight_quantizer\.)(\d+)(?=\.)")


class NamingError(ValueError):
    """A name that the layout cannot place (a layer or expert index out of range)."""


def is_expert(name: str) -> bool:
    """Expert tensors are grouped by the expert view (ETP/EP/EDP), everything else by the dense view."""
    return ".experts." in name or name.startswith("experts.")


def to_global(name: str, layout: ParallelLayout, coords: Coords) -> str:
    """The global name of a rank's local tensor name."""
    return globalizer(layout, coords)(name)[0]


def globalizer(layout: ParallelLayout, coords: Coords) -> Callable[[str], tuple[str, int | None, int | None, tuple | None]]:
    """For one rank: a function from a local tensor name to its global name, the local layer and
    expert index it carries (``None`` where it has none), and where the expert index lies in the
    global name (its characters, or ``None``); found in one pass with the rank's offsets bound once:
    a rank packs 10^4 names (SequentialMLP)."""
    stage_layers, offset = layout.stage_layers[coords.pp], layout.layer_offset(coords.pp)
    per_rank = layout.experts_per_rank
    base = None if per_rank is None else coords.ep * per_rank  # None: no expert parallelism to undo
    search_layer, search_expert = _LAYER.search, _EXPERT.search

    def globalize(name: str) -> tuple[str, int | None, int | None, tuple | None]:
        layer = expert = None
        out = name
        found = search_layer(name)
        if found:
            layer = int(found.group(2))
            if layer >= stage_layers:
                raise NamingError(f"{name!r} on rank {coords.rank} names local layer {layer}, but pipeline stage "
                                  f"{coords.pp} holds {stage_layers} layer(s) per the layout; check "
                                  f"num_layers/layers_per_stage")
            out = f"{name[:found.start(2)]}{offset + layer}{name[found.end(2):]}"
        if "experts." not in out:
            return out, layer, None, None
        found = search_expert(out)  # a name carries at most one expert index (the alternatives exclude two)
        if found is None:
            return out, layer, None, None
        digits = found.lastindex  # the matched alternative's digits group
        expert = int(found.group(digits))
        start = found.start(digits)
        if base is None:
            return out, layer, expert, (start, found.end(digits))
        if expert >= per_rank:
            raise NamingError(f"{name!r} on rank {coords.rank} names local expert {expert}, but each of the "
                              f"ep={layout.ep} ranks holds {per_rank} of num_experts={layout.num_experts}")
        number = str(base + expert)
        return f"{out[:start]}{number}{out[found.end(digits):]}", layer, expert, (start, start + len(number))

    return globalize


def expert_span(name: str) -> tuple[int, int] | None:
    """Where a name's expert index lies (its characters), or ``None`` when it has none."""
    found = _EXPERT.search(name) if "experts." in name else None
    if found is None:
        return None
    digits = found.lastindex  # the matched alternative's digits group
    return found.start(digits), found.end(digits)


class Holder(NamedTuple):
    """Where a global name lives: its pipeline stage and expert-parallel rank (``None``: every one)."""

    stage: int | None
    ep: int | None


def holder(name: str, layout: ParallelLayout) -> Holder | None:
    """Which stage and EP rank hold a global name, or ``None`` when no rank of the layout does (a layer
    beyond ``num_layers``, an expert beyond ``num_experts``): such a name must be reported, not dropped."""
    found = _LAYER.search(name)
    if found:
        layer = decimal(found.group(2))
        if layer is None:  # beyond any model, and int() refuses hostile 5000-digit indexes
            return None
        if layer >= layout.num_layers:
            return None
        stage = layout.stage_of_layer(layer)
    else:
        stage = stage_outside_layers(name, layout)
    if layout.num_experts is None or not is_expert(name):
        return Holder(stage, None)
    experts = [_expert_index(found)[1] for found in _EXPERT.finditer(name)]
    if any(expert >= layout.num_experts for expert in experts):
        return None
    ranks = {expert // layout.experts_per_rank for expert in experts}
    if len(ranks) > 1:
        return None
    return Holder(stage, ranks.pop() if ranks else None)


def stage_outside_layers(name: str, layout: ParallelLayout) -> int | None:
    """The pipeline stage that holds a name outside ``decoder.layers``, or ``None`` for every stage.

    Megatron-Core's ``GPTModel`` builds ``embedding`` only with ``pre_process`` (the first stage) and
    ``output_layer``, ``TransformerBlock``'s ``final_layernorm`` and, without a custom pipeline layout,
    the MTP block (``mtp_on_this_rank``) only with ``post_process`` (the last stage). An MTP stage also
    builds an embedding to share its weights; its quantizers are placed on the first stage only. Any other
    name stays on every stage. A prefix (``language_model.``) is allowed, as for ``decoder.layers``."""
    found = _EDGE.search(name)
    if found is None:
        return None
    return 0 if found.group(1) else layout.pp - 1


def to_local(name: str, layout: ParallelLayout, coords: Coords) -> str | None:
    """The rank's local name for a global name, or ``None`` when the rank does not hold it."""
    held = holder(name, layout)
    if held is None or held.stage not in (None, coords.pp) or held.ep not in (None, coords.ep):
        return None
    offset = layout.layer_offset(coords.pp)
    name = _LAYER.sub(lambda found: f"{found.group(1)}{int(found.group(2)) - offset}", name, count=1)
    if held.ep is None:
        return name

    def expert(found: re.Match) -> str:
        prefix, index = _expert_index(found)
        return f"{prefix}{index % layout.experts_per_rank}"

    return _EXPERT.sub(expert, name)


def _expert_index(found: re.Match) -> tuple[str, int]:
    """An ``_EXPERT`` match's text before the index and the index (``local_experts.N``, ``weightN`` or
    ``weight_quantizer.N``)."""
    first = found.lastindex - 1  # the alternative that matched: its prefix group, then its digits
    return found.group(first), int(found.group(first + 1))


def expert_count(name: str, rule, layout: ParallelLayout) -> int:
    """How many experts a rule over every expert (a grouped block's quantizer, a fan-in) spans: the
    spec's count or the layout's, which must agree when both are given."""
    total = rule.num_experts or layout.num_experts
    if total is None:
        raise NamingError(f"{name} stands for every expert but neither the spec (--param num_experts=N) nor the "
                          f"layout (num_experts) gives the number of experts")
    if layout.num_experts is not None and total != layout.num_experts:
        raise NamingError(f"{name}: the spec says {total} experts but the layout says {layout.num_experts}; "
                          f"make them agree")
    return total


def expert_block(name: str, match, layout: ParallelLayout, ep_rank: int) -> range:
    """The global experts a grouped-MoE quantizer covers on EP rank ``ep_rank``: ``[r*E/ep, (r+1)*E/ep)``."""
    per_rank = expert_count(name, match.rule, layout) // layout.ep
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def expert_hf_names(match, experts: range) -> list[str] | tuple[str, ...]:
    """A forward ``moe_fanout`` match's HF names for ``experts``, each expert's parts in group order."""
    slot = match.rule.expert_capture
    if any(pattern.captures[slot].offset is not None for pattern in match.rule.hf):
        return match.expert_names(experts)
    # The match leaves the expert as its only '*': fill it by text (hundreds of experts per block).
    parts = [name.split("*", 1) for name in match.hf]
    return [f"{head}{expert}{tail}" for expert in experts for head, tail in parts]


def slot_indices(name: str, layer_slot: str, expert_slot: str) -> tuple[str, int | None, int | None]:
    """``name`` with its layer index and expert index replaced by the given slot texts, and those
    indices (``None`` where it has none): the shape of a name that every layer or expert shares."""
    layer = expert = None
    found = _LAYER.search(name)
    if found:
        layer = int(found.group(2))
        name = name[:found.start(2)] + layer_slot + name[found.end(2):]
    found = _EXPERT.search(name) if "experts." in name else None
    if found:
        prefix, expert = _expert_index(found)
        name = name[:found.start()] + prefix + expert_slot + name[found.end():]
    return name, layer, expert
