"""What a mapped tensor is: its role, and the Hugging Face module it belongs to.

Every later stage (which tensors a format writes, which values may not be negative, which tensors a
scale needs together) asks the rule that claimed a tensor, never the tensor's name again: a role is
decided once, from the rule, when the spec is compiled. Torch-free.

Roles of quantizer state: ``weight_amax`` (a weight quantizer's, any stage of a sequential one),
``input_amax``, ``k_amax`` / ``v_amax`` (the KV cache), ``pre_quant_scale`` (SmoothQuant / AWQ). Roles of the
model's own tensors: ``weight`` (a linear or embedding weight), ``bias``, ``norm`` (a norm's weight or
bias), ``parameter`` (anything else a module owns: Mamba's ``A_log``/``D``/``dt_bias``, attention sinks,
a router's score-correction bias).
"""

from __future__ import annotations

WEIGHT, BIAS, NORM, PARAMETER = "weight", "bias", "norm", "parameter"
WEIGHT_AMAX, INPUT_AMAX, K_AMAX, V_AMAX, PRE_QUANT_SCALE = (
    "weight_amax", "input_amax", "k_amax", "v_amax", "pre_quant_scale")

MODEL_ROLES = frozenset({WEIGHT, BIAS, NORM, PARAMETER})
QUANTIZER_ROLES = frozenset({WEIGHT_AMAX, INPUT_AMAX, K_AMAX, V_AMAX, PRE_QUANT_SCALE})
AMAX_ROLES = frozenset({WEIGHT_AMAX, INPUT_AMAX, K_AMAX, V_AMAX})

_QUANTIZER = {"weight": WEIGHT_AMAX, "input": INPUT_AMAX, "k_bmm": K_AMAX, "v_bmm": V_AMAX}


def role_of(buffer: str | None, hf_pattern: str) -> str:
    """The role of what a rule maps: ``buffer`` is a quantizer rule's buffer (``input_quantizer._amax``,
    ``weight_quantizer.*._amax``), ``None`` for a weight rule, whose role comes from the HF name it
    writes (``hf_pattern``, its first part's)."""
    if buffer is not None:
        quantizer, field = buffer.split(".", 1)[0], buffer.rsplit(".", 1)[-1]
        if field == "_pre_quant_scale":
            return PRE_QUANT_SCALE
        if field == "_amax":
            return _QUANTIZER.get(quantizer.removesuffix("_quantizer"), INPUT_AMAX)
        raise ValueError(f"quantizer buffer {buffer!r} has no role: expected one ending in _amax or _pre_quant_scale")
    module, _, leaf = hf_pattern.rpartition(".")
    if "norm" in module.rsplit(".", 1)[-1].lower():
        return NORM
    if leaf.endswith("bias") and leaf != "dt_bias":
        return BIAS if leaf == "bias" or leaf.endswith("_proj_bias") else PARAMETER
    if leaf == "weight" or leaf.endswith("_proj"):
        return WEIGHT
    return PARAMETER


def module_of(hf_name: str, role: str) -> str:
    """The HF module ``hf_name`` belongs to: the text before its quantizer (``....q_proj.input_quantizer._amax``
    → ``....q_proj``; transformers' fused experts' ``gate_up_proj_input_quantizer`` belongs to ``....experts``),
    or before its last segment for the model's own tensors."""
    if role in QUANTIZER_ROLES:
        segments = hf_name.split(".")
        at = next(i for i, segment in enumerate(segments) if segment.endswith("quantizer") or
                  segment.endswith("quantizers"))
        return ".".join(segments[:at])
    return hf_name.rpartition(".")[0]
