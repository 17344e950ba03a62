"""Local ↔ global Megatron names.

Each pipeline stage numbers its layers from 0 (``TransformerBlock`` builds ``decoder.layers.{i}``
locally; the global index is ``get_transformer_layer_offset + i``), and each expert-parallel rank
numbers its experts from 0 (``SequentialMLP`` ``local_experts.{i}``, ``TEGroupedLinear``
``weight{i}``/``bias{i}``; the global index is ``ep_rank * experts_per_rank + i``, as in
``BaseMoELayer``). Rules are written against global names. A grouped block's quantizer
(``...experts.linear_fc1.weight_quantizer._amax``) has no expert index and is never renumbered.
"""

from __future__ import annotations

import re

from quantmap.executor.layout import Coords, Layout

_LAYER = re.compile(r"(?:^|(?<=\.))(decoder\.layers\.)(\d+)(?=\.)")
_EXPERT = re.compile(r"(\.local_experts\.)(\d+)(?=\.)|(?<=\.experts\.)(linear_fc\d+\.(?:weight|bias))(\d+)(?=$|\.)")


class NamingError(ValueError):
    """A name that the layout cannot place (a layer or expert index out of range)."""


def is_expert(name: str) -> bool:
    """Expert tensors are grouped by the expert view (ETP/EP/EDP), everything else by the dense view."""
    return ".experts." in name or name.startswith("experts.")


def to_global(name: str, layout: Layout, coords: Coords) -> str:
    """The global name of a rank's local tensor name."""
    stage_layers = layout.stage_layers[coords.pp]
    offset = layout.layer_offset(coords.pp)

    def layer(found: re.Match) -> str:
        local = int(found.group(2))
        if local >= stage_layers:
            raise NamingError(f"{name!r} on rank {coords.rank} names local layer {local}, but pipeline stage "
                              f"{coords.pp} holds {stage_layers} layer(s) per the layout; check num_layers/layers_per_stage")
        return f"{found.group(1)}{offset + local}"

    name_out = _LAYER.sub(layer, name, count=1)
    if layout.num_experts is None or not is_expert(name):
        return name_out
    per_rank = layout.experts_per_rank
    base = coords.ep * per_rank

    def expert(found: re.Match) -> str:
        prefix, digits = (found.group(1), found.group(2)) if found.group(1) else (found.group(3), found.group(4))
        local = int(digits)
        if local >= per_rank:
            raise NamingError(f"{name!r} on rank {coords.rank} names local expert {local}, but each of the ep={layout.ep} "
                              f"ranks holds {per_rank} of num_experts={layout.num_experts}")
        return f"{prefix}{base + local}"

    return _EXPERT.sub(expert, name_out)


def to_local(name: str, layout: Layout, coords: Coords) -> str | None:
    """The rank's local name for a global name, or ``None`` when the rank does not hold it."""
    found = _LAYER.search(name)
    if found:
        layer = int(found.group(2))
        if layer >= layout.num_layers or layout.stage_of_layer(layer) != coords.pp:
            return None
        local = layer - layout.layer_offset(coords.pp)
        name = f"{name[:found.start(2)]}{local}{name[found.end(2):]}"
    if layout.num_experts is None or not is_expert(name):
        return name
    per_rank = layout.experts_per_rank
    held = True

    def expert(found: re.Match) -> str:
        nonlocal held
        prefix, digits = (found.group(1), found.group(2)) if found.group(1) else (found.group(3), found.group(4))
        ep, local = divmod(int(digits), per_rank)
        held = held and ep == coords.ep
        return f"{prefix}{local}"

    name = _EXPERT.sub(expert, name)
    return name if held else None


def expert_block(name: str, match, layout: Layout, ep_rank: int) -> range:
    """The global experts a grouped-MoE quantizer covers on EP rank ``ep_rank``: ``[r*E/ep, (r+1)*E/ep)``."""
    total = match.rule.num_experts or layout.num_experts
    if total is None:
        raise NamingError(f"{name} is a grouped-MoE quantizer but neither the spec (--param num_experts=N) nor the "
                          f"layout (num_experts) gives the number of experts")
    if layout.num_experts is not None and total != layout.num_experts:
        raise NamingError(f"{name}: the spec says {total} experts but the layout says {layout.num_experts}; "
                          f"make them agree")
    per_rank = total // layout.ep
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def expert_hf_names(match, experts: range) -> list[str] | tuple[str, ...]:
    """A forward ``moe_fanout`` match's HF names for ``experts``, each expert's parts in group order."""
    slot = match.rule.expert_capture
    if any(pattern.captures[slot].offset is not None for pattern in match.rule.hf):
        return match.expert_names(experts)
    # The match leaves the expert as its only '*': fill it by text (hundreds of experts per block).
    parts = [name.split("*", 1) for name in match.hf]
    return [f"{head}{expert}{tail}" for expert in experts for head, tail in parts]


def local_indices(name: str) -> tuple[int | None, int | None]:
    """The local layer and local expert index a rank's name carries (``None`` where it has none), so
    that a rank's highest indices can be checked against what the layout says it holds."""
    layer = _LAYER.search(name)
    expert = _EXPERT.search(name)
    return (int(layer.group(2)) if layer else None,
            int(expert.group(2) or expert.group(4)) if expert else None)
