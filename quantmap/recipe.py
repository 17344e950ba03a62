"""What ModelOpt's quantization recipe (``quant_cfg``) says about a quantizer: the parser output formats and
checks share, apart from the reading of the file that holds it (:mod:`quantmap.io.torch_dist.modelopt`).

``quant_cfg`` is ModelOpt's ordered list of ``{"quantizer_name": wildcard, "cfg": {...} | [{...}, ...] | None,
"enable": bool, "parent_class": ...}``. ModelOpt applies the entries in order (``set_quantizer_by_cfg``,
modelopt/torch/quantization/conversion.py:245 in 0.47.0): the wildcard is ``fnmatch``-ed against the
quantizer's module name (and against that name with a fused-experts list index taken off, ``:323``); an entry
with ``cfg`` replaces all its attributes and sets ``enable`` from the entry (default ``True``), a list ``cfg``
makes it a ``SequentialQuantizer`` with one stage per element; an entry without ``cfg`` only toggles
``enable``. Entries restricted to a ``parent_class`` are left out: the stock configs use them only to disable
quantizers under torch classes Megatron-Core's layers are not (``nn.BatchNorm1d``, ``nn.Embedding``, ...).

The names matched are the model's module names as ModelOpt saw them; for Megatron-Core that is
``decoder.layers.0.self_attention.linear_qkv.weight_quantizer``, ``...core_attention.k_bmm_quantizer``,
``output_layer.weight_quantizer``, which the stock wildcards ``*weight_quantizer``, ``*[kv]_bmm_quantizer``,
``*output_layer*`` and ``*router*`` match as they read.

From the effective attributes of a module's weight and input quantizers, :func:`module_format` decides the
``quant_algo`` a ModelOpt deployable checkpoint records, branch for branch as ``get_quantization_format``
(modelopt/torch/export/quant_utils.py:488) decides ModelOpt's format and ``process_layer_quant_config``
(``:683``) spells it; :func:`kv_cache_algo` does the same for the KV cache (``_compute_kv_cache_dtype``,
``:441``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatch


class RecipeError(ValueError):
    """The recipe says something no ModelOpt format names, or something a caller contradicts."""


FP8_BITS = (4, 3)  # E4M3
FP4_BITS = (2, 1)  # E2M1
E8M0_BITS = (8, 0)  # the MX formats' power-of-two block scale


@dataclass(frozen=True)
class Stage:
    """The attributes of one tensor quantizer that decide a format (a ``SequentialQuantizer`` has one per
    stage); ModelOpt's defaults (``QuantizerAttributeConfig``) where the cfg leaves them out."""

    num_bits: int | tuple[int, int] = 8
    axis: int | tuple[int, ...] | None = None
    #: ``{-1: size, "type": "static" | "dynamic", "scale_bits": (e, m)}`` as ModelOpt writes it; ``None`` if none.
    block_sizes: Mapping | None = None
    fake_quant: bool = True
    #: Whether the quantizer is affine (a ``bias`` cfg: ModelOpt calibrates a ``_bias_value`` for it).
    affine: bool = False

    @classmethod
    def from_cfg(cls, cfg: Mapping) -> Stage:
        block_sizes = cfg.get("block_sizes")
        if isinstance(block_sizes, Mapping):
            block_sizes = {_axis(key): _bits(value) if key == "scale_bits" else value
                           for key, value in block_sizes.items()}
        return cls(num_bits=_bits(cfg.get("num_bits", 8)), axis=cfg.get("axis"), block_sizes=block_sizes or None,
                   fake_quant=bool(cfg.get("fake_quant", True)), affine=cfg.get("bias") is not None)

    @property
    def block_size(self) -> int:
        """The block along the last axis (``block_sizes[-1]``, ``get_weight_block_size``); 0 without blocks."""
        return int(self.block_sizes.get(-1) or 0) if self.block_sizes else 0

    @property
    def block_type(self) -> str:
        return str(self.block_sizes.get("type", "static")) if self.block_sizes else "static"

    @property
    def scale_bits(self):
        return self.block_sizes.get("scale_bits") if self.block_sizes else None


def _bits(value):
    """``num_bits``/``scale_bits`` as a tuple where it is a pair: a recipe read from JSON or YAML has lists."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _axis(key):
    """A ``block_sizes`` axis key as the int ModelOpt writes (``-1``): a recipe read from JSON (``recipe.json``
    beside shards, ``--recipe``) has it as the string ``"-1"``, which would otherwise read as no block at all."""
    return int(key) if isinstance(key, str) and key.removeprefix("-").isdigit() else key


@dataclass(frozen=True)
class Quantizer:
    """The effective state ModelOpt's config gives one quantizer: whether it is enabled and its stages (one for a
    ``TensorQuantizer``, several for a ``SequentialQuantizer``; none when no entry with a ``cfg`` matched it,
    so its attributes are its layer class's defaults, which the recipe does not record)."""

    enabled: bool = True
    stages: tuple[Stage, ...] = ()
    sequential: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.stages)


