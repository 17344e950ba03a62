"""The two quantization configs of ModelOpt's deployable ("unified HF") checkpoint, built from what each HF
module is: ``hf_quant_config.json`` and the ``quantization_config`` entry of ``config.json``, as ModelOpt 0.47.0's
Megatron-Core exporter writes them (modelopt/torch/export/unified_export_megatron.py:380-431). Torch-free.

Consumers read these, not the tensors, to know the format: vLLM reads ``config.json``'s block first and falls
back to ``hf_quant_config.json`` only when its ``producer.name`` is ``"modelopt"`` (vLLM
model_loader/weight_utils.py:391-397), so the producer is always written as ModelOpt, with the version of the
ModelOpt release whose format is reproduced.

What each piece follows in ModelOpt 0.47.0:

* the per-module entries and the choice of one ``quant_algo`` or ``MIXED_PRECISION`` with ``quantized_layers``:
  ``process_layer_quant_config`` (export/quant_utils.py:683-792), fed the exporter's sorted per-layer records;
* ``exclude_modules``: the Megatron exporter replaces ``process_layer_quant_config``'s prefix-wildcard summary
  by its own sorted list of every unquantized module (unified_export_megatron.py:381-383, ``:1978``); the
  summary (``_prefix_wildcard_summarize_exclude_modules``, quant_utils.py:609) is what ModelOpt's HF exporter
  keeps (``get_quant_config``, quant_utils.py:1598), offered here as ``summarise=True``;
* ``kv_cache_quant_algo``: only FP8 and NVFP4 are recorded by the Megatron exporter (``:1769``);
* ``config.json``'s block: ``convert_hf_quant_config_format`` (export/convert_hf_config.py:130), whose
  ``kv_cache_scheme`` is a compressed-tensors dict for FP8 but the bare string for anything else (``"NVFP4"``).

One departure: the Megatron exporter writes no config at all unless the first quantized module it finds is
FP8, NVFP4, W4A16_NVFP4 or block FP8 (unified_export_megatron.py:315-327, :380), and refuses SmoothQuant and AWQ
outright (``:1106``); these functions describe every format the same way, as ModelOpt's HF exporter does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from quantmap.recipe import ModuleFormat

#: The ModelOpt release whose files these are; what ``producer.version`` says by default.
MODELOPT_VERSION = "0.47.0"
HF_QUANT_CONFIG = "hf_quant_config.json"
#: The KV-cache formats ModelOpt's Megatron exporter records (others it leaves out of the config).
KV_CACHE_ALGOS = ("FP8", "NVFP4")

#: ``process_layer_quant_config``'s per-layer fields beyond ``quant_algo`` (quant_utils.py:703-765): the
#: AWQ-style formats carry their group size and the ``pre_quant_scale`` flag, the other block formats only the
#: group size; the rest nothing.
_AWQ_FIELDS = ("group_size", "has_zero_point", "pre_quant_scale")
_LAYER_FIELDS = {
    "W4A16_AWQ": _AWQ_FIELDS, "W4A8_AWQ": _AWQ_FIELDS, "NVFP4_AWQ": _AWQ_FIELDS,
    "NVFP4": ("group_size",), "W4A16_NVFP4": ("group_size",), "W4A8_NVFP4_FP8": ("group_size",),
    "W4A8_MXFP4_FP8": ("group_size",), "MXFP8": ("group_size",),
}


class ModelOptConfigError(ValueError):
    """What to describe cannot be said in ModelOpt's config files."""


def layer_config(fmt: ModuleFormat) -> dict:
    """One module's entry, as ``process_layer_quant_config`` writes it (``group_size`` is the weight's block)."""
    config: dict = {"quant_algo": fmt.quant_algo}
    fields = _LAYER_FIELDS.get(fmt.quant_algo, ())
    if "group_size" in fields:
        config["group_size"] = fmt.group_size
    if "pre_quant_scale" in fields:
        config.update(has_zero_point=False, pre_quant_scale=True)
    return config


