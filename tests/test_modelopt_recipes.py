"""``quantmap export --format modelopt`` for the fixtures' recipes that have no ModelOpt export to compare with
(NVFP4 + NVFP4 KV, plain INT8, SmoothQuant, INT4 AWQ, W4A8 AWQ; ModelOpt's Megatron exporter refuses SmoothQuant
and W4A8 and writes INT4 AWQ wrong): every tensor written is the formula of ``../shared/FORMATS.md`` §1 applied
to the checkpoint, computed here independently; and the uncalibrated cases (zero or missing amax, ``--strict``).

Nothing here comes from quantmap's own code: the checkpoint is read with plain ``torch.distributed.checkpoint``,
the weights converted by the documented layout (``tests/megatron_layout.py``), the quantizer rows cut by hand
(q/k/v by the query-group interleave, ModelOpt's TP-interleaved SwiGLU amax de-interleaved), and scales and
payloads computed from FORMATS.md's formulas (fp32 division by the Python float divisor; E2M1 by nearest grid
point, ties to the even code; INT4 two output rows per byte; INT8 round half to even). Every payload is also
dequantized and held to one quantization step of the Megatron weight. Only TP2 saves of these recipes exist,
so TP invariance (``fp8_kv_tp1`` against ``fp8_kv_tp2``) stays with ``test_modelopt_export.py``."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from typer.testing import CliRunner

from megatron_layout import llama_hf_by_hand
from written_files import bits, differences, written
from quantmap.cli import app

DATA = Path(__file__).parent / "data" / "dcp"
CONFIG = DATA / "reference" / "hf_config_dense.json"
LAYERS, HEADS, GROUPS, HEAD_DIM, SAVED_TP = 2, 4, 2, 16, 2  # hf_config_dense.json; every fixture here is TP2
BF16 = torch.bfloat16
ATTENTION, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
#: The norm before each fused group, and one linear of the group (they share one input quantizer, so one PQS).
FED_BY_NORM = {"input_layernorm": "self_attn.q_proj", "post_attention_layernorm": "mlp.gate_proj"}


@dataclass(frozen=True)
class Recipe:
    """What a fixture's recipe is, as FORMATS.md names it (ModelOpt's ``quant_algo``)."""

    quant_algo: str
    group_size: int | None = None  # NVFP4's 16; the AWQ block size
    kv_cache: str | None = None


RECIPES = {"nvfp4_kv_tp2": Recipe("NVFP4", 16, "NVFP4"), "int8_tp2": Recipe("W8A8_SQ_PER_CHANNEL"),
           "int8_sq_tp2": Recipe("W8A8_SQ_PER_CHANNEL"), "int4_awq_bs32_tp2": Recipe("W4A16_AWQ", 32),
           "w4a8_awq_bs32_tp2": Recipe("W4A8_AWQ", 32)}
AWQ = ("W4A16_AWQ", "W4A8_AWQ")  # pre_quant_scale of q/k/v and gate/up folded into the norm (FORMATS.md §3)


# -- the checkpoint, read by hand -----------------------------------------------------------------------

def checkpoint_directory(fixture: str) -> Path:
    ckpt = DATA / fixture / "ckpt"
    tag = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()
    return ckpt / ("release" if tag == "release" else f"iter_{int(tag):07d}")


@functools.cache
def saved(fixture: str) -> dict[str, torch.Tensor]:
    """Every tensor of the torch_dist checkpoint under its global name, whole, by plain ``dcp.load``."""
    reader = dcp.FileSystemReader(checkpoint_directory(fixture))
    state = {key: torch.empty(entry.size, dtype=entry.properties.dtype)
             for key, entry in reader.read_metadata().state_dict_metadata.items()
             if isinstance(entry, TensorStorageMetadata)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(checkpoint_directory(fixture)), no_dist=True)
    return state


@functools.cache
def hf_weights(fixture: str) -> dict[str, torch.Tensor]:
    """The fp32 Megatron weights in LlamaForCausalLM's names (SwiGLU's saved halves joined to ``[gate; up]``)."""
    state = {key: tensor for key, tensor in saved(fixture).items() if "_quantizer" not in key}
    for layer in range(LAYERS):
        fc1 = f"decoder.layers.{layer}.mlp.linear_fc1."
        state[fc1 + "weight"] = torch.cat([state.pop(fc1 + "weight_w"), state.pop(fc1 + "weight_v")])
    return llama_hf_by_hand(state, LAYERS, HEADS, GROUPS, HEAD_DIM)


def qkv_rows(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows in ``linear_qkv``'s order, ``[q heads; k; v]`` per query group, cut to q/k/v like the weight."""
    per_group = HEADS // GROUPS * HEAD_DIM
    grouped = tensor.reshape(GROUPS, per_group + 2 * HEAD_DIM, *tensor.shape[1:])
    q, k, v = grouped.split([per_group, HEAD_DIM, HEAD_DIM], dim=1)
    return {name: t.reshape(-1, *tensor.shape[1:]) for name, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v))}


