"""The export's closing summary, on a real Megatron torch_dist checkpoint: where it wrote, what (tensors,
bytes, dtypes, as the files hold them), what it skipped and why, and the command to run next."""

import json
import shlex
from pathlib import Path

from typer.testing import CliRunner

from quantmap.cli import app

CKPT = Path(__file__).parent / "data" / "dcp" / "fp8_kv_tp1" / "ckpt"


def test_the_export_summary_says_where_what_what_was_skipped_and_what_next(tmp_path):
    out = tmp_path / "hf export"  # a space: the next command must quote it
    result = CliRunner().invoke(app, ["export", "llama", "--megatron", str(CKPT), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 32 and index["metadata"]["total_size"] == 128  # 32 float32 amax
    assert lines[0] == f"32 tensor(s) written to {out}: 128 bytes of data (32 F32) in 1 safetensors file(s) and the index"
    # the checkpoint's other 17 tensors (embedding, 2 x 7 per layer, final norm, output layer) and its 11
    # non-tensor entries (5 _extra_state per layer, rng_state)
    assert lines[1].startswith("17 tensor(s) that are not quantizer state skipped (weights, norms, embeddings")
    assert "quantmap moves quantizer state only" in lines[1]
    assert lines[2] == ("11 checkpoint entries that hold no tensor skipped (_extra_state, rng_state): "
                        "not model state")
    prefix = "next: check the export against its source (it must be clean): "
    assert lines[3].startswith(prefix) and len(lines) == 4
    command = shlex.split(lines[3][len(prefix):])
    assert command[:2] == ["quantmap", "check"] and command[-3:] == ["--hf", str(out), "--strict"]
    checked = CliRunner().invoke(app, command[1:])
    assert checked.exit_code == 0 and "no finding(s)" in checked.stdout, checked.output


def test_quiet_export_prints_nothing(tmp_path):
    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", "llama", "--megatron", str(CKPT), "--out", str(out), "--quiet"])
    assert result.exit_code == 0 and result.output == "" and (out / "model.safetensors.index.json").is_file()
