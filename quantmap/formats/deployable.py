"""What the deployable formats share (``modelopt``, ``compressed-tensors``): a module's scheme under the
checkpoint's ModelOpt recipe, the amax each scale is computed from, and the tensors computed from them.

Where two formats hold the same bytes (an FP8 weight, an NVFP4 payload and its block scales, an INT4 value
before it is packed), both take them from the functions here, which call :mod:`quantmap.quantize`; a format
then only names, shapes and packs them its own way. Torch-free at import: the functions that compute a tensor
import torch (through :mod:`quantmap.quantize`) when they run, so the command line lists formats without it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import partial

from quantmap.formats.declaration import Derived, FormatError, ModuleView
from quantmap.recipe import ModuleFormat, RecipeError, kv_cache_algo_in, module_format_in
from quantmap.roles import K_AMAX, V_AMAX

FP32 = "float32"
WEIGHT_AMAX, STAGE0_AMAX, STAGE1_AMAX = "weight_quantizer._amax", "weight_quantizer.0._amax", "weight_quantizer.1._amax"
INPUT_AMAX, PQS = "input_quantizer._amax", "input_quantizer._pre_quant_scale"
#: Megatron modules ModelOpt never exports quantized whatever the recipe says (an embedding's quantizers, which
#: Megatron-Core's layers carry, never see data: its input is token ids).
NEVER_QUANTIZED = frozenset({"word_embeddings", "position_embeddings"})
#: quantize.MAXBOUND, without torch: what ModelOpt writes for an amax the checkpoint lacks.
MAXBOUND = {"fp8": 448.0, "int8": 127.0, "int4": 7.0, "nvfp4": 6.0}
#: The norm before each Megatron linear whose input it feeds alone, where it is not fused into the linear
#: (Transformer Engine's ``linear_qkv.layer_norm_weight``): Megatron-Core's ``TransformerLayer``.
NORM_FEEDS = {"input_layernorm": "self_attention.linear_qkv", "pre_mlp_layernorm": "mlp.linear_fc1"}


def megatron_module(view: ModuleView) -> str:
    """The Megatron module the HF module's weight comes from (``decoder.layers.0.self_attention.linear_qkv``)."""
    return view.megatron["weight"].rpartition(".")[0]


def recipe_of(view: ModuleView) -> list:
    """The checkpoint's recipe, without which no amax can be read as a scale of any format."""
    if view.recipe is None:
        raise FormatError(f"{view.name}: the checkpoint records no quantization recipe (modelopt_state/), so which "
                          f"format its amax stands for is unknown; export a checkpoint that keeps ModelOpt's "
                          f"modelopt_state/ beside its weights")
    return view.recipe


def scheme_of(view: ModuleView, written: Collection[str], format_name: str) -> ModuleFormat | None:
    """The module's ModelOpt format under the checkpoint's recipe (``None``: left unquantized); one the format
    ``format_name`` does not write (``written``: the ``quant_algo`` names it does) is refused by name."""
    module = megatron_module(view)
    if module.rpartition(".")[2] in NEVER_QUANTIZED:  # ModelOpt's exporters write embeddings as they are
        return None
    try:
        fmt = module_format_in(module, recipe_of(view), pre_quant_scale=PQS in view.buffers)
    except RecipeError as error:
        raise FormatError(f"{view.name}: {error}") from None
    if fmt is not None and fmt.quant_algo not in written:
        raise FormatError(f"{view.name}: the recipe quantizes it as {fmt.quant_algo}, which the {format_name} format "
                          f"does not write (it writes {', '.join(sorted(written))})")
    return fmt


def amax_input(view: ModuleView, buffer: str, kind: str, uncalibrated: list[str]) -> str:
    """The input naming ``buffer``'s amax: the buffer, or where the checkpoint lacks it (a quantizer that never
    saw data and kept no amax), ModelOpt's maximum bound, what its export makes of a zero amax (for a missing
    one ModelOpt 0.47 writes no scale at all, which no engine loads as the recipe says); the name is listed in
    ``uncalibrated`` for the report (and ``--strict``)."""
    if buffer in view.buffers:
        return buffer
    uncalibrated.append(f"{view.name}.{buffer}")
    return f"={MAXBOUND[kind]}"


def model_dtype(view: ModuleView) -> str:
    """The dtype the module's weights are written in, and a quantized weight is divided by its scale in."""
    return view.dtype or view.buffers["weight"][0]


def kv_algo(view: ModuleView, written: Collection[str], format_name: str) -> str | None:
    """The KV-cache format the recipe gives the attention module whose KV amax ``view`` holds; one the format
    does not record is refused by name."""
    amax = next(buffer for buffer, role in view.roles.items() if role in (K_AMAX, V_AMAX))
    attention = view.megatron[amax].rsplit(".core_attention.", 1)[0]
    algo = kv_cache_algo_in(attention, recipe_of(view))
    if algo not in written:
        raise FormatError(f"{view.name}: the recipe quantizes its KV cache as {algo}, which the {format_name} format "
                          f"does not record ({' or '.join(sorted(written))})")
    return algo


