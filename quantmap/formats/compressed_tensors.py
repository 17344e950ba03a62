"""The ``compressed-tensors`` format: what llm-compressor writes and vLLM, SGLang and transformers load.

Per Hugging Face module, from the weight and its quantizer state, under the checkpoint's ModelOpt recipe
(:func:`quantmap.formats.deployable.scheme_of`), with names, dtypes and shapes as compressed-tensors 0.20.1's
compressors write them (``../shared/FORMATS.md``, "compressed-tensors 0.20.1 against ModelOpt"):

* FP8 per tensor (``float-quantized``): ``weight`` E4M3, the bytes ModelOpt writes; ``weight_scale`` and
  ``input_scale`` ``amax / 448`` as ``[1]``;
* INT8 per-channel weights, static per-tensor input (``int-quantized``, ModelOpt's ``W8A8_SQ_PER_CHANNEL``):
  ``weight`` int8, ``weight_scale`` ``[out, 1]``, ``input_scale`` ``[1]``;
* INT4 group weights (``pack-quantized``, W4A16, ModelOpt's ``W4A16_AWQ``): ModelOpt's INT4 values packed
  eight input columns per int32 as ``weight_packed``, ``weight_scale`` ``[out, in / group]``, ``weight_shape``;
* NVFP4 (``nvfp4-pack-quantized``): ``weight_packed`` and the E4M3 ``weight_scale`` are ModelOpt's ``weight`` and
  ``weight_scale`` bytes; ``weight_global_scale`` / ``input_global_scale`` are ``6·448 / amax``, the reciprocals
  of ModelOpt's ``weight_scale_2`` / ``input_scale``;
* the KV cache: ``self_attn.k_scale`` / ``v_scale`` ``amax / 448`` (FP8, never clamped: compressed-tensors keeps
  the calibrated scale), or NVFP4's ``k_global_scale`` / ``v_global_scale``;
* every scale float32, whatever the model's dtype: the payload was divided by the float32 scale, and a scale
  rounded to bf16 would dequantize it to other values (llm-compressor writes the model's dtype; both load).

compressed-tensors has no ``pre_quant_scale`` (SmoothQuant, AWQ), so it is folded where it is exact: into the
norm before q/k/v and gate/up (the group shares one in Megatron), and for o_proj and down_proj into the rows of
the linear that produces their input, v_proj and up_proj (the attention and the SwiGLU product are linear in
those rows). With GQA one value head feeds several query heads, so o_proj's scale folds into v_proj only where
it is equal across the query heads of each group; where it is not, or the producer's scale cannot follow a
per-row scaling (one scale for the whole tensor, a quantized KV cache), the export is refused with the reason.

Embeddings, norms, routers and excluded layers are written as they are; excluded linears are listed in
``config.json``'s ``ignore``, beside ``config_groups`` and ``kv_cache_scheme`` (:func:`quantization_config`).
"""

from __future__ import annotations

import json
from collections import Counter
from functools import partial

from quantmap.formats import deployable as shared
from quantmap.formats.declaration import AddedFile, Derived, FormatError, ModuleOutput, ModuleView, OutputFormat, \
    Written
from quantmap.formats.deployable import FP32, INPUT_AMAX, NEVER_QUANTIZED, PQS, WEIGHT_AMAX, amax_input, as_is, \
    fed_by_norm, folded_norm, megatron_module, model_dtype
from quantmap.name_groups import group_names
from quantmap.recipe import ModuleFormat, kv_cache_algo_in
from quantmap.roles import K_AMAX, MODEL_ROLES, NORM, QUANTIZER_ROLES, V_AMAX, WEIGHT

NAME = "compressed-tensors"
VERSION = "0.20.1"  # the compressed-tensors release whose layout this is
#: The linear whose input another linear's ``pre_quant_scale`` scales, by the consumer's Megatron module: the
#: producer's Megatron module and the HF module (Llama family names, which compressed-tensors' consumers key on
#: too) whose rows give that input: v_proj's rows are o_proj's input after attention, up_proj's rows
#: down_proj's input after the SwiGLU product.
PRODUCERS = {"self_attention.linear_proj": ("self_attention.linear_qkv", "v_proj"),
             "mlp.linear_fc2": ("mlp.linear_fc1", "up_proj")}
