"""Scalar records are built in bulk for the file writer (a SequentialMLP export has 10^5 of them):
the bytes must be those of building each record on its own, disagreements included (NaN never gets
this far: packing refuses it), and the disagreement must still be reported once."""

from __future__ import annotations

import torch

from executor_support import global_state, rules_for, shard
from quantmap.executor import ParallelLayout, export_offline
from quantmap.io.safetensors_stream import each_record


def test_bulk_scalar_data_equals_record_by_record_data_and_reports_disagreements_once():
    layout = ParallelLayout(tp=2, num_layers=2)
    ranks = shard(global_state("dense", 2), layout)
    ranks[1]["decoder.layers.0.self_attention.linear_proj.input_quantizer._amax"] = torch.tensor(99.0)
    ranks[0]["decoder.layers.1.self_attention.linear_qkv.input_quantizer._amax"] = torch.tensor(0.125)
    for state in ranks:  # a second dtype, so that runs break on it
        state["decoder.layers.1.self_attention.core_attention.k_bmm_quantizer._amax"] = torch.tensor(2.5, dtype=torch.bfloat16)
    records = export_offline(rules_for("dense"), ranks, layout).records()
    everything = range(len(records))
    bulk = b"".join(records.data(everything))
    assert len(records.plan.report.disagreements) == 2
    assert bulk == b"".join(each_record(records, everything))
    assert len(records.plan.report.disagreements) == 2, "each disagreement is reported once"
    assert any("99" in note for note in records.plan.report.disagreements)
    assert any(records.spec(i)[0] > 1 for i in everything), "fanned-out records are written once per name"
    assert {records.spec(i)[1] for i in everything} >= {torch.float32, torch.bfloat16}
