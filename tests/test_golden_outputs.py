"""Every export and import of the real fixtures is byte-for-byte what it was when its digest was recorded.

The executor is being reshaped (one path for every payload) with no change in behaviour; this test is the
proof that holds across that work: the SHA-256 of every file each command writes, for each torch_dist
checkpoint in tests/data/dcp and each tests/data/megatron run laid out as a shard directory at TP=1 and
TP=2, scalar, per-channel and block state, export and import. A change that alters one byte names the
case and the file. Where a change is meant to alter an output, record the new digests with
``QUANTMAP_RECORD_GOLDEN=1 python -m pytest tests/test_golden_outputs.py`` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantmap.cli import app
from quantmap.executor import ParallelLayout

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden" / "outputs.json"
RECORD = os.environ.get("QUANTMAP_RECORD_GOLDEN") == "1"
# The fixture model (tests/data/README.md): 2 layers, hidden 64, 4 heads in 2 query groups of head_dim 16.
SIZES = ["-p", "num_attention_heads=4", "-p", "num_query_groups=2", "-p", "head_dim=16", "-p", "hidden_size=64"]
_TOKEN = re.compile(r"__quantmap_[0-9a-f]{12}")
_ZEROS = b"__quantmap_" + b"0" * 12
pytestmark = pytest.mark.slow  # 14 real exports and imports through the CLI

MOE_SPEC = str(DATA / "specs" / "moe_seq.yaml")

# case -> (spec, extra parameters); torch_dist checkpoints under tests/data/dcp
CHECKPOINTS = {
    "fp8_kv_tp1": ("llama", []),
    "fp8_kv_tp2": ("llama", []),
    "int8_tp2": ("llama", SIZES),
    "w4a8_awq_bs32_tp2": ("llama", [*SIZES, "-p", "weight_block_size=32"]),
}
# stem of tests/data/megatron -> (spec, extra parameters, experts)
SHARD_RUNS = {
    "state_fp8_default_kv": ("llama", [], None),
    "state_fp8_default_kv_moeseq": (MOE_SPEC, [], 4),
    "state_int8_default_moeseq": (MOE_SPEC, [*SIZES, "-p", "weight_block_size=0"], 4),
    "state_int8_smoothquant": ("llama", [*SIZES, "-p", "weight_block_size=0"], None),
    "state_int4_awq_bs32": ("llama", [*SIZES, "-p", "weight_block_size=32"], None),
}


def _digests(directory: Path) -> dict[str, str]:
    """Each file's SHA-256 by its path; the random token naming the data file an import into a torch_dist
    checkpoint adds (``__quantmap_<12 hex>.distcp``, and the same text inside ``.metadata``) reads as zeros."""
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    tokens = {found.group(0).encode() for path in files if (found := _TOKEN.search(path.name))}
    digests = {}
    for path in files:
        data = path.read_bytes()
        for token in tokens:
            data = data.replace(token, _ZEROS)
        digests[_TOKEN.sub(_ZEROS.decode(), str(path.relative_to(directory)))] = hashlib.sha256(data).hexdigest()
    return digests


def _run(*args: str) -> None:
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output


def _check(case: str, outputs: dict[str, dict[str, str]]) -> None:
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({**recorded, case: outputs}, indent=1, sort_keys=True) + "\n")
        return
    assert case in recorded, f"no digests recorded for {case}: run with QUANTMAP_RECORD_GOLDEN=1"
    for output, files in outputs.items():
        assert files == recorded[case][output], f"{case}: {output} changed"
    assert sorted(outputs) == sorted(recorded[case])


@pytest.mark.parametrize("fixture", sorted(CHECKPOINTS))
def test_a_torch_dist_checkpoints_export_and_import_into_a_copy_are_unchanged(fixture, tmp_path):
    spec, params = CHECKPOINTS[fixture]
    ckpt = DATA / "dcp" / fixture / "ckpt"
    _run("export", spec, "--megatron", str(ckpt), "--out", str(tmp_path / "hf"), *params)
    _run("import", spec, "--hf", str(tmp_path / "hf"), "--into", str(ckpt), "--out", str(tmp_path / "back"), *params)
    _check(f"torch_dist/{fixture}", {"export": _digests(tmp_path / "hf"), "import --into": _digests(tmp_path / "back")})


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("stem", sorted(SHARD_RUNS))
def test_a_shard_directorys_export_and_import_are_unchanged(stem, tp, tmp_path):
    spec, params, experts = SHARD_RUNS[stem]
    shards = tmp_path / "megatron"
    shards.mkdir()
    ParallelLayout(tp=tp, num_layers=2, num_experts=experts).write(shards)
    names = [f"{stem}_tp1"] if tp == 1 else [f"{stem}_tp2pp1ep1_rank{rank}" for rank in range(2)]
    for rank, name in enumerate(names):
        shutil.copy(DATA / "megatron" / f"{name}.safetensors", shards / f"rank_{rank:05d}.safetensors")
    _run("export", spec, "--megatron", str(shards), "--out", str(tmp_path / "hf"), *params)
    _run("import", spec, "--hf", str(tmp_path / "hf"), "--layout", str(shards), "--out", str(tmp_path / "back"),
         *params)
    _check(f"shards/{stem}/tp{tp}", {"export": _digests(tmp_path / "hf"), "import": _digests(tmp_path / "back")})
