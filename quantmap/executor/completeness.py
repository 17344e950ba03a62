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

from collections.abc import Iterable

from quantmap.parallel import ParallelLayout
from quantmap.executor.naming import slot_indices

LAYER_SLOT, EXPERT_SLOT = "\0L", "\0E"


def missing_names(names: Iterable[str], layout: ParallelLayout) -> list[str]:
    """The global Megatron names the layout requires (see the module docstring) that ``names`` lack."""
    present = set(names)
    return missing_parsed(list(map(_kind, present)), layout, lambda: present)


def missing_parsed(parsed: list[tuple], layout: ParallelLayout, present) -> list[str]:
    """:func:`missing_names` of names already parsed (:func:`parse`, :func:`parse_run`); ``present()``
    gives the names themselves. Counted first: the names are built only when some are missing (an
    export checks 10^5 names)."""
    required = _Required(parsed, layout)
    if required.count() == sum(map(required.held, required.parsed)):
        return []
    return sorted(required.names() - set(present()))


def required_names(names: Iterable[str], layout: ParallelLayout) -> set[str]:
    """Every global name the layout requires, given the names present."""
    return _Required(list(map(_kind, set(names))), layout).names()


def parse(name: str) -> tuple[str, str, int | None, int | None]:
    """A name as the check sees it: its kind, module, layer and expert (see the module docstring)."""
    return _kind(name)


def parse_run(first_name: str, experts: range) -> tuple[str, str, int | None, range]:
    """:func:`parse` of the names of an expert run (``first_name``: its first expert's) at once: its
    expert is the run's range of experts."""
    kind, module, layer, _ = _kind(first_name)
    return kind, module, layer, experts


class _Required:
    """The kinds, modules and layer module sets of the names present, and what they imply."""

    def __init__(self, parsed: list[tuple], layout: ParallelLayout):
        self.layout = layout
        # (kind, module, layer, expert); 10^5 names share a few hundred kinds, kept once each. An
        # expert run's expert is a range: it stands for one name per expert.
        shared: dict[str, str] = {}
        self.parsed = [(shared.setdefault(kind, kind), shared.setdefault(module, module), layer, expert)
                       for kind, module, layer, expert in parsed]
        self.kinds: dict[str, set[str]] = {}  # module -> its kinds
        self.experts_seen: dict[str, set[int]] = {}  # kind -> expert indices seen
        self.loose: set[str] = set()  # kinds outside decoder.layers: required as seen
        layer_modules: dict[int, set[str]] = {}
        for kind, module, layer, expert in self.parsed:
            self.kinds.setdefault(module, set()).add(kind)
            if isinstance(expert, range):
                self.experts_seen.setdefault(kind, set()).update(expert)
            elif expert is not None:
                self.experts_seen.setdefault(kind, set()).add(expert)
            if layer is None:
                self.loose.add(kind)
            else:
                layer_modules.setdefault(layer, set()).add(module)
        signatures = {frozenset(modules) for modules in layer_modules.values()}
        complete = [signature for signature in signatures if not any(signature < other for other in signatures)]
        self.modules: list[frozenset[str]] = []  # per layer of the layout: the modules it must hold
        for layer in range(layout.num_layers):
            own = frozenset(layer_modules.get(layer, ()))
            larger = [signature for signature in complete if signature > own]
            self.modules.append(own.union(frozenset.intersection(*larger)) if larger else own)

    def experts(self, kind: str):
        if EXPERT_SLOT not in kind:
            return None
        return range(self.layout.num_experts) if self.layout.num_experts is not None else self.experts_seen[kind]

    def count(self) -> int:
        def size(kind: str) -> int:
            experts = self.experts(kind)
            return 1 if experts is None else len(experts)

        return (sum(map(size, self.loose)) +
                sum(size(kind) for modules in self.modules for module in modules for kind in self.kinds[module]))

    def held(self, parsed: tuple) -> int:
        """How many of the required names a present name (or expert run) is."""
        kind, module, layer, expert = parsed
        if layer is not None and not (layer < self.layout.num_layers and module in self.modules[layer]):
            return 0
        experts = self.experts(kind)
        if not isinstance(expert, range):
            return experts is None or expert in experts
        if experts is None:
            return len(expert)
        if isinstance(experts, range):  # the layout's experts, 0..E-1
            return len(range(max(expert.start, experts.start), min(expert.stop, experts.stop)))
        return sum(e in experts for e in expert)

    def names(self) -> set[str]:
        out: set[str] = set()
        for kind in self.loose:
            out.update(self._expand(kind, None))
        for layer, modules in enumerate(self.modules):
            for module in modules:
                for kind in self.kinds[module]:
                    out.update(self._expand(kind, layer))
        return out

    def _expand(self, kind: str, layer: int | None) -> list[str]:
        name = kind if layer is None else kind.replace(LAYER_SLOT, str(layer))
        experts = self.experts(kind)
        if experts is None:
            return [name]
        head, tail = name.split(EXPERT_SLOT)
        return [f"{head}{expert}{tail}" for expert in experts]


def _kind(name: str) -> tuple[str, str, int | None, int | None]:
    """The name with its layer and expert index slotted, its module, and those indices (the hot path)."""
    name, layer, expert = slot_indices(name, LAYER_SLOT, EXPERT_SLOT)
    at = name.find("quantizer")
    return name, name if at < 0 else name[:name.rfind(".", 0, at)], layer, expert
