"""The ``modelopt`` format: ModelOpt's unified Hugging Face checkpoint, what vLLM, TensorRT-LLM and SGLang deploy.

Per Hugging Face module, from the weight and its quantizer state (``../shared/FORMATS.md`` §1; ModelOpt
0.47.0's Megatron exporter, ``export_mcore_gpt_to_hf``, for names, shapes and dtypes):

* a quantized linear (as the checkpoint's recipe says, :func:`quantmap.recipe.module_format_in`): the
  quantized payload under ``weight`` and its scales, computed by :mod:`quantmap.quantize`;
* the KV cache of an attention module: ``self_attn.k_scale`` / ``v_scale`` (the Megatron exporter's names,
  FP8 clamped at 1.0), or with ``kv_scales="hf"`` the HF exporter's ``k_proj.k_scale`` / ``v_proj.v_scale``
  (divided by 448, never clamped);
* AWQ-style formats (INT4 AWQ, W4A8) fold the ``pre_quant_scale`` of q/k/v and gate/up into the norm that
  feeds them, as TensorRT-LLM expects, and write it for o_proj and down_proj; SmoothQuant writes it for every
  linear (FORMATS.md §1);
* everything else (embeddings, norms, routers, excluded layers): as it is, in the model's dtype;

plus ``hf_quant_config.json`` and ``config.json``'s ``quantization_config`` (:mod:`quantmap.formats.modelopt_config`).
Where ModelOpt breaks, this is correct: every TP shard and EP rank is in the plan's tensors already, experts
are written one by one, and SmoothQuant, AWQ and W4A8 are written at all. An uncalibrated amax (zero, or
none) is ModelOpt's maximum bound, as ModelOpt exports a zero one; the run reports it, and ``--strict``
refuses it.
"""

from __future__ import annotations

import json
from functools import partial

from quantmap.formats import deployable as shared
from quantmap.formats.declaration import AddedFile, Derived, FormatError, ModuleOutput, ModuleView, OutputFormat, \
    Restored, Written
from quantmap.formats.deployable import FP32, INPUT_AMAX, PQS, STAGE0_AMAX, STAGE1_AMAX, WEIGHT_AMAX, amax_input, \
    as_is, fed_by_norm, folded_norm, megatron_module, model_dtype
from quantmap.formats.modelopt_config import HF_QUANT_CONFIG, ModelOptConfigError, file_text, hf_quant_config, \
    quantization_config
from quantmap.recipe import ModuleFormat
from quantmap.roles import K_AMAX, MODEL_ROLES, NORM, QUANTIZER_ROLES, V_AMAX, WEIGHT

#: Formats whose q/k/v and gate/up ``pre_quant_scale`` go into the preceding norm (TensorRT-LLM's AWQ loaders
#: read it only for o_proj and down_proj; FORMATS.md §3).
FOLDED = frozenset({"W4A16_AWQ", "W4A8_AWQ", "NVFP4_AWQ"})


def module_output(view: ModuleView) -> ModuleOutput:
    """What the checkpoint holds for one HF module, as ModelOpt's Megatron exporter writes it."""
    tensors, facts = _kv_cache(view), {}
    if tensors:
        facts["kv_cache"] = _kv_algo(view)
    role = view.roles.get("weight")
    fmt = shared.scheme_of(view, _WRITERS, "modelopt") if role == WEIGHT else None
    if role == WEIGHT:
        facts["format"] = fmt
    if fmt is not None:
        uncalibrated: list[str] = []
        tensors += _WRITERS[fmt.quant_algo](view, fmt, uncalibrated)
        facts["uncalibrated"] = uncalibrated
        tensors += [as_is(view, buffer) for buffer, role in view.roles.items()
                    if role in MODEL_ROLES and buffer != "weight"]
    else:
        folded = folded_norm(view, lambda fmt: fmt.quant_algo in FOLDED) if role == NORM else None
        tensors += [folded] if folded else []
        tensors += [as_is(view, buffer) for buffer, role in view.roles.items()
                    if role in MODEL_ROLES and not (folded and buffer == "weight")]
    return ModuleOutput(tuple(tensors), facts)


