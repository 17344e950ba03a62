"""The spec file format, as Pydantic models: what a user may write in ``specs/<name>.yaml``.

The models validate one file as written; merging ``extends`` and applying prefixes happens in
:mod:`quantmap.spec.loader`. ``quantmap schema`` prints the JSON Schema generated from here, so
editors complete and check specs with the same rules the loader enforces.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_QUANTIZERS = ("weight_quantizer._amax", "input_quantizer._amax")
DEFAULT_KV_SKIP_SEGMENTS = ("mtp", "mtp_layers", "mtp_model_layer", "draft", "draft_layers", "draft_model_layer")

Kind = Literal["plain", "qkv", "kv", "gated_mlp", "fused", "gdn_in_proj", "gdn_conv1d"]


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
        description="plain, qkv, kv, gated_mlp or fused. Inferred from the group's part names when omitted. "
        "gdn_in_proj / gdn_conv1d: a Gated DeltaNet in_proj ([q; k; v; z; b; a] rows) or conv1d ([q; k; v]), "
        "each component split over TP ranks on its own; sized by the spec parameters linear_num_key_heads, "
        "linear_key_head_dim, linear_num_value_heads, linear_value_head_dim.",
    )
    hf_parts: list[str] | None = Field(
        None,
        description="The HF tensor is itself fused: it holds these parts of the Megatron group (kind qkv or "
        "gated_mlp) concatenated on dim 0 in this order, e.g. [q, k, v] for Phi-3's qkv_proj.",
    )
    hf_layout: list[Literal["interleaved", "transposed", "zero_centered"]] | None = Field(
        None,
        description="How the HF tensor's elements lie besides its parts' order: 'interleaved' (the hf_parts of a "
        "gated_mlp alternate row by row, even rows gate and odd rows up, instead of [gate; up]) and/or "
        "'transposed' (the HF weight is [in, out], Megatron's [out, in] swapped), e.g. [interleaved, transposed] "
        "for gpt-oss's mlp.experts.gate_up_proj; 'zero_centered' (a norm weight Megatron stores as w - 1, "
        "layernorm_zero_centered_gamma, and HF as w: HF = Megatron + 1), e.g. Gated DeltaNet's out_norm.",
    )
    quantizers: list[str] | None = Field(
        None,
        description="Quantizer buffers of this weight's module; [] for weights without quantizers "
        "(norms, embeddings, routers). Defaults to the spec's 'quantizers'.",
    )
    quantized_parts: list[str] | None = Field(
        None,
        description="A fused group whose HF parts are not all quantized: the parts whose HF modules carry the "
        "Megatron tensor's quantizers, e.g. [qkv, z] for Qwen3.5's Gated DeltaNet in_proj (ModelOpt disables "
        "in_proj_a / in_proj_b). The quantizers fan out to these parts only. Defaults to every part.",
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


class KindSource(_Strict):
    """One place in a Hugging Face config.json that gives each decoder layer's kind."""

    key: str = Field(
        description="The config.json key (under text_config for a vision-language config): a list with one value per "
        "layer ('layer_types'), a string with one character per layer ('hybrid_override_pattern'), or, with "
        "'every', an interval N ('full_attention_interval')."
    )
    values: dict[str, str] | None = Field(
        None,
        description="Config value (list item or character) -> kind, e.g. {M: mamba, '*': attention}; omitted, "
        "the config's values are the kinds' names.",
    )
    every: str | None = Field(
        None,
        description="With an interval N: the kind of every N-th layer (layer i when (i + 1) % N == 0, as "
        "transformers derives Qwen3-Next's layer_types); 'others' gives the kind of the rest.",
    )
    others: str | None = Field(None, description="With 'every': the kind of the layers that are not every N-th.")

    @model_validator(mode="after")
    def _one_form(self) -> KindSource:
        if (self.every is None) != (self.others is None):
            raise ValueError("'every' and 'others' go together: give both, or neither")
        if self.every is not None and self.values is not None:
            raise ValueError("'values' maps a list or a string, 'every'/'others' an interval: give one form")
        return self


class Hybrid(_Strict):
    """The kinds of decoder layer of a hybrid model, the mappings each kind has, and where a config.json gives
    each layer's kind; `quantmap names` lists a marked mapping's names for the layers of its kinds only."""

    kinds: dict[str, list[str]] = Field(
        description="Kind -> Megatron texts: a mapping whose Megatron pattern contains one of a kind's texts, "
        "starting at a segment (e.g. 'self_attention.in_proj.'), belongs to the layers of that kind; a mapping "
        "no text marks belongs to every layer."
    )
    config: list[KindSource] = Field(
        default_factory=list,
        description="Where config.json gives the layers' kinds, in order; the first key the config has is read.",
    )

    def kinds_of(self, megatron: str) -> frozenset[str]:
        """The kinds whose texts the Megatron pattern ``megatron`` contains at a segment start (none: every layer's)."""
        return frozenset(kind for kind, texts in self.kinds.items()
                         if any(marks(text, megatron) for text in texts))


def marks(text: str, megatron: str) -> bool:
    """Whether ``text`` occurs in ``megatron`` at its start or right after a dot (``norm.weight`` marks
    ``layers.*.norm.weight``, not ``pre_mlp_layernorm.weight``)."""
    return bool(text) and (megatron.startswith(text) or f".{text}" in megatron)


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
    in_memory_renames: dict[str, str] = Field(
        default_factory=dict,
        description="HF name prefixes that transformers v5 renames when it loads the model (its conversion "
        "mapping's WeightRenaming), on-disk prefix -> in-memory prefix: under --hf-naming in-memory they are "
        "applied to every mapping and HF exclusion that serves both namings. Inherited unless set.",
    )
    hybrid: Hybrid | None = Field(
        None, description="A hybrid model's kinds of decoder layer (Mamba / attention, Gated DeltaNet / attention): "
        "which mappings each kind has, and where config.json gives each layer's kind. Inherited unless set."
    )
