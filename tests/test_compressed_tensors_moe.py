"""``quantmap export --format compressed-tensors`` of an MoE, proven by transformers 5.25.0 with compressed-tensors
0.20.1 where they can, and by reading the files where they cannot.

The MoE is ``moe_fixture.py``'s (no MoE torch_dist checkpoint with weights exists): a Mixtral-equivalent
SequentialMLP MoE, exported with the ``mixtral`` spec, which transformers loads as ``MixtralForCausalLM`` with its
experts fused (``mlp.experts.gate_up_proj`` = each expert's ``[w1; w3]``, ``mlp.experts.down_proj`` its ``w2``).

* FP8 experts (TP1 and an EP2 layout) and W4A16 experts load with no key missing and dequantize to the formula
  applied to the Megatron weight bit for bit; the FP8 model computes the weight-only model built here.
* INT8 and NVFP4 experts meet two bugs of transformers 5.25's expert loading (``CompressedTensorsDequantize``, the
  one converter for fused experts, knows FP8 ``(weight, weight_scale)`` pairs and packed ``weight_packed``,
  ``weight_scale``, ``weight_shape`` triples only): **INT8 experts fail to load** (an int8 ``weight`` is neither,
  so no expert tensor reaches the merge) and **NVFP4 experts are loaded without their** ``weight_global_scale``.
  Their files are checked tensor by tensor here, and each bug is asserted as it behaves, so that a transformers
  that fixes one fails its test and the docs (docs/formats.md) are revisited.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from megatron_layout import write_shards  # noqa: E402
from moe_fixture import EXPERTS, LAYERS, MIXTRAL, moe_state  # noqa: E402
from reference_formulas import FORMULAS, e2m1_unpacked, nvfp4_parts, qkv_parts, unquantized_hf  # noqa: E402
from transformers_consumer import assert_all_keys_taken, load  # noqa: E402
from typer.testing import CliRunner  # noqa: E402
from written_files import bits, written  # noqa: E402

from quantmap.cli import app  # noqa: E402
from quantmap.executor import ParallelLayout  # noqa: E402
from quantmap.io.torch_dist.modelopt import quant_cfg  # noqa: E402

DCP = Path(__file__).parent / "data" / "dcp"
MOE_NORMS = ("input_layernorm.weight", "pre_mlp_layernorm.weight")  # the local spec's
LAYOUTS = {"tp1": ParallelLayout(tp=1, pp=1, dp=1, num_layers=LAYERS, num_experts=EXPERTS),
           "ep2": ParallelLayout(tp=1, pp=1, dp=2, ep=2, num_layers=LAYERS, num_experts=EXPERTS)}
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj",
           *(f"mlp.experts.local_experts.{e}.linear_fc{i}" for e in range(EXPERTS) for i in (1, 2)))
ROUTERS = [f"model.layers.{layer}.block_sparse_moe.gate" for layer in range(LAYERS)]
TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


# -- the MoE under each recipe ----------------------------------------------------------------------------

def int4_moe() -> tuple[dict[str, torch.Tensor], list]:
    """Plain W4A16 (no ``pre_quant_scale``): the INT4 fixture's recipe (ModelOpt's INT4 weights in blocks of 32
    input columns, inputs off), each linear's block amax the max |W| of its 32 columns, in Megatron's
    ``state_dict`` form ``[rows · blocks, 1]``."""
    state = {name: tensor for name, tensor in moe_state()[0].items() if "_quantizer" not in name}
    for linear in LINEARS:
        for layer in range(LAYERS):
            weight = state[f"decoder.layers.{layer}.{linear}.weight"]
            state[f"decoder.layers.{layer}.{linear}.weight_quantizer._amax"] = \
                weight.abs().reshape(weight.shape[0], -1, 32).amax(-1).reshape(-1, 1)
    return state, quant_cfg(DCP / "int4_awq_bs32_tp2" / "ckpt" / "release")


def nvfp4_moe() -> tuple[dict[str, torch.Tensor], list]:
    """NVFP4 weights, inputs and KV cache (the NVFP4 fixture's recipe): each weight's per-tensor amax its max |W|,
    the input and KV amax the FP8 calibration's."""
    calibrated = moe_state()[0]
    state = {name: tensor for name, tensor in calibrated.items() if not name.endswith("weight_quantizer._amax")}
    for linear in LINEARS:
        for layer in range(LAYERS):
            name = f"decoder.layers.{layer}.{linear}"
            state[f"{name}.weight_quantizer._amax"] = state[f"{name}.weight"].abs().amax()
    return state, quant_cfg(DCP / "nvfp4_kv_tp2" / "ckpt" / "release")


MOES = {"fp8": lambda: moe_state("fp8_default_kv"), "int8": lambda: moe_state("int8_default"), "int4": int4_moe,
        "nvfp4": nvfp4_moe}


def export(directory: Path, kind: str, layout: str) -> Path:
    state, recipe = MOES[kind]()
    write_shards(directory / "shards", state, LAYOUTS[layout], recipe=recipe)
    out = directory / "out"
    run = CliRunner().invoke(app, ["export", "mixtral", "--megatron", str(directory / "shards"), "--out", str(out),
                                   "--format", "compressed-tensors", "--config", str(MIXTRAL), "--dtype", "fp32",
                                   "--quiet"])
    assert run.exit_code == 0, run.output
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each (recipe, layout) exported once for the module's tests."""
    made = {}

    def get(kind: str, layout: str = "tp1") -> Path:
        if (kind, layout) not in made:
            made[kind, layout] = export(tmp_path_factory.mktemp(f"{kind}-{layout}"), kind, layout)
        return made[kind, layout]
    return get


# -- what the files should hold, from the Megatron state ------------------------------------------------

def checkpoint_linears(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each quantized linear of the checkpoint (its HF module name) with its Megatron weight and amax: q/k/v cut
    from the fused QKV rows, w1 / w3 the gate / up halves of an expert's fc1 (its per-row or per-block amax rows
    halved alike, a per-tensor amax shared), w2 its fc2."""
    out = {}
    for layer in range(LAYERS):
        megatron, hf = f"decoder.layers.{layer}", f"model.layers.{layer}"

        def pair(linear):
            return state[f"{megatron}.{linear}.weight"], state[f"{megatron}.{linear}.weight_quantizer._amax"]

        weight, amax = pair("self_attention.linear_qkv")
        amaxes = [amax] * 3 if amax.numel() == 1 else qkv_parts(amax.reshape(weight.shape[0], -1))
        for part, part_weight, part_amax in zip("qkv", qkv_parts(weight), amaxes):
            out[f"{hf}.self_attn.{part}_proj"] = (part_weight, part_amax)
        out[f"{hf}.self_attn.o_proj"] = pair("self_attention.linear_proj")
        for expert in range(EXPERTS):
            experts = f"{hf}.block_sparse_moe.experts.{expert}"
            weight, amax = pair(f"mlp.experts.local_experts.{expert}.linear_fc1")
            halves = [amax] * 2 if amax.numel() == 1 else amax.reshape(weight.shape[0], -1).chunk(2)
            for w, half_weight, half_amax in zip(("w1", "w3"), weight.chunk(2), halves):
                out[f"{experts}.{w}"] = (half_weight, half_amax)
            out[f"{experts}.w2"] = pair(f"mlp.experts.local_experts.{expert}.linear_fc2")
    return out


def as_loaded(linears: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-linear weights as ``MixtralForCausalLM`` holds them: attention ``<module>.weight``, and per layer the
    experts fused, ``mlp.experts.gate_up_proj[e] = [w1; w3]`` and ``mlp.experts.down_proj[e] = w2``."""
    out = {f"{name}.weight": weight for name, weight in linears.items() if ".experts." not in name}
    for layer in range(LAYERS):
        experts = [f"model.layers.{layer}.block_sparse_moe.experts.{e}" for e in range(EXPERTS)]
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([linears[f"{e}.w1"], linears[f"{e}.w3"]]) for e in experts])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([linears[f"{e}.w2"] for e in experts])
    return out