#: Formats whose weight scales are per output row (or per row and block), so a weight whose rows are scaled
#: keeps its quantization: each row's scale scales with it.
PER_ROW = frozenset({"W8A8_SQ_PER_CHANNEL", "W4A16_AWQ"})
_FLOAT8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "group_size": None, "symmetric": True,
           "dynamic": False}


def _nvfp4_args(dynamic):
    return {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
            "dynamic": dynamic, "scale_dtype": "torch.float8_e4m3fn"}


def module_output(view: ModuleView) -> ModuleOutput:
    """What the checkpoint holds for one HF module, as compressed-tensors stores it."""
    tensors, facts = _kv_cache(view), {}
    if tensors:
        facts["kv_cache"] = _kv_algo(view)
    role = view.roles.get("weight")
    linear = role == WEIGHT and megatron_module(view).rpartition(".")[2] not in NEVER_QUANTIZED
    fmt = shared.scheme_of(view, _WRITERS, NAME) if linear else None
    if linear:
        facts["scheme"] = fmt
    rows = _producer_of(view, fmt) if role == WEIGHT else None
    if rows is not None:
        facts["folded"] = "rows"
    if fmt is not None:
        _consumer_folded(view, fmt)
        uncalibrated: list[str] = []
        tensors += _WRITERS[fmt.quant_algo](view, fmt, uncalibrated, rows)
        facts["uncalibrated"] = uncalibrated
    elif rows is not None:
        dtype, shape = model_dtype(view), view.buffers["weight"][1]
        tensors.append(Derived(f"{view.name}.weight", ("weight", rows[0]), partial(_rows_cast, rows[1], dtype), dtype,
                               shape))
    folded = folded_norm(view, lambda _: True) if role == NORM else None
    if folded:
        facts["folded"] = "norm"
        tensors.append(folded)
    tensors += [_bias(view, buffer, rows) if rows is not None and buffer == "bias" else as_is(view, buffer)
                for buffer, role in view.roles.items()
                if role in MODEL_ROLES and not (buffer == "weight" and (fmt or rows or folded))]
    return ModuleOutput(tuple(tensors), facts)


# -- the schemes ---------------------------------------------------------------------------------------

def _fp8(view: ModuleView, fmt: ModuleFormat, uncalibrated: list[str], rows) -> list[Derived]:
    """``float-quantized``: ModelOpt's FP8 bytes, ``weight_scale`` and ``input_scale`` ``[1]``."""
    amax = amax_input(view, WEIGHT_AMAX, "fp8", uncalibrated)
    name, (_, shape) = view.name, view.buffers["weight"]
    return [Derived(f"{name}.weight", ("weight", amax),
                    partial(shared.payload, "fp8_quantize", "fp8", (), model_dtype(view)), "float8_e4m3fn", shape),
            Derived(f"{name}.weight_scale", (amax,), partial(shared.scale, "fp8", (1,)), FP32, (1,)),
            *_input_scale(view, "fp8", uncalibrated)]


def _int8(view: ModuleView, fmt: ModuleFormat, uncalibrated: list[str], rows) -> list[Derived]:
    """``int-quantized``: int8 ``weight`` over the per-row ``weight_scale`` ``[out, 1]``, ``input_scale``
    ``[1]``; with its rows scaled by the ``pre_quant_scale`` of the linear it feeds, where it feeds one."""
    amax = amax_input(view, WEIGHT_AMAX, "int8", uncalibrated)
    name, (_, shape) = view.name, view.buffers["weight"]
    payload = partial(shared.payload, "int8_quantize", "int8", (shape[0],), model_dtype(view))
    scale = partial(shared.scale, "int8", (shape[0], 1))
    return [_derived(f"{name}.weight", ("weight", amax), payload, "int8", shape, rows),
            _derived(f"{name}.weight_scale", (amax,), scale, FP32, (shape[0], 1), rows),
            *_input_scale(view, "int8", uncalibrated)]


