"""The laws of the tensor ops and the layouts built from them: every op's inverse undoes it, and
exporting a tensor-parallel sharded tensor gives what exporting the unsharded tensor gives."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from quantmap.element_layout import ROWS, TensorParallel, derive
from quantmap.ops import (STRIDED, Concat, Copy, Each, Max, Offset, OpError, Select, Split, Stack, Transpose, Unstack, apply,
                          reverse)

SETTINGS = settings(max_examples=150, deadline=None)


def _tensor(shape) -> torch.Tensor:
    return torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape)


@st.composite
def splits(draw):
    units = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    groups = draw(st.sampled_from([1, 2, 3, STRIDED]))
    multiple = draw(st.sampled_from([1, 2]))
    unit = draw(st.integers(1, 3)) * multiple
    repeats = draw(st.integers(1, 3)) if groups == STRIDED else groups
    if groups == STRIDED:
        unit, multiple = 1, 1
    trailing = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    shape = (repeats * sum(units) * unit,) + trailing
    return Split(0, units, groups, multiple), shape


@SETTINGS
@given(splits())
def test_concat_undoes_split_and_split_undoes_concat(case):
    op, shape = case
    tensor = _tensor(shape)
    parts = op([tensor])
    assert [p.shape[0] for p in parts] == [u * shape[0] // sum(op.units) for u in op.units]
    (back,) = op.reverse()(parts)
    assert torch.equal(back, tensor)
    again = op(op.reverse()(parts))
    assert all(torch.equal(a, b) for a, b in zip(again, parts))


@SETTINGS
@given(st.permutations(range(4)))
def test_select_reverse_is_the_inverse_permutation(order):
    op = Select(tuple(order))
    tensors = [torch.full((1,), float(i)) for i in range(4)]
    assert [t.item() for t in op.reverse()(op(tensors))] == [0, 1, 2, 3]


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 1))
def test_transpose_and_expert_stack_undo_themselves(rows, experts, axis):
    tensors = [_tensor((rows, 3)) + 100 * e for e in range(experts)]
    stacked = Stack(axis, experts)(tensors)
    assert all(torch.equal(a, b) for a, b in zip(Stack(axis, experts).reverse()(stacked), tensors))
    flipped = Transpose(0, 1)(tensors)
    assert all(torch.equal(a, b) for a, b in zip(Transpose(0, 1).reverse()(flipped), tensors))
    assert Unstack(axis, experts).reverse() == Stack(axis, experts)


def test_copy_then_max_is_the_identity_and_max_refuses_different_shapes():
    tensor = torch.rand(5)
    assert torch.equal(Copy(3).reverse()(Copy(3)([tensor]))[0], tensor)
    with pytest.raises(OpError, match="different shapes"):
        Max(2)([torch.rand(2), torch.rand(3)])


def test_a_split_that_does_not_divide_names_the_sizes():
    with pytest.raises(OpError, match="cannot be cut into 2 group"):
        Split(0, (2, 1, 1), 2, multiple=16)([torch.rand(96, 1)])


@st.composite
def shaped_states(draw):
    """A weight quantizer's full Megatron tensor (per-channel or per-block), its mapping and TP size."""
    tp = draw(st.sampled_from([1, 2, 4]))
    blocks = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["qkv", "gated_mlp", "plain_column", "plain_row"]))
    if kind == "qkv":
        groups = tp * draw(st.integers(1, 2))
        heads = groups * draw(st.integers(1, 3))
        head_dim = draw(st.sampled_from([1, 2, 4]))
        params = dict(num_attention_heads=heads, num_query_groups=groups, head_dim=head_dim)
        rows = (heads + 2 * groups) * head_dim
        return kind, ("q", "k", "v"), "column", params, tp, (rows * blocks, 1)
    if kind == "gated_mlp":
        return kind, ("gate", "up"), "column", {}, tp, (2 * tp * draw(st.integers(1, 3)) * blocks, 1)
    if kind == "plain_column":
        return "plain", ("",), "column", {}, tp, (tp * draw(st.integers(1, 4)) * blocks, 1)
    hidden = draw(st.integers(1, 4))
    blocks = tp * draw(st.integers(2, 3)) if tp > 1 else blocks
    return "plain", ("",), "row", dict(hidden_size=hidden, weight_block_size=8), tp, (hidden * blocks, 1)