def hf_quant_config(modules: Mapping[str, ModuleFormat | None], kv_cache_algo: str | None, *,
                    producer_version: str = MODELOPT_VERSION, summarise: bool = False) -> dict:
    """``hf_quant_config.json``'s content for a model whose HF modules are ``modules`` (each module whose
    weight the checkpoint writes, norms left out as ModelOpt leaves them out, by HF name → its format, or
    ``None`` when it is left unquantized: ``lm_head``, ``model.embed_tokens``, MoE routers ``...mlp.gate``), with
    the KV cache in ``kv_cache_algo`` (``"FP8"``, ``"NVFP4"`` or ``None``).

    One format for every quantized module gives its ``quant_algo`` (and ``group_size`` ...); several give
    ``"MIXED_PRECISION"`` and every quantized module's entry under ``quantized_layers``. ``summarise``:
    ``exclude_modules`` as ModelOpt's HF exporter writes it (prefix wildcards; none for mixed precision) rather
    than the Megatron exporter's list of names."""
    if kv_cache_algo is not None and kv_cache_algo not in KV_CACHE_ALGOS:
        raise ModelOptConfigError(f"a KV cache quantized as {kv_cache_algo}: ModelOpt's deployable format records "
                                  f"only {' and '.join(KV_CACHE_ALGOS)} KV caches")
    # The exporter's records reach process_layer_quant_config sorted by "<name>.quantization"
    # (unified_export_megatron.py:1991-2002), which is the order of quantized_layers.
    in_record_order = sorted(modules.items(), key=lambda item: item[0] + ".quantization")
    quantized = {name: layer_config(fmt) for name, fmt in in_record_order if fmt is not None}
    excluded = sorted(name for name, fmt in modules.items() if fmt is None)
    if not quantized:
        raise ModelOptConfigError("no module is quantized: ModelOpt writes no hf_quant_config.json for such a "
                                  "model; export it as a plain Hugging Face checkpoint")
    quantization: dict = {"quant_algo": None, "kv_cache_quant_algo": None}
    if len({tuple(config.items()) for config in quantized.values()}) > 1:
        quantization.update(quant_algo="MIXED_PRECISION", quantized_layers=quantized)
        if not summarise:
            quantization["exclude_modules"] = excluded
    else:
        quantization.update(next(iter(quantized.values())))
        quantization["exclude_modules"] = summarise_exclude_modules(excluded, quantized) if summarise else excluded
    if kv_cache_algo is not None:
        quantization["kv_cache_quant_algo"] = kv_cache_algo
    return {"producer": {"name": "modelopt", "version": producer_version}, "quantization": quantization}


def summarise_exclude_modules(unquantized: Iterable[str], quantized: Iterable[str]) -> list[str]:
    """``unquantized`` module names covered by prefix wildcards that match no ``quantized`` name, sorted, as
    ``_prefix_wildcard_summarize_exclude_modules`` (quant_utils.py:609-680) builds them: for each name in
    turn, the shortest candidate at a dot (``a.b*``, then the pair ``a.b`` + ``a.b.*``, written as ``a.b.*``
    alone), else the name itself; a name a candidate already written covers adds nothing."""
    blocked = set()
    for name in quantized:
        blocked.add(name)
        blocked.update(name[:end] + "*" for end in range(len(name) + 1))
    summary: set[str] = set()
    for name in unquantized:
        chosen: list[str] = []
        for candidate in _candidates(name):
            if any(wildcard in blocked for wildcard in candidate):
                continue
            if all(wildcard in summary for wildcard in candidate):
                chosen = []
                break
            chosen = candidate
            break
        if len(chosen) == 2 and chosen[1] == chosen[0] + ".*":
            chosen = chosen[1:]
        summary.update(chosen)
    return sorted(summary)


def _candidates(name: str):
    for end, char in enumerate(name):
        if char == ".":
            yield [name[:end] + "*"]
            yield [name[:end], name[:end] + ".*"]
    yield [name]


