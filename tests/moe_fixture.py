"""Shared by the deployable-format tests: the one MoE there is weights for. No MoE torch_dist checkpoint with
weights exists, so this is a SequentialMLP MoE (Mixtral-like: 2 layers, 4 experts, local-spec norm names) as one
Megatron-Core rank holds it: a real quantizer state ModelOpt calibrated (``tests/data/megatron``), seeded random
weights of the model's parameter shapes, and the recipe it was quantized with."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

MEGATRON = Path(__file__).parent / "data" / "megatron"
#: The HF config the MoE exports with (the ``mixtral`` spec): MixtralForCausalLM of the same shapes.
MIXTRAL = Path(__file__).parent / "data" / "dcp" / "reference" / "hf_config_moe_mixtral.json"
LAYERS, EXPERTS = 2, 4


def moe_state(recipe: str = "fp8_default_kv") -> tuple[dict[str, torch.Tensor], list]:
    """The MoE's global (TP1) state and recipe (ModelOpt's ``quant_cfg`` list) as calibrated with ``recipe``
    (``fp8_default_kv`` or ``int8_default``); the weights are the same for every recipe (seed 0)."""
    record = json.loads((MEGATRON / f"state_{recipe}_moeseq_tp1.json").read_text())
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) / 8 for name, shape in record["parameters"].items()}
    return state | load_file(MEGATRON / f"state_{recipe}_moeseq_tp1.safetensors"), record["quant_cfg"]["quant_cfg"]
