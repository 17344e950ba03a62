"""Fan-in rules through the executor: many Megatron quantizers, one HF quantizer (transformers v5 in-memory
naming), on real gloo groups at EP=2 and EP=4 and in the offline mode.

Sources are SequentialMLP's per-expert input quantizers (``local_experts.{E}...input_quantizer``) and a
grouped linear's shared input quantizer, which each expert-parallel rank calibrates on its own tokens (so
the EP ranks' copies differ here, as they do in a real run). Export writes their max and reports that
they differ; import copies the HF tensor to every source; ModelOpt 0.47's per-expert grouped weight
quantizers move one to one, renumbered from each EP rank's local index."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from executor_support import global_state, quantizers, rules_for, shard, values_of_every_rank
import quantmap
from quantmap.executor import ExecutorError, ParallelLayout, export_offline, import_offline
from quantmap.executor.naming import is_expert, to_global
from quantmap.io.hf import Checkpoint
from quantmap.io.shards import LazyShard, rank_file
from quantmap.rules import FAN_IN

NUM_LAYERS, NUM_EXPERTS = 2, 8
SCENARIOS = {
    2: [("EP2", "seq", "in-memory", dict(dp=2, ep=2)),
        ("EP2", "grouped_per_expert", "in-memory", dict(dp=2, ep=2)),
        ("EP2", "grouped", "in-memory", dict(dp=2, ep=2))],
    4: [("EP4", "seq", "in-memory", dict(dp=4, ep=4)),
        ("EP4", "grouped_per_expert", "in-memory", dict(dp=4, ep=4)),
        ("TP2xEP2", "grouped_per_expert", "in-memory", dict(tp=2, dp=2, ep=2, etp=1)),
        ("EP4", "grouped_per_expert", "on-disk", dict(dp=4, ep=4))],
}




def layout_of(sizes: dict) -> ParallelLayout:
    return ParallelLayout(num_layers=NUM_LAYERS, num_experts=NUM_EXPERTS, **sizes)


def rank_states(form: str, layout: ParallelLayout) -> list[dict]:
    """Every rank's local state; a grouped block's shared input quantizer is calibrated per EP rank."""
    states = shard(global_state(form, NUM_LAYERS, NUM_EXPERTS), layout)
    for rank, state in enumerate(states):
        ep = layout.coords(rank).ep
        for name in state:
            if is_expert(name) and "local_experts" not in name and name.endswith("input_quantizer._amax"):
                state[name] = state[name] * (1 + ep / 10)
    return states


def expected_fan_ins(form: str, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """The HF in-memory input quantizers: the max over their Megatron sources, computed here by hand."""
    state = global_state(form, NUM_LAYERS, NUM_EXPERTS)
    out = {}
    for layer in range(NUM_LAYERS):
        for fc, hf in (("linear_fc1", "gate_up_proj"), ("linear_fc2", "down_proj")):
            if form == "seq":
                value = max(state[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{fc}.input_quantizer._amax"]
                            for e in range(NUM_EXPERTS))
            else:  # the EP ranks' copies are base * (1 + ep/10): the last EP rank's is the max
                value = state[f"decoder.layers.{layer}.mlp.experts.{fc}.input_quantizer._amax"] * (1 + (layout.ep - 1) / 10)
            out[f"model.layers.{layer}.mlp.experts.{hf}_input_quantizer._amax"] = value
    return out


def _run_world(scenarios, tmp: str) -> dict:
    """On every rank: export to files, import them back, export the import again."""
    import torch.distributed as dist

    from quantmap.executor import Placement, export, import_

    rank = dist.get_rank()
    out = {}
    for label, form, naming, sizes in scenarios:
        layout = layout_of(sizes)
        ruleset = rules_for(form, NUM_EXPERTS, naming)
        placement = Placement.from_world(layout)
        base = Path(tmp) / f"{label}-{form}-{naming}"
        result = export(ruleset, rank_states(form, layout)[rank], placement, out=base / "hf")
        import_(ruleset, base / "hf", placement, base / "mg")
        shard_file = LazyShard(rank_file(base / "mg", rank))
        imported = {name: shard_file[name] for name in shard_file}
        again = export(ruleset, imported, placement)
        out[(label, form, naming)] = {
            "report": result.report.disagreements if result.is_writer else None,
            "imported": imported,
            "again": again.state_dict() if again.is_writer else None,
        }
    return out


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def world(request, tmp_path_factory):
    size = request.param
    tmp = tmp_path_factory.mktemp(f"fan_in_world{size}")
    return size, tmp, values_of_every_rank(size, _run_world, SCENARIOS[size], str(tmp))


@pytest.mark.slow
def test_distributed_export_writes_the_max_of_every_fan_in_source_and_maps_the_rest_one_to_one(world):
    size, tmp, results = world
    for label, form, naming, sizes in SCENARIOS[size]:
        layout = layout_of(sizes)
        files = Checkpoint(tmp / f"{label}-{form}-{naming}" / "hf")
        written = {name: files.get(name) for name in files.names()}
        # The same as one process exporting every rank's shard: the plan groups sources the same way.
        offline = export_offline(rules_for(form, NUM_EXPERTS, naming), rank_states(form, layout), layout).state_dict()
        assert sorted(written) == sorted(offline)
        assert all(torch.equal(written[n], offline[n]) for n in written), (label, form, naming)
        if naming == "in-memory":
            for name, value in expected_fan_ins(form, layout).items():
                assert torch.equal(written[name], value), (label, form, name)
            per_expert = [n for n in written if "_weight_quantizers." in n]
            assert len(per_expert) == NUM_LAYERS * 2 * NUM_EXPERTS
            disagreements = results[0][(label, form, naming)]["report"]
            # One line per HF tensor whose sources differ, naming the HF tensor.
            assert sorted(line.split(":")[0] for line in disagreements) == sorted(expected_fan_ins(form, layout))
        if form == "grouped_per_expert":  # weight_quantizer.{i} on EP rank r is global expert r * E/ep + i
            state = global_state(form, NUM_LAYERS, NUM_EXPERTS)
            target = ("model.layers.1.mlp.experts.gate_up_proj_weight_quantizers.7._amax" if naming == "in-memory"
                      else "model.layers.1.mlp.experts.7.up_proj.weight_quantizer._amax")
            assert torch.equal(written[target], state["decoder.layers.1.mlp.experts.linear_fc1.weight_quantizer.7._amax"])


@pytest.mark.slow
def test_import_copies_each_fan_in_tensor_to_every_source_and_export_again_gives_the_same_file(world):
    size, tmp, results = world
    for label, form, naming, sizes in SCENARIOS[size]:
        layout = layout_of(sizes)
        ruleset = rules_for(form, NUM_EXPERTS, naming)
        files = Checkpoint(tmp / f"{label}-{form}-{naming}" / "hf")
        originals = rank_states(form, layout)
        for rank in range(size):
            imported = results[rank][(label, form, naming)]["imported"]
            original = quantizers(originals[rank])
            assert sorted(imported) == sorted(original), (label, form, naming, rank)
            for local, value in imported.items():
                match = ruleset.to_hf(to_global(local, layout, layout.coords(rank)))
                if match.kind == FAN_IN:
                    assert torch.equal(value, files.get(match.hf[0])), (label, form, local)
                else:
                    assert torch.equal(value, original[local]), (label, form, local)
        again = results[0][(label, form, naming)]["again"]
        assert sorted(again) == sorted(files.names())
        assert all(torch.equal(again[n], files.get(n)) for n in again), (label, form, naming)


def test_offline_import_of_an_in_memory_checkpoint_fills_every_ranks_sources(tmp_path):
    layout = layout_of(dict(dp=4, ep=4))
    ruleset = rules_for("seq", NUM_EXPERTS, "in-memory")
    exported = export_offline(ruleset, rank_states("seq", layout), layout, out=tmp_path / "hf")
    assert len(exported.report.disagreements) == NUM_LAYERS * 2
    report = import_offline(ruleset, tmp_path / "hf", layout, tmp_path / "mg")
    assert not report.missing and not report.unclaimed

    hf = Checkpoint(tmp_path / "hf")
    target = hf.get("model.layers.0.mlp.experts.gate_up_proj_input_quantizer._amax")
    for rank in range(layout.world_size):
        shard_file = LazyShard(rank_file(tmp_path / "mg", rank))
        sources = [name for name in shard_file if name.endswith("linear_fc1.input_quantizer._amax")
                   and name.startswith("decoder.layers.0.mlp.experts.")]
        assert len(sources) == NUM_EXPERTS // layout.ep  # each EP rank's block of experts
        assert all(torch.equal(shard_file[name], target) for name in sources)


def test_a_fan_in_source_with_per_channel_state_is_refused_naming_the_tensor(tmp_path):
    layout = layout_of(dict(dp=2, ep=2))
    states = rank_states("seq", layout)
    name = "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.input_quantizer._amax"
    states[0][name] = torch.rand(4, 1)
    with pytest.raises(ExecutorError, match=r"local_experts\.1\.linear_fc1\.input_quantizer\._amax has shape \[4, 1\]"
                                            r".*gate_up_proj_input_quantizer"):
        export_offline(rules_for("seq", NUM_EXPERTS, "in-memory"), states, layout, out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_fan_in_short_of_an_expert_is_an_error_not_a_max_of_fewer_sources(tmp_path):
    layout = layout_of(dict(dp=2, ep=2))
    states = rank_states("seq", layout)
    for state in states:  # every EP rank lacks its first expert's fc2 input quantizer
        del state["decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.input_quantizer._amax"]
    with pytest.raises(ExecutorError, match=r"down_proj_input_quantizer\._amax is the max over 8 experts' quantizers "
                                            r"but the shards hold 6"):
        export_offline(rules_for("seq", NUM_EXPERTS, "in-memory"), states, layout, out=tmp_path / "hf")


def test_a_per_channel_expert_weight_quantizer_lands_as_gate_then_up_in_the_fused_in_memory_tensor(tmp_path):
    """transformers v5 concatenates an expert's gate and up into gate_up_proj, so its per-channel weight
    amax is [gate; up]; Megatron's TP rank r holds [gate_r; up_r] (kind: gated_mlp, hf_parts: [gate, up])."""
    layout = ParallelLayout(tp=2, num_layers=1, num_experts=2, ep=1, etp=2)
    g = torch.Generator().manual_seed(3)
    full = {e: (torch.rand(6, 1, generator=g), torch.rand(6, 1, generator=g)) for e in range(2)}  # (gate, up)
    states = [{} for _ in range(layout.world_size)]
    for rank, state in enumerate(states):
        etp = layout.coords(rank).etp
        for e, (gate, up) in full.items():
            prefix = f"decoder.layers.0.mlp.experts.local_experts.{e}."
            state[prefix + "linear_fc1.weight_quantizer._amax"] = torch.cat([gate.chunk(2)[etp], up.chunk(2)[etp]])
            state[prefix + "linear_fc1.input_quantizer._amax"] = torch.tensor(1.0 + e)
    ruleset = rules_for("seq", 2, "in-memory")
    written = export_offline(ruleset, states, layout, out=tmp_path / "hf").state_dict()
    for e, (gate, up) in full.items():
        assert torch.equal(written[f"model.layers.0.mlp.experts.gate_up_proj_weight_quantizers.{e}._amax"],
                           torch.cat([gate, up]))
    assert torch.equal(written["model.layers.0.mlp.experts.gate_up_proj_input_quantizer._amax"], torch.tensor(2.0))
    import_offline(ruleset, tmp_path / "hf", layout, tmp_path / "mg")
    for rank, state in enumerate(states):
        back = LazyShard(rank_file(tmp_path / "mg", rank))
        for name, tensor in state.items():
            expected = torch.tensor(2.0) if "input_quantizer" in name else tensor
            assert torch.equal(back[name], expected), (rank, name)


