"""Diagnostics: every problem quantmap reports has a stable code, a place and a suggested fix.

Codes are stable so that CI can select or silence a class of problem. ``QM0xx`` are spec
errors (file, YAML, schema, patterns, rule conflicts), ``QM06x`` compile warnings, and
``QM1xx`` findings of ``quantmap check`` against a real checkpoint's names.
"""

from __future__ import annotations

from dataclasses import dataclass

CODES: dict[str, str] = {
    "QM001": "YAML syntax error",
    "QM002": "file is not UTF-8",
    "QM003": "file is empty",
    "QM004": "file is larger than the spec size limit",
    "QM005": "YAML anchors and aliases are not allowed",
    "QM006": "file cannot be read",
    "QM010": "unknown key",
    "QM011": "wrong type or value",
    "QM012": "missing required field",
    "QM020": "malformed pattern",
    "QM021": "wildcard count or kind mismatch between the two sides",
    "QM022": "empty fused group",
    "QM023": "grouped-MoE mapping without an expert wildcard",
    "QM024": "hf_parts that do not fit the mapping",
    "QM025": "a fused Megatron tensor mapped 1:1 without a kind",
    "QM026": "fused-experts mapping whose sides do not differ by the expert",
    "QM027": "a kind that has no effect on a single HF name",
    "QM028": "hf_layout that does not fit the mapping",
    "QM029": "quantized_parts that do not fit the mapping",
    "QM030": "duplicate mapping",
    "QM031": "two rules can match the same name and none is preferred",
    "QM032": "two rules produce the same target",
    "QM040": "extended spec not found",
    "QM041": "extends cycle",
    "QM042": "drop names no inherited mapping",
    "QM043": "use names no block",
    "QM044": "hybrid layer kinds that do not fit the spec",
    "QM045": "in_memory_renames that cannot apply one way",
    "QM050": "missing run-time parameter",
    "QM060": "no quantizer rules derived for a mapping",
    "QM061": "no KV-cache rules derived for an attention mapping",
    "QM101": "name that no rule claims",
    "QM102": "rule target that does not exist",
    "QM103": "name claimed by more than one rule",
    "QM104": "fan-out group with a missing part",
    "QM105": "rule that matches no name on either side (a note)",
    "QM106": "reverse lookup that wins a Megatron name the model lacks",
    "QM107": "a weight the checkpoint saves gated (SwiGLU halves) that the spec maps ungated, or the reverse",
}


@dataclass(frozen=True, slots=True)
class Location:
    """Where something is in a spec file (1-based line and column)."""

    file: str
    line: int = 0
    column: int = 0

    def shifted(self, columns: int) -> Location:
        return Location(self.file, self.line, self.column + columns)

    def __str__(self) -> str:
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem: ``code``, a full-sentence ``message``, where it is and how to fix it."""

    code: str
    message: str
    location: Location | None = None
    hint: str = ""
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{self.severity} {self.code}: {self.message}{hint}"

    def to_json(self) -> dict:
        place = self.location
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
            "file": place.file if place else None,
            "line": place.line if place else None,
            "column": place.column if place else None,
        }


class SpecError(Exception):
    """A spec that cannot be used; carries every diagnostic found, not only the first."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))
