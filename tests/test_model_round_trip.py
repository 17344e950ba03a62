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


def _gpt_oss(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    build("gpt_oss", variants("gpt_oss")[0]).save_pretrained(hf)
    return hf, saved(hf)


def _laid_out(tmp_path: Path, hf: Path, name: str, layout: ParallelLayout) -> Path:
    """``hf`` laid out as Megatron shards of ``layout`` by quantmap's own import."""
    (tmp_path / name).mkdir()
    layout.write(tmp_path / name)
    meg = tmp_path / name / "megatron"
    cli("import", "gpt_oss", "--hf", str(hf), "--layout", str(tmp_path / name / "layout.json"), "--out", str(meg),
        "--format", "hf", "--config", str(hf / "config.json"))
    return meg


def test_gpt_oss_laid_out_over_expert_parallel_ranks_exports_the_same_bytes_as_one_rank(tmp_path):
    """The fused experts of one HF tensor (gate_up_proj: 4 experts stacked) come from two expert-parallel
    ranks, two experts each, and from expert-tensor-parallel pieces: every layout exports the same files,
    byte for byte, as one rank does."""
    hf, original = _gpt_oss(tmp_path)
    layers = 2
    layouts = {"one": ParallelLayout(num_layers=layers, num_experts=4),
               "ep2": ParallelLayout(dp=2, ep=2, num_layers=layers, num_experts=4),
               "tp2_ep2_etp1": ParallelLayout(tp=2, ep=2, etp=1, num_layers=layers, num_experts=4),
               "tp2_etp2": ParallelLayout(tp=2, num_layers=layers, num_experts=4)}
    exported = {}
    for name, layout in layouts.items():
        meg = _laid_out(tmp_path, hf, name, layout)
        if layout.ep > 1:  # each EP rank holds its own two experts, under local indices 0 and 1
            held = [{local for local in LazyShard(rank_file(meg, rank)) if "local_experts" in local}
                    for rank in range(layout.world_size)]
            assert all(any(".local_experts.1." in n for n in h) and not any(".local_experts.2." in n for n in h)
                       for h in held)
        out = tmp_path / name / "back"
        cli("export", "gpt_oss", "--megatron", str(meg), "--out", str(out), "--format", "hf", "--like", str(hf))
        exported[name] = {path.name: path.read_bytes() for path in sorted(out.iterdir()) if path.is_file()}
    assert all(files == exported["one"] for files in exported.values())
    assert saved(tmp_path / "one" / "back").keys() == original.keys()


def test_a_fused_experts_tensor_short_of_an_expert_is_refused_by_name(tmp_path):
    """An EP rank whose shard lacks one expert's weight: the stacked HF tensor would lack it, so the export
    names the tensor and the expert, and writes nothing."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    hf, _ = _gpt_oss(tmp_path)
    layout = ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4)
    meg = _laid_out(tmp_path, hf, "ep2", layout)
    path = rank_file(meg, 1)
    metadata = safe_open(path, "pt").metadata()  # the rank's coordinates
    state = load_file(path)
    del state["decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"]  # EP rank 1's expert 2
    save_file(state, path, metadata=metadata)
    run = CliRunner().invoke(app, ["export", "gpt_oss", "--megatron", str(meg), "--out", str(tmp_path / "back"),
                                   "--format", "hf", "--like", str(hf), "--quiet"])
    assert run.exit_code != 0
    assert "model.layers.1.mlp.experts.down_proj stacks the weights of 4 experts" in run.output
    assert "lacking expert(s) 2" in run.output, run.output
    assert not (tmp_path / "back").exists()