def expected(kind: str, formula=None) -> dict[str, torch.Tensor]:
    """The loaded model's linear weights: ``formula`` (the recipe's, unless given) applied to each Megatron weight."""
    formula = formula or FORMULAS[kind]
    return as_loaded({name: formula(weight, amax) for name, (weight, amax) in
                      checkpoint_linears(MOES[kind]()[0]).items()})


def differing(model, want: dict[str, torch.Tensor]) -> list[str]:
    return sorted(name for name, tensor in want.items() if not torch.equal(model.get_parameter(name).detach(), tensor))


def quantization_config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


# -- FP8 and W4A16: loaded, dequantized exactly ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind, layout", [("fp8", "tp1"), ("fp8", "ep2"), ("int4", "tp1")])
def test_fp8_and_w4a16_experts_load_with_no_key_missing_and_dequantize_to_the_formula_bit_for_bit(
        kind, layout, exported):
    out = exported(kind, layout)
    model, info = load(out)
    assert_all_keys_taken(info)
    want = expected(kind)
    assert len(want) == 6 * LAYERS and differing(model, want) == []
    assert differing(model, unquantized_hf(MOES[kind]()[0], LAYERS, MOE_NORMS, router=True)) == []
    config = quantization_config(out)
    assert config["format"] == {"fp8": "float-quantized", "int4": "pack-quantized"}[kind]
    assert config["ignore"] == ["lm_head", *ROUTERS]


