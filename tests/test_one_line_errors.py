"""Input that once ended in a Python traceback, and output that could not be written: the real CLI, run
as a subprocess on real files, ends each with one ``error:`` line (or a usage error) naming the file,
option or key, and the exit code the project gives it; a reader closing the pipe is a quiet exit.

The input cases are DATA: one ``Case`` row each (how to spoil a fresh copy of a fixture, the command,
the exit code, a phrase of the message), so a new one is one line."""

from __future__ import annotations

import dataclasses
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from executor_support import SPECS, global_state, shard
from quantmap.executor import ParallelLayout
from quantmap.executor.report import distinct
from quantmap.io.shards import save_shard
from quantmap.io.torch_dist.metadata import METADATA_FILE, load_metadata

REPO = Path(__file__).resolve().parents[1]
DCP = REPO / "tests" / "data" / "dcp"
HUGE = "1" * 5000  # int() refuses it: past Python's 4300-digit limit
SIZES = ["-p", "num_attention_heads=4", "-p", "num_query_groups=2", "-p", "head_dim=16"]
AMAX = "decoder.layers.0.self_attention.linear_proj.input_quantizer._amax"


def quantmap(*args, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "quantmap", *map(str, args)], cwd=REPO, env=env, text=True,
                          capture_output="stdout" not in popen, timeout=300, **popen)


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


# -- how to spoil a copy of a fixture (each returns the command's arguments) ---------------------------

def ckpt(tmp: Path, fixture: str = "int8_tp2") -> Path:
    shutil.copytree(DCP / fixture / "ckpt", tmp / "ckpt")
    return tmp / "ckpt"


def export(tmp: Path, *extra) -> list:
    return ["export", "llama", *SIZES, "--megatron", tmp / "ckpt", "--out", tmp / "out", *extra]


def tracker(text: str) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        (ckpt(tmp) / "latest_checkpointed_iteration.txt").write_text(text)
        return export(tmp)
    return build


def metadata(change: Callable) -> Callable[[Path], list]:
    """Rewrite ``.metadata`` with only the classes torch writes, in a structure torch never writes."""
    def build(tmp: Path) -> list:
        directory = ckpt(tmp) / "release"
        loaded = load_metadata(directory, real=True)
        change(loaded)
        (directory / METADATA_FILE).write_bytes(pickle.dumps(loaded))
        return export(tmp)
    return build


def huge_layer_key(loaded) -> None:
    key = AMAX.replace(".0.", f".{HUGE}.")
    loaded.state_dict_metadata[key] = loaded.state_dict_metadata.pop(AMAX)
    for index in [index for index in loaded.storage_data if index.fqn == AMAX]:
        loaded.storage_data[dataclasses.replace(index, fqn=key)] = loaded.storage_data.pop(index)


def setter(target: Callable, field: str, value) -> Callable:
    return lambda loaded: setattr(target(loaded), field, value)


def modelopt_state(state) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        torch.save(state, ckpt(tmp) / "release" / "modelopt_state" / "common.pt")
        return export(tmp)
    return build


def config(text: str) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        (tmp / "config.json").write_text(text)
        return ["compile", "llama", "--config", tmp / "config.json"]
    return build


def spec(text: bytes) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        (tmp / "spec.yaml").write_bytes(text)
        return ["compile", tmp / "spec.yaml"]
    return build


def hf_index(text: str) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        (tmp / "hf").mkdir()
        (tmp / "hf" / "model.safetensors.index.json").write_text(text)
        return ["check", "llama", "--hf", tmp / "hf"]
    return build


def hf_fp8(tmp: Path) -> list:
    """An export of a real checkpoint with its amax cast to float8 (which has no max kernel)."""
    source = tmp / "hf"
    done = quantmap("export", "llama", "--megatron", DCP / "fp8_kv_tp1" / "ckpt", "--out", source, "-q")
    assert done.returncode == 0, done.stderr
    shard_file = next(source.glob("*.safetensors"))
    state = load_file(shard_file)
    save_file({name: value.to(torch.float8_e4m3fn) for name, value in state.items()}, shard_file)
    return ["import", "llama", "--hf", source, "--into", ckpt(tmp, "fp8_kv_tp1"), "--out", tmp / "out"]


