"""Quantizer values that cannot be right are refused in both directions (NaN, inf, negative amax, non-float
dtypes), a zero amax (ModelOpt's "uncalibrated") is reported, and data-parallel replicas are compared as
tensor-parallel copies are, without adding a collective."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from executor_support import global_state, rules_for, run_ranks, shard
from quantmap.executor import ExecutorError, ParallelLayout, RunOptions, export_offline, import_offline
from quantmap.executor.values import check_values
from quantmap.roles import INPUT_AMAX, PRE_QUANT_SCALE, WEIGHT_AMAX

K_BMM = "decoder.layers.0.self_attention.core_attention.k_bmm_quantizer._amax"
HF_K = "model.layers.0.self_attn.k_bmm_quantizer._amax"  # where dense_mla maps k_bmm
BAD = {"nan": torch.tensor(float("nan")), "inf": torch.tensor(float("inf")), "negative": torch.tensor(-1.0),
       "bf16 nan": torch.tensor(float("nan"), dtype=torch.bfloat16)}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_amax_on_one_tensor_parallel_rank_is_refused_not_maxed(tmp_path, case):
    layout = ParallelLayout(tp=2, num_layers=1)
    ranks = shard(global_state("dense", 1), layout)
    ranks[1][K_BMM] = BAD[case]
    what = {"nan": "NaN", "inf": "infinite", "negative": "negative", "bf16 nan": "NaN"}[case]
    with pytest.raises(ExecutorError, match=rf"rank 1: bad quantizer values: {K_BMM} holds 1 {what} value\(s\) of 1; "
                                            r"an amax must be a finite number >= 0"):
        export_offline(rules_for("dense"), ranks, layout, out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_non_float_quantizer_tensor_is_refused(tmp_path):
    ranks = shard(global_state("dense", 1), ParallelLayout(num_layers=1))
    ranks[0][K_BMM] = torch.tensor(3, dtype=torch.int32)
    with pytest.raises(ExecutorError, match=rf"{K_BMM}: dtype int32 is not a floating-point type"):
        export_offline(rules_for("dense"), ranks, ParallelLayout(num_layers=1), out=tmp_path / "hf")


def _export_with_a_nan_on_rank_one(out: str):
    from quantmap.executor import Placement, export

    layout = ParallelLayout(tp=2, num_layers=1)
    placement = Placement.from_world(layout)
    state = shard(global_state("dense", 1), layout)[placement.coords.rank]
    if placement.coords.rank == 1:
        state[K_BMM] = torch.tensor(float("nan"))
    export(rules_for("dense"), state, placement, out=out)


@pytest.mark.slow
def test_a_nan_on_one_rank_of_a_distributed_export_fails_every_rank_with_one_message(tmp_path):
    outcomes = run_ranks(2, _export_with_a_nan_on_rank_one, str(tmp_path / "hf"))
    assert [o[0] for o in outcomes] == ["error", "error"] and outcomes[0][1] == outcomes[1][1]
    assert f"{K_BMM} holds 1 NaN value(s)" in outcomes[0][1] and not (tmp_path / "hf").exists()


def test_a_zero_amax_is_reported_as_uncalibrated_and_strict_refuses_it(tmp_path):
    ranks = shard(global_state("dense", 1), ParallelLayout(num_layers=1))
    ranks[0][K_BMM] = torch.tensor(0.0)
    report = export_offline(rules_for("dense"), ranks, ParallelLayout(num_layers=1), out=tmp_path / "hf").report
    assert report.uncalibrated == [K_BMM] and "1 name(s) with a zero amax (uncalibrated):" in report.lines()
    with pytest.raises(ExecutorError, match=rf"export refused \(--strict\): 1 Megatron name\(s\) with a zero amax "
                                            rf"\(uncalibrated\): {K_BMM}"):
        export_offline(rules_for("dense"), ranks, ParallelLayout(num_layers=1), out=tmp_path / "strict",
                       options=RunOptions(strict=True))
    assert not (tmp_path / "strict").exists()


def _hf_with(tmp_path: Path, name: str, value: torch.Tensor) -> Path:
    """A real exported HF checkpoint with one tensor replaced in its shard file."""
    hf = tmp_path / "hf"
    export_offline(rules_for("dense"), [global_state("dense", 1)], ParallelLayout(num_layers=1), out=hf)
    shard_name = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(hf / shard_name)
    tensors[name] = value
    save_file(tensors, hf / shard_name, metadata={"format": "pt"})
    return hf


@pytest.mark.parametrize("value", [torch.tensor(float("nan")), torch.tensor(float("-inf")), torch.tensor(-0.5),
                                   torch.tensor(2, dtype=torch.int64)], ids=["nan", "-inf", "negative", "int64"])
def test_import_refuses_a_bad_value_naming_the_hf_tensor(tmp_path, value):
    hf = _hf_with(tmp_path, HF_K, value)
    with pytest.raises(ExecutorError, match=rf"bad quantizer values: {HF_K}"):
        import_offline(rules_for("dense"), hf, ParallelLayout(tp=2, num_layers=1), tmp_path / "mg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_import_reports_a_zero_amax_and_strict_refuses_it(tmp_path):
    hf = _hf_with(tmp_path, HF_K, torch.tensor(0.0))
    report = import_offline(rules_for("dense"), hf, ParallelLayout(tp=2, num_layers=1), tmp_path / "mg")
    assert report.uncalibrated == [HF_K]
    with pytest.raises(ExecutorError, match=rf"1 HF name\(s\) with a zero amax \(uncalibrated\): {HF_K}"):
        import_offline(rules_for("dense"), hf, ParallelLayout(num_layers=1), tmp_path / "strict",
                       options=RunOptions(strict=True))


def test_a_pre_quant_scale_may_be_negative_but_not_nan():
    scale = "decoder.layers.0.mlp.linear_fc2.input_quantizer._pre_quant_scale"
    assert check_values([(scale, torch.tensor([-1.0, 0.0, 2.0]), PRE_QUANT_SCALE)]) == []
    with pytest.raises(ExecutorError, match=rf"{scale} holds 1 NaN value"):
        check_values([(scale, torch.tensor([1.0, float("nan")]), PRE_QUANT_SCALE)])


# -- data-parallel replicas ----------------------------------------------------------------------------------
def _replicas(layout: ParallelLayout, form: str = "dense", experts: int | None = None) -> list[dict]:
    return shard(global_state(form, layout.num_layers, experts), layout)


def test_a_dp_replica_that_disagrees_is_reported_and_the_first_replica_exported(tmp_path):
    layout = ParallelLayout(dp=2, num_layers=1)
    ranks = _replicas(layout)
    ranks[0][K_BMM], ranks[1][K_BMM] = torch.tensor(0.509), torch.tensor(99.0)
    result = export_offline(rules_for("dense"), ranks, layout, out=tmp_path / "hf")
    assert result.report.disagreements == [f"{K_BMM}: data-parallel replicas differ (rank 0: 0.509, rank 1: 99); "
                                           f"exported rank 0's copy"]
    assert load_file(next((tmp_path / "hf").glob("model-*.safetensors")))[HF_K].item() == pytest.approx(0.509)


def test_a_per_channel_dp_replica_difference_is_reported_by_digest(tmp_path):
    layout = ParallelLayout(dp=2, num_layers=1)
    ranks = _replicas(layout)
    name = "decoder.layers.0.self_attention.linear_q_up_proj.weight_quantizer._amax"
    ranks[1][name] = ranks[1][name].clone()
    ranks[1][name][3] += 1
    notes = export_offline(rules_for("dense"), ranks, layout).report.disagreements
    assert len(notes) == 1 and notes[0].startswith(f"{name}: data-parallel replicas differ (rank 0: float32 [16, 1] #")


def test_expert_replicas_are_compared_over_expert_data_parallel_ranks():
    layout = ParallelLayout(dp=4, ep=2, num_layers=1, num_experts=2)  # edp=2: ranks 2 and 3 replicate ranks 0 and 1
    ranks = _replicas(layout, "seq", 2)
    assert (layout.coords(3).ep, layout.coords(3).edp) == (1, 1)
    local = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.input_quantizer._amax"
    ranks[3][local] = torch.tensor(7.0)
    notes = export_offline(rules_for("seq"), ranks, layout).report.disagreements
    assert notes == [f"{local.replace('local_experts.0', 'local_experts.1')}: data-parallel replicas differ "
                     f"(rank 1: {ranks[1][local].item():g}, rank 3: 7); exported rank 1's copy"]


def test_a_nan_on_a_dp_replica_is_refused_although_it_is_not_exported(tmp_path):
    layout = ParallelLayout(dp=2, num_layers=1)
    ranks = _replicas(layout)
    ranks[1][K_BMM] = torch.tensor(float("nan"))
    with pytest.raises(ExecutorError, match=rf"rank 1: bad quantizer values: {K_BMM} holds 1 NaN"):
        export_offline(rules_for("dense"), ranks, layout)


def _export_with_a_disagreeing_replica(out: str):
    from quantmap.executor import Placement, export

    layout = ParallelLayout(dp=2, num_layers=1)
    placement = Placement.from_world(layout)
    state = _replicas(layout)[placement.coords.rank]
    state[K_BMM] = torch.tensor(0.509 if placement.coords.rank == 0 else 99.0)
    result = export(rules_for("dense"), state, placement, out=out)
    return result.report.disagreements, result.calls


def test_a_distributed_export_compares_replicas_without_extra_collectives(tmp_path):
    outcomes = run_ranks(2, _export_with_a_disagreeing_replica, str(tmp_path / "hf"))
    assert [o[0] for o in outcomes] == ["ok", "ok"]
    (notes, calls), (_, replica_calls) = outcomes[0][1], outcomes[1][1]
    assert notes == [f"{K_BMM}: data-parallel replicas differ (rank 0: 0.509, rank 1: 99); exported rank 0's copy"]
    assert calls == replica_calls == 5  # 4 + one round of files, replicas or not


ROLE = {"a._amax": WEIGHT_AMAX, "b._pre_quant_scale": PRE_QUANT_SCALE}  # what their rules would say


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a._amax", "b._pre_quant_scale"]),
                          st.lists(st.sampled_from([0.0, 0.5, 3.0, -1.0, float("nan"), float("inf")]), min_size=1,
                                   max_size=4),
                          st.sampled_from([torch.float32, torch.bfloat16, torch.float16])), max_size=6))
def test_values_are_refused_exactly_when_one_is_not_finite_or_a_negative_amax(entries):
    tensors = [(f"{i}.{name}", torch.tensor(values, dtype=dtype), ROLE[name])
               for i, (name, values, dtype) in enumerate(entries)]
    bad = any(v != v or abs(v) == float("inf") or (v < 0 and name.endswith("amax"))
              for name, values, _ in entries for v in values)
    zero = [f"{i}.{name}" for i, (name, values, _) in enumerate(entries) if name.endswith("amax") and 0.0 in values]
    if bad:
        with pytest.raises(ExecutorError, match="bad quantizer values"):
            check_values(tensors)
    else:
        assert check_values(tensors) == zero


def test_large_tensors_are_checked_one_by_one_for_nan_inf_sign_and_zero():
    """Block amax can be gigabytes: tensors beyond the batched size are checked by a reduction each,
    with the same verdicts as the batched small ones."""
    from quantmap.executor.values import BadValues, check_values

    big = 10_000
    amax = "decoder.layers.0.mlp.linear_fc2.weight_quantizer._amax"
    scale = "decoder.layers.0.mlp.linear_fc2.input_quantizer._pre_quant_scale"
    assert check_values([(amax, torch.rand(big) + 0.1, WEIGHT_AMAX),
                         (scale, torch.rand(big) - 0.5, PRE_QUANT_SCALE)]) == []
    assert check_values([(amax, torch.cat([torch.zeros(1), torch.rand(big)]), WEIGHT_AMAX)]) == [amax]
    for bad in (float("nan"), float("inf"), -1.0):
        value = torch.rand(big)
        value[big // 2] = bad
        with pytest.raises(BadValues, match=re.escape(amax)):
            check_values([(amax, value, WEIGHT_AMAX)])
    nan_scale = torch.rand(big)
    nan_scale[3] = float("nan")
    with pytest.raises(BadValues, match="NaN"):
        check_values([(scale, nan_scale, PRE_QUANT_SCALE)])


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False),
       st.sampled_from([(torch.float64, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                        (torch.float64, torch.bfloat16), (torch.float16, torch.float32)]))
def test_a_dtype_conversion_is_refused_exactly_when_it_overflows_or_underflows(number, dtypes):
    """Finite becomes infinite (overflow), or a nonzero normal value becomes zero or subnormal (underflow): the
    import refuses it by name; any other value converts as a plain ``.to`` converts it."""
    from quantmap.executor.values import BadValues, converted

    source, target = dtypes
    value = torch.tensor([number], dtype=source)
    if not torch.isfinite(value).all():
        return  # not representable in the source dtype: check_values refuses it before any conversion
    plain = value.to(target)
    wide, info = value.double().item(), torch.finfo(target)
    over = math.isinf(plain.item())
    normal_in_source = abs(wide) >= torch.finfo(source).tiny  # a subnormal source may stay subnormal
    under = wide != 0 and (plain.item() == 0 or abs(plain.item()) < info.tiny and normal_in_source)
    if over or under:
        with pytest.raises(BadValues, match=rf"^x\._amax: the {str(source)[6:]} value \S+ "
                                            rf"{'overflows' if over else 'underflows'} {str(target)[6:]}, "):
            converted("x._amax", value, target)
    else:
        assert torch.equal(converted("x._amax", value, target), plain)


def test_a_float64_amax_is_checked_in_float64_not_called_infinite():
    assert check_values([("a._amax", torch.tensor([1e300], dtype=torch.float64), WEIGHT_AMAX),
                         ("b._amax", torch.full((5000,), 1e300, dtype=torch.float64), WEIGHT_AMAX)]) == []


def test_the_role_not_the_name_decides_what_is_checked():
    """Sign and zero are checked for an amax role, finiteness for every role: the role comes from the rule
    that claimed the tensor (no shipped rule's role disagrees with its name, see test_roles)."""
    from quantmap.executor.values import BadValues, quiet

    assert check_values([("x._amax", torch.tensor([-1.0, 0.0]), PRE_QUANT_SCALE)]) == []
    with pytest.raises(BadValues, match=r"x\.scale holds 1 negative value"):
        check_values([("x.scale", torch.tensor([-1.0, 2.0]), INPUT_AMAX)])
    assert check_values([("x.scale", torch.zeros(3), INPUT_AMAX), ("y.scale", torch.zeros(5000), WEIGHT_AMAX)]) == \
        ["x.scale", "y.scale"]
    assert check_values([("x._amax", torch.zeros(5000) - 1, None)]) == []  # a buffer no role is known for
    assert quiet(torch.tensor([-1.0, 2.0]), PRE_QUANT_SCALE) and not quiet(torch.tensor([-1.0, 2.0]), WEIGHT_AMAX)
    assert not quiet(torch.tensor([0.0]), INPUT_AMAX) and not quiet(torch.tensor([float("nan")]), PRE_QUANT_SCALE)