def fed_by_norm(linear: str) -> bool:
    """Whether a dense norm feeds the Megatron linear ``linear`` alone (q/k/v, gate/up), so its
    ``pre_quant_scale`` can go into the norm."""
    return linear.endswith(tuple(f".{fed}" for fed in NORM_FEEDS.values()))


def folded_norm(view: ModuleView, folds: Callable[[ModuleFormat], bool]) -> Derived | None:
    """The norm's weight with its linear's ``pre_quant_scale`` folded in (``w · pqs``, FORMATS.md §3:
    ``fuse_prequant_layernorm``), where the linear it feeds has one and is in a format that ``folds``."""
    megatron = view.megatron["weight"]
    owner, _, leaf = megatron.rpartition(".")
    if leaf == "layer_norm_weight":
        linear = owner
    else:
        layer, _, norm = owner.rpartition(".")
        if norm not in NORM_FEEDS or leaf != "weight":
            return None
        linear = f"{layer}.{NORM_FEEDS[norm]}"
    if not fed_by_norm(linear) or view.recipe is None:
        return None
    pqs = view.lookup(f"{linear}.{PQS}")
    if pqs is None:
        return None
    fmt = module_format_in(linear, view.recipe, pre_quant_scale=True)
    if fmt is None or not folds(fmt):
        return None
    dtype, shape = view.buffers["weight"]
    model = view.dtype or dtype
    return Derived(f"{view.name}.weight", ("weight", pqs), partial(fold, model), model, shape)


def as_is(view: ModuleView, buffer: str) -> Derived:
    """A buffer written under its own name, in the model's dtype."""
    dtype, shape = view.buffers[buffer]
    model = view.dtype or dtype
    return Derived(f"{view.name}.{buffer}", (buffer,), partial(cast, model), model, shape)


# -- the tensors, computed (torch imported only here) -------------------------------------------------

def formulas():
    """:mod:`quantmap.quantize`, imported when a tensor is computed."""
    from quantmap import quantize

    return quantize


def _sane(amax, kind: str):
    q = formulas()
    return q.sanitize_amax(amax.float(), q.MAXBOUND[kind])[0]


def scale(kind: str, shape: tuple[int, ...], amax):
    """``amax / divisor`` of ``kind`` (a zero or NaN amax replaced by ModelOpt's bound), reshaped to ``shape``."""
    q = formulas()
    return q.scale_from_amax(_sane(amax, kind), q.DIVISOR[kind], shape)


def payload(function: str, kind: str, scale_shape: tuple[int, ...], dtype: str, weight, amax):
    """The FP8 or INT8 payload: ``quantize.<function>`` of the weight in ``dtype`` over its :func:`scale`."""
    import torch

    return getattr(formulas(), function)(weight, scale(kind, scale_shape, amax), getattr(torch, dtype))


def int4_values(dtype: str, blocks: tuple[int, int], weight, amax):
    """INT4 values (int8 in -8..7, unpacked) of the weight in ``dtype`` over its per-block scale; each format
    packs them its own way."""
    import torch

    return formulas().int4_quantize(weight, scale("int4", blocks, amax), getattr(torch, dtype))


def nvfp4_global(amax):
    """ModelOpt's NVFP4 ``weight_scale_2`` / ``input_scale``: the raw amax over 6·448 (not sanitised)."""
    q = formulas()
    return q.scale_from_amax(amax, q.DIVISOR["nvfp4"], ())


def nvfp4_blocks(block: int, weight, amax):
    """The NVFP4 per-block E4M3 scales, from the checkpoint's own full-precision weight."""
    return formulas().nvfp4_block_scale(weight, nvfp4_global(amax), block)


def nvfp4_payload(dtype: str, weight, amax, blocks):
    """The packed E2M1 payload of the weight in ``dtype`` over its block scales (:func:`nvfp4_blocks`, the
    module's ``weight_scale``, computed once for both), ModelOpt's ``weight`` and compressed-tensors'
    ``weight_packed`` alike."""
    import torch

    return formulas().nvfp4_quantize(weight, blocks, nvfp4_global(amax), getattr(torch, dtype))


def kv(kind: str, clamp: bool, shape: tuple[int, ...], amax):
    """A KV-cache scale: ``amax / divisor``, at least 1.0 where ``clamp``."""
    q = formulas()
    return q.kv_cache_scale(_sane(amax, kind), q.DIVISOR[kind], clamp, shape)


def cast(dtype: str, tensor):
    import torch

    return tensor.to(getattr(torch, dtype))


def fold(dtype: str, weight, pqs):
    """A norm's weight times the ``pre_quant_scale`` of the linear it feeds, in float32, then ``dtype``."""
    import torch

    return (weight.float() * pqs.float()).to(getattr(torch, dtype))
