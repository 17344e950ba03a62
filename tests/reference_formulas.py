"""Shared by the compressed-tensors tests: the quantization formulas and Megatron's fused QKV rows, written out
here from FORMATS.md and Megatron's documented layout, independently of quantmap (``quantmap.quantize``), so that
what an export wrote is checked against something quantmap did not compute. Each formula returns the weight as
compressed-tensors 0.20.1 dequantizes it."""

from __future__ import annotations

import torch

#: Every fixture model's attention (the dense Llama and the Mixtral-like MoE): query heads, KV heads, head size.
HEADS, KV_HEADS, HEAD = 4, 2, 16


def fp8(weight, amax):
    scale = amax.float().reshape(()) / 448
    return (weight / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def int8(weight, amax):
    scale = amax.float().reshape(-1, 1) / 127
    return (weight / scale).round().clamp(-128, 127) * scale


def int4(weight, amax):
    rows, columns = weight.shape
    scale = amax.float().reshape(rows, -1) / 7
    block = columns // scale.shape[1]
    values = (weight / scale.repeat_interleave(block, dim=1)).round().clamp(-8, 7)
    return (values.reshape(rows, -1, block) * scale[..., None]).reshape(rows, columns)


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1(values):
    """Round to the FP4 grid, ties to the even code, saturating at 6."""
    distance = (values.abs().clamp(max=6)[..., None] - E2M1).abs()
    code = distance.argmin(-1)
    upper = (code + 1).clamp(max=7)
    tie = (distance.gather(-1, upper[..., None])[..., 0] == distance.gather(-1, code[..., None])[..., 0])
    code = torch.where(tie & (code % 2 == 1) & (upper != code), upper, code)
    return E2M1[code] * torch.where(values < 0, -1.0, 1.0)


def e2m1_unpacked(packed: torch.Tensor) -> torch.Tensor:
    """The E2M1 values of a packed FP4 payload (two codes a byte, the low nibble the even column; bit 3 the
    sign), as float32."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    return E2M1[codes & 7] * torch.where(codes & 8 > 0, -1.0, 1.0)


def nvfp4_parts(weight, amax):
    """ModelOpt's NVFP4 quantization of ``weight`` under its per-tensor ``amax``: the E2M1 values, the E4M3 block
    scales (one per 16 input columns) and compressed-tensors' ``global_scale = 6·448 / amax``; the weight they
    stand for is ``values · block_scale / global_scale``."""
    rows, columns = weight.shape
    scale_2 = amax.float().reshape(()) / 2688
    blocks = weight.abs().reshape(rows, -1, 16).amax(-1) / (6 * scale_2)
    blocks = torch.where(blocks == 0, torch.ones_like(blocks), blocks).clamp(2 ** -9, 448).to(torch.float8_e4m3fn)
    values = e2m1(weight / (blocks.float() * scale_2).repeat_interleave(16, dim=1))
    return values, blocks, 2688 / amax.float().reshape(1)


def nvfp4(weight, amax):
    """ModelOpt's NVFP4 quantization, dequantized as compressed-tensors 0.20.1 does: ``value · (block_scale /
    global_scale)``, the product rounded to bfloat16 (its FP4 unpacking dtype) before the model's dtype."""
    values, blocks, global_scale = nvfp4_parts(weight, amax)
    rows, columns = weight.shape
    return (values.reshape(rows, -1, 16) * (blocks.float() / global_scale)[..., None]).reshape(rows, columns) \
        .to(torch.bfloat16).float()


FORMULAS = {"fp8": fp8, "int8": int8, "int4": int4, "nvfp4": nvfp4}


def qkv_parts(rows: torch.Tensor) -> list[torch.Tensor]:
    """q, k and v of Megatron's fused QKV rows: per query group, its query heads' rows, then k's, then v's."""
    grouped = rows.reshape(KV_HEADS, -1, HEAD, rows.shape[1])
    return [grouped[:, :-2].reshape(-1, rows.shape[1]), grouped[:, -2].reshape(-1, rows.shape[1]),
            grouped[:, -1].reshape(-1, rows.shape[1])]


def unquantized_hf(state: dict[str, torch.Tensor], layers: int, norms: tuple[str, str],
                   router: bool = False) -> dict[str, torch.Tensor]:
    """The tensors no recipe quantizes, under transformers' Llama/Mixtral names: the embedding, final norm and
    output layer, each layer's two norms (``norms``: their Megatron names under the layer, TE-fused
    ``self_attention.linear_qkv.layer_norm_weight`` or the local spec's ``input_layernorm.weight``) and, for
    an MoE, its router."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"], "lm_head.weight": state["output_layer.weight"]}
    for layer in range(layers):
        megatron, hf = f"decoder.layers.{layer}", f"model.layers.{layer}"
        out[f"{hf}.input_layernorm.weight"] = state[f"{megatron}.{norms[0]}"]
        out[f"{hf}.post_attention_layernorm.weight"] = state[f"{megatron}.{norms[1]}"]
        if router:
            out[f"{hf}.mlp.gate.weight"] = state[f"{megatron}.mlp.router.weight"]
    return out
