"""The real ``quantmap`` command, run in a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QUANTMAP = shutil.which("quantmap", path=str(Path(sys.executable).parent)) or "quantmap"


def run(*args, stdin=None, cwd=REPO, module=False):
    command = [sys.executable, "-m", "quantmap", *args] if module else [QUANTMAP, *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, cwd=cwd, timeout=120)


def test_compile_prints_a_readable_table_by_default():
    result = run("compile", "specs/llama.yaml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("llama: ") and lines[0].endswith(" rules")
    assert any(line.startswith("fanout") and "linear_qkv.weight_quantizer._amax" in line for line in lines)


@pytest.mark.slow
def test_compile_json_is_deterministic_and_has_kind_megatron_hf_and_source():
    first, second = run("compile", "llama", "--format", "json"), run("compile", "llama", "--format", "json")
    assert first.returncode == 0 and first.stdout == second.stdout
    rules = json.loads(first.stdout)
    assert {rule["kind"] for rule in rules} == {"weight", "amax", "fanout"}
    fanout = next(r for r in rules if r["megatron"].endswith("linear_fc1.input_quantizer._amax"))
    assert fanout["hf"] == ["model.layers.*.mlp.gate_proj.input_quantizer._amax",
                            "model.layers.*.mlp.up_proj.input_quantizer._amax"]
    assert fanout["source"]["line"] > 0


@pytest.mark.slow
def test_compile_yaml_round_trips_to_the_json_content():
    as_yaml = run("compile", "llama", "-f", "yaml")
    as_json = run("compile", "llama", "-f", "json")
    import yaml

    assert yaml.safe_load(as_yaml.stdout) == json.loads(as_json.stdout)


def test_python_dash_m_behaves_exactly_like_the_command():
    for args in (("compile", "llama", "-f", "json"), ("validate", "nope.yaml"), ("--help",)):
        a, b = run(*args), run(*args, module=True)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)


@pytest.mark.slow
def test_validate_exit_codes_and_file_line_col_messages(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmappings:\n  - {megatron: a.*.weight, hf: b.weight}\n")
    assert run("validate", "llama").returncode == 0
    result = run("validate", "llama", str(bad))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{bad}:3:")
    assert "QM021" in result.stderr


@pytest.mark.slow
def test_lookup_forward_reverse_and_json_lines():
    result = run("lookup", "llama", "decoder.layers.4.mlp.linear_fc1.weight_quantizer._amax", "--json")
    assert result.returncode == 0
    record = json.loads(result.stdout)
    assert record["kind"] == "fanout" and record["hf"][0] == "model.layers.4.mlp.gate_proj.weight_quantizer._amax"
    result = run("lookup", "llama", "--reverse", "model.layers.4.mlp.up_proj.weight_quantizer._amax", "--json")
    record = json.loads(result.stdout)
    assert record["megatron"] == "decoder.layers.4.mlp.linear_fc1.weight_quantizer._amax" and record["part"] == "up"


@pytest.mark.slow
def test_lookup_from_stdin_reports_unmatched_names_and_exits_1():
    names = "decoder.layers.0.mlp.linear_fc2.weight\nnot.a.name\n"
    result = run("lookup", "llama", "--from-file", "-", "--json", stdin=names)
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[1] == {"name": "not.a.name", "match": None}
    assert records[0]["hf"] == ["model.layers.0.mlp.down_proj.weight"]


@pytest.mark.slow
def test_schema_is_the_pydantic_json_schema_and_matches_the_shipped_copy():
    result = run("schema")
    schema = json.loads(result.stdout)
    assert "mappings" in schema["properties"] and schema["additionalProperties"] is False
    assert json.loads((REPO / "quantmap/specs/schema.json").read_text()) == schema


def test_shipped_specs_point_editors_at_the_schema():
    for spec in (REPO / "quantmap/specs").glob("*.yaml"):
        assert spec.read_text().startswith("# yaml-language-server: $schema=schema.json"), spec.name


@pytest.mark.slow
def test_bad_param_syntax_is_a_usage_error():
    result = run("compile", "llama", "--param", "num_layers")
    assert result.returncode == 2 and "NAME=INT" in result.stderr


@pytest.mark.slow
def test_unknown_spec_name_suggests_a_shipped_one():
    result = run("compile", "lama")
    assert result.returncode == 1 and "did you mean 'llama'" in result.stderr


@pytest.mark.parametrize("args", [("compile", "llama"), ("validate", "llama"),
                                  ("lookup", "llama", "decoder.layers.0.mlp.linear_fc2.weight"),
                                  ("lookup", "qwen3_moe", "--hf-naming", "in-memory", "-r",
                                   "model.layers.0.mlp.experts.gate_up_proj_input_quantizer._amax"),
                                  ("names", "deepseek_v3", "--side", "hf", "--layers", "2", "--experts", "2",
                                   "-p", "num_layers=2"),
                                  ("names", "qwen3_5", "--side", "megatron", "--layers", "2", "--layer-kind",
                                   "linear_attention=0", "--layer-kind", "full_attention=1"),
                                  ("names", "qwen2_5_vl", "--side", "hf", "--layers", "1")])
@pytest.mark.slow
def test_compile_validate_lookup_and_names_never_import_torch(args):
    code = (
        "import sys\n"
        "from quantmap.cli import main\n"
        f"sys.argv = ['quantmap', *{list(args)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("clean")


@pytest.mark.slow
def test_help_is_available_for_every_command():
    for command in ("compile", "validate", "lookup", "names", "schema", "specs"):
        result = run(command, "--help")
        assert result.returncode == 0 and "Usage:" in result.stdout


def test_diagnostics_doc_lists_every_code_with_its_title():
    from quantmap.diagnostics import CODES

    text = (REPO / "docs/diagnostics.md").read_text()
    for code, title in CODES.items():
        assert f"| {code} | {title} |" in text, code


@pytest.mark.slow
def test_lookup_json_of_a_grouped_moe_quantizer_lists_every_expert_when_the_count_is_known():
    name = "decoder.layers.2.mlp.experts.linear_fc2.input_quantizer._amax"
    result = run("lookup", "qwen3_moe", name, "--json", "--param", "num_experts=4")
    record = json.loads(result.stdout)
    assert record["kind"] == "moe_fanout"
    assert record["hf"] == ["model.layers.2.mlp.experts.*.down_proj.input_quantizer._amax"]
    assert record["expanded"] == [f"model.layers.2.mlp.experts.{e}.down_proj.input_quantizer._amax" for e in range(4)]
    without_count = json.loads(run("lookup", "qwen3_moe", name, "--json").stdout)
    assert "expanded" not in without_count


@pytest.mark.slow
def test_lookup_reverse_of_a_fan_in_name_shows_every_source_and_json_lists_them_when_the_count_is_known():
    name = "model.layers.2.mlp.experts.down_proj_input_quantizer._amax"
    result = run("lookup", "qwen3_moe", "--hf-naming", "in-memory", "--reverse", name, "--param", "num_experts=4")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"{name}\tfan_in\tdecoder.layers.2.mlp.experts.local_experts.*.linear_fc2."
                             f"input_quantizer._amax sources=4\n")
    record = json.loads(run("lookup", "qwen3_moe", "--hf-naming", "in-memory", "-r", name, "--json",
                            "-p", "num_experts=4").stdout)
    assert record["kind"] == "fan_in"
    assert record["expanded"] == [f"decoder.layers.2.mlp.experts.local_experts.{e}.linear_fc2.input_quantizer._amax"
                                  for e in range(4)]
    assert "expanded" not in json.loads(run("lookup", "qwen3_moe", "--hf-naming", "in-memory", "-r", name,
                                            "--json").stdout)
    # The default on-disk naming does not know the fused name.
    assert run("lookup", "qwen3_moe", "-r", name).returncode == 1


@pytest.mark.slow
def test_every_spec_command_takes_hf_naming_and_validate_checks_both(tmp_path):
    for command in ("compile", "validate", "lookup", "check", "export", "import"):
        result = run(command, "--help")
        assert "--hf-naming" in result.stdout, command
    compiled = json.loads(run("compile", "mixtral", "--hf-naming", "in-memory", "--format", "json").stdout)
    assert {"fan_in", "moe_fanout"} <= {rule["kind"] for rule in compiled}
    assert not any("block_sparse_moe" in target for rule in compiled for target in rule["hf"])
    bad = run("lookup", "llama", "--hf-naming", "disk", "decoder.layers.0.mlp.linear_fc2.weight")
    assert bad.returncode == 2 and "--hf-naming" in bad.stderr
    # validate compiles each naming: a broken in-memory mapping fails even though on-disk compiles.
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: broken\nextends: llama\nmappings:\n"
                    "  - {megatron: decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight,\n"
                    "     hf: model.layers.*.mlp.experts.*.down_proj, fused_experts: per-expert, hf_naming: in-memory}\n")
    both = run("validate", str(spec))
    assert both.returncode == 1 and "QM026" in both.stderr
    assert run("validate", str(spec), "--hf-naming", "on-disk").returncode == 0


@pytest.mark.slow
def test_check_of_in_memory_names_against_the_in_memory_naming(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("model.layers.0.mlp.experts.gate_up_proj_weight_quantizers.1._amax\n"
                     "model.layers.0.mlp.experts.gate_up_proj_input_quantizer._amax\nmodel.layers.0.mlp.experts.gate_up_proj\n")
    megatron = tmp_path / "megatron.txt"
    megatron.write_text("".join(f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.input_quantizer._amax\n"
                                for e in range(2)))
    in_memory = run("check", "qwen3_moe", "--hf", str(names), "--hf-naming", "in-memory", "--strict")
    assert in_memory.returncode == 0, in_memory.stdout
    # Two experts' input quantizers meeting in one HF tensor is by design: no QM103.
    fan_in = run("check", "qwen3_moe", "--megatron", str(megatron), "--hf-naming", "in-memory", "--strict")
    assert fan_in.returncode == 0, fan_in.stdout
    on_disk = run("check", "qwen3_moe", "--hf", str(names), "--strict")
    assert on_disk.returncode == 1 and "QM101" in on_disk.stdout


@pytest.mark.slow
def test_extends_resolves_beside_the_spec_then_the_shipped_library_from_any_working_directory(tmp_path):
    """``extends: llama.yaml`` means a llama.yaml next to the spec, else the shipped llama; a llama.yaml in
    the working directory never changes what a spec compiles to (issue 19, item 19)."""
    user, decoy = tmp_path / "user", tmp_path / "decoy"
    user.mkdir()
    decoy.mkdir()
    (user / "mine.yaml").write_text("name: mine\nextends: llama.yaml\nmappings: []\n")
    (decoy / "llama.yaml").write_text("name: decoy\nmappings:\n  - {megatron: decoy.weight, hf: decoy.weight}\n")

    def rules(cwd, spec):
        """The compiled rules, each source file as an absolute path (a user file is named from the cwd)."""
        result = run("compile", spec, "--format", "json", cwd=cwd, module=True)
        assert result.returncode == 0, result.stderr
        files = {file: (REPO if file.startswith("quantmap/specs/") else cwd) / file
                 for file in {rule["source"]["file"] for rule in json.loads(result.stdout)}}
        return [{**rule, "source": str(files[rule["source"]["file"]].resolve())} for rule in json.loads(result.stdout)]

    shipped = rules(user, "mine.yaml")
    assert shipped == rules(decoy, str(user / "mine.yaml"))
    assert all(not rule["megatron"].startswith("decoy") for rule in shipped)
    assert {rule["source"] for rule in shipped} >= {str((REPO / "quantmap/specs/llama.yaml").resolve())}
    table = run("compile", str(user / "mine.yaml"), cwd=decoy, module=True).stdout.splitlines()
    assert table[1].startswith("spec files: ") and "extends quantmap/specs/llama.yaml" in table[1]

    (user / "llama.yaml").write_text("name: local\nmappings:\n  - {megatron: local.weight, hf: local.weight}\n")
    beside = rules(decoy, str(user / "mine.yaml"))
    assert beside == rules(user, "mine.yaml") and {rule["megatron"].split(".")[0] for rule in beside} == {"local"}
    assert beside[0]["source"] == str((user / "llama.yaml").resolve())