#: ``...weight_quantizers.3`` or ``...input_quantizer.3`` (a fused-experts module's per-expert list).
_EXPERT_LIST = re.compile(r"(weight_quantizers?|input_quantizers?)\.\d+(?=$|\.)")


def _matches(name: str, wildcard: str) -> bool:
    if fnmatch(name, wildcard):
        return True
    normalized = _EXPERT_LIST.sub(lambda found: found.group(1).removesuffix("s"), name)
    return normalized != name and fnmatch(normalized, wildcard)


def quantizer(name: str, entries: list[dict]) -> Quantizer:
    """The state ``entries`` (a ``quant_cfg``) leave the quantizer named ``name`` (a module name) in."""
    state = Quantizer()
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("parent_class") or \
                not _matches(name, str(entry.get("quantizer_name", ""))):
            continue
        enabled = bool(entry.get("enable", True))
        cfg = entry.get("cfg")
        if cfg is None:
            state = Quantizer(enabled, state.stages, state.sequential)
        elif isinstance(cfg, Mapping):
            state = Quantizer(enabled, (Stage.from_cfg(cfg),))
        elif isinstance(cfg, (list, tuple)) and all(isinstance(item, Mapping) for item in cfg):
            state = Quantizer(enabled, tuple(Stage.from_cfg(item) for item in cfg), sequential=True)
        else:
            raise RecipeError(f"the quant_cfg entry for {entry.get('quantizer_name')!r} has a cfg of type "
                              f"{type(cfg).__name__}, where ModelOpt writes a dict or a list of dicts")
    return state


def per_tensor(quantizer_name: str, entries: list[dict]) -> bool | None:
    """Whether ModelOpt's config makes ``quantizer_name`` (a module name) an enabled per-tensor quantizer;
    ``None`` when it does not say (disabled, never configured, a sequential cfg, a cfg ModelOpt never writes)."""
    try:
        state = quantizer(quantizer_name, entries)
    except RecipeError:
        return None
    if not state.enabled or state.sequential or not state.configured:
        return None
    return state.stages[0].axis is None and state.stages[0].block_sizes is None


@dataclass(frozen=True)
class ModuleFormat:
    """How one linear module is quantized, in the terms of ModelOpt's ``hf_quant_config.json``: its
    ``quant_algo`` and the weight's block size along the input (``group_size``; 0 without blocks)."""

    quant_algo: str
    group_size: int = 0


def module_format(weight: Quantizer, input: Quantizer | None = None, *,  # noqa: A002 - ModelOpt's word
                  pre_quant_scale: bool = False) -> ModuleFormat | None:
    """The format ModelOpt records for a module whose weight and input quantizers are ``weight`` and
    ``input`` (``None``: the module has no input quantizer); ``None`` when its weight is not quantized.
    ``pre_quant_scale``: whether the input quantizer holds a ``_pre_quant_scale`` (the checkpoint's tensors
    say it, not the recipe), which makes NVFP4 ``NVFP4_AWQ``.

    Mirrors ``get_quantization_format`` (quant_utils.py:494-590) and the names
    ``process_layer_quant_config`` (quant_utils.py:703-765) gives its formats, except the two branches the
    recipe cannot see: SVDQuant (LoRA factors on the weight quantizer) and a layer ModelOpt marked
    ``fused_with_prequant``."""
    if not weight.enabled:
        return None
    if not weight.configured:
        raise RecipeError("the weight quantizer is enabled but no quant_cfg entry configures it, so its "
                          "attributes are its layer class's defaults, which the recipe does not record")
    first = weight.stages[0]
    if weight.sequential:
        stages = weight.stages
        if not (len(stages) == 2 and stages[0].num_bits == 4 and stages[1].num_bits == FP8_BITS):
            raise RecipeError(f"a sequential weight quantizer of {[s.num_bits for s in stages]} bits; ModelOpt "
                              f"exports only [4, (4, 3)] (W4A8_AWQ)")
        return ModuleFormat("W4A8_AWQ", _blocked(first, "the INT4 stage of a W4A8 weight"))
    input_on = input is not None and input.enabled
    input_stage = input.stages[0] if input_on and input.configured else None
    if first.num_bits == 4:
        return ModuleFormat("W4A16_AWQ", _blocked(first, "an INT4 weight"))
    if first.num_bits == 8:
        return ModuleFormat("W8A8_SQ_PER_CHANNEL" if input_on else "W8A16")
    if first.num_bits == FP8_BITS:
        if first.block_sizes:
            _blocked(first, "a block-quantized FP8 weight")
            if first.block_type == "dynamic" and first.scale_bits == E8M0_BITS:
                return ModuleFormat("MXFP8", first.block_size)
            return ModuleFormat("fp8_pb_wo" if first.fake_quant else "fp8_pb_real", first.block_size)
        return ModuleFormat("FP8_PER_CHANNEL_PER_TOKEN" if first.axis == 0 else "FP8")
    if first.num_bits == FP4_BITS:
        size = first.block_size
        if input is not None and pre_quant_scale:
            return ModuleFormat("NVFP4_AWQ", size)
        if not input_on and first.scale_bits == FP8_BITS:
            return ModuleFormat("W4A16_NVFP4", size)
        if input is None:
            raise RecipeError("an FP4 weight in a module without an input quantizer, which ModelOpt refuses")
        fp8_input = input_stage is not None and input_stage.num_bits == FP8_BITS and input_stage.block_sizes is None
        if first.block_type == "dynamic" and input_on and fp8_input:
            if first.scale_bits == E8M0_BITS:
                return ModuleFormat("W4A8_MXFP4_FP8", size)
            if first.scale_bits == FP8_BITS:
                return ModuleFormat("W4A8_NVFP4_FP8", size)
        if first.scale_bits == FP8_BITS:
            return ModuleFormat("NVFP4", size)
        if first.scale_bits == E8M0_BITS:
            return ModuleFormat("mxfp4", size)
    raise RecipeError(f"a weight quantizer of num_bits {first.num_bits!r} with block_sizes "
                      f"{first.block_sizes!r}, which ModelOpt's export has no format for")


