"""``quantmap check``: the library's findings, and the command that prints them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import quantmap
from quantmap.check import check

DATA = Path(__file__).parent / "data"
LLAMA_HF = [f"model.layers.0.{s}" for s in (
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight")] + ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
LLAMA_MEGATRON = [f"decoder.layers.0.{s}" for s in (
    "input_layernorm.weight", "pre_mlp_layernorm.weight", "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
    "self_attention.linear_qkv._extra_state")] + [
    "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]


@pytest.fixture(scope="module")
def llama():
    return quantmap.compile("llama")


def codes(report) -> list[tuple[str, str, str]]:
    return sorted((f.code, f.side, f.name) for f in report.findings)


def test_matching_names_on_both_sides_have_no_findings(llama):
    report = check(llama, megatron=LLAMA_MEGATRON, hf=LLAMA_HF)
    assert report.ok and report.names == {"megatron": len(LLAMA_MEGATRON), "hf": len(LLAMA_HF)}


def test_names_no_rule_claims_are_qm101_on_their_side_but_exclusions_are_not(llama):
    report = check(llama, megatron=LLAMA_MEGATRON + ["decoder.layers.0.mystery.weight"],
                   hf=LLAMA_HF + ["model.layers.0.mystery.weight"])
    # decoder.layers.0.self_attention.linear_qkv._extra_state is excluded by the spec's '**._extra_state'.
    assert codes(report) == [("QM101", "hf", "model.layers.0.mystery.weight"),
                             ("QM101", "megatron", "decoder.layers.0.mystery.weight")]


def test_a_target_absent_from_the_other_side_is_qm102_in_both_directions(llama):
    report = check(llama, megatron=[n for n in LLAMA_MEGATRON if "linear_proj" not in n],
                   hf=[n for n in LLAMA_HF if "down_proj" not in n])
    assert codes(report) == [("QM102", "hf", "model.layers.0.self_attn.o_proj.weight"),
                             ("QM102", "megatron", "decoder.layers.0.mlp.linear_fc2.weight")]


def test_two_megatron_names_resolving_to_one_hf_name_are_qm103(llama):
    te_and_local = LLAMA_MEGATRON + ["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]
    [finding] = check(llama, megatron=te_and_local).findings
    assert (finding.code, finding.name) == ("QM103", "model.layers.0.input_layernorm.weight")
    assert "linear_qkv.layer_norm_weight" in finding.message and "input_layernorm.weight" in finding.message


def test_a_fused_group_with_a_missing_part_is_qm104_with_or_without_megatron_names(llama):
    hf = [n for n in LLAMA_HF if "v_proj" not in n]
    assert codes(check(llama, megatron=LLAMA_MEGATRON, hf=hf)) == [
        ("QM104", "hf", "model.layers.0.self_attn.v_proj.weight")]
    assert codes(check(llama, hf=hf)) == [("QM104", "hf", "model.layers.0.self_attn.v_proj.weight")]


def test_grouped_expert_quantizers_are_checked_against_every_expert():
    hf = [f"model.layers.0.mlp.experts.{e}.down_proj.weight_quantizer._amax" for e in range(3)]
    megatron = ["decoder.layers.0.mlp.experts.linear_fc2.weight_quantizer._amax"]
    # Expert count given: the fourth expert's buffer is missing. (Each HF buffer's reverse lookup
    # prefers SequentialMLP's local_experts, which this grouped model lacks: QM106.)
    found = codes(check(quantmap.compile("olmoe", num_experts=4), megatron=megatron, hf=hf))
    assert [f for f in found if f[0] != "QM106"] == [
        ("QM104", "hf", "model.layers.0.mlp.experts.3.down_proj.weight_quantizer._amax")]
    assert [f for f in found if f[0] == "QM106"] == [("QM106", "hf", name) for name in hf]  # present ones only
    # Not given: the experts the HF names hold are the targets.
    assert {f.code for f in check(quantmap.compile("olmoe"), megatron=megatron, hf=hf).findings} == {"QM106"}
    assert codes(check(quantmap.compile("olmoe"), megatron=megatron, hf=[])) == [("QM102", "megatron", megatron[0])]


def test_findings_in_every_layer_group_into_one_shape(llama):
    hf = [f"model.layers.{i}.mystery.weight" for i in range(12)]
    report = check(llama, hf=hf)
    assert list(report.groups()) == [("QM101", "hf", "model.layers.*.mystery.weight")]
    assert "model.layers.*.mystery.weight (12 names)" in report.to_text()


def test_json_report_counts_findings_by_code(llama):
    data = check(llama, megatron=LLAMA_MEGATRON + ["x.weight"]).to_json()
    assert data["ok"] is False and data["counts"] == {"QM101": 1} and data["names"]["hf"] is None
    assert data["groups"][0]["names"] == ["x.weight"] and data["findings"][0]["code"] == "QM101"


def test_check_needs_names_on_at_least_one_side(llama):
    with pytest.raises(ValueError, match="needs Megatron names, HF names, or both"):
        check(llama)


# --- The command, run for real. ---

def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantmap", "check", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def names_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("names")
    files = {"megatron": folder / "megatron.txt", "hf": folder / "hf.txt", "bad_hf": folder / "bad_hf.txt"}
    files["megatron"].write_text("\n".join(LLAMA_MEGATRON) + "\n")
    files["hf"].write_text("# save_pretrained names\n" + "\n".join(LLAMA_HF) + "\n")
    files["bad_hf"].write_text("\n".join(n for n in LLAMA_HF if "k_proj" not in n) + "\nmodel.extra.weight\n")
    return files


@pytest.mark.slow
def test_cli_check_passes_clean_names_in_strict_mode(names_files):
    result = run("llama", "--megatron", str(names_files["megatron"]), "--hf", str(names_files["hf"]), "--strict")
    assert result.returncode == 0, result.stderr
    assert "no finding" in result.stdout


@pytest.mark.slow
def test_cli_check_reports_grouped_findings_and_exits_1_only_when_strict(names_files):
    args = ("llama", "--megatron", str(names_files["megatron"]), "--hf", str(names_files["bad_hf"]))
    lenient, strict = run(*args), run(*args, "--strict")
    assert lenient.returncode == 0 and strict.returncode == 1
    assert "QM101 name that no rule claims: 1" in lenient.stdout
    assert "QM104 fan-out group with a missing part: 1" in lenient.stdout


@pytest.mark.slow
def test_cli_check_json_output_is_machine_readable(names_files):
    result = run("llama", "--hf", str(names_files["bad_hf"]), "--format", "json")
    data = json.loads(result.stdout)
    assert data["spec"] == "llama" and data["counts"] == {"QM101": 1, "QM104": 1}


@pytest.mark.slow
def test_cli_check_reads_a_safetensors_file_and_takes_run_time_params():
    fixture = DATA / "hf" / "quant_deepseek_v3_FP8_DEFAULT_CFG_plus_FP8_KV_CFG.safetensors"
    result = run("deepseek_v3", "--hf", str(fixture), "--param", "num_layers=3", "--format", "json")
    data = json.loads(result.stdout)
    # Only the transformers v5 fused-expert quantizers (a later issue) are unclaimed.
    assert result.returncode == 0 and set(data["counts"]) == {"QM101"}
    assert all(".mlp.experts.gate_up_proj_" in g["shape"] or ".mlp.experts.down_proj_" in g["shape"]
               for g in data["groups"])


@pytest.mark.slow
def test_cli_check_without_a_needed_param_fails_with_the_param_named(names_files):
    result = run("deepseek_v3", "--hf", str(names_files["hf"]))
    assert result.returncode == 1 and "num_layers" in result.stderr and "QM050" in result.stderr


@pytest.mark.slow
def test_cli_check_with_unreadable_names_exits_1_with_the_path(tmp_path):
    result = run("llama", "--hf", str(tmp_path / "missing.txt"))
    assert result.returncode == 1 and "missing.txt: no such file or directory" in result.stderr


@pytest.mark.slow
def test_cli_check_without_any_names_is_a_usage_error():
    result = run("llama")
    assert result.returncode == 2 and "--megatron, --hf, or both" in result.stderr


def test_dead_rules_are_notes_for_the_kinds_of_names_present():
    """qwen2's qkv bias rules match nothing in a Llama-shaped model; AWQ's _pre_quant_scale rules are not
    dead where the names hold no _pre_quant_scale at all. Notes never fail the report."""
    qwen2 = quantmap.compile("qwen2")
    report = check(qwen2, megatron=LLAMA_MEGATRON, hf=LLAMA_HF)
    assert report.ok
    dead = sorted(n.name for n in report.notes if n.code == "QM105")
    assert dead == ["decoder.layers.*.self_attention.linear_qkv.bias"]
    buffers = ["decoder.layers.0.self_attention.linear_proj.weight_quantizer._amax"]
    report = check(qwen2, megatron=LLAMA_MEGATRON + buffers, hf=LLAMA_HF + ["model.layers.0.self_attn.o_proj.weight_quantizer._amax"])
    dead = {n.name for n in report.notes if n.code == "QM105"}
    assert "decoder.layers.*.self_attention.linear_qkv.weight_quantizer._amax" in dead
    assert not any("_pre_quant_scale" in name or "input_quantizer" in name for name in dead)
    assert "QM105" in report.to_text() and report.to_json()["notes"]


def test_reverse_winners_the_model_lacks_are_reported_with_both_sides_only(llama):
    te = [n.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
          .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight") for n in LLAMA_MEGATRON]
    assert check(llama, megatron=te, hf=LLAMA_HF).notes == ()
    notes = check(llama, megatron=LLAMA_MEGATRON, hf=LLAMA_HF).notes  # local: TE's names win reverse
    assert [(n.code, n.name) for n in notes] == [("QM106", "model.layers.0.input_layernorm.weight"),
                                                 ("QM106", "model.layers.0.post_attention_layernorm.weight")]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in notes[0].message
    assert check(llama, megatron=LLAMA_MEGATRON).notes == ()


# -- an export against its own source ----------------------------------------------------------------------
CKPT = DATA / "dcp/fp8_kv_tp1/ckpt"  # a real Megatron torch_dist checkpoint: weights and quantizer state


@pytest.fixture(scope="module")
def export_of_ckpt(tmp_path_factory):
    """What ``quantmap export`` writes for CKPT: quantizer state only, no weights."""
    from typer.testing import CliRunner

    from quantmap.cli import app

    out = tmp_path_factory.mktemp("export") / "hf"
    result = CliRunner().invoke(app, ["export", "llama", "--megatron", str(CKPT), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def test_an_export_checked_against_its_own_source_is_clean(export_of_ckpt):
    """The export holds no weights by design: the source's weights are not expected in it (they were 15
    QM102 findings, one per weight rule); the CLI says why, and --strict passes."""
    result = run("llama", "--megatron", str(CKPT), "--hf", str(export_of_ckpt), "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "check llama: 35 Megatron names, 32 HF names; no finding(s)"
    assert lines[1] == ("the HF names hold quantizer state only (no weights): the Megatron weights' targets are "
                        "not expected there")
    report = json.loads(run("llama", "--megatron", str(CKPT), "--hf", str(export_of_ckpt), "-f", "json").stdout)
    assert report["ok"] and report["state_only"] == ["hf"]


def test_a_quantizer_missing_from_an_export_is_still_qm102(llama, export_of_ckpt):
    from quantmap.io.names import read_names
    from quantmap.io.torch_dist import checkpoint_names

    source = checkpoint_names(CKPT)
    lost = "model.layers.1.self_attn.o_proj.weight_quantizer._amax"
    report = check(llama, megatron=source, hf=[n for n in read_names(export_of_ckpt) if n != lost])
    assert report.state_only == ("hf",)
    assert codes(report) == [("QM102", "megatron", "decoder.layers.1.self_attention.linear_proj.weight_quantizer._amax")]


def test_a_side_with_some_weights_is_a_whole_model_and_each_weight_it_lacks_is_qm102(llama, export_of_ckpt):
    from quantmap.io.names import read_names
    from quantmap.io.torch_dist import checkpoint_names

    report = check(llama, megatron=checkpoint_names(CKPT), hf=read_names(export_of_ckpt) + ["model.embed_tokens.weight"])
    assert report.state_only == ()
    missing = {f.name for f in report.findings if f.code == "QM102"}
    assert "decoder.layers.0.self_attention.linear_proj.weight" in missing and len(missing) == 14
    assert "embedding.word_embeddings.weight" not in missing


def test_a_megatron_side_of_quantizer_state_only_expects_no_hf_weights(llama):
    """The other direction: quantizer names on the Megatron side against a whole HF model."""
    buffer = "decoder.layers.0.self_attention.linear_proj.weight_quantizer._amax"
    report = check(llama, megatron=[buffer], hf=LLAMA_HF + ["model.layers.0.self_attn.o_proj.weight_quantizer._amax"])
    assert report.ok and report.state_only == ("megatron",)
    report = check(llama, megatron=[buffer], hf=LLAMA_HF)
    assert codes(report) == [("QM102", "megatron", buffer)]
