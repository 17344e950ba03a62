"""Shared by the executor tests: a tiny synthetic model's quantizer state, the way Megatron shards it,
and a launcher that runs a function on N real gloo processes and brings back each rank's outcome."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch

import quantmap
from quantmap.executor import ParallelLayout
from quantmap.executor.launch import spawn
from quantmap.executor.naming import is_expert, to_local

SPECS = Path(__file__).parent / "data" / "specs"


def rules_for(form: str, num_experts: int | None = None, hf_naming: str = "on-disk"):
    if form == "dense":
        return quantmap.compile(SPECS / "dense_mla.yaml")
    if form == "grouped":
        return quantmap.compile(SPECS / "moe_grouped.yaml", hf_naming, num_experts=num_experts)
    if form == "grouped_per_expert":
        return quantmap.compile(SPECS / "moe_grouped_per_expert.yaml", hf_naming, num_experts=num_experts)
    if hf_naming == "in-memory":  # SequentialMLP in memory: the shipped spec
        return quantmap.compile("qwen3_moe", hf_naming, num_experts=num_experts)
    return quantmap.compile(SPECS / "moe_seq.yaml")


def _amax(generator) -> torch.Tensor:
    return torch.rand((), generator=generator) * 4 + 0.01


def global_state(form: str, num_layers: int, num_experts: int | None = None, seed: int = 0,
                 channels: int = 8) -> dict[str, torch.Tensor]:
    """The unsharded (TP=PP=EP=1) state under global names: per-tensor amax everywhere, KV-cache amax,
    a per-channel amax on a column-parallel projection (dense form), some weights and a router
    (which the rules do not claim). Forms: ``dense``, ``seq`` (SequentialMLP experts), ``grouped``
    (TEGroupedMLP, ModelOpt <= 0.46: one weight quantizer per grouped linear) and ``grouped_per_expert``
    (ModelOpt 0.47: ``linear_fc1.weight_quantizer.{E}``, one shared input quantizer)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(num_layers):
        p = f"decoder.layers.{layer}."
        modules = ["self_attention.linear_qkv", "self_attention.linear_proj"]
        if form == "dense":
            modules += ["mlp.linear_fc1", "mlp.linear_fc2"]
            state[p + "self_attention.linear_q_up_proj.weight_quantizer._amax"] = torch.rand((channels * 2, 1), generator=g)
            state[p + "self_attention.linear_q_up_proj.input_quantizer._amax"] = _amax(g)
        elif form in ("grouped", "grouped_per_expert"):
            modules += ["mlp.experts.linear_fc1", "mlp.experts.linear_fc2"]
            for expert in range(num_experts):
                state[p + f"mlp.experts.linear_fc1.weight{expert}"] = torch.randn(4, 2, generator=g)
        else:
            modules += [f"mlp.experts.local_experts.{e}.linear_fc{i}" for e in range(num_experts) for i in (1, 2)]
        for module in modules:
            if form == "grouped_per_expert" and ".experts." in module:
                for expert in range(num_experts):
                    state[p + module + f".weight_quantizer.{expert}._amax"] = _amax(g)
            else:
                state[p + module + ".weight_quantizer._amax"] = _amax(g)
            state[p + module + ".input_quantizer._amax"] = _amax(g)
        state[p + "self_attention.core_attention.k_bmm_quantizer._amax"] = _amax(g)
        state[p + "self_attention.core_attention.v_bmm_quantizer._amax"] = _amax(g)
        state[p + "self_attention.linear_qkv.weight"] = torch.randn(4, 2, generator=g)
        if form != "dense":
            state[p + "mlp.router.weight"] = torch.randn(num_experts, 2, generator=g)
    return state


def shard(state: dict[str, torch.Tensor], layout: ParallelLayout) -> list[dict[str, torch.Tensor]]:
    """Each global rank's local state, as Megatron holds it: its stage's layers renumbered from 0,
    its expert block renumbered from 0, scalars replicated, per-channel column amax split on dim 0."""
    out = []
    for rank in range(layout.world_size):
        coords = layout.coords(rank)
        local_state = {}
        for name, tensor in state.items():
            local = to_local(name, layout, coords)
            if local is None:
                continue
            size, index = (layout.etp, coords.etp) if is_expert(name) else (layout.tp, coords.tp)
            if tensor.dim() and "_quantizer." in name:
                tensor = tensor.chunk(size, 0)[index]
            local_state[local] = tensor.clone()
        out.append(local_state)
    return out


def quantizers(state: dict) -> dict:
    return {k: v for k, v in state.items() if "_quantizer." in k}


def run_ranks(world: int, fn, *args) -> list[tuple]:
    """Run ``fn(*args)`` on ``world`` real gloo processes; each rank's ("ok", value) or ("error", message, tb)."""
    return spawn(world, fn, args, timeout=timedelta(seconds=60))


def values_of_every_rank(world: int, fn, *args) -> list:
    """Each rank's value of ``fn(*args)`` on ``world`` gloo processes; a failing rank fails the test with its traceback."""
    outcomes = run_ranks(world, fn, *args)
    for rank, outcome in enumerate(outcomes):
        assert outcome[0] == "ok", f"rank {rank}: {outcome[1]}\n{outcome[2]}"
    return [outcome[1] for outcome in outcomes]
