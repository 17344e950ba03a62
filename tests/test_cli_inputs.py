"""A missing input is one kind of error, whatever the option or command: one ``error:`` line naming the
option and the path, what was expected and the fix, exit code 1, no usage banner, nothing written."""

import pytest
from typer.testing import CliRunner

from quantmap.cli import app

CKPT = "tests/data/dcp/fp8_kv_tp1/ckpt"

# (command line with MISSING where the missing path goes, the option named, what it expects)
CASES = [
    (["compile", "llama", "--config", "MISSING"], "--config", "config.json"),
    (["validate", "llama", "--config", "MISSING"], "--config", "config.json"),
    (["lookup", "llama", "--config", "MISSING"], "--config", "config.json"),
    (["lookup", "llama", "--from-file", "MISSING"], "--from-file", "names, one per line"),
    (["names", "llama", "--side", "hf", "--config", "MISSING"], "--config", "config.json"),
    (["check", "llama", "--config", "MISSING", "--megatron", CKPT], "--config", "config.json"),
    (["check", "llama", "--megatron", "MISSING"], "--megatron", "a names source"),
    (["check", "llama", "--hf", "MISSING"], "--hf", "a names source"),
    (["export", "llama", "--megatron", "MISSING", "--out", "OUT"], "--megatron", "a Megatron checkpoint"),
    (["export", "llama", "--megatron", CKPT, "--config", "MISSING", "--out", "OUT"], "--config", "config.json"),
    (["import", "llama", "--hf", "MISSING", "--layout", CKPT, "--out", "OUT"], "--hf", "a Hugging Face checkpoint"),
    (["import", "llama", "--hf", CKPT, "--layout", "MISSING", "--out", "OUT"], "--layout", "a layout.json"),
    (["import", "llama", "--hf", CKPT, "--into", "MISSING", "--out", "OUT"], "--into", "a torch_dist checkpoint"),
    (["import", "llama", "--hf", CKPT, "--into", CKPT, "--config", "MISSING", "--in-place"], "--config", "config.json"),
]


@pytest.mark.parametrize("args, option, expected", CASES, ids=[" ".join(c[0][:1] + [c[1]]) for c in CASES])
def test_a_missing_input_path_is_one_line_naming_the_option_exit_1(tmp_path, args, option, expected):
    missing, out = tmp_path / "no" / "such", tmp_path / "out"
    args = [str(missing) if a == "MISSING" else str(out) if a == "OUT" else a for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and not result.stdout, result.output
    assert lines[0].startswith(f"error: {option} {missing}: no such file or directory; expected ")
    assert expected in lines[0] and lines[0].endswith("check the path")
    assert "Usage" not in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_missing_spec_file_is_the_same_kind_of_error():
    """A spec argument may be a shipped name, so the loader reports it (QM006): one line, exit 1."""
    result = CliRunner().invoke(app, ["compile", "no/such/spec.yaml"])
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert "QM006" in result.stderr and "Usage" not in result.output


def test_an_unusable_config_that_exists_is_an_input_error_too(tmp_path):
    """A config that exists but is no JSON is a problem with an input (exit 1), not a wrong command line."""
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(app, ["compile", "llama", "--config", str(bad)])
    assert result.exit_code == 1 and "Usage" not in result.output
    assert result.stderr.splitlines() == [f"error: --config: {bad} is not a JSON config (Expecting property name "
                                          f"enclosed in double quotes: line 1 column 2 (char 1)); give a Hugging "
                                          f"Face config.json"]


def test_stdin_is_not_a_missing_file():
    result = CliRunner().invoke(app, ["lookup", "llama", "--from-file", "-"],
                                input="decoder.layers.0.self_attention.linear_qkv.weight\n")
    assert result.exit_code == 0 and "q_proj" in result.stdout


@pytest.mark.parametrize("args", [["compile", "llama", "--config", "PIPE"], ["compile", "PIPE"],
                                  ["names", "llama", "--side", "hf", "--config", "DIR"],
                                  ["check", "llama", "--megatron", "PIPE"]],
                         ids=["--config pipe", "spec pipe", "--config dir holding a pipe", "check --megatron pipe"])
def test_a_named_pipe_given_as_an_input_file_is_refused_at_once_not_read(tmp_path, args):
    """Reading a named pipe waits for a writer forever (issue 19 item 15: every file read)."""
    import os
    import signal

    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "dir" / "config.json")
    os.mkfifo(tmp_path / "pipe")
    args = [str(tmp_path / "pipe") if a == "PIPE" else str(tmp_path / "dir") if a == "DIR" else a for a in args]
    def blocked(signum, frame):
        raise TimeoutError("the command blocked reading a named pipe")

    previous = signal.signal(signal.SIGALRM, blocked)  # on failure the read blocks: fail this test, not the suite
    signal.alarm(20)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.exit_code == 1, result.output
    assert "is a named pipe, not a" in result.stderr and len(result.stderr.splitlines()) == 1, result.output
