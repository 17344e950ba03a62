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


def compile(spec: str | Path, *, config: str | Path | None = None, **params: int) -> RuleSet:  # noqa: A001
    """Compile a spec (a path, or a shipped spec's name) with run-time parameters; ``config`` (a
    Hugging Face config.json) supplies the ones it knows (head counts, widths), ``params`` win."""
    from quantmap.compiler import compile_spec

    resolved = load_spec(spec)
    if config is not None:
        from quantmap.spec.hf_config import params_from_config

        params = {**params_from_config(config, resolved.params), **params}
    return compile_spec(resolved, params)
