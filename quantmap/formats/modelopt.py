"""The ``modelopt`` format: ModelOpt's unified Hugging Face checkpoint, what vLLM, TensorRT-LLM and SGLang deploy.

Per Hugging Face module, from the weight and its quantizer state (``../shared/FORMATS.md`` §1, ModelOpt
0.47.0's Megatron exporter, ``export_mcore_gpt_to_hf``):

* a quantized linear (its weight quantizer enabled in the checkpoint's recipe): the quantized payload
  under ``weight``, and its scales (``weight_scale``, ``input_scale``, ...) computed from the amax;
* the KV cache of an attention module: ``self_attn.k_scale`` / ``v_scale`` (the Megatron exporter's names,
  clamped at 1.0);
* everything else (embeddings, norms, the router, excluded layers): as it is, in the model's dtype;

plus ``hf_quant_config.json`` and ``config.json``'s ``quantization_config``. The recipe is the checkpoint's
own (:attr:`~quantmap.executor.options.RunOptions.recipe`): a quantized module whose quantizer the recipe
does not describe is refused, never guessed.
"""

from __future__ import annotations

import json
from functools import partial

from quantmap.formats.declaration import AddedFile, Derived, FormatError, ModuleOutput, ModuleView, OutputFormat, \
    Restored, Written
from quantmap.roles import K_AMAX, MODEL_ROLES, QUANTIZER_ROLES, V_AMAX, WEIGHT

PRODUCER = {"name": "modelopt", "version": "0.47.0"}  # vLLM reads hf_quant_config.json only from "modelopt"
E4M3_MAX = 448.0
FP32 = "float32"


def module_output(view: ModuleView) -> ModuleOutput:
    """What the checkpoint holds for one HF module, as ModelOpt's Megatron exporter writes it."""
    tensors, facts = [], {}
    for buffer, role in view.roles.items():
        if role in (K_AMAX, V_AMAX):
            tensors.append(_kv_scale(view, buffer, "k" if role == K_AMAX else "v"))
            facts["kv_cache_quant_algo"] = "FP8"
    algo = _algo(view) if "weight_quantizer._amax" in view.buffers and "weight" in view.buffers else None
    if algo == "FP8":
        tensors += _fp8(view)
        facts["quant_algo"] = algo
    else:
        tensors += [_as_is(view, buffer) for buffer, role in view.roles.items() if role in MODEL_ROLES]
        if view.roles.get("weight") == WEIGHT:
            facts["excluded"] = True
    return ModuleOutput(tuple(tensors), facts)


def _algo(view: ModuleView) -> str | None:
    """The module's ModelOpt ``quant_algo`` under the checkpoint's recipe, from its weight quantizer's settings."""
    quantizer = view.megatron["weight_quantizer._amax"].removesuffix("._amax")
    cfg = _cfg(view.recipe, quantizer)
    if cfg is None:
        return None
    if list(cfg.get("num_bits") or ()) == [4, 3] and cfg.get("axis") is None and cfg.get("block_sizes") is None:
        return "FP8"
    raise FormatError(f"{view.name}: its weight quantizer ({quantizer}) is {cfg}, which the modelopt format does "
                      f"not write yet")


def _cfg(recipe, quantizer: str) -> dict | None:
    from fnmatch import fnmatch

    if recipe is None:
        raise FormatError(f"{quantizer}: the checkpoint records no quantization recipe (modelopt_state/), so which "
                          f"format its amax stands for is unknown")
    attributes, enabled = None, True
    for entry in recipe:
        if entry.get("parent_class") or not fnmatch(quantizer, str(entry.get("quantizer_name", ""))):
            continue
        enabled = bool(entry.get("enable", True))
        if entry.get("cfg") is not None:
            attributes = entry["cfg"]
    return attributes if attributes is not None and enabled else None


def _fp8(view: ModuleView) -> list[Derived]:
    """FP8 per-tensor: ``weight`` e4m3 of the weight in the model's dtype over ``weight_scale`` (``amax/448``,
    0-d), ``input_scale`` (``amax/448``, ``[1]``)."""
    name, (dtype, shape) = view.name, view.buffers["weight"]
    model = view.dtype or dtype
    out = [Derived(f"{name}.weight", ("weight", "weight_quantizer._amax"), partial(_fp8_weight, model),
                   "float8_e4m3fn", shape),
           Derived(f"{name}.weight_scale", ("weight_quantizer._amax",), partial(_scale, E4M3_MAX, ()), FP32, ())]
    if "input_quantizer._amax" in view.buffers:
        out.append(Derived(f"{name}.input_scale", ("input_quantizer._amax",), partial(_scale, E4M3_MAX, (1,)),
                           FP32, (1,)))
    out += [_as_is(view, buffer) for buffer, role in view.roles.items() if role in MODEL_ROLES and buffer != "weight"]
    return out


def _kv_scale(view: ModuleView, buffer: str, which: str) -> Derived:
    return Derived(f"{view.name}.{which}_scale", (buffer,), _kv, FP32, (1,))


