"""Compiled once per process tree: a rule set pickles as what it was compiled from (the resolved spec, the
parameters, the HF naming) and unpickles as the same rules, never reading the spec's files again; spawned
workers get the rules their command compiled."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import pytest

import quantmap
from executor_support import SPECS, global_state, shard
from quantmap.executor import ParallelLayout, RunOptions
from quantmap.executor.launch import export_from, import_checkpoint
from quantmap.io.shards import save_shard
from quantmap.model_names import ModelSize, model_names

# spec, HF naming, parameters, model size for the names looked up: a dense model, a MoE one, and the in-memory
# naming of a spec whose in-memory renames would apply twice if the renamed spec were what is pickled
CASES = [
    ("llama", "on-disk", {}, ModelSize(layers=3)),
    ("deepseek_v3", "on-disk", {"num_layers": 3, "num_experts": 4}, ModelSize(layers=3, experts=4)),
    ("qwen2_5_vl", "in-memory", {}, ModelSize(layers=2)),
    ("qwen3_moe", "in-memory", {"num_experts": 4}, ModelSize(layers=2, experts=4)),
]


@pytest.mark.parametrize("spec, hf_naming, params, size", CASES, ids=[case[0] for case in CASES])
def test_a_pickled_rule_set_is_the_same_rules_with_the_same_lookups(spec, hf_naming, params, size):
    rules = quantmap.compile(spec, hf_naming, **params)
    again = pickle.loads(pickle.dumps(rules))
    assert again.to_json() == rules.to_json()
    assert (again.hf_naming, again.params, again.spec) == (hf_naming, rules.params, rules.spec)
    assert "hf_naming" not in again.params  # the naming is the rule set's, not a parameter
    megatron, hf = model_names(rules, "megatron", size), model_names(rules, "hf", size)
    assert megatron and hf
    assert [again.to_hf(name) for name in megatron] == [rules.to_hf(name) for name in megatron]
    assert [again.to_megatron(name) for name in hf] == [rules.to_megatron(name) for name in hf]


def test_unpickling_reads_no_spec_file(tmp_path):
    spec = tmp_path / "model.yaml"
    shutil.copy(SPECS / "dense_mla.yaml", spec)
    rules = quantmap.compile(spec)
    pickled = pickle.dumps(rules)
    spec.unlink()
    assert pickle.loads(pickled).to_json() == rules.to_json()  # the rules still name the file they came from


def _digests(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_spawned_workers_export_and_import_with_the_rules_compiled_before_the_spec_file_went(tmp_path):
    """With --nproc 2 every worker used to compile the spec again from its file: gone, they could not."""
    spec = tmp_path / "model.yaml"
    shutil.copy(SPECS / "dense_mla.yaml", spec)
    rules = quantmap.compile(spec)
    spec.rename(tmp_path / "moved.yaml")
    layout = ParallelLayout(pp=2, num_layers=2)
    directory = tmp_path / "shards"
    for rank, state in enumerate(shard(global_state("dense", 2), layout)):
        save_shard(state, layout, directory, rank=rank)

    report = export_from(rules, directory, tmp_path / "hf", RunOptions(nproc=2))
    export_from(rules, directory, tmp_path / "hf-offline", RunOptions())
    assert report.written and _digests(tmp_path / "hf") == _digests(tmp_path / "hf-offline")

    import_checkpoint(rules, tmp_path / "hf", directory, tmp_path / "back", RunOptions(nproc=2, strict=True))
    import_checkpoint(rules, tmp_path / "hf", directory, tmp_path / "back-offline", RunOptions(strict=True))
    assert _digests(tmp_path / "back") == _digests(tmp_path / "back-offline")
