"""Every shipped spec moves a whole model both ways: a tiny Hugging Face model of its architecture, built
with ``from_config``, laid out as Megatron tensor-parallel ranks (TP=2) by ``quantmap import --format hf``
and exported again with ``quantmap export --format hf``, is the same model bit for bit; and the Megatron
side holds the names and shapes the spec documents (every name claimed, each HF tensor's rows on its ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import quantmap
from quantmap.cli import app, spec_params
from quantmap.executor.naming import to_global
from quantmap.io.shards import LazyShard, rank_file
from quantmap.parallel import ParallelLayout
from test_specs_hf import ARCHS, PARAMS, build, variants

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # builds 27 real transformers models


def cli(*args: str) -> str:
    run = CliRunner().invoke(app, [*args, "--quiet"])
    assert run.exit_code == 0, run.output
    return run.output


def saved(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for path in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(path).items()}


@pytest.mark.parametrize("arch, variant", [(arch, i) for arch in ARCHS for i in range(len(variants(arch)))])
def test_a_tiny_model_goes_to_megatron_tp2_and_back_bit_for_bit(arch, variant, tmp_path):
    torch.manual_seed(0)
    config = variants(arch)[variant]
    hf, meg, back = tmp_path / "hf", tmp_path / "megatron", tmp_path / "back"
    build(arch, config).save_pretrained(hf)
    params = spec_params(arch, [f"{k}={v}" for k, v in PARAMS.get(arch, {}).items()], str(hf / "config.json"))
    layers = params.get("num_layers", config.get_text_config().num_hidden_layers)
    layout = ParallelLayout(tp=2, num_layers=layers, num_experts=params.get("num_experts"))
    layout.write(tmp_path)
    given = [arg for name, value in PARAMS.get(arch, {}).items() for arg in ("-p", f"{name}={value}")]
    cli("import", arch, "--hf", str(hf), "--layout", str(tmp_path / "layout.json"), "--out", str(meg),
        "--format", "hf", "--config", str(hf / "config.json"), *given)
    cli("export", arch, "--megatron", str(meg), "--out", str(back), "--format", "hf", "--like", str(hf), *given)

    original, again = saved(hf), saved(back)
    assert sorted(again) == sorted(original)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name].view(torch.uint8) if tensor.dim() else
                                                                 again[name], tensor.view(torch.uint8) if tensor.dim()
                                                                 else tensor), name
    # The Megatron side: every global name is a weight the spec maps, and its global shape (the ranks' pieces
    # joined on the dim its `parallel` splits) is the HF parts' rows joined, as the spec's mapping documents.
    rules = quantmap.compile(arch, **params)
    pieces: dict[str, list[torch.Size]] = {}
    for rank in range(layout.world_size):
        shard = LazyShard(rank_file(meg, rank))
        for local in shard:
            pieces.setdefault(to_global(local, layout, layout.coords(rank)), []).append(shard.tensor_spec(local)[1])
    # A fused-experts HF tensor (gpt-oss's gate_up_proj) stands for one Megatron tensor per expert.
    expected = set()
    for name in original:
        match = rules.to_megatron(name)
        expected.update(match.source_names(range(layout.num_experts)) if match.rule.fans_in else (match.megatron,))
    assert set(pieces) == expected
    for name, shapes in pieces.items():
        match = rules.to_hf(name)
        assert match is not None and match.kind == "weight", name
        if len(set(shapes)) != 1:
            continue  # a replicated copy: the round trip above checks it
        split = {"column": 0, "row": 1}.get(match.rule.parallel)
        whole = list(shapes[0])
        ranks = layout.etp * layout.edp if match.rule.expert_capture is not None else layout.tp * layout.dp
        if split is not None and len(whole) > split and layout.tp > 1 and len(shapes) == ranks:
            whole[split] *= layout.tp
        if match.rule.expert_capture is not None:
            # One expert of the stack: the HF tensor's shape past its expert axis, [in, out] where the spec
            # declares the HF tensor transposed (hf_layout: [transposed]).
            (stacked,) = [original[hf_name].shape for hf_name in match.hf]
            transposed = any(op.to_json()["op"] == "transpose" for op in match.rule.layout.ops)
            assert stacked[0] == layout.num_experts and whole == list(stacked[1:])[::-1 if transposed else 1], (
                name, whole, stacked)
            continue
        parts = [original[hf_name].shape for hf_name in match.hf if hf_name in original]
        if len(parts) == len(match.hf) and all(len(p) == len(parts[0]) for p in parts) and parts[0]:
            assert whole == [sum(p[0] for p in parts), *parts[0][1:]] or whole == list(parts[0]), (name, whole, parts)