def _fp8(view: ModuleView, fmt: ModuleFormat, uncalibrated: list[str]) -> list[Derived]:
    """FP8 per tensor: ``weight`` e4m3 of the weight in the model's dtype over ``weight_scale`` (``amax/448``,
    0-d); ``input_scale`` ``amax/448``, ``[1]`` as the Megatron exporter writes it. FP8_PER_CHANNEL_PER_TOKEN:
    ``weight_scale`` per output row ``[out]``, inputs scaled per token at run time (no ``input_scale``)."""
    amax = amax_input(view, WEIGHT_AMAX, "fp8", uncalibrated)
    name, (_, shape) = view.name, view.buffers["weight"]
    per_channel = fmt.quant_algo == "FP8_PER_CHANNEL_PER_TOKEN"
    scale_shape = (shape[0],) if per_channel else ()
    out = [Derived(f"{name}.weight", ("weight", amax),
                   partial(shared.payload, "fp8_quantize", "fp8", scale_shape, model_dtype(view)), "float8_e4m3fn",
                   shape),
           Derived(f"{name}.weight_scale", (amax,), partial(shared.scale, "fp8", scale_shape), FP32, scale_shape)]
    if not per_channel:
        out += _input_scale(view, "fp8", (1,), uncalibrated)
    return out


