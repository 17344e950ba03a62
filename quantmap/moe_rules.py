"""Quantizer rules of MoE expert mappings where one module's buffer is not one buffer per side.

Two namings need more than the compiler's one-buffer-per-module derivation:

* ModelOpt 0.47 gives a Transformer Engine grouped linear (TEGroupedMLP) one weight quantizer per
  local expert, ``...experts.linear_fc1.weight_quantizer.{E}._amax`` (a ``GroupedQuantizer``
  ``ModuleList``, ``plugins/transformer_engine.py`` ``_QuantTEGroupedLinear._setup``), and keeps one
  shared ``input_quantizer`` per grouped linear. ModelOpt <= 0.46 shared one weight quantizer too
  (``...experts.linear_fc1.weight_quantizer._amax``). Both forms are derived for export; a reverse
  lookup (import) gives the one the mapping's ``grouped_weight_quantizer`` names (per-expert by
  default), the other is forward-only (``Rule.reversible`` is false).
* transformers v5 fuses a layer's experts into one tensor in memory (``mlp.experts.gate_up_proj``),
  and ModelOpt names that module's quantizers after the tensor
  (``plugins/huggingface.py`` ``_QuantFusedExperts``): ``gate_up_proj_weight_quantizers.{E}`` (one
  per expert) and ``gate_up_proj_input_quantizer`` (one per layer); gpt-oss's
  ``_QuantGptOssExperts`` has one ``gate_up_proj_weight_quantizer`` for all experts ("shared").
  Many Megatron quantizers meeting one HF quantizer are ``fan_in`` rules.

A weight quantizer's stages (W4A8's ``SequentialQuantizer``, :mod:`quantmap.stages`) are derived for
every form whose name has the expert, never for a grouped block's shared one, whose staged name
would be 0.47's per-expert name.

Each derivation is plain data (:class:`Derived`); the compiler turns it into a rule.
"""

from __future__ import annotations

from typing import NamedTuple

from quantmap.patterns import Pattern
from quantmap.rules import AMAX, FAN_IN, FANOUT, MOE_FANOUT
from quantmap.stages import staged

WEIGHT_QUANTIZER = "weight_quantizer"


class Derived(NamedTuple):
    """One derived quantizer rule, before the compiler adds the mapping's origin and priority."""

    kind: str
    megatron: str
    hf: tuple[str, ...]
    parts: tuple[str, ...]
    buffer: str
    expert_capture: int | None = None
    reversible: bool = True  # False for the weight quantizer form an import does not write
    staged: bool = False  # a stage of a sequential weight quantizer: the last capture of each side


def with_stages(derived: Derived) -> list[Derived]:
    """A weight quantizer's rule and its stages' (the stage index before the buffer's attribute, both sides).
    The stages have one form, so they reverse whichever single form an import writes."""
    return [derived, derived._replace(megatron=staged(derived.megatron), hf=tuple(map(staged, derived.hf)),
                                      buffer=staged(derived.buffer), reversible=True, staged=True)]


def _both_forms(shared: Derived, each: Derived, imported: str) -> list[Derived]:
    """A grouped linear's weight quantizer in both ModelOpt forms; only the ``imported`` one reverses. The
    per-expert form has stages; the shared form's staged name is the per-expert name, so it has none."""
    return [shared._replace(reversible=imported == "shared"), *with_stages(each._replace(
        reversible=imported == "per-expert"))]


def grouped_weight_buffers(megatron: Pattern, hf: list[Pattern], buffers, parts, imported: str) -> list[Derived]:
    """A grouped ``weight*`` mapping onto per-expert HF modules: each block buffer fans out to the
    experts (``moe_fanout``); a weight quantizer also per expert, one to one (or onto a fused group)."""
    module = megatron.text.rsplit(".", 1)[0]  # ...experts.linear_fc1
    expert = megatron.arity - 1
    hf_modules = [p.text.rsplit(".", 1)[0] for p in hf]
    out = []
    for buffer in buffers:
        targets = tuple(f"{m}.{buffer}" for m in hf_modules)
        quantizer, _, attr = buffer.partition(".")
        if quantizer != WEIGHT_QUANTIZER:
            out.append(Derived(MOE_FANOUT, f"{module}.{buffer}", targets, parts, buffer, expert))
            continue
        out += _both_forms(Derived(MOE_FANOUT, f"{module}.{buffer}", targets, parts, buffer, expert),
                           Derived(FANOUT if parts != ("",) else AMAX, f"{module}.{quantizer}.*.{attr}", targets,
                                   parts, buffer), imported)
    return out


def fused_expert_buffers(megatron: Pattern, hf: Pattern, buffers, grouped: bool, style: str,
                         imported: str) -> list[Derived]:
    """A mapping onto a fused-experts HF tensor (``fused_experts: per-expert | shared``), from SequentialMLP
    (``local_experts.*...weight``) or a grouped linear (``weight*``). The Megatron expert is its last capture."""
    hf_module, tensor = hf.text.rsplit(".", 1)
    expert = megatron.arity - 1
    module = megatron.text.rsplit(".", 1)[0]  # local_experts.*.linear_fc1, or the grouped ...experts.linear_fc1
    out = []
    for buffer in buffers:
        quantizer, _, attr = buffer.partition(".")
        per_expert = style == "per-expert" and quantizer == WEIGHT_QUANTIZER
        target = (f"{hf_module}.{tensor}_{quantizer}s.*.{attr}" if per_expert else f"{hf_module}.{tensor}_{buffer}",)
        if not grouped:  # one Megatron quantizer per expert
            one = (Derived(AMAX, f"{module}.{buffer}", target, ("",), buffer) if per_expert
                   else Derived(FAN_IN, f"{module}.{buffer}", target, ("",), buffer, expert))
            out += with_stages(one) if quantizer == WEIGHT_QUANTIZER else [one]
            continue
        block = f"{module}.{buffer}"  # shared by the block: the same name on every expert-parallel rank
        if quantizer != WEIGHT_QUANTIZER:
            out.append(Derived(FAN_IN, block, target, ("",), buffer))
            continue
        each = f"{module}.{quantizer}.*.{attr}"
        if per_expert:
            out += _both_forms(Derived(MOE_FANOUT, block, target, ("",), buffer, expert),
                               Derived(AMAX, each, target, ("",), buffer), imported)
        else:
            out += _both_forms(Derived(FAN_IN, block, target, ("",), buffer),
                               Derived(FAN_IN, each, target, ("",), buffer, expert), imported)
    return out