def quantization_config(hf_quant: Mapping) -> dict:
    """``config.json``'s ``quantization_config`` for the content of ``hf_quant_config.json`` (what
    :func:`hf_quant_config` returns), as ``convert_hf_quant_config_format`` (convert_hf_config.py:130-263) writes
    it: compressed-tensors style ``config_groups`` (for FP8, NVFP4, W4A16_NVFP4 and mixed precision only, like
    ModelOpt), ``ignore``, ``quant_algo``, ``kv_cache_scheme``, ``producer`` and ``quant_method: "modelopt"``."""
    details = hf_quant.get("quantization", {})
    algo = details.get("quant_algo")
    config: dict = {}
    if algo in ("FP8", "NVFP4", "W4A16_NVFP4"):
        config["config_groups"] = {"group_0": {**_group(algo, details.get("group_size", 16)), "targets": ["Linear"]}}
    elif algo == "MIXED_PRECISION":
        layers = details.get("quantized_layers", {})
        grouped: dict[tuple, list[str]] = {}
        for name, layer in layers.items():
            grouped.setdefault(tuple(sorted(layer.items())), []).append(name)
        config["config_groups"] = {
            f"group_{index}": {**_group(dict(key)["quant_algo"], dict(key).get("group_size")), "targets": sorted(names)}
            for index, (key, names) in enumerate(grouped.items())}
        config["quantized_layers"] = layers
    excluded = details.get("exclude_modules")
    config["ignore"] = excluded if excluded is not None else []
    if algo:
        config["quant_algo"] = algo
    kv = details.get("kv_cache_quant_algo")
    if kv:
        config["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"} if kv == "FP8" else kv
    if hf_quant.get("producer"):
        config["producer"] = hf_quant["producer"]
    config["quant_method"] = "modelopt"
    return config


def _group(algo: str, group_size: int | None) -> dict:
    """A compressed-tensors config group's ``input_activations``/``weights`` for ``algo``
    (``_quant_algo_to_group_config``, convert_hf_config.py:23-127, with its default group sizes)."""
    def tensor(bits: int, kind: str, size: int | None = None, strategy: str | None = None) -> dict:
        described: dict = {"dynamic": False, "num_bits": bits, "type": kind}
        if size is not None:
            described["group_size"] = size
        if strategy is not None:
            described["strategy"] = strategy
        return described

    if algo == "FP8":
        return {"input_activations": tensor(8, "float"), "weights": tensor(8, "float")}
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        return {"input_activations": tensor(8, "float"), "weights": tensor(8, "float", strategy="channel")}
    if algo == "NVFP4":
        size = group_size or 16
        return {"input_activations": tensor(4, "float", size), "weights": tensor(4, "float", size)}
    if algo == "W4A16_AWQ":
        return {"weights": tensor(4, "int", group_size or 128)}
    if algo == "W4A16_NVFP4":
        return {"weights": tensor(4, "float", group_size or 16)}
    if algo in ("NVFP4_AWQ", "W4A8_AWQ"):
        size = group_size or 128
        return {"input_activations": tensor(8, "float", size), "weights": tensor(4, "float", size)}
    if algo == "W8A16":
        return {"weights": tensor(8, "int")}
    if algo == "W8A8_SQ_PER_CHANNEL":
        return {"input_activations": tensor(8, "int"), "weights": tensor(8, "int", strategy="channel")}
    if algo in ("W4A8_NVFP4_FP8", "W4A8_MXFP4_FP8"):
        return {"input_activations": tensor(8, "float"), "weights": tensor(4, "float", group_size or 16)}
    if algo == "MXFP8":
        size = group_size or 32
        return {"input_activations": tensor(8, "float", size), "weights": tensor(8, "float", size)}
    return {"quant_algo": algo}


def file_text(config: Mapping) -> str:
    """A config file's text as ModelOpt writes it (``json.dump(..., indent=4)``, no final newline)."""
    return json.dumps(config, indent=4)