def _nvfp4(view: ModuleView, fmt: ModuleFormat, uncalibrated: list[str]) -> list[Derived]:
    """NVFP4: ``weight_scale_2`` = ``amax/2688`` (the raw amax, as ModelOpt), per-16-block ``weight_scale`` (E4M3,
    from the checkpoint's own, full-precision weight), the packed E2M1 ``weight`` (from the weight in the
    model's dtype), ``input_scale`` = ``amax_in/2688``."""
    amax = amax_input(view, WEIGHT_AMAX, "nvfp4", uncalibrated)
    name, (_, (rows, columns)) = view.name, view.buffers["weight"]
    blocks = (rows, columns // fmt.group_size)
    return [Derived(f"{name}.weight_scale", ("weight", amax), partial(shared.nvfp4_blocks, fmt.group_size),
                    "float8_e4m3fn", blocks),
            Derived(f"{name}.weight", ("weight", amax, "@weight_scale"), partial(shared.nvfp4_payload,
                                                                                  model_dtype(view)),
                    "uint8", (rows, columns // 2)),
            Derived(f"{name}.weight_scale_2", (amax,), shared.nvfp4_global, FP32, ()),
            *_input_scale(view, "nvfp4", (), uncalibrated)]


def _int8_sq(view: ModuleView, fmt: ModuleFormat, uncalibrated: list[str]) -> list[Derived]:
    """INT8 (SmoothQuant, or plain per-channel INT8, which ModelOpt names the same): ``weight`` int8 over the
    per-channel ``weight_scale`` (``amax/127``, ``[out]``), ``input_scale`` ``amax_in/127``, and where the
    checkpoint was smoothed, the ``pre_quant_scale`` in the model's dtype (every linear)."""
    amax = amax_input(view, WEIGHT_AMAX, "int8", uncalibrated)
    name, (_, shape) = view.name, view.buffers["weight"]
    rows = (shape[0],)
    return [Derived(f"{name}.weight", ("weight", amax),
                    partial(shared.payload, "int8_quantize", "int8", rows, model_dtype(view)), "int8", shape),
            Derived(f"{name}.weight_scale", (amax,), partial(shared.scale, "int8", rows), FP32, rows),
            *_input_scale(view, "int8", (), uncalibrated), *(_pre_quant_scale(view, fmt) if PQS in view.buffers else ())]


def _int4_awq(view: ModuleView, fmt: ModuleFormat, uncalibrated: list[str]) -> list[Derived]:
    """INT4 AWQ (W4A16) and W4A8 AWQ: per-block ``weight_scale`` (``amax/7``, ``[out, in/block]``), the INT4
    ``weight`` packed two output rows per byte; W4A8 adds ``weight_scale_2`` (the FP8 stage's ``amax/448``) and
    ``input_scale`` (``amax_in/448``); the ``pre_quant_scale`` of o_proj / down_proj (the others are folded)."""
    w4a8 = fmt.quant_algo == "W4A8_AWQ"
    blocks_amax = STAGE0_AMAX if w4a8 else WEIGHT_AMAX
    if blocks_amax not in view.buffers:  # one maximum bound for every block: not a scale ModelOpt could write
        raise FormatError(f"{view.name}: the recipe quantizes it as {fmt.quant_algo}, but the checkpoint has no "
                          f"{blocks_amax} for it (its blocks were never calibrated); calibrate it, or leave the "
                          f"layer out of the recipe")
    name, (_, (rows, columns)) = view.name, view.buffers["weight"]
    blocks = (rows, columns // fmt.group_size)
    out = [Derived(f"{name}.weight", ("weight", blocks_amax), partial(_int4_payload, model_dtype(view), blocks),
                   "uint8", (rows // 2, columns)),
           Derived(f"{name}.weight_scale", (blocks_amax,), partial(shared.scale, "int4", blocks), FP32, blocks)]
    if w4a8:
        stage1 = amax_input(view, STAGE1_AMAX, "fp8", uncalibrated)
        out += [Derived(f"{name}.weight_scale_2", (stage1,), partial(shared.scale, "fp8", ()), FP32, ()),
                *_input_scale(view, "fp8", (), uncalibrated)]
    if not fed_by_norm(megatron_module(view)):
        out += _pre_quant_scale(view, fmt)
    return out


_WRITERS = {"FP8": _fp8, "FP8_PER_CHANNEL_PER_TOKEN": _fp8, "NVFP4": _nvfp4, "W8A8_SQ_PER_CHANNEL": _int8_sq,
            "W4A16_AWQ": _int4_awq, "W4A8_AWQ": _int4_awq}


def _input_scale(view: ModuleView, kind: str, shape: tuple[int, ...], uncalibrated: list[str]) -> list[Derived]:
    amax = amax_input(view, INPUT_AMAX, kind, uncalibrated)
    return [Derived(f"{view.name}.input_scale", (amax,), partial(shared.scale, kind, shape), FP32, shape)]


def _pre_quant_scale(view: ModuleView, fmt: ModuleFormat) -> list[Derived]:
    if PQS not in view.buffers:
        raise FormatError(f"{view.name}: the recipe quantizes it as {fmt.quant_algo}, whose checkpoint keeps the "
                          f"weight divided by its input's pre_quant_scale, but the checkpoint has no {PQS} for it; "
                          f"without it the weights would be deployed wrong")
    dtype = model_dtype(view)
    return [Derived(f"{view.name}.pre_quant_scale", (PQS,), partial(shared.cast, dtype), dtype, view.buffers[PQS][1])]


def _kv_cache(view: ModuleView) -> list[Derived]:
    """``k_scale`` / ``v_scale`` of an attention module holding the KV-cache amax."""
    out = []
    for buffer, role in view.roles.items():
        if role not in (K_AMAX, V_AMAX):
            continue
        which = "k" if role == K_AMAX else "v"
        if view.kv_scales == "hf":  # the HF exporter: under the projection, amax / 448 for FP8 and NVFP4 alike
            out.append(Derived(f"{view.name}.{which}_proj.{which}_scale", (buffer,),
                               partial(shared.kv, "fp8", False, ()), FP32, ()))
        elif _kv_algo(view) == "NVFP4":  # the Megatron exporter: NVFP4's divisor, no clamp
            out.append(Derived(f"{view.name}.{which}_scale", (buffer,), partial(shared.kv, "nvfp4", False, ()), FP32,
                               ()))
        else:
            out.append(Derived(f"{view.name}.{which}_scale", (buffer,), partial(shared.kv, "fp8", True, (1,)), FP32,
                               (1,)))
    return out


def _kv_algo(view: ModuleView) -> str:
    return shared.kv_algo(view, ("FP8", "NVFP4"), "modelopt")


def _int4_payload(dtype: str, blocks: tuple[int, int], weight, amax):
    return shared.formulas().pack_int4_rows(shared.int4_values(dtype, blocks, weight, amax))


# -- the way back --------------------------------------------------------------------------------------

def restore_module(view: ModuleView) -> tuple[Derived, ...]:
    """One module of a ModelOpt checkpoint as the ``hf`` format holds it: a quantized weight dequantized (in
    float32), each amax its scale × the scale's divisor, a ``pre_quant_scale`` back on its input quantizer, the
    rest as it is. ``view.recipe`` is the checkpoint's ``quantization`` block (``hf_quant_config.json``), which
    says the KV cache's format. FP8 (per tensor or per channel), NVFP4 and INT8 are read back; INT4 AWQ and W4A8
    are refused: their q/k/v and gate/up ``pre_quant_scale`` went into the norms and cannot be taken out."""
    name, leaves = view.name, view.buffers
    dtype = leaves.get("weight", ("", ()))[0]
    if "weight_scale_2" in leaves and leaves.get("weight_scale", ("",))[0] == "float8_e4m3fn":
        out, kind = _restored_nvfp4(view), "nvfp4"
    elif dtype == "float8_e4m3fn":
        out, kind = _restored_scaled(view, "fp8"), "fp8"
    elif dtype == "int8":
        out, kind = _restored_scaled(view, "int8"), "int8"
    elif dtype == "uint8":
        raise FormatError(f"{name}.weight is packed INT4 (INT4 AWQ or W4A8): its q/k/v and gate/up pre_quant_scale "
                          f"were folded into the norms when it was written, so the Megatron weights and scales "
                          f"cannot be told apart again; quantmap reads back FP8, NVFP4 and INT8 checkpoints")
    else:
        out, kind = [], None
    done = {"weight", "weight_scale", "weight_scale_2", "input_scale"} if kind else set()
    for leaf, (leaf_dtype, shape) in leaves.items():
        if leaf in done:
            continue
        if leaf in ("k_scale", "v_scale"):
            out.append(_restored_kv(view, leaf))
        elif leaf == "pre_quant_scale":
            out.append(Derived(f"{name}.{PQS}", (leaf,), _same, leaf_dtype, shape))
        else:
            out.append(Derived(f"{name}.{leaf}", (leaf,), _same, leaf_dtype, shape))
    return tuple(out)


def _restored_scaled(view: ModuleView, kind: str) -> list[Derived]:
    """FP8 or INT8: the payload times its ``weight_scale`` (per tensor ``[]`` or per channel ``[out]``, whose amax
    is ``[out, 1]``), the amax from the scales."""
    name, (_, shape) = view.name, view.buffers["weight"]
    scale_shape = view.buffers.get("weight_scale", (None, None))[1]
    if scale_shape not in ((), (shape[0],)):
        raise FormatError(f"{name}.weight_scale has shape {scale_shape}; a ModelOpt {kind.upper()} weight has a "
                          f"per-tensor [] or per-channel [{shape[0]}] weight_scale beside it")
    amax_shape = () if scale_shape == () else (shape[0], 1)
    out = [Derived(f"{name}.weight", ("weight", "weight_scale"), _dequantized, FP32, shape,
                   note=f"dequantized from {kind.upper()} (QAT resumes from the quantized values)"),
           Derived(f"{name}.{WEIGHT_AMAX}", ("weight_scale",), partial(_amax, kind, amax_shape), FP32, amax_shape,
                   note=_FROM_SCALE)]
    return out + _restored_input(view, kind)


def _restored_nvfp4(view: ModuleView) -> list[Derived]:
    name, (_, (rows, half)) = view.name, view.buffers["weight"]
    return [Derived(f"{name}.weight", ("weight", "weight_scale", "weight_scale_2"), _nvfp4_dequantized, FP32,
                    (rows, half * 2), note="dequantized from NVFP4 (QAT resumes from the quantized values)"),
            Derived(f"{name}.{WEIGHT_AMAX}", ("weight_scale_2",), partial(_amax, "nvfp4", ()), FP32, (),
                    note=_FROM_SCALE),
            *_restored_input(view, "nvfp4")]


def _restored_input(view: ModuleView, kind: str) -> list[Derived]:
    if "input_scale" not in view.buffers:
        return []
    return [Derived(f"{view.name}.{INPUT_AMAX}", ("input_scale",), partial(_amax, kind, ()), FP32, (),
                    note=_FROM_SCALE)]


def _restored_kv(view: ModuleView, leaf: str) -> Derived:
    """A KV scale's amax: under the attention module (the Megatron exporter's ``self_attn.k_scale``: FP8 clamped
    at 1.0, NVFP4 over 2688) or under the projection (the HF exporter's ``k_proj.k_scale``: over 448)."""
    which = leaf[0]
    attention, projection = view.name, view.name.endswith(f".{which}_proj")
    if projection:
        attention = view.name.rpartition(".")[0]
    nvfp4 = not projection and (view.recipe or {}).get("kv_cache_quant_algo") == "NVFP4"
    return Derived(f"{attention}.{which}_bmm_quantizer._amax", (leaf,), partial(_amax, "nvfp4" if nvfp4 else "fp8", ()),
                   FP32, (), note="KV-cache amax computed back from k_scale / v_scale (an FP8 scale of exactly 1.0 "
                                  "may be ModelOpt's clamp: its amax, 448, is then an upper bound)")


_FROM_SCALE = "amax computed back from its scale (scale × divisor: the calibrated amax, or one ulp from it)"


def _same(tensor):
    return tensor


def _dequantized(payload, scale):
    return shared.formulas().dequantize(payload, scale)


def _nvfp4_dequantized(packed, block_scale, global_scale):
    return shared.formulas().nvfp4_dequantize(packed, block_scale, global_scale)


def _amax(kind: str, shape: tuple[int, ...], scale):
    q = shared.formulas()
    return q.amax_from_scale(scale, q.DIVISOR[kind]).reshape(shape)


# -- the files beside the tensors ----------------------------------------------------------------------

def _hf_quant(facts) -> dict:
    """``hf_quant_config.json`` for what the modules said: each linear's format (``None``: left unquantized),
    and the KV cache's (one for the model)."""
    modules = {module: fact["format"] for module, fact in facts.items() if "format" in fact}
    kv = {fact["kv_cache"] for fact in facts.values() if "kv_cache" in fact}
    if len(kv) > 1:
        raise FormatError(f"the KV cache is quantized as {sorted(kv)} in different layers; ModelOpt's format records "
                          f"one KV-cache format for the model")
    try:
        return hf_quant_config(modules, kv.pop() if kv else None)
    except ModelOptConfigError as error:
        raise FormatError(str(error)) from None


def _hf_quant_config(facts, _copied) -> bytes:
    return file_text(_hf_quant(facts)).encode()


def _config(facts, copied: bytes | None) -> bytes:
    config = json.loads(copied)
    config["quantization_config"] = quantization_config(_hf_quant(facts))
    return (json.dumps(config, indent=2) + "\n").encode()


MODELOPT = OutputFormat(
    "modelopt", "ModelOpt's unified Hugging Face checkpoint for vLLM, TensorRT-LLM and SGLang: quantized weights "
                "and their scales, hf_quant_config.json (the recipe is the checkpoint's own)",
    writes={role: (Written((role,)),) for role in sorted(MODEL_ROLES | QUANTIZER_ROLES)},
    restores={role: Restored() for role in sorted(MODEL_ROLES | QUANTIZER_ROLES)},
    files=(AddedFile(HF_QUANT_CONFIG, _hf_quant_config), AddedFile("config.json", _config)),
    model=True, modules=module_output, restore_modules=restore_module,
    next_step="next: serve it: vllm serve {out} (FP8, NVFP4), or build a TensorRT-LLM engine from it (INT8 SmoothQuant, "
              "INT4 AWQ, W4A8); see docs/deployment.md")
