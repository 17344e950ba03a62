"""The layout value: Megatron-Core's rank order, validation before any collective, layout.json."""

from __future__ import annotations

import json

import pytest

from quantmap.parallel import LayoutError, ParallelLayout


def _groups(layout: ParallelLayout, dim: str, view: tuple[str, ...]) -> list[list[int]]:
    """Ranks that share every coordinate of ``view`` except ``dim``, as Megatron's groups list them."""
    found: dict[tuple, list[int]] = {}
    for rank in range(layout.world_size):
        coords = layout.coords(rank)._asdict()
        key = tuple(coords[name] for name in view if name != dim)
        found.setdefault(key, []).append(rank)
    return sorted(found.values())


DENSE, EXPERT = ("tp", "cp", "dp", "pp"), ("etp", "ep", "edp", "pp")


def test_rank_order_matches_megatron_core_rank_generator():
    # world=16, TP=2, DP=4, PP=2, and the expert view ETP=1, EP=2 (EDP=4): the groups Megatron-Core's
    # RankGenerator(order="tp-cp-ep-dp-pp") builds (megatron/core/parallel_state.py).
    layout = ParallelLayout(tp=2, dp=4, pp=2, ep=2, etp=1, num_layers=2, num_experts=4)
    assert _groups(layout, "tp", DENSE) == [[2 * i, 2 * i + 1] for i in range(8)]
    assert _groups(layout, "dp", DENSE) == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert _groups(layout, "pp", DENSE) == [[i, i + 8] for i in range(8)]
    assert _groups(layout, "ep", EXPERT) == [[2 * i, 2 * i + 1] for i in range(8)]
    assert _groups(layout, "edp", EXPERT) == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert _groups(layout, "pp", EXPERT) == _groups(layout, "pp", DENSE)


def test_expert_parallelism_is_carved_out_of_data_parallelism():
    layout = ParallelLayout(dp=2, ep=2, num_layers=2, num_experts=4)  # a 2-rank EP=2 run
    assert layout.world_size == 2 and layout.edp == 1
    assert [layout.coords(r).ep for r in range(2)] == [0, 1]
    with pytest.raises(LayoutError, match="carved out of data parallelism"):
        ParallelLayout(ep=2, num_layers=2, num_experts=4)


@pytest.mark.parametrize("sizes, words", [
    (dict(dp=2, ep=2, num_layers=2, num_experts=5), "num_experts=5 is not divisible by ep=2"),
    (dict(pp=2, num_layers=3), "does not split evenly over pp=2"),
    (dict(pp=2, num_layers=3, layers_per_stage=[1, 1]), "sums to 2, not num_layers=3"),
    (dict(pp=2, num_layers=3, layers_per_stage=[3]), "one count >= 0 per pipeline stage"),
    (dict(tp=0, num_layers=2), "tp must be a whole number >= 1"),
    (dict(dp=2, ep=2, num_layers=2), "needs num_experts"),
])
def test_layout_mistakes_are_clear_errors(sizes, words):
    with pytest.raises(LayoutError, match=words.replace("*", r"\*").replace("(", r"\(")):
        ParallelLayout(**sizes)


def test_world_size_must_equal_the_product_of_sizes():
    with pytest.raises(LayoutError, match=r"the world has 6 ranks but the layout needs tp\*cp\*dp\*pp = 2\*1\*1\*2 = 4"):
        ParallelLayout(tp=2, pp=2, num_layers=2).check_world(6)


def test_uneven_stages_give_megatron_layer_offsets():
    layout = ParallelLayout(pp=3, num_layers=7, layers_per_stage=[3, 2, 2])
    assert [layout.layer_offset(s) for s in range(3)] == [0, 3, 5]
    assert [layout.stage_of_layer(n) for n in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert ParallelLayout(pp=2, num_layers=4).layer_offset(1) == 2


def test_layout_json_round_trips_and_rejects_what_it_cannot_honour(tmp_path):
    layout = ParallelLayout(tp=2, pp=2, dp=2, ep=2, num_layers=6, num_experts=8, layers_per_stage=[4, 2])
    path = layout.write(tmp_path)
    data = json.loads(path.read_text())
    assert data["order"] == "tp-cp-ep-dp-pp" and data["etp"] == 2 and data["layers_per_stage"] == [4, 2]
    assert ParallelLayout.read(tmp_path) == layout
    with pytest.raises(LayoutError, match="rank order 'tp-cp-ep-pp-dp' is not supported"):
        ParallelLayout.from_json({**data, "order": "tp-cp-ep-pp-dp"})
    with pytest.raises(LayoutError, match=r"unknown key\(s\) \['vpp'\]"):
        ParallelLayout.from_json({**data, "vpp": 2})
    with pytest.raises(LayoutError, match=r"missing key\(s\) \['num_layers'\]"):
        ParallelLayout.from_json({"tp": 1, "pp": 1, "dp": 1})
