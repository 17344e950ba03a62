"""quantmap: move quantization calibration state between Megatron-Core and Hugging Face names.

The pipeline, one module per stage: ``spec`` (YAML → validated spec) → ``patterns`` (the
wildcard engine) → ``compiler`` (spec → rules) → ``index``/``ruleset`` (resolve names both
ways) → ``executor`` (tensors across ranks) → ``io`` (files). This package's top level never
imports torch; the executor does, when it is used.
"""

from __future__ import annotations

from pathlib import Path

from quantmap.diagnostics import Diagnostic, SpecError
from quantmap.rules import Match, Rule
from quantmap.ruleset import RuleSet
from quantmap.spec import load_spec

__all__ = ["Diagnostic", "Match", "Rule", "RuleSet", "SpecError", "compile", "load_spec"]


def compile(spec: str | Path, hf_naming: str = "on-disk", **params: int) -> RuleSet:  # noqa: A001 - the verb users expect
    """Compile a spec (a path, or a shipped spec's name) with run-time parameters, for the HF names
    ``save_pretrained`` writes (``hf_naming="on-disk"``) or a live transformers v5 model's
    (``"in-memory"``: fused MoE experts, as ModelOpt names their quantizers)."""
    from quantmap.compiler import compile_spec

    return compile_spec(load_spec(spec), params, hf_naming)
