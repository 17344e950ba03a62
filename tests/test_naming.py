"""Local ↔ global names: pipeline layer offsets and expert-parallel renumbering."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from quantmap.parallel import ParallelLayout
from quantmap.executor.naming import NamingError, to_global, to_local

LAYOUT = ParallelLayout(tp=1, pp=2, dp=4, ep=4, num_layers=4, num_experts=8)


def test_pipeline_stage_layers_and_expert_blocks_become_global():
    rank = LAYOUT.coords(6)  # pp stage 1, ep rank 2
    assert (rank.pp, rank.ep) == (1, 2)
    assert to_global("decoder.layers.0.self_attention.linear_qkv.input_quantizer._amax", LAYOUT, rank) == \
        "decoder.layers.2.self_attention.linear_qkv.input_quantizer._amax"
    assert to_global("decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight_quantizer._amax", LAYOUT, rank) == \
        "decoder.layers.3.mlp.experts.local_experts.5.linear_fc2.weight_quantizer._amax"
    assert to_global("decoder.layers.1.mlp.experts.linear_fc1.weight0", LAYOUT, rank) == \
        "decoder.layers.3.mlp.experts.linear_fc1.weight4"
    assert to_global("decoder.layers.1.mlp.experts.linear_fc2.bias1", LAYOUT, rank) == \
        "decoder.layers.3.mlp.experts.linear_fc2.bias5"


def test_grouped_block_quantizers_are_never_renumbered():
    rank = LAYOUT.coords(6)
    name = "decoder.layers.0.mlp.experts.linear_fc1.weight_quantizer._amax"
    assert to_global(name, LAYOUT, rank) == name.replace("layers.0", "layers.2")
    assert all(to_local(name.replace("layers.0", "layers.2"), LAYOUT, LAYOUT.coords(r)) == name for r in range(4, 8))


def test_names_beyond_the_stage_or_block_are_errors():
    with pytest.raises(NamingError, match="pipeline stage 1 holds 2 layer"):
        to_global("decoder.layers.2.self_attention.linear_qkv.input_quantizer._amax", LAYOUT, LAYOUT.coords(4))
    with pytest.raises(NamingError, match="holds 2 of num_experts=8"):
        to_global("decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.input_quantizer._amax", LAYOUT, LAYOUT.coords(4))


def test_a_rank_holds_only_its_stage_and_expert_block():
    name = "decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.input_quantizer._amax"
    holders = [r for r in range(8) if to_local(name, LAYOUT, LAYOUT.coords(r)) is not None]
    assert holders == [6]


@settings(max_examples=60, deadline=None)
@given(layer=st.integers(0, 5), expert=st.integers(0, 7), kind=st.sampled_from(["seq", "grouped", "per_expert"]),
       stages=st.sampled_from([(3, 3), (4, 2), (1, 5)]), ep=st.sampled_from([1, 2, 4]))
def test_local_then_global_gives_back_the_name(layer, expert, kind, stages, ep):
    layout = ParallelLayout(pp=2, dp=4, ep=ep, num_layers=6, num_experts=8, layers_per_stage=stages)
    tail = {"seq": f"local_experts.{expert}.linear_fc1.weight_quantizer._amax", "grouped": f"linear_fc1.weight{expert}",
            "per_expert": f"linear_fc2.weight_quantizer.{expert}._amax"}[kind]
    name = f"decoder.layers.{layer}.mlp.experts.{tail}"
    holders = [c for c in map(layout.coords, range(8)) if to_local(name, layout, c) is not None]
    assert len({(c.pp, c.ep) for c in holders}) == 1
    for coords in holders:
        assert to_global(to_local(name, layout, coords), layout, coords) == name


def test_expert_names_filled_by_text_equal_the_rule_sets_own_expansion():
    from executor_support import rules_for
    from quantmap.executor.naming import expert_block, expert_hf_names

    rules = rules_for("grouped", 8)
    match = rules.to_hf("decoder.layers.3.mlp.experts.linear_fc1.weight_quantizer._amax")
    experts = expert_block(match.megatron, match, LAYOUT, 2)
    assert experts == range(4, 6)
    assert list(expert_hf_names(match, experts)) == list(match.expert_names(experts))
    assert expert_hf_names(match, experts)[:2] == ["model.layers.3.mlp.experts.4.gate_proj.weight_quantizer._amax",
                                                   "model.layers.3.mlp.experts.4.up_proj.weight_quantizer._amax"]


def test_modelopt_047_per_expert_grouped_weight_quantizers_are_renumbered_like_the_weights():
    # _QuantTEGroupedLinear: weight_quantizer is a GroupedQuantizer (ModuleList), one per local expert.
    rank = LAYOUT.coords(6)  # pp stage 1, ep rank 2: local experts 0, 1 are global 4, 5
    local = "decoder.layers.1.mlp.experts.linear_fc1.weight_quantizer.1._amax"
    assert to_global(local, LAYOUT, rank) == "decoder.layers.3.mlp.experts.linear_fc1.weight_quantizer.5._amax"
    holders = [r for r in range(8) if to_local("decoder.layers.3.mlp.experts.linear_fc1.weight_quantizer.5._amax",
                                               LAYOUT, LAYOUT.coords(r)) == local]
    assert holders == [6]
    # A SequentialQuantizer inside (W4A8: weight_quantizer.{E}.{j}) keeps its own index; only the expert moves.
    assert to_global("decoder.layers.0.mlp.experts.linear_fc2.weight_quantizer.0.1._amax", LAYOUT, rank) == \
        "decoder.layers.2.mlp.experts.linear_fc2.weight_quantizer.4.1._amax"
    with pytest.raises(NamingError, match="holds 2 of num_experts=8"):
        to_global("decoder.layers.0.mlp.experts.linear_fc1.weight_quantizer.2._amax", LAYOUT, rank)


def test_the_shared_input_quantizer_of_a_grouped_linear_is_on_every_expert_parallel_rank():
    name = "decoder.layers.2.mlp.experts.linear_fc1.input_quantizer._amax"
    holders = [r for r in range(8) if to_local(name, LAYOUT, LAYOUT.coords(r)) is not None]
    assert holders == [4, 5, 6, 7]  # every EP rank of stage 1
    # Outside a grouped linear an index after weight_quantizer is a SequentialQuantizer's, not an expert's.
    dense = "decoder.layers.0.mlp.linear_fc1.weight_quantizer.1._amax"
    assert to_global(dense, LAYOUT, LAYOUT.coords(6)) == dense.replace("layers.0", "layers.2")
    sequential = "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight_quantizer.1._amax"
    assert to_global(sequential, LAYOUT, LAYOUT.coords(6)) == \
        "decoder.layers.2.mlp.experts.local_experts.5.linear_fc1.weight_quantizer.1._amax"