def args(*given) -> Callable[[Path], list]:
    return lambda tmp: list(given)


class Case(NamedTuple):
    name: str
    build: Callable[[Path], list]
    code: int
    phrase: str


CASES = [
    Case("5000-digit tracker", tracker(HUGE), 1, "over quantmap's limit of 64 (quantmap/limits.py) bytes"),
    Case("19-digit tracker", tracker("1" * 19), 1, "latest_checkpointed_iteration.txt: says '1111"),
    Case("superscript-two tracker", tracker("²"), 1, "latest_checkpointed_iteration.txt: says '²'"),
    Case("5000-digit -p", args("compile", "llama", "-p", f"num_layers={HUGE}"), 2, "is not NAME=INT"),
    Case("superscript-two -p", args("compile", "llama", "-p", "num_layers=²"), 2, "'num_layers=²' is not NAME=INT"),
    Case("superscript-two layer list", args("names", "llama", "--side", "hf", "--layers", "2", "--dense-layers", "²"),
         2, "'²' is not a layer"),
    Case("5000-digit .metadata key", metadata(huge_layer_key), 1, "has a layer index of 5000 digits"),
    Case(".metadata shape of the wrong type",
         metadata(setter(lambda m: m.state_dict_metadata[AMAX], "size", "abc")), 1, "size 'abc', not a tensor's"),
    Case(".metadata chunks of the wrong type",
         metadata(setter(lambda m: m.state_dict_metadata[AMAX], "chunks", 5)), 1, "its chunks are 5, not a list"),
    Case(".metadata storage offsets of the wrong type",
         metadata(lambda m: [setattr(info, "offset", "x") for info in m.storage_data.values()]), 1,
         "at byte offset 'x'"),
    Case(".metadata state_dict_metadata of the wrong type", metadata(setter(lambda m: m, "state_dict_metadata", [1])),
         1, "state_dict_metadata is [1], not a dict"),
    Case("modelopt_state_dict not a list", modelopt_state({"modelopt_state_dict": 5}), 1,
         "common.pt: not ModelOpt's saved state: its modelopt_state_dict is int"),
    Case("modelopt mode not a pair", modelopt_state({"modelopt_state_dict": [(1, 2, 3)]}), 1, "a mode is (1, 2, 3)"),
    Case("modelopt config not a dict", modelopt_state({"modelopt_state_dict": [("quantize", {"config": []})]}), 1,
         "a mode is ('quantize', {'config': []})"),
    Case("5000-digit --config value", config(f'{{"num_hidden_layers": {HUGE}}}'), 1, "integer of 5000 digits"),
    Case("num_attention_heads: 0", config('{"num_attention_heads": 0, "hidden_size": 64}'), 1,
         "num_attention_heads is 0"),
    Case("deeply nested --config", config("[" * 100000 + "]" * 100000), 1, "nested too deeply"),
    Case("5000-digit total_size", hf_index(f'{{"metadata": {{"total_size": {HUGE}}}, "weight_map": {{}}}}'), 1,
         "model.safetensors.index.json: not a safetensors index: it holds an integer of 5000 digits"),
    Case("deeply nested index.json", hf_index("[" * 100000 + "]" * 100000), 1, "nested too deeply"),
    Case("NUL in a spec", spec(b"name: x\x00\nmappings: []\n"), 1, "spec.yaml:1:8: error QM001: YAML syntax error: "
         "control character U+0000"),
    Case("ESC in a spec", spec(b"name: x\nmappings:\n  - {megatron: a\x1bb, hf: c}\n"), 1, "spec.yaml:3:17: error QM001"),
    Case("fp8 amax imported", hf_fp8, 1, "dtype float8_e4m3fn is an 8-bit float"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_ends_in_one_clear_line(case, tmp_path):
    done = quantmap(*case.build(tmp_path))
    assert done.returncode == case.code, done.stderr
    if case.code == 2:  # a usage error: click's banner, then the one line saying what is wrong
        assert "Traceback" not in done.stderr and case.phrase in done.stderr.splitlines()[-1], done.stderr
    else:
        assert case.phrase in one_line(done.stderr)
    assert not (tmp_path / "out").exists()


def test_a_5000_digit_offset_capture_is_no_match_not_a_traceback():
    done = quantmap("lookup", "glm4_moe", "-p", "num_layers=2", "-p", "num_experts=4", "--reverse",
                    f"model.layers.{HUGE}.enorm.weight", "model.layers.3.enorm.weight")
    assert done.returncode == 1 and done.stderr == ""
    assert done.stdout.splitlines() == [f"model.layers.{HUGE}.enorm.weight\t(no match)",
                                        "model.layers.3.enorm.weight\tweight\tmtp.layers.1.enorm.weight"]


# -- output that cannot be written -------------------------------------------------------------------

@pytest.mark.parametrize("command", [["compile", "llama"], ["names", "llama", "--side", "hf", "--layers", "2"],
                                     ["lookup", "llama", "decoder.layers.0.mlp.linear_fc1.weight"]])
@pytest.mark.parametrize("stdout", ["closed", "/dev/full"])
def test_output_that_cannot_be_written_is_one_error_line(command, stdout):
    if stdout == "closed":  # as `>&-` leaves it: Python starts with sys.stdout None
        done = quantmap(*command, stdout=None, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
        reason = "it is closed"
    else:
        with open(stdout, "w") as full:
            done = quantmap(*command, stdout=full, stderr=subprocess.PIPE)
        reason = "No space left on device"
    assert done.returncode == 1
    assert one_line(done.stderr) == (f"error: cannot write the output to standard output: {reason}; redirect it to "
                                     f"a file with room, or to /dev/null")


def test_a_reader_closing_the_pipe_is_a_quiet_exit(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"decoder.layers.{i}.mlp.linear_fc1.weight\n" for i in range(50000)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-m", "quantmap", "lookup", "llama", "--from-file", str(names)], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout.readline().startswith(b"decoder.layers.0.mlp.linear_fc1.weight\tweight")
        process.stdout.close()  # what `| head -1` does
        stderr = process.stderr.read()
    assert process.returncode == 128 + signal.SIGPIPE and stderr == b""


# -- the executor's own reports -----------------------------------------------------------------------

@pytest.mark.slow
def test_copies_one_float32_step_apart_are_shown_with_the_digits_that_differ(tmp_path):
    layout = ParallelLayout(tp=2, num_layers=2, num_experts=2)
    ranks = shard(global_state("seq", 2, 2), layout)
    value = torch.tensor(3.78847, dtype=torch.float32)
    ranks[0][AMAX] = value.clone()
    ranks[1][AMAX] = torch.nextafter(value, torch.tensor(4.0))
    for rank, state in enumerate(ranks):
        save_shard(state, layout, tmp_path / "meg", rank=rank)
    done = quantmap("export", SPECS / "moe_seq.yaml", "--megatron", tmp_path / "meg", "--out", tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    (note,) = [line for line in done.stderr.splitlines() if AMAX in line]
    assert "tensor-parallel copies differ (rank 1: 3.7884703, rank 0: 3.78847)" in note, note


@given(st.floats(allow_nan=False), st.floats(allow_nan=False))
def test_values_that_differ_are_shown_differently_and_read_back_close(a, b):
    shown = distinct([a, b])
    assert a == b or shown[0] != shown[1]
    assert float(shown[0]) == pytest.approx(a, rel=1e-5)


@pytest.mark.slow
def test_a_file_limit_too_low_for_the_workers_stops_at_once_in_one_line(tmp_path):
    layout = ParallelLayout(tp=2, num_layers=2, num_experts=2)
    for rank, state in enumerate(shard(global_state("seq", 2, 2), layout)):
        save_shard(state, layout, tmp_path / "meg", rank=rank)
    start = time.monotonic()
    done = quantmap("export", SPECS / "moe_seq.yaml", "--megatron", tmp_path / "meg", "--out", tmp_path / "hf",
                    "--nproc", "2", "--timeout", "600",
                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16)))
    assert done.returncode == 1
    assert one_line(done.stderr).startswith("error: --nproc 2 needs about 80 open files per worker")
    assert "ulimit -n allows 16" in done.stderr and time.monotonic() - start < 120  # not the 600 s timeout
    assert not (tmp_path / "hf").exists()