def fc1_amax_rows(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModelOpt 0.47 saves SwiGLU fc1's per-row amax TP-interleaved, ``[gate_0; up_0; gate_1; up_1]`` (fixture
    README): gate is ``[gate_0; gate_1]``, up ``[up_0; up_1]``."""
    chunks = tensor.chunk(2 * SAVED_TP)
    return {"gate_proj": torch.cat(chunks[0::2]), "up_proj": torch.cat(chunks[1::2])}


LINEARS = {"self_attention.linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
           "self_attention.linear_proj": ("self_attn", ("o_proj",)),
           "mlp.linear_fc1": ("mlp", ("gate_proj", "up_proj")), "mlp.linear_fc2": ("mlp", ("down_proj",))}


@functools.cache
def hf_quantizers(fixture: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per HF linear (``model.layers.L.self_attn.q_proj``), its quantizer tensors (``weight_quantizer._amax``,
    ``input_quantizer._pre_quant_scale``, ...): per-tensor ones shared by the fused group, per-row ones cut."""
    state, out = saved(fixture), {}
    for layer in range(LAYERS):
        for linear, (parent, projections) in LINEARS.items():
            prefix = f"decoder.layers.{layer}.{linear}."
            modules = {p: out.setdefault(f"model.layers.{layer}.{parent}.{p}", {}) for p in projections}
            for key, tensor in state.items():
                if not (key.startswith(prefix) and "_quantizer" in key):
                    continue
                if tensor.dim() == 2 and len(projections) > 1:  # per channel / block: each row is one projection's
                    rows = (qkv_rows if linear.endswith("qkv") else fc1_amax_rows)(tensor)
                else:  # per tensor, or a pre_quant_scale over the shared input
                    rows = dict.fromkeys(projections, tensor)
                for projection, quantizer in modules.items():
                    quantizer[key[len(prefix):]] = rows[projection]
    return out


# -- the formulas, written out from FORMATS.md §1 --------------------------------------------------------

def scale(amax: torch.Tensor, divisor: float, shape: tuple[int, ...]) -> torch.Tensor:
    """``amax / divisor`` in fp32, the divisor a Python float (``get_scaling_factor``)."""
    return (amax.float() / divisor).reshape(shape)


