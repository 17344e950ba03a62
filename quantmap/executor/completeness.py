"""What a layout requires: the quantizer names every layer and expert must hold, derived from the names seen.

Neither direction can know the model's quantizer set from the spec alone (which quantizers exist
depends on the quantization recipe), but the names present show it: if any layer has
``linear_qkv.input_quantizer._amax``, every layer with that module must, and a module with an
expert index exists for every expert. So, on global Megatron names:

* a *kind* is a name with its layer and expert index replaced by a slot, and its *module* the kind up
  to the quantizer (``decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1``);
* a module present in a layer must have every kind seen for that module, for every expert of the
  layout (``num_experts``; the experts seen when the layout gives none);
* a layer's modules are *complete* when no other layer has a strict superset of them; a layer must
  hold every module that all complete module sets larger than its own agree on. An empty layer
  (dropped, or a checkpoint with fewer layers than the layout) gets the modules common to every
  complete layer, a layer that lost some modules gets them back from the complete layers, and models
  whose layers legitimately differ (DeepSeek's first dense layers next to MoE layers, interleaved
  MoE) are not flagged, because neither kind of layer is a subset of the other. (The price: in such
  a model, a layer that lost its whole MLP block matches both kinds and is only checked for the
  modules they share.)

A model that quantizes only some layers therefore shows the others as missing: that is a finding,
not a refusal, unless ``--strict`` (import) or the default export policy asks for completeness.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from quantmap.executor.layout import Layout
from quantmap.executor.naming import _EXPERT, _LAYER, _expert_index

_QUANTIZER = re.compile(r"\.[^.]*quantizer(?=\.|$)")
LAYER_SLOT, EXPERT_SLOT = "\0L", "\0E"


def missing_names(names: Iterable[str], layout: Layout) -> list[str]:
    """The global Megatron names the layout requires (see the module docstring) that ``names`` lack."""
    present = set(names)
    return sorted(required_names(present, layout) - present)


def required_names(names: Iterable[str], layout: Layout) -> set[str]:
    """Every global name the layout requires, given the names present (which it includes)."""
    kinds: dict[str, set[str]] = {}  # module -> its kinds
    experts_seen: dict[str, set[int]] = {}  # kind -> expert indices seen
    layer_modules: dict[int, set[str]] = {}
    loose: set[str] = set()  # kinds outside decoder.layers: required as seen
    for name in names:
        kind, layer, expert = _kind(name)
        module = _module(kind)
        kinds.setdefault(module, set()).add(kind)
        if expert is not None:
            experts_seen.setdefault(kind, set()).add(expert)
        if layer is None:
            loose.add(kind)
        else:
            layer_modules.setdefault(layer, set()).add(module)
    signatures = {frozenset(modules) for modules in layer_modules.values()}
    complete = [signature for signature in signatures if not any(signature < other for other in signatures)]
    out: set[str] = set()
    for kind in loose:
        out.update(_expand(kind, None, experts_seen, layout))
    for layer in range(layout.num_layers):
        own = frozenset(layer_modules.get(layer, ()))
        larger = [signature for signature in complete if signature > own]
        modules = own.union(frozenset.intersection(*larger)) if larger else own
        for module in modules:
            for kind in kinds[module]:
                out.update(_expand(kind, layer, experts_seen, layout))
    return out


def _kind(name: str) -> tuple[str, int | None, int | None]:
    """The name with its layer and expert index slotted, and those indices."""
    layer = expert = None
    found = _LAYER.search(name)
    if found:
        layer = int(found.group(2))
        name = name[:found.start(2)] + LAYER_SLOT + name[found.end(2):]
    found = _EXPERT.search(name)
    if found:
        prefix, expert = _expert_index(found)
        name = name[:found.start()] + prefix + EXPERT_SLOT + name[found.end():]
    return name, layer, expert


def _module(kind: str) -> str:
    found = _QUANTIZER.search(kind)
    return kind[:found.start()] if found else kind


def _expand(kind: str, layer: int | None, experts_seen: dict[str, set[int]], layout: Layout) -> list[str]:
    name = kind if layer is None else kind.replace(LAYER_SLOT, str(layer))
    if EXPERT_SLOT not in name:
        return [name]
    experts = range(layout.num_experts) if layout.num_experts is not None else sorted(experts_seen[kind])
    head, tail = name.split(EXPERT_SLOT)
    return [f"{head}{expert}{tail}" for expert in experts]
