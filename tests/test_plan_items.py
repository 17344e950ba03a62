"""A packed entry carries the rule that claimed it on its rank, and the plan's items carry that rule and
its role, so that no later stage resolves a name again or reads its suffix to know what it is."""

from __future__ import annotations

import pickle

import pytest

from executor_support import global_state, rules_for, shard
from quantmap.executor import ParallelLayout
from quantmap.executor.pack import pack
from quantmap.executor.placement import Placement
from quantmap.executor.plan import Plan
from quantmap.executor.rank_meta import RankMeta
from quantmap.roles import INPUT_AMAX, module_of


def _plan(form: str, layout: ParallelLayout, hf_naming: str = "on-disk") -> tuple[object, Plan, list[RankMeta]]:
    rules = rules_for(form, num_experts=layout.num_experts, hf_naming=hf_naming)
    states = shard(global_state(form, layout.num_layers, layout.num_experts), layout)
    metas = [pack(rules, state, Placement.offline(layout, rank)).meta for rank, state in enumerate(states)]
    return rules, Plan(rules, layout, metas), metas


def test_an_item_carries_the_rule_and_role_of_its_name_at_tp2():
    rules, plan, metas = _plan("dense", ParallelLayout(tp=2, num_layers=1))
    name = "decoder.layers.0.self_attention.linear_qkv.input_quantizer._amax"
    (item,) = [item for item in plan.items if item.megatron == name]
    assert item.role == INPUT_AMAX and item.rule.buffer == "input_quantizer._amax"
    assert [rank for rank, _ in item.sources] == [0, 1]
    assert all(metas[rank].rules[entry] == rules.number(item.rule) for rank, entry in item.sources)
    assert plan.hf_names(item) == ("model.layers.0.self_attn.q_proj.input_quantizer._amax",
                                   "model.layers.0.self_attn.k_proj.input_quantizer._amax",
                                   "model.layers.0.self_attn.v_proj.input_quantizer._amax")
    assert [plan.module(item, part) for part in range(3)] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]


@pytest.mark.parametrize(("form", "hf_naming", "sizes"), [
    ("dense", "on-disk", dict(tp=2, pp=1)),
    ("grouped", "on-disk", dict(dp=2, ep=2)),  # a grouped block's amax fans out to every expert
    ("seq", "on-disk", dict(dp=2, ep=2)),  # expert runs
    ("seq", "in-memory", dict(dp=2, ep=2)),  # fan-in: every expert's input amax meets in one HF tensor
])
def test_every_item_has_the_rule_a_lookup_of_its_name_finds(form, hf_naming, sizes):
    layout = ParallelLayout(num_layers=2, num_experts=None if form == "dense" else 4, **sizes)
    rules, plan, _ = _plan(form, layout, hf_naming)
    assert len(plan.items) > 0
    for item in plan.items:
        assert item.rule is rules.to_hf(item.megatron).rule
        assert item.role == item.rule.role
        names = plan.hf_names(item)
        assert [plan.module(item, part) for part in range(len(names))] == [module_of(n, item.role) for n in names]


def test_a_rank_names_its_rules_by_number_and_pickles_no_rule():
    rules, _, metas = _plan("seq", ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4))
    meta = metas[0]
    assert meta.runs and len(meta.rules) == len(meta.names)
    assert all(rules.rules[number].kind != "weight" for number in meta.rules)
    copy = pickle.loads(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL))
    assert isinstance(copy, RankMeta) and copy.rules == meta.rules and copy.names == meta.names
    assert b"quantmap.rules" not in pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
