"""Shared by the weight tests: a model's tensors laid out by hand as Megatron-Core shards them, written
as quantmap's shard directory. Written out from Megatron's documented layout, never with quantmap's own
ops, so that an export is checked against an independent reference."""

from __future__ import annotations

import torch

from quantmap.executor import ParallelLayout
from quantmap.executor.naming import to_local
from quantmap.io.shards import save_shard


def tp_piece(name: str, tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Megatron's tensor-parallel shard, written out by hand: column-parallel layers split their output
    rows (``linear_fc1`` within each of gate and up: rank r holds ``[gate_r; up_r]``; the vocab-parallel
    embedding and output layer their vocabulary rows), row-parallel ones their input columns; norms (TE-fused
    ``layer_norm_weight`` or the local spec's ``*_layernorm``), the MoE router and scalars are whole on every rank."""
    if tensor.dim() == 0 or "layer_norm" in name or "layernorm" in name or ".router." in name or (
            "_quantizer" in name and tensor.numel() == 1):
        return tensor
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return tensor.chunk(tp, dim=1)[rank]
    if name.endswith("linear_fc1.weight"):
        gate, up = tensor.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return tensor.chunk(tp)[rank]  # linear_qkv (whole query groups per rank), embedding and output layer rows


def write_shards(directory, state: dict[str, torch.Tensor], layout: ParallelLayout,
                 quantizers_only: bool = False, recipe: list | None = None) -> None:
    """``state`` (global names, unsharded) as a shard directory of ``layout``: each rank's local names and pieces
    (and ``recipe``, ModelOpt's quant_cfg, recorded beside them)."""
    for rank in range(layout.world_size):
        coords = layout.coords(rank)
        local = {}
        for name, tensor in state.items():
            local_name = to_local(name, layout, coords)
            if local_name is not None:
                local[local_name] = tp_piece(name, tensor, layout.tp, coords.tp).contiguous()
        save_shard(local, layout, directory, rank=rank, quantizers_only=quantizers_only, recipe=recipe)


def megatron_llama(hf: dict[str, torch.Tensor], layers: int, heads: int, groups: int) -> dict[str, torch.Tensor]:
    """A Hugging Face Llama's tensors as one (TP=1) Megatron-Core model holds them: TE-fused norms, QKV
    interleaved per query group (``[q heads of group g; k_g; v_g]``), ``linear_fc1 = [gate; up]``."""
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for layer in range(layers):
        h, m = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        q, k, v = (hf[h + f"self_attn.{x}_proj.weight"] for x in "qkv")
        hidden = q.shape[1]
        per_group = [t.reshape(groups, -1, hidden) for t in (q, k, v)]
        out |= {m + "self_attention.linear_qkv.weight": torch.cat(per_group, dim=1).reshape(-1, hidden),
                m + "self_attention.linear_qkv.layer_norm_weight": hf[h + "input_layernorm.weight"],
                m + "self_attention.linear_proj.weight": hf[h + "self_attn.o_proj.weight"],
                m + "mlp.linear_fc1.weight": torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]),
                m + "mlp.linear_fc1.layer_norm_weight": hf[h + "post_attention_layernorm.weight"],
                m + "mlp.linear_fc2.weight": hf[h + "mlp.down_proj.weight"]}
    return out


def llama_hf_by_hand(state: dict[str, torch.Tensor], layers: int, heads: int, groups: int,
                     head_dim: int) -> dict[str, torch.Tensor]:
    """A Llama's weights in transformers' names, from Megatron-Core's single-rank state_dict form, written out
    from the documented layout: q/k/v cut from each query group's ``[q heads of the group; k; v]`` rows of
    ``linear_qkv``, gate/up the two halves of ``linear_fc1``, the TE-fused norms to the layer norms. (The
    embedding and output layer are renamed where ``state`` holds them.)"""
    per_group = heads // groups * head_dim
    renamed = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
               "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}
    out = {hf: state[megatron] for megatron, hf in renamed.items() if megatron in state}
    for layer in range(layers):
        m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        qkv = state[m + "self_attention.linear_qkv.weight"]
        grouped = qkv.reshape(groups, per_group + 2 * head_dim, qkv.shape[1])
        q, k, v = grouped.split([per_group, head_dim, head_dim], dim=1)
        gate, up = state[m + "mlp.linear_fc1.weight"].chunk(2)
        out |= {h + "self_attn.q_proj.weight": q.reshape(-1, qkv.shape[1]),
                h + "self_attn.k_proj.weight": k.reshape(-1, qkv.shape[1]),
                h + "self_attn.v_proj.weight": v.reshape(-1, qkv.shape[1]),
                h + "self_attn.o_proj.weight": state[m + "self_attention.linear_proj.weight"],
                h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                h + "mlp.down_proj.weight": state[m + "mlp.linear_fc2.weight"],
                h + "input_layernorm.weight": state[m + "self_attention.linear_qkv.layer_norm_weight"],
                h + "post_attention_layernorm.weight": state[m + "mlp.linear_fc1.layer_norm_weight"]}
    return out