def _int4(view: ModuleView, fmt: ModuleFormat, uncalibrated: list[str], rows) -> list[Derived]:
    """``pack-quantized`` W4A16: ModelOpt's INT4 values packed into int32 ``weight_packed``
    ``[out, ceil(in / 8)]``, ``weight_scale`` ``[out, in / group]``, ``weight_shape`` (int64 ``[2]``)."""
    if WEIGHT_AMAX not in view.buffers:
        raise FormatError(f"{view.name}: the recipe quantizes it as {fmt.quant_algo}, but the checkpoint has no "
                          f"{WEIGHT_AMAX} for it (its blocks were never calibrated); calibrate it, or leave the "
                          f"layer out of the recipe")
    name, (_, (out, columns)) = view.name, view.buffers["weight"]
    blocks = (out, columns // fmt.group_size)
    return [_derived(f"{name}.weight_packed", ("weight", WEIGHT_AMAX),
                     partial(_int4_packed, model_dtype(view), blocks), "int32", (out, -(-columns // 8)), rows),
            _derived(f"{name}.weight_scale", (WEIGHT_AMAX,), partial(shared.scale, "int4", blocks), FP32, blocks,
                     rows),
            Derived(f"{name}.weight_shape", ("=0",), partial(_shape, (out, columns)), "int64", (2,))]


def _nvfp4(view: ModuleView, fmt: ModuleFormat, uncalibrated: list[str], rows) -> list[Derived]:
    """``nvfp4-pack-quantized``: ModelOpt's packed E2M1 payload and E4M3 block scales, and the global scales
    ``6·448 / amax`` (``[1]``)."""
    amax = amax_input(view, WEIGHT_AMAX, "nvfp4", uncalibrated)
    input_amax = amax_input(view, INPUT_AMAX, "nvfp4", uncalibrated)
    name, (_, (out, columns)) = view.name, view.buffers["weight"]
    return [Derived(f"{name}.weight_scale", ("weight", amax), partial(shared.nvfp4_blocks, fmt.group_size),
                    "float8_e4m3fn", (out, columns // fmt.group_size)),
            Derived(f"{name}.weight_packed", ("weight", amax, "@weight_scale"),
                    partial(shared.nvfp4_payload, model_dtype(view)), "uint8", (out, columns // 2)),
            Derived(f"{name}.weight_global_scale", (amax,), _global_scale, FP32, (1,)),
            Derived(f"{name}.input_global_scale", (input_amax,), _global_scale, FP32, (1,))]


_WRITERS = {"FP8": _fp8, "W8A8_SQ_PER_CHANNEL": _int8, "W4A16_AWQ": _int4, "NVFP4": _nvfp4}
#: Each ModelOpt format as a compressed-tensors scheme: its format name, weight and input arguments.
SCHEMES = {
    "FP8": ("float-quantized", _FLOAT8, _FLOAT8),
    "W8A8_SQ_PER_CHANNEL": ("int-quantized", {**_FLOAT8, "type": "int", "strategy": "channel"},
                            {**_FLOAT8, "type": "int"}),
    "W4A16_AWQ": ("pack-quantized", {**_FLOAT8, "num_bits": 4, "type": "int", "strategy": "group"}, None),
    "NVFP4": ("nvfp4-pack-quantized", _nvfp4_args(False), _nvfp4_args("local")),
}
_KV = {"FP8": _FLOAT8, "NVFP4": _nvfp4_args("local")}


def _input_scale(view: ModuleView, kind: str, uncalibrated: list[str]) -> list[Derived]:
    amax = amax_input(view, INPUT_AMAX, kind, uncalibrated)
    return [Derived(f"{view.name}.input_scale", (amax,), partial(shared.scale, kind, (1,)), FP32, (1,))]


def _kv_cache(view: ModuleView) -> list[Derived]:
    """``self_attn.k_scale`` / ``v_scale`` (FP8, ``amax / 448``) or ``k_global_scale`` / ``v_global_scale``
    (NVFP4, ``6·448 / amax``), as compressed-tensors registers them on the attention module."""
    out = []
    for buffer, role in view.roles.items():
        if role in (K_AMAX, V_AMAX):
            which = "k" if role == K_AMAX else "v"
            if _kv_algo(view) == "NVFP4":
                out.append(Derived(f"{view.name}.{which}_global_scale", (buffer,), _global_scale, FP32, (1,)))
            else:
                out.append(Derived(f"{view.name}.{which}_scale", (buffer,), partial(shared.kv, "fp8", False, (1,)),
                                   FP32, (1,)))
    return out


def _kv_algo(view: ModuleView) -> str:
    return shared.kv_algo(view, _KV, NAME)


# -- pre_quant_scale, folded ---------------------------------------------------------------------------

def _consumer_folded(view: ModuleView, fmt: ModuleFormat) -> None:
    """Refuse a linear whose ``pre_quant_scale`` nothing folds: not fed by a norm alone, and no producing
    v_proj / up_proj to take it (an expert's gate/up, whose norm also feeds the router and the other experts)."""
    if PQS not in view.buffers:
        return
    linear = megatron_module(view)
    if fed_by_norm(linear):
        return
    layer, consumer = _split(linear)
    if consumer in PRODUCERS:
        producer, leaf = PRODUCERS[consumer]
        sibling = f"{view.name.rpartition('.')[0]}.{leaf}.weight"
        if sibling in view.holders(f"{layer}.{producer}.weight"):
            return
    raise FormatError(f"{view.name}: the recipe quantizes it as {fmt.quant_algo} with a pre_quant_scale, which "
                      f"compressed-tensors cannot store, and it cannot be folded exactly: no norm feeds this linear "
                      f"alone and no v_proj / up_proj produces its input; export it with --format modelopt")


def _producer_of(view: ModuleView, fmt: ModuleFormat | None) -> tuple[str, object] | None:
    """Where this module is the v_proj / up_proj whose rows give the input of a linear with a ``pre_quant_scale``:
    that scale's HF name and the function from it to this module's row scales (checking it folds exactly)."""
    layer, producer = _split(megatron_module(view))
    consumer = next((c for c, (p, leaf) in PRODUCERS.items() if p == producer and view.name.endswith(f".{leaf}")),
                    None)
    pqs = consumer and view.lookup(f"{layer}.{consumer}.{PQS}")
    if pqs is None:
        return None
    where = f"{view.name}: the {PQS.rpartition('.')[2]} of {pqs.rpartition('.input_quantizer')[0]} folds into its rows"
    if fmt is not None and fmt.quant_algo not in PER_ROW:
        raise FormatError(f"{where}, but it is quantized as {fmt.quant_algo}, whose weight has one scale for the "
                          f"whole tensor, which rows scaled apart would change; export it with --format modelopt")
    if consumer == "self_attention.linear_proj":
        if kv_cache_algo_in(f"{layer}.self_attention", shared.recipe_of(view)) is not None:
            raise FormatError(f"{where}, but the KV cache is quantized with one scale per tensor, which values scaled "
                              f"per channel would change; export it with --format modelopt")
        return pqs, partial(_gqa_rows, where, _heads(view), view.buffers["weight"][1][0])
    return pqs, partial(_same_rows, where, view.buffers["weight"][1][0])


def _split(linear: str) -> tuple[str, str]:
    """``decoder.layers.0.self_attention.linear_proj`` → (``decoder.layers.0``, ``self_attention.linear_proj``)."""
    parts = linear.split(".")
    return ".".join(parts[:-2]), ".".join(parts[-2:])


def _heads(view: ModuleView) -> tuple[int, int, int]:
    """(query heads, KV heads, head size), from the model's config."""
    config = view.config or {}
    try:
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        size = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{view.name}: folding o_proj's pre_quant_scale into v_proj needs the attention's head "
                          f"counts, which config.json does not give (num_attention_heads, num_key_value_heads, "
                          f"head_dim)") from None
    return heads, kv_heads, size


def _rows_cast(select, dtype: str, weight, pqs):
    import torch

    return _scaled_rows(weight, select(pqs)).to(getattr(torch, dtype))


def _derived(name: str, inputs: tuple[str, ...], compute, dtype: str, shape: tuple[int, ...], rows) -> Derived:
    """A tensor computed from the weight (or its amax) as it is, or with the weight's rows scaled by ``rows``
    (a ``pre_quant_scale`` and the function selecting each row's factor from it): the weight's rows and the
    amax of each row (and block) scaled alike, so the quantization is the same one, of the folded weight."""
    if rows is None:
        return Derived(name, inputs, compute, dtype, shape)
    if any(source.startswith("=") for source in inputs):
        raise FormatError(f"{name}: its weight's rows take the pre_quant_scale of the linear it feeds, but the "
                          f"checkpoint has no amax for it (uncalibrated), whose rows could not follow; calibrate it")
    return Derived(name, (*inputs, rows[0]), partial(_folded, compute, rows[1], inputs), dtype, shape)


def _folded(compute, select, inputs: tuple[str, ...], *tensors):
    *tensors, pqs = tensors
    factors = select(pqs)
    return compute(*(_scaled_rows(tensor, factors) if name == "weight" else _scaled_amax(tensor, factors)
                     for name, tensor in zip(inputs, tensors)))


def _scaled_rows(weight, factors):
    """Each row of the weight times its factor, in float32, back in the weight's dtype."""
    return (weight.float() * factors[:, None]).to(weight.dtype)


def _scaled_amax(amax, factors):
    """A per-row (``[out, 1]``) or per-row-and-block (``[out · blocks, 1]``) amax with each row's times its
    factor: the amax of the rows scaled (rounding is monotonic, so the maximum of the products is the product
    of the maximum)."""
    return (amax.float().reshape(factors.shape[0], -1) * factors[:, None]).reshape(amax.shape)


def _bias(view: ModuleView, buffer: str, rows) -> Derived:
    dtype, shape = view.buffers[buffer]
    model = view.dtype or dtype
    return Derived(f"{view.name}.{buffer}", (buffer, rows[0]), partial(_bias_scaled, rows[1], model), model, shape)


def _bias_scaled(select, dtype: str, bias, pqs):
    import torch

    return (bias.float() * select(pqs)).to(getattr(torch, dtype))


def _same_rows(where: str, rows: int, pqs):
    """up_proj's row ``r`` gives down_proj's input ``r``: the factors are the scale itself."""
    if pqs.shape != (rows,):
        raise FormatError(f"{where}, but it has {list(pqs.shape)} entries for {rows} rows")
    return pqs.float()


def _gqa_rows(where: str, heads: tuple[int, int, int], rows: int, pqs):
    """v_proj's row ``j·d + i`` (KV head ``j``) gives o_proj's inputs ``(j·g + h)·d + i`` for each of the ``g``
    query heads ``h`` of its group (transformers' ``repeat_kv``): one factor per row only where those are equal."""
    query, kv, size = heads
    if pqs.shape != (query * size,) or rows != kv * size or query % kv:
        raise FormatError(f"{where}, but its {list(pqs.shape)} entries do not match {query} query heads of "
                          f"{size} over {rows // size if size else rows} value heads")
    grouped = pqs.float().reshape(kv, query // kv, size)
    unequal = (grouped != grouped[:, :1]).any(dim=(1, 2)).nonzero().flatten().tolist()
    if unequal:
        raise FormatError(f"{where}, but one value head feeds {query // kv} query heads (GQA) and the scale differs "
                          f"between the query heads of value head(s) {unequal}: no per-row factor of v_proj gives "
                          f"each of them its own. Export this checkpoint with --format modelopt, or calibrate with "
                          f"the scale tied across each GQA group")
    return grouped[:, 0].reshape(-1)


# -- the tensors, computed -----------------------------------------------------------------------------

def _int4_packed(dtype: str, blocks: tuple[int, int], weight, amax):
    return shared.formulas().pack_int4_int32(shared.int4_values(dtype, blocks, weight, amax))


def _global_scale(amax):
    return shared.formulas().nvfp4_global_scale(amax).reshape(1)


def _shape(shape: tuple[int, int], _):
    import torch

    return torch.tensor(shape, dtype=torch.int64)


# -- config.json ---------------------------------------------------------------------------------------

def quantization_config(facts) -> dict:
    """``config.json``'s ``quantization_config`` for what the modules said, as compressed-tensors 0.20.1 writes
    it: one config group targeting every ``Linear``, the unquantized linears in ``ignore``, the KV cache's scheme."""
    fmt = _one_scheme(facts)
    name, weights, inputs = SCHEMES[fmt.quant_algo]
    weights = {**weights, "group_size": fmt.group_size} if fmt.group_size else weights
    kv = {fact["kv_cache"] for fact in facts.values() if "kv_cache" in fact}
    if len(kv) > 1:
        raise FormatError(f"the KV cache is quantized as {sorted(kv)} in different layers; compressed-tensors records "
                          f"one KV-cache scheme for the model")
    return {"config_groups": {"group_0": {"format": name, "input_activations": inputs, "output_activations": None,
                                          "targets": ["Linear"], "weights": weights}},
            "format": name, "global_compression_ratio": None, "ignore": _ignored(facts),
            "kv_cache_scheme": _KV[kv.pop()] if kv else None, "moe_sparsity_config": None,
            "quant_method": NAME, "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
            "version": VERSION}


def _one_scheme(facts) -> ModuleFormat:
    schemes = Counter(fact["scheme"] for fact in facts.values() if fact.get("scheme") is not None)
    if len(schemes) != 1:
        found = ", ".join(f"{count} as {fmt.quant_algo}" for fmt, count in schemes.items()) or "none quantized"
        raise FormatError(f"the recipe quantizes the linears in {len(schemes)} schemes ({found}); quantmap writes "
                          f"compressed-tensors checkpoints of one scheme (--format hf writes an unquantized model)")
    return next(iter(schemes))


def _ignored(facts) -> list[str]:
    return sorted(module for module, fact in facts.items() if "scheme" in fact and fact["scheme"] is None)


def _config(facts, copied: bytes | None) -> bytes:
    config = json.loads(copied)
    config["quantization_config"] = quantization_config(facts)
    return (json.dumps(config, indent=2) + "\n").encode()


# -- the closing summary -------------------------------------------------------------------------------

_WHAT = {"FP8": "FP8 weights and static inputs, one scale per tensor",
         "W8A8_SQ_PER_CHANNEL": "INT8 weights per output channel, static INT8 inputs per tensor",
         "W4A16_AWQ": "INT4 weights per group of {group} (W4A16)",
         "NVFP4": "NVFP4 weights and inputs (FP4 in blocks of {group}, E4M3 block scales, a global scale)"}


_KV_NOTE = {"FP8": "self_attn.k_scale / v_scale, which vLLM reads",
            "NVFP4": "self_attn.k_global_scale / v_global_scale; no engine's reading of it was checked"}


def summarize(facts) -> list[str]:
    """What a user gets: the format, the scheme per group of layers, what was left out, and who loads it."""

    fmt = _one_scheme(facts)
    quantized = [module for module, fact in facts.items() if fact.get("scheme") is not None]
    groups = ", ".join(f"{shape} ({count})" for shape, count in group_names(quantized))
    lines = [f"format {NAME} ({SCHEMES[fmt.quant_algo][0]}, quantization_config in config.json): "
             f"{_WHAT[fmt.quant_algo].format(group=fmt.group_size)} in {len(quantized)} linear(s): {groups}"]
    kv = sorted({fact["kv_cache"] for fact in facts.values() if "kv_cache" in fact})
    lines.append(f"KV cache: {kv[0]} ({_KV_NOTE[kv[0]]}; transformers 5.25 applies no KV-cache scheme)" if kv
                 else "KV cache: not quantized")
    ignored = _ignored(facts)
    lines.append(f"left unquantized (ignore): {', '.join(f'{s} ({n})' for s, n in group_names(ignored))}" if ignored
                 else "left unquantized: none")
    for kind, where in (("norm", "the norms before q/k/v and gate/up"), ("rows", "the rows of v_proj / up_proj "
                                                                                 "(for o_proj / down_proj)")):
        count = sum(fact.get("folded") == kind for fact in facts.values())
        if count:
            lines.append(f"pre_quant_scale folded into {where}: {count} module(s)")
    lines.append("loads in vLLM and SGLang (compressed-tensors), and on a CPU in transformers with compressed-tensors "
                 "(CompressedTensorsConfig(dequantize=True), or fake-quantized by default)")
    return lines


COMPRESSED_TENSORS = OutputFormat(
    NAME, "compressed-tensors checkpoint (llm-compressor's) for vLLM, SGLang and transformers: FP8, INT8, W4A16 and "
          "NVFP4 weights with their scales, SmoothQuant/AWQ scales folded in, config.json's quantization_config",
    writes={role: (Written((role,)),) for role in sorted(MODEL_ROLES | QUANTIZER_ROLES)},
    restores={}, files=(AddedFile("config.json", _config),), model=True, modules=module_output,
    summarize=summarize,
    next_step="next: serve it: vllm serve {out}; or load it on a CPU: python -c 'from transformers import "
              "AutoModelForCausalLM, CompressedTensorsConfig; AutoModelForCausalLM.from_pretrained({out_py}, "
              "quantization_config=CompressedTensorsConfig(dequantize=True))'")