def int8_payload(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``round(W_bf16 / ws[:, None]).clamp(-128, 127)``, the quotient in fp32; torch rounds half to even."""
    return (weight.to(BF16).float() / weight_scale[:, None]).round().clamp(-128, 127).to(torch.int8)


def int4_values(weight: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """``round(W_bf16 / ws_blk).clamp(-8, 7)``, int8 values."""
    per_column = block_scale.repeat_interleave(weight.shape[1] // block_scale.shape[1], dim=1)
    return (weight.to(BF16).float() / per_column).round().clamp(-8, 7).to(torch.int8)


def pack_two_rows_per_byte(values: torch.Tensor) -> torch.Tensor:
    """Row ``2r`` in the low nibble, row ``2r + 1`` in the high one, two's complement (-1 is 0xF)."""
    rows, columns = values.shape
    out = torch.empty(rows // 2, columns, dtype=torch.uint8)
    for r in range(rows // 2):
        low = [int(v) & 0xF for v in values[2 * r]]
        high = [int(v) & 0xF for v in values[2 * r + 1]]
        out[r] = torch.tensor([lo | (hi << 4) for lo, hi in zip(low, high)], dtype=torch.uint8)
    return out


def signed_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    return torch.where(nibbles >= 8, nibbles.int() - 16, nibbles.int())


def unpack_two_rows_per_byte(packed: torch.Tensor) -> torch.Tensor:
    values = torch.empty(packed.shape[0] * 2, packed.shape[1], dtype=torch.int32)
    values[0::2], values[1::2] = signed_nibbles(packed & 0xF), signed_nibbles(packed >> 4)
    return values


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # code 0..7; bit 3 is the sign


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """The nearest grid point to each magnitude, an even code on a tie (round half to even: the even codes have
    mantissa 0), beyond 6 saturating; the sign bit set for every value below zero."""
    distance = (values.abs().reshape(-1, 1) - E2M1).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    even_first = nearest * torch.tensor([2, 1] * 4)  # of two equally near codes (neighbours), the even one wins
    codes = even_first.argmax(dim=1).reshape(values.shape)
    return (codes + 8 * (values < 0)).to(torch.uint8)


def nvfp4_block_scale(weight: torch.Tensor, weight_scale_2: torch.Tensor, block: int) -> torch.Tensor:
    """``clamp(max|W_blk| / (6·ws2), 2^-9, 448)``, 0 → 1, in E4M3, from the fp32 weight."""
    rows, columns = weight.shape
    block_amax = weight.float().abs().reshape(rows, columns // block, block).amax(dim=2)
    ratio = block_amax / (6.0 * weight_scale_2)
    ratio[ratio == 0] = 1.0
    return ratio.clamp(2.0 ** -9, 448.0).to(torch.float8_e4m3fn)


def nvfp4_denominator(block_scale: torch.Tensor, weight_scale_2: torch.Tensor, columns: int) -> torch.Tensor:
    per_block = block_scale.float() * weight_scale_2
    return per_block.repeat_interleave(columns // block_scale.shape[1], dim=1)


def nvfp4_payload(weight: torch.Tensor, block_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of ``W_bf16 / (ws·ws2)`` (fp32), column ``2c`` in the low nibble and ``2c + 1`` in the high one."""
    codes = e2m1_codes(weight.to(BF16).float() / nvfp4_denominator(block_scale, weight_scale_2, weight.shape[1]))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def nvfp4_values(packed: torch.Tensor) -> torch.Tensor:
    codes = torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(packed.shape[0], -1).long()
    return torch.where(codes >= 8, -E2M1[codes % 8], E2M1[codes % 8])


# -- the expected checkpoint ---------------------------------------------------------------------------

WEIGHT_AMAX, INPUT_AMAX, PQS = "weight_quantizer._amax", "input_quantizer._amax", "input_quantizer._pre_quant_scale"
STAGE0, STAGE1 = "weight_quantizer.0._amax", "weight_quantizer.1._amax"


def expected_linear(recipe: Recipe, weight: torch.Tensor, quantizer: dict[str, torch.Tensor],
                    pqs_written: bool) -> dict[str, torch.Tensor]:
    """One HF linear's tensors by FORMATS.md §1 (suffix → tensor)."""
    rows, columns = weight.shape
    if recipe.quant_algo == "NVFP4":
        ws2 = scale(quantizer[WEIGHT_AMAX], 6.0 * 448.0, ())
        blocks = nvfp4_block_scale(weight, ws2, recipe.group_size)
        return {"weight": nvfp4_payload(weight, blocks, ws2), "weight_scale": blocks, "weight_scale_2": ws2,
                "input_scale": scale(quantizer[INPUT_AMAX], 6.0 * 448.0, ())}
    if recipe.quant_algo == "W8A8_SQ_PER_CHANNEL":
        ws = scale(quantizer[WEIGHT_AMAX], 127.0, (rows,))
        out = {"weight": int8_payload(weight, ws), "weight_scale": ws,
               "input_scale": scale(quantizer[INPUT_AMAX], 127.0, ())}
    else:
        blocks = (rows, columns // recipe.group_size)
        ws = scale(quantizer[STAGE0 if recipe.quant_algo == "W4A8_AWQ" else WEIGHT_AMAX], 7.0, blocks)
        out = {"weight": pack_two_rows_per_byte(int4_values(weight, ws)), "weight_scale": ws}
        if recipe.quant_algo == "W4A8_AWQ":
            out |= {"weight_scale_2": scale(quantizer[STAGE1], 448.0, ()),
                    "input_scale": scale(quantizer[INPUT_AMAX], 448.0, ())}
    if pqs_written:
        out["pre_quant_scale"] = quantizer[PQS].to(BF16)
    return out


@functools.cache
def expected(fixture: str) -> dict[str, torch.Tensor]:
    """The whole deployable checkpoint of ``fixture`` exported with ``--dtype bf16``."""
    recipe, weights, quantizers = RECIPES[fixture], hf_weights(fixture), hf_quantizers(fixture)
    out = {name: tensor.to(BF16) for name, tensor in weights.items()}  # norms, embeddings, lm_head as they are
    for module, quantizer in quantizers.items():
        del out[module + ".weight"]
        folded = recipe.quant_algo in AWQ and module.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
        pqs_written = PQS in quantizer and not folded
        for suffix, tensor in expected_linear(recipe, weights[module + ".weight"], quantizer, pqs_written).items():
            out[f"{module}.{suffix}"] = tensor
    if recipe.quant_algo in AWQ:
        for layer in range(LAYERS):
            for norm, fed in FED_BY_NORM.items():  # fuse_prequant_layernorm: norm.w * pqs, then the model dtype
                name = f"model.layers.{layer}.{norm}.weight"
                out[name] = (weights[name] * quantizers[f"model.layers.{layer}.{fed}"][PQS]).to(BF16)
    if recipe.kv_cache == "NVFP4":  # the Megatron exporter's names; NVFP4's divisor, no clamp, 0-d
        state = saved(fixture)
        for layer in range(LAYERS):
            for which in "kv":
                amax = state[f"decoder.layers.{layer}.self_attention.core_attention.{which}_bmm_quantizer._amax"]
                out[f"model.layers.{layer}.self_attn.{which}_scale"] = scale(amax, 6.0 * 448.0, ())
    return out


# -- the export and the comparison ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each fixture exported once (``--dtype bf16``), on first use."""
    root, done = tmp_path_factory.mktemp("modelopt"), {}

    def export(fixture: str) -> Path:
        if fixture not in done:
            out = root / fixture
            run = CliRunner().invoke(app, ["export", "llama", "--megatron", str(DATA / fixture / "ckpt"), "--out",
                                           str(out), "--format", "modelopt", "--config", str(CONFIG), "--dtype", "bf16",
                                           "--quiet"])
            assert run.exit_code == 0, run.output
            done[fixture] = out
        return done[fixture]

    return export


# -- the tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", sorted(RECIPES))
def test_every_tensor_is_the_formula_applied_to_the_checkpoint(exported, fixture):
    """Names, dtypes, shapes and bytes of every tensor: scales bit-equal to amax / divisor, payloads to the
    formulas applied to the weight, pre_quant_scale where FORMATS.md puts it, norms folded or as they are."""
    want, got = expected(fixture), written(exported(fixture))
    assert differences(want, got) == []


def quantized_linears(fixture: str) -> list[str]:
    return sorted(hf_quantizers(fixture))


def test_every_linear_of_both_layers_is_checked():
    assert quantized_linears("int8_sq_tp2") == sorted(f"model.layers.{layer}.{parent}.{projection}"
                                                       for layer in range(LAYERS) for parent, projections in
                                                       (("self_attn", ATTENTION), ("mlp", MLP))
                                                       for projection in projections)


@pytest.mark.parametrize("fixture", sorted(RECIPES))
def test_the_quantizer_rows_are_cut_as_the_weight_rows(fixture):
    """The hand-made split above (q/k/v interleave, fc1 de-interleave) against FORMATS.md's fact that the saved
    (smoothed) weight's own row max (INT8) or block max (INT4, W4A8 stage 0) is its amax exactly, and that
    a per-tensor weight amax (NVFP4, W4A8 stage 1) is the max of the whole fused weight."""
    recipe, weights = RECIPES[fixture], hf_weights(fixture)
    for module, quantizer in hf_quantizers(fixture).items():
        weight = weights[module + ".weight"].abs()
        if recipe.quant_algo == "W8A8_SQ_PER_CHANNEL":
            assert torch.equal(quantizer[WEIGHT_AMAX], weight.amax(dim=1, keepdim=True)), module
        elif recipe.quant_algo in AWQ:
            blocks = weight.reshape(weight.shape[0], -1, recipe.group_size).amax(dim=2)
            assert torch.equal(quantizer[STAGE0 if recipe.quant_algo == "W4A8_AWQ" else WEIGHT_AMAX], blocks), module
        else:
            assert quantizer[WEIGHT_AMAX].shape == (1,), module
    if recipe.quant_algo in ("NVFP4", "W4A8_AWQ"):
        per_tensor = WEIGHT_AMAX if recipe.quant_algo == "NVFP4" else STAGE1
        for layer in range(LAYERS):
            for linear, (parent, projections) in LINEARS.items():
                fused = torch.cat([weights[f"model.layers.{layer}.{parent}.{p}.weight"] for p in projections])
                amax = hf_quantizers(fixture)[f"model.layers.{layer}.{parent}.{projections[0]}"][per_tensor]
                assert float(amax) == float(fused.abs().max()), (layer, linear)


def one_step_error(recipe: Recipe, got: dict[str, torch.Tensor], module: str, weight: torch.Tensor):
    """``(|dequantized - W|, one quantization step)`` elementwise, for the written payload and scales."""
    payload, ws = got[module + ".weight"], got[module + ".weight_scale"]
    if recipe.quant_algo == "NVFP4":
        denominator = nvfp4_denominator(ws, got[module + ".weight_scale_2"], weight.shape[1])
        dequantized = nvfp4_values(payload) * denominator
        magnitude = weight.abs() / denominator  # on the grid's scale: steps of .5 below 2, 1 below 4, then 2
        step = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0)) * denominator
    elif recipe.quant_algo == "W8A8_SQ_PER_CHANNEL":
        dequantized, step = payload.float() * ws[:, None], ws[:, None].expand_as(weight)
    else:
        step = ws.repeat_interleave(weight.shape[1] // ws.shape[1], dim=1)
        dequantized = unpack_two_rows_per_byte(payload).float() * step
    return (dequantized - weight).abs(), step


@pytest.mark.parametrize("fixture", sorted(RECIPES))
def test_every_payload_dequantizes_to_within_one_step_of_the_megatron_weight(exported, fixture):
    recipe, weights, got = RECIPES[fixture], hf_weights(fixture), written(exported(fixture))
    for module in quantized_linears(fixture):
        error, step = one_step_error(recipe, got, module, weights[module + ".weight"])
        assert (error <= step).all(), (module, float((error / step).max()))
        assert 0 < error.max(), module  # quantized, not copied


@pytest.mark.parametrize("fixture", sorted(RECIPES))
def test_pre_quant_scale_and_norms_follow_the_fused_groups(exported, fixture):
    """AWQ / W4A8: pre_quant_scale only on o_proj and down_proj, q/k/v's and gate/up's folded into the norm
    before them (``norm_w * pqs``, then bf16); SmoothQuant: on every linear, norms as they are; plain INT8 and
    NVFP4: none, norms as they are."""
    recipe, weights, got = RECIPES[fixture], hf_weights(fixture), written(exported(fixture))
    with_pqs = sorted(name.rpartition(".")[0] for name in got if name.endswith(".pre_quant_scale"))
    if recipe.quant_algo in AWQ:
        assert with_pqs == sorted(f"model.layers.{layer}.{projection}" for layer in range(LAYERS)
                                  for projection in ("self_attn.o_proj", "mlp.down_proj"))
    elif fixture == "int8_sq_tp2":
        assert with_pqs == quantized_linears(fixture)
    else:
        assert with_pqs == []
    quantizers = hf_quantizers(fixture)
    for layer in range(LAYERS):
        for norm, fed in FED_BY_NORM.items():
            name, group = f"model.layers.{layer}.{norm}.weight", f"model.layers.{layer}.{fed}"
            if recipe.quant_algo in AWQ:
                folded = (weights[name] * quantizers[group][PQS]).to(BF16)
                assert bits(got[name]) == bits(folded) and not torch.equal(folded, weights[name].to(BF16)), name
            else:
                assert bits(got[name]) == bits(weights[name].to(BF16)), name
    for module in with_pqs:
        assert bits(got[module + ".pre_quant_scale"]) == bits(quantizers[module][PQS].to(BF16)), module


HF_QUANT = {"NVFP4": {"group_size": 16}, "W8A8_SQ_PER_CHANNEL": {},
            "W4A16_AWQ": {"group_size": 32, "has_zero_point": False, "pre_quant_scale": True},
            "W4A8_AWQ": {"group_size": 32, "has_zero_point": False, "pre_quant_scale": True}}
NVFP4_GROUPS = {"group_0": {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                            "targets": ["Linear"]}}


@pytest.mark.parametrize("fixture", sorted(RECIPES))
def test_hf_quant_config_and_quantization_config_name_the_recipe(exported, fixture):
    """FORMATS.md §4.1: ``hf_quant_config.json`` as ModelOpt's ``get_quant_config`` writes it; ``config.json``
    is the model's config plus ``convert_hf_quant_config_format`` of it (config groups for NVFP4 only, the
    NVFP4 KV scheme a bare string)."""
    recipe, out = RECIPES[fixture], exported(fixture)
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    excluded = ["lm_head", "model.embed_tokens"]
    assert hf_quant == {"producer": {"name": "modelopt", "version": "0.47.0"},
                        "quantization": {"quant_algo": recipe.quant_algo, "kv_cache_quant_algo": recipe.kv_cache,
                                         **HF_QUANT[recipe.quant_algo], "exclude_modules": excluded}}
    config = json.loads((out / "config.json").read_text())
    block = config.pop("quantization_config")
    assert config == json.loads(CONFIG.read_text())
    want = {"ignore": excluded, "quant_algo": recipe.quant_algo, "producer": hf_quant["producer"],
            "quant_method": "modelopt"}
    if recipe.quant_algo == "NVFP4":
        want |= {"config_groups": NVFP4_GROUPS, "kv_cache_scheme": "NVFP4"}
    assert block == want


@pytest.mark.parametrize(("fixture", "nudged"), [("w4a8_awq_bs32_tp2", "model.layers.1.mlp.up_proj.weight_scale"),
                                                 ("nvfp4_kv_tp2", "model.layers.0.self_attn.k_proj.weight_scale_2")])
def test_a_written_scale_one_ulp_off_is_reported_by_name(exported, tmp_path, fixture, nudged):
    """The negative control: a copy of the export with one element of one scale moved by one ulp is exactly
    one difference, that tensor's."""
    copy = tmp_path / "copy"
    shutil.copytree(exported(fixture), copy)
    for path in copy.glob("*.safetensors"):
        tensors = load_file(path)
        if nudged in tensors:
            flat = tensors[nudged].reshape(-1).clone()
            flat[-1] = torch.nextafter(flat[-1], torch.tensor(float("inf")))
            tensors[nudged] = flat.reshape(tensors[nudged].shape)
            save_file(tensors, path, metadata={"format": "pt"})
    assert differences(expected(fixture), written(copy)) == [nudged]


# -- the reference itself, by hand (no fixture has a tie or an all-zero block to exercise these) ---------------

def test_e2m1_reference_rounds_to_the_nearest_with_ties_to_the_even_code_and_saturates():
    values = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 0.26, 2.6, -0.1, -0.0, -6.0])
    assert e2m1_codes(values).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 1, 5, 8, 0, 15]


def test_int4_reference_packs_two_output_rows_per_byte():
    values = torch.tensor([[-8, 7, -1], [1, -2, 0]], dtype=torch.int8)
    packed = pack_two_rows_per_byte(values)
    assert packed.tolist() == [[0x18, 0xE7, 0x0F]]
    assert torch.equal(unpack_two_rows_per_byte(packed), values.int())


def test_nvfp4_reference_block_scale_clamps_and_maps_zero_to_one():
    weight = torch.zeros(1, 48)
    weight[0, 16:32], weight[0, 32] = 1e-6, 1e4  # a zero block, one below 2^-9, one above 448
    assert nvfp4_block_scale(weight, torch.tensor(1.0), 16).float().tolist() == [[1.0, 2.0 ** -9, 448.0]]


# -- uncalibrated quantizers --------------------------------------------------------------------------

PROJ_INPUT = "decoder.layers.{}.self_attention.linear_proj.input_quantizer._amax"


def resaved(tmp_path: Path, fixture: str, edit) -> Path:
    """A copy of ``fixture``'s checkpoint (modelopt_state and all) whose tensors are ``edit(state)``, saved again
    with plain ``dcp.save``."""
    source = checkpoint_directory(fixture)
    shutil.copytree(source.parent, tmp_path / "ckpt")
    directory = tmp_path / "ckpt" / source.name
    for path in [*directory.glob("*.distcp"), directory / ".metadata"]:
        path.unlink()
    dcp.save(edit(dict(saved(fixture))), storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    return tmp_path / "ckpt"


def export_modelopt(checkpoint: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["export", "llama", "--megatron", str(checkpoint), "--out", str(out), "--format",
                                    "modelopt", "--config", str(CONFIG), *extra])


def test_a_zero_amax_is_written_with_modelopts_bound_reported_and_refused_under_strict(tmp_path):
    """FORMATS.md §1: ``_sanitize_export_amax`` turns a zero amax into maxbound, so the FP8 scale is 448/448."""
    checkpoint = resaved(tmp_path, "fp8_kv_tp1", lambda state: state | {PROJ_INPUT.format(1): torch.zeros(1)})
    run = export_modelopt(checkpoint, tmp_path / "out")
    assert run.exit_code == 0, run.output
    assert "with a zero amax (uncalibrated)" in run.output
    got = written(tmp_path / "out")
    assert bits(got["model.layers.1.self_attn.o_proj.input_scale"]) == bits(torch.ones(1))
    calibrated = scale(saved("fp8_kv_tp1")[PROJ_INPUT.format(0)], 448.0, (1,))
    assert bits(got["model.layers.0.self_attn.o_proj.input_scale"]) == bits(calibrated)
    strict = export_modelopt(checkpoint, tmp_path / "strict", "--strict")
    assert strict.exit_code != 0 and PROJ_INPUT.format(1) in strict.output and "Traceback" not in strict.output
    assert not (tmp_path / "strict").exists()


def test_strict_refuses_a_quantizer_the_recipe_enables_without_an_amax(tmp_path):
    """The recipe (modelopt_state) enables o_proj's input quantizer in both layers; the checkpoint has no amax
    for it: ``--strict`` refuses by name and writes nothing; without it the export reports both."""
    checkpoint = resaved(tmp_path, "fp8_kv_tp1", lambda state: {key: tensor for key, tensor in state.items()
                                                  if key not in (PROJ_INPUT.format(0), PROJ_INPUT.format(1))})
    strict = export_modelopt(checkpoint, tmp_path / "strict", "--strict")
    assert strict.exit_code != 0 and "Traceback" not in strict.output
    assert "hold no amax" in strict.output and "model.layers.1.self_attn.o_proj.input_quantizer._amax" in strict.output
    assert not (tmp_path / "strict").exists()
    lenient = export_modelopt(checkpoint, tmp_path / "out")
    assert lenient.exit_code == 0 and "2 x model.layers.*.self_attn.o_proj.input_quantizer._amax" in lenient.output


def test_the_folded_norm_is_rounded_once_to_the_model_dtype(tmp_path):
    """The fixtures' norms are all 1.0, which hides how the fold rounds: with other norm weights, the written
    norm is ``(norm_w · pqs)`` in fp32 rounded once to bf16 (not the product of the two bf16 roundings)."""
    generator = torch.Generator().manual_seed(0)
    norms = {key: 1 + 0.3 * torch.randn(tensor.shape, generator=generator)
             for key, tensor in saved("w4a8_awq_bs32_tp2").items() if key.endswith(".layer_norm_weight")}
    checkpoint = resaved(tmp_path, "w4a8_awq_bs32_tp2", lambda state: state | norms)
    run = export_modelopt(checkpoint, tmp_path / "out", "--dtype", "bf16")
    assert run.exit_code == 0, run.output
    got, rounded_twice_differs = written(tmp_path / "out"), 0
    for layer in range(LAYERS):
        for norm, linear in (("input_layernorm", "self_attention.linear_qkv"),
                             ("post_attention_layernorm", "mlp.linear_fc1")):
            weight = norms[f"decoder.layers.{layer}.{linear}.layer_norm_weight"]
            pqs = saved("w4a8_awq_bs32_tp2")[f"decoder.layers.{layer}.{linear}.{PQS}"]
            folded = (weight * pqs).to(BF16)
            assert bits(got[f"model.layers.{layer}.{norm}.weight"]) == bits(folded), (layer, norm)
            rounded_twice_differs += not torch.equal(weight.to(BF16) * pqs.to(BF16), folded)
    assert rounded_twice_differs  # this check tells the two apart
