"""The spec file format, as Pydantic models: what a user may write in ``specs/<name>.yaml``.

The models validate one file as written; merging ``extends`` and applying prefixes happens in
:mod:`quantmap.spec.loader`. ``quantmap schema`` prints the JSON Schema generated from here, so
editors complete and check specs with the same rules the loader enforces.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_QUANTIZERS = ("weight_quantizer._amax", "input_quantizer._amax")
DEFAULT_KV_SKIP_SEGMENTS = ("mtp", "mtp_layers", "mtp_model_layer", "draft", "draft_layers", "draft_model_layer")

Kind = Literal["plain", "qkv", "kv", "gated_mlp", "fused"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Sides(_Strict):
    """A string for each side of the mapping (used for name prefixes)."""

    megatron: str = Field("", description="Text put before every Megatron name, e.g. 'language_model.'.")
    hf: str = Field("", description="Text put before every Hugging Face name, e.g. 'model.language_model.'.")


class Exclusions(_Strict):
    """Names that no rule maps on purpose, so that `quantmap check` does not report them."""

    megatron: list[str] = Field(default_factory=list, description="Megatron name patterns left unmapped.")
    hf: list[str] = Field(default_factory=list, description="Hugging Face name patterns left unmapped.")


class MappingSpec(_Strict):
    """One weight of the model under its Megatron name and its Hugging Face name(s)."""

    megatron: str = Field(
        description="Megatron-Core weight name pattern. End in 'weight*' for grouped-MoE experts "
        "(Megatron's 'linear_fc1.weight0..N')."
    )
    hf: str | dict[str, str] = Field(
        description="The Hugging Face pattern, or a fused group {part: pattern} in Megatron's order, "
        "e.g. {q: ..., k: ..., v: ...} or {gate: ..., up: ...}."
    )
    kind: Kind | None = Field(
        None,
        description="plain, qkv, kv, gated_mlp or fused. Inferred from the group's part names when omitted.",
    )
    hf_parts: list[str] | None = Field(
        None,
        description="The HF tensor is itself fused: it holds these parts of the Megatron group (kind qkv or "
        "gated_mlp) concatenated on dim 0 in this order, e.g. [q, k, v] for Phi-3's qkv_proj.",
    )
    hf_layout: list[Literal["interleaved", "transposed"]] | None = Field(
        None,
        description="How the HF tensor's elements lie besides its parts' order: 'interleaved' (the hf_parts of a "
        "gated_mlp alternate row by row, even rows gate and odd rows up, instead of [gate; up]) and/or "
        "'transposed' (the HF weight is [in, out], Megatron's [out, in] swapped), e.g. [interleaved, transposed] "
        "for gpt-oss's mlp.experts.gate_up_proj.",
    )
    quantizers: list[str] | None = Field(
        None,
        description="Quantizer buffers of this weight's module; [] for weights without quantizers "
        "(norms, embeddings, routers). Defaults to the spec's 'quantizers'.",
    )
    priority: int = Field(
        0,
        description="When two mappings can claim the same name on one side, the higher priority wins; "
        "equal priorities are an error.",
    )
    parallel: Literal["column", "row", "replicated"] | None = Field(
        None,
        description="How Megatron splits the weight over tensor-parallel ranks: column (dim 0), "
        "row (dim 1), or replicated.",
    )
    experts: int | str | None = Field(
        None,
        description="Grouped MoE: the number of experts, or the name of the run-time parameter that "
        "gives it. Defaults to the parameter 'num_experts'.",
    )
    kv_cache: bool | None = Field(
        None,
        description="Derive KV-cache (k_bmm/v_bmm) rules for the attention module that holds this weight. "
        "Defaults to true for qkv mappings.",
    )
    hf_naming: Literal["on-disk", "in-memory"] | None = Field(
        None,
        description="The Hugging Face naming this mapping belongs to: 'on-disk' (what save_pretrained writes: "
        "per-expert MoE names) or 'in-memory' (transformers v5 fused experts, what ModelOpt names on a live "
        "model). Compiled only under that --hf-naming; omitted, under both.",
    )
    fused_experts: Literal["per-expert", "shared"] | None = Field(
        None,
        description="The HF side is one tensor holding every expert on its dim 0 (transformers v5 "
        "'mlp.experts.gate_up_proj'), named without an expert wildcard. ModelOpt names its quantizers "
        "'<tensor>_weight_quantizers.{E}' and '<tensor>_input_quantizer' (per-expert), or '<tensor>_weight_quantizer' "
        "and '<tensor>_input_quantizer' (shared: gpt-oss).",
    )
    grouped_weight_quantizer: Literal["per-expert", "shared"] | None = Field(
        None,
        description="Grouped-MoE ('weight*') mappings: the form of ModelOpt's weight quantizer that an import "
        "writes: 'per-expert' ('weight_quantizer.{E}', ModelOpt >= 0.47; the default) or 'shared' (one "
        "'weight_quantizer' per grouped linear, ModelOpt <= 0.46). Export maps both forms.",
    )
    note: str | None = Field(None, description="Free text for readers of the spec.")


class BlockUse(_Strict):
    """One instance of one or more blocks: their mappings with prefixes put before their names and a priority offset."""

    block: str | list[str] = Field(
        description="The name of a block of this spec or of a spec it extends, or a list of them (mapped in order)."
    )
    prefix: Sides = Field(
        default_factory=Sides,
        description="Text put before every name of the block's mappings, captures included, e.g. "
        "{megatron: 'mtp.layers.{i}.mtp_model_layer.', hf: 'model.layers.{num_layers + i}.'}.",
    )
    priority: int = Field(0, description="Added to the priority of every mapping of the block.")


class SpecFile(_Strict):
    """A quantmap spec: how one architecture's weights are named in Megatron-Core and Hugging Face."""

    name: str = Field(description="Short name of the spec, e.g. 'llama'.")
    description: str = ""
    architectures: list[str] = Field(
        default_factory=list, description="Hugging Face architecture classes served, e.g. LlamaForCausalLM."
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free metadata (sources, versions).")
    extends: str | None = Field(
        None, description="A shipped spec's name or a path (relative to this file) whose mappings this spec reuses."
    )
    prefix: Sides = Field(default_factory=Sides, description="Prefixes put on every name of either side.")
    params: dict[str, int | None] = Field(
        default_factory=dict,
        description="Run-time parameters and their defaults; null means it must be given (--param name=value).",
    )
    quantizers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_QUANTIZERS),
        description="Quantizer buffers derived for every weight mapping ending in '.weight'.",
    )
    kv_cache: bool = Field(True, description="Derive KV-cache (k_bmm/v_bmm) amax rules for attention mappings.")
    kv_skip_segments: list[str] = Field(
        default_factory=lambda: list(DEFAULT_KV_SKIP_SEGMENTS),
        description="Path segments under which no KV-cache rules are derived.",
    )
    mappings: list[MappingSpec] = Field(default_factory=list, description="The weight mappings.")
    blocks: dict[str, list[MappingSpec]] = Field(
        default_factory=dict,
        description="Named groups of mappings, written relative to a prefix, that 'use' instantiates; a block "
        "alone maps nothing.",
    )
    use: list[BlockUse] = Field(default_factory=list, description="Instances of blocks, mapped after 'mappings'.")
    drop: list[str] = Field(
        default_factory=list,
        description="Megatron patterns of inherited mappings to remove, exactly as the extended spec resolves "
        "them; one that names no inherited mapping is an error.",
    )
    exclude: Exclusions = Field(
        default_factory=Exclusions, description="Names left unmapped on purpose, taken as written (no prefix)."
    )