@SETTINGS
@given(shaped_states())
def test_exporting_tp_shards_equals_exporting_the_unsharded_tensor_and_import_gives_the_shards_back(case):
    kind, parts, parallel, params, tp, shape = case
    layout = derive("weight_quantizer._amax", parallel, kind, parts, None, params)
    full = torch.rand(shape)
    scatter = layout.tp.scatter(tp, shape)
    shards = [full] * tp if scatter is None else apply(scatter, [full])
    unsharded = apply(layout.ops, [full])
    exported = apply(layout.tp.gather(tp, tuple(shards[0].shape)) + layout.ops, shards)
    assert len(exported) == len(parts)
    assert all(torch.equal(a, b) for a, b in zip(exported, unsharded))
    (joined,) = apply(reverse(layout.ops), exported)
    back = [joined] * tp if scatter is None else apply(scatter, [joined])
    assert all(torch.equal(a, b) for a, b in zip(back, shards))


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 2, 4]))
def test_the_qkv_split_follows_the_gqa_row_arithmetic(groups, per_group, head_dim, blocks):
    heads = groups * per_group
    layout = derive("weight_quantizer._amax", "column", "qkv", ("q", "k", "v"),
                    None, dict(num_attention_heads=heads, num_query_groups=groups, head_dim=head_dim))
    rows = torch.arange((heads + 2 * groups) * head_dim * blocks).reshape(-1, 1)
    q, k, v = apply(layout.ops, [rows])
    stride = (per_group + 2) * head_dim * blocks  # one query group's rows
    width = head_dim * blocks  # one head's rows
    for head in range(heads):
        start = (head // per_group) * stride + (head % per_group) * width
        assert torch.equal(q[head * width:(head + 1) * width], rows[start:start + width])
    for group in range(groups):
        start = group * stride + per_group * width
        assert torch.equal(k[group * width:(group + 1) * width], rows[start:start + width])
        assert torch.equal(v[group * width:(group + 1) * width], rows[start + width:start + 2 * width])


def test_a_row_parallel_rank_with_one_block_per_row_needs_the_block_size():
    tp = TensorParallel(ROWS, rows=4)
    with pytest.raises(OpError, match="weight_block_size"):
        tp.gather(2, (4, 1))
    assert isinstance(TensorParallel(ROWS, rows=4, block_size=0).gather(2, (4, 1))[0], Max)
    assert isinstance(TensorParallel(ROWS, rows=4, block_size=32).gather(2, (4, 1))[0], Concat)
    assert isinstance(tp.gather(2, (8, 1))[0], Concat), "two blocks per row per rank can only be blocks"


@st.composite
def fused_expert_tensors(draw):
    """Per-expert Megatron tensors of one gpt-oss-style projection and how the HF tensor holds them."""
    experts, hidden, inter = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    case = draw(st.sampled_from(["gate_up", "gate_up_bias", "down", "down_bias"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    shape = {"gate_up": (2 * inter, hidden), "gate_up_bias": (2 * inter,), "down": (hidden, inter),
             "down_bias": (hidden,)}[case]
    megatron = [torch.randn(shape, generator=g) for _ in range(experts)]
    gated = case.startswith("gate_up")
    layout = derive(None, "column" if gated else "row", "gated_mlp" if gated else "plain",
                    ("",), ("gate", "up") if gated else None, {},
                    (("interleaved",) if gated else ()) + (("transposed",) if not case.endswith("bias") else ()),
                    experts)
    return case, megatron, inter, layout


@SETTINGS
@given(fused_expert_tensors())
def test_a_fused_experts_layout_stacks_interleaves_and_transposes_and_reverses_exactly(case):
    """Megatron's per-expert [gate; up] rows become columns 0::2 (gate) and 1::2 (up) of expert e's
    slice of the HF tensor, [in, out]; the reverse pipeline gives every expert's tensor back bit for bit."""
    name, megatron, inter, layout = case
    (hf,) = apply(layout.ops, megatron)
    assert hf.shape[0] == len(megatron)
    for e, tensor in enumerate(megatron):
        if name == "gate_up":
            assert torch.equal(hf[e][:, 0::2], tensor[:inter].T) and torch.equal(hf[e][:, 1::2], tensor[inter:].T)
        elif name == "gate_up_bias":
            assert torch.equal(hf[e][0::2], tensor[:inter]) and torch.equal(hf[e][1::2], tensor[inter:])
        elif name == "down":
            assert torch.equal(hf[e], tensor.T)
        else:
            assert torch.equal(hf[e], tensor)
    back = apply(reverse(layout.ops), [hf])
    assert len(back) == len(megatron) and all(torch.equal(a, b) for a, b in zip(back, megatron))


def test_a_per_channel_row_parallel_amax_of_another_length_than_hidden_size_is_refused():
    """weight_block_size=0 says per-channel, whose row-parallel amax is exactly hidden_size rows on
    every rank: a rank holding twice that means hidden_size is wrong, not that the rows are blocks
    (found exporting the real INT8 fixture with --param hidden_size=32: o_proj came out [128, 1])."""
    tp = TensorParallel(ROWS, rows=32, block_size=0)
    with pytest.raises(OpError, match=r"per-channel.*hidden_size=32 rows.*has 64"):
        tp.gather(2, (64, 1))
    with pytest.raises(OpError, match=r"per-channel.*hidden_size=32 rows.*has 64"):
        tp.scatter(2, (64, 1))
    assert isinstance(tp.gather(2, (32, 1))[0], Max) and tp.scatter(2, (32, 1)) is None


@pytest.mark.parametrize("heads, groups, words", [
    (0, 2, "needs the spec parameters num_attention_heads and num_query_groups"),
    (3, 2, "num_attention_heads=3 is not a multiple of num_query_groups=2"),
    (4, 0, "needs the spec parameters"),
])
def test_qkv_head_counts_that_cannot_interleave_say_which(heads, groups, words):
    """Head counts that were given but do not fit each other are named, not reported as missing."""
    layout = derive("weight_quantizer._amax", "column", "qkv", ("q", "k", "v"), None,
                    dict(num_attention_heads=heads, num_query_groups=groups, head_dim=16))
    assert layout.ops is None and words in layout.reason


@SETTINGS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=6), st.integers(1, 4), st.integers(1, 3))
def test_sectioned_tp_ranks_hold_a_slice_of_every_component_and_gather_back_exactly(sections, ranks, width):
    """``tp: split`` with ``sections`` (Gated DeltaNet's in_proj, conv1d): rank r holds the r-th slice of each
    component in turn; gathering the ranks gives the full tensor back, and scattering it gives the ranks."""
    sections = tuple(size * ranks for size in sections)
    full = _tensor((sum(sections), width))
    components = full.split(list(sections))
    shards = [torch.cat([c.chunk(ranks)[rank] for c in components]) for rank in range(ranks)]
    tp = TensorParallel("split", 0, sections=sections)
    (gathered,) = apply(tp.gather(ranks, tuple(shards[0].shape)), shards)
    assert torch.equal(gathered, full)
    scatter = tp.scatter(ranks, tuple(full.shape))
    scattered = [full] if scatter is None else apply(scatter, [full])
    assert all(torch.equal(a, b) for a, b in zip(scattered, shards)) and len(scattered) == ranks


def test_each_runs_one_op_per_run_of_parts_and_its_reverse_undoes_it():
    parts = [_tensor((2, 1)), _tensor((4, 1)) + 10, _tensor((3, 1)) + 20]
    op = Each((Concat(0, (1, 2)), Select((0,))))
    joined = op(parts)
    assert [t.shape[0] for t in joined] == [6, 3] and op.takes == 3 and op.reverse().takes == 2
    assert all(torch.equal(a, b) for a, b in zip(op.reverse()(joined), parts))
    with pytest.raises(OpError, match="got 2 tensor"):
        op(parts[:2])


def test_offset_adds_its_value_and_its_reverse_takes_it_away_exactly_where_the_dtype_holds_both():
    """A zero-centred norm (Megatron ``w - 1``) is HF's ``w``: values in [0.5, 2] come back bit for bit."""
    hf = torch.tensor([0.5, 0.75, 1.0, 1.3125, 2.0, 1.0 + 2 ** -20])
    megatron = apply((Offset(1.0).reverse(),), [hf])[0]
    assert torch.equal(megatron, torch.tensor([-0.5, -0.25, 0.0, 0.3125, 1.0, 2 ** -20]))
    assert torch.equal(apply((Offset(1.0),), [megatron])[0], hf)
    assert Offset(1.0).reverse() == Offset(-1.0) and Offset(1.0).to_json() == {"op": "offset", "value": 1.0}