def _as_is(view: ModuleView, buffer: str) -> Derived:
    dtype, shape = view.buffers[buffer]
    model = view.dtype or dtype
    return Derived(f"{view.name}.{buffer}", (buffer,), partial(_cast, model), model, shape)


def _cast(dtype: str, tensor):
    import torch

    return tensor.to(getattr(torch, dtype))


def _scale(bound: float, shape: tuple[int, ...], amax):
    return (amax.float() / bound).reshape(shape)


def _fp8_weight(dtype: str, weight, amax):
    import torch

    return (weight.to(getattr(torch, dtype)) / _scale(E4M3_MAX, (), amax)).to(torch.float8_e4m3fn)


def _kv(amax):
    return _scale(E4M3_MAX, (1,), amax).clamp(min=1.0)


def restore_module(view: ModuleView) -> tuple[Derived, ...]:
    """One module of a ModelOpt checkpoint as the ``hf`` format holds it: a quantized weight dequantized
    (``payload × weight_scale``, in float32), each amax as its scale × the scale's divisor, the rest as it is."""
    name, leaves, out = view.name, view.buffers, []
    for leaf, (dtype, shape) in leaves.items():
        if leaf == "weight" and dtype == "float8_e4m3fn":
            if "weight_scale" not in leaves:
                raise FormatError(f"{name}.weight is FP8 but the module has no weight_scale; a ModelOpt checkpoint "
                                  f"keeps one beside every quantized weight")
            out += [Derived(f"{name}.weight", ("weight", "weight_scale"), _dequantized, FP32, shape,
                            note="dequantized from FP8 (QAT resumes from the quantized values)"),
                    Derived(f"{name}.weight_quantizer._amax", ("weight_scale",), partial(_amax, E4M3_MAX), FP32, (),
                            note=_FROM_SCALE)]
        elif leaf == "input_scale":
            out.append(Derived(f"{name}.input_quantizer._amax", (leaf,), partial(_amax, E4M3_MAX), FP32, (),
                               note=_FROM_SCALE))
        elif leaf in ("k_scale", "v_scale"):
            out.append(Derived(f"{name}.{leaf[0]}_bmm_quantizer._amax", (leaf,), partial(_amax, E4M3_MAX), FP32, (),
                               note="KV-cache amax computed back from k_scale / v_scale (a scale of exactly 1.0 may "
                                    "be ModelOpt's clamp: its amax, 448, is then an upper bound)"))
        elif leaf != "weight_scale":
            out.append(Derived(f"{name}.{leaf}", (leaf,), _same, dtype, shape))
    return tuple(out)


_FROM_SCALE = "amax computed back from its scale (scale × divisor: the calibrated amax, or one ulp from it)"


def _same(tensor):
    return tensor


def _dequantized(payload, scale):
    return payload.float() * scale.float()


def _amax(bound: float, scale):
    return (scale.float() * bound).reshape(())


def _quantization(facts) -> dict:
    algos = {fact["quant_algo"] for fact in facts.values() if "quant_algo" in fact}
    kv = {fact["kv_cache_quant_algo"] for fact in facts.values() if "kv_cache_quant_algo" in fact}
    quantization = {"quant_algo": algos.pop() if len(algos) == 1 else None}
    if kv:
        quantization["kv_cache_quant_algo"] = kv.pop()
    quantization["exclude_modules"] = sorted(module for module, fact in facts.items() if fact.get("excluded"))
    return quantization


def _hf_quant_config(facts, _existing) -> bytes:
    return json.dumps({"producer": PRODUCER, "quantization": _quantization(facts)}, indent=4).encode()


def _config(facts, existing: bytes | None) -> bytes:
    config = json.loads(existing)
    quantization = _quantization(facts)
    group = {"dynamic": False, "num_bits": 8, "type": "float"}
    config["quantization_config"] = {
        "config_groups": {"group_0": {"input_activations": group, "weights": group, "targets": ["Linear"]}},
        "ignore": quantization["exclude_modules"], "quant_algo": quantization["quant_algo"],
        **({"kv_cache_scheme": group} if "kv_cache_quant_algo" in quantization else {}),
        "producer": PRODUCER, "quant_method": "modelopt"}
    return json.dumps(config, indent=2).encode()


MODELOPT = OutputFormat(
    "modelopt", "ModelOpt's unified Hugging Face checkpoint for vLLM, TensorRT-LLM and SGLang: quantized weights "
                "and their scales, hf_quant_config.json (the recipe is the checkpoint's own)",
    writes={role: (Written((role,)),) for role in sorted(MODEL_ROLES | QUANTIZER_ROLES)},
    restores={role: Restored() for role in sorted(MODEL_ROLES | QUANTIZER_ROLES)},
    files=(AddedFile("hf_quant_config.json", _hf_quant_config), AddedFile("config.json", _config)),
    model=True, modules=module_output, restore_modules=restore_module)