def reference_model(kind: str | None):
    """The weight-only fake-quant MoE, built here: ``MixtralForCausalLM`` holding each linear's weight through
    the formula (``kind``; ``None``: unquantized) and every other tensor as Megatron's."""
    state = MOES["fp8"]()[0]
    weights = expected(kind) if kind else as_loaded({name: weight for name, (weight, _) in
                                                     checkpoint_linears(state).items()})
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig.from_pretrained(MIXTRAL)).eval()
    model.load_state_dict(unquantized_hf(state, LAYERS, MOE_NORMS, router=True) | weights, strict=True)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.slow
def test_the_fp8_moe_computes_the_weight_only_model_built_from_the_formulas(exported):
    got = logits(load(exported("fp8"))[0])
    off = (got - logits(reference_model("fp8"))).abs().max()
    assert off <= 1e-6
    assert (got - logits(reference_model(None))).abs().max() > 1e-3


# -- INT8 and NVFP4: the files, read; transformers' bugs, asserted ---------------------------------------

def test_int8_experts_are_written_as_the_formulas_say(exported):
    """Every linear, experts included: int8 ``weight`` ``[out, in]``, ``weight_scale`` ``amax / 127``
    ``[out, 1]``, ``input_scale`` ``amax / 127`` ``[1]``; the weight times its scale is the formula's."""
    files = written(exported("int8"))
    state = MOES["int8"]()[0]
    linears = checkpoint_linears(state)
    assert len(linears) == (4 + 3 * EXPERTS) * LAYERS
    for name, (weight, amax) in linears.items():
        payload, scale = files[f"{name}.weight"], files[f"{name}.weight_scale"]
        assert payload.dtype == torch.int8 and payload.shape == weight.shape, name
        assert bits(scale) == bits(amax.float().reshape(-1, 1) / 127), name
        assert torch.equal(payload.float() * scale, FORMULAS["int8"](weight, amax)), name
        assert files[f"{name}.input_scale"].shape == (1,)
    for layer in range(LAYERS):  # every expert's input scale is its own calibrated amax
        for expert in range(EXPERTS):
            for w, fc in (("w1", 1), ("w3", 1), ("w2", 2)):
                amax = state[f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc{fc}."
                             f"input_quantizer._amax"]
                got = files[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.input_scale"]
                assert bits(got) == bits(amax.float().reshape(1) / 127)
    config = quantization_config(exported("int8"))
    assert config["format"] == "int-quantized" and config["ignore"] == ["lm_head", *ROUTERS]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_transformers_fails_to_load_int8_experts(exported):
    """transformers 5.25's bug, as it is: its expert converter skips an int8 ``weight`` (no FP8 type, no
    ``weight_packed``), so nothing reaches the merge of each layer's ``gate_up_proj`` and the load is refused."""
    records = Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        with pytest.raises(RuntimeError, match="issues during automatic conversion of the weights"):
            load(exported("int8"))
    finally:
        logger.removeHandler(records)
    report = "\n".join(records.messages)  # each layer's fused experts missing, the merge given no tensor
    assert re.search(r"Concatenate on tensors destined for model\.layers\.\d\.mlp\.experts\.gate_up_proj\. Ckpt "
                     r"contains: 0", report)
    for fused in ("gate_up_proj", "down_proj"):
        assert re.search(rf"model\.layers\.{{0, 1}}\.mlp\.experts\.{fused} +\| MISSING", report), fused


def test_nvfp4_experts_are_written_as_the_formulas_say(exported):
    """Every linear, experts included: ``weight_packed`` the E2M1 values of ModelOpt's quantization (uint8
    ``[out, in / 2]``), ``weight_scale`` its E4M3 block scales ``[out, in / 16]``, ``weight_global_scale``
    ``6·448 / amax`` and ``input_global_scale`` ``6·448 / input amax`` ``[1]``."""
    files = written(exported("nvfp4"))
    state = MOES["nvfp4"]()[0]
    linears = checkpoint_linears(state)
    assert len(linears) == (4 + 3 * EXPERTS) * LAYERS
    for name, (weight, amax) in linears.items():
        values, blocks, global_scale = nvfp4_parts(weight, amax)
        packed = files[f"{name}.weight_packed"]
        assert packed.dtype == torch.uint8 and packed.shape == (weight.shape[0], weight.shape[1] // 2), name
        assert torch.equal(e2m1_unpacked(packed), values), name
        assert bits(files[f"{name}.weight_scale"]) == bits(blocks), name
        assert bits(files[f"{name}.weight_global_scale"]) == bits(global_scale), name
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            for w, fc in (("w1", 1), ("w3", 1), ("w2", 2)):
                amax = state[f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc{fc}."
                             f"input_quantizer._amax"]
                got = files[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.input_global_scale"]
                assert bits(got) == bits(2688 / amax.float().reshape(1))
    config = quantization_config(exported("nvfp4"))
    assert config["format"] == "nvfp4-pack-quantized" and config["ignore"] == ["lm_head", *ROUTERS]


def without_global_scale(weight, amax):
    """What transformers 5.25 makes of an NVFP4 expert: ``value · block_scale``, the global scale left out (in
    bfloat16, compressed-tensors' FP4 unpacking dtype, where the product of an E2M1 and an E4M3 value is exact)."""
    values, blocks, _ = nvfp4_parts(weight, amax)
    rows, columns = weight.shape
    return (values.reshape(rows, -1, 16) * blocks.float()[..., None]).reshape(rows, columns) \
        .to(torch.bfloat16).float()


@pytest.mark.slow
def test_transformers_loads_nvfp4_experts_without_their_global_scale(exported):
    """transformers 5.25's bug, as it is: the attention linears dequantize to the formula, but each expert's
    weight is ``value · block_scale``, ``weight_global_scale`` ignored (``amax / 2688`` times too large)."""
    model, info = load(exported("nvfp4"))
    right, wrong = expected("nvfp4"), expected("nvfp4", without_global_scale)
    attention = [name for name in right if ".self_attn." in name]
    experts = [name for name in right if ".mlp.experts." in name]
    assert len(attention) == 4 * LAYERS and len(experts) == 2 * LAYERS
    assert differing(model, {name: right[name] for name in attention}) == []
    assert differing(model, {name: wrong[name] for name in experts}) == []
    assert differing(model, {name: right[name] for name in experts}) == sorted(experts)
    assert_all_keys_taken(info)  # silently: the experts' weight_global_scale is not even an unexpected key