def _gpt_oss_expert_state(experts: int, shaped: str) -> dict[str, torch.Tensor]:
    """One gpt-oss layer's expert quantizers (SequentialMLP), per-tensor but for ``shaped``, per-channel."""
    g = torch.Generator().manual_seed(5)
    state = {}
    for e in range(experts):
        for fc in ("linear_fc1", "linear_fc2"):
            for buffer in ("weight_quantizer._amax", "input_quantizer._amax"):
                state[f"decoder.layers.0.mlp.experts.local_experts.{e}.{fc}.{buffer}"] = torch.rand((), generator=g)
    state[shaped] = torch.rand(8, 1, generator=g)
    return state


def test_a_shaped_gpt_oss_expert_weight_quantizer_is_refused_naming_it_and_the_shared_hf_quantizer(tmp_path):
    """gpt-oss's experts share one HF weight quantizer per projection: per-channel amax of several experts has no
    place in it, whatever the declared element layout of the expert tensors."""
    layout = ParallelLayout(num_layers=1, num_experts=2)
    shaped = "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight_quantizer._amax"
    with pytest.raises(ExecutorError, match=r"local_experts\.1\.linear_fc1\.weight_quantizer\._amax has shape \[8, 1\]"
                                            r".*gate_up_proj_weight_quantizer\._amax"):
        export_offline(quantmap.compile("gpt_oss", num_experts=2), [_gpt_oss_expert_state(2, shaped)], layout,
                       out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_shaped_per_expert_quantizer_of_a_transposed_interleaved_hf_tensor_is_refused_with_the_reason(tmp_path):
    """One HF quantizer per expert, but the expert tensor is declared [in, out] and interleaved: where ModelOpt
    puts a per-channel amax of it is not known, so the export stops before writing anything."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: t\nmappings:\n"
        "  - {megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight,\n"
        "     hf: model.layers.*.mlp.experts.gate_up_proj, fused_experts: per-expert, kind: gated_mlp,\n"
        "     hf_parts: [gate, up], hf_layout: [interleaved, transposed], parallel: column}\n"
        "  - {megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight,\n"
        "     hf: model.layers.*.mlp.experts.down_proj, fused_experts: per-expert, parallel: row}\n")
    layout = ParallelLayout(num_layers=1, num_experts=2)
    shaped = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight_quantizer._amax"
    with pytest.raises(ExecutorError, match=r"local_experts\.0\.linear_fc1\.weight_quantizer\._amax has shape \[8, 1\]"
                                            r".*declared interleaved and transposed"):
        export_offline(quantmap.compile(spec), [_gpt_oss_expert_state(2, shaped)], layout, out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