def _blocked(stage: Stage, what: str) -> int:
    if stage.block_size <= 0:
        raise RecipeError(f"{what} needs block_sizes with a positive last-axis size; the recipe has "
                          f"{stage.block_sizes!r}")
    return stage.block_size


def module_format_in(module: str, entries: list[dict], *, pre_quant_scale: bool = False) -> ModuleFormat | None:
    """:func:`module_format` of the module named ``module`` (a Megatron module name such as
    ``decoder.layers.0.self_attention.linear_qkv``) under ``entries``: its ``weight_quantizer`` and
    ``input_quantizer``, both of which every ModelOpt-quantized linear layer has."""
    return module_format(quantizer(f"{module}.weight_quantizer", entries),
                         quantizer(f"{module}.input_quantizer", entries), pre_quant_scale=pre_quant_scale)


def kv_cache_algo(*quantizers: Quantizer) -> str | None:
    """The KV-cache format ModelOpt records for an attention module whose KV quantizers (Megatron's
    ``core_attention.k_bmm_quantizer`` and ``v_bmm_quantizer``) are ``quantizers``: ``"FP8"``, ``"INT8"``,
    ``"NVFP4_AFFINE"``, ``"NVFP4"`` or ``None``, in ``_compute_kv_cache_dtype``'s order of precedence
    (quant_utils.py:441-465)."""
    stages = [q.stages[0] for q in quantizers if q.enabled and q.configured]
    bits = [stage.num_bits for stage in stages]
    if FP8_BITS in bits:
        return "FP8"
    if 8 in bits:
        return "INT8"
    if FP4_BITS in bits:
        return "NVFP4_AFFINE" if all(stage.affine for stage in stages) else "NVFP4"
    return None


def kv_cache_algo_in(attention: str, entries: list[dict]) -> str | None:
    """:func:`kv_cache_algo` of the Megatron attention module ``attention`` (``decoder.layers.0.self_attention``)."""
    return kv_cache_algo(*(quantizer(f"{attention}.core_attention.{kv}_bmm_quantizer", entries) for kv in "kv"))


def check_override(requested: str, recorded: ModuleFormat | None, module: str, recipe: str) -> None:
    """Refuse a ``quant_algo`` the user asked for (``requested``) that the checkpoint's own recipe (read from
    ``recipe``, a file) contradicts for ``module``: the tensors were calibrated for the recipe's format, so
    writing them under another name would deploy wrong numbers."""
    if recorded is not None and recorded.quant_algo == requested:
        return
    found = "leaves it unquantized" if recorded is None else f"quantizes it as {recorded.quant_algo}"
    raise RecipeError(f"{module}: the requested quant_algo {requested} contradicts the checkpoint's ModelOpt recipe "
                      f"({recipe}), which {found}; leave the format to the recipe or export a checkpoint "
                      f"quantized as {requested}")
