"""Odd files inside a torch_dist checkpoint (issue 19, items 13-16): symbolic links, paths in
``.metadata`` that leave the checkpoint, named pipes, an output inside the checkpoint. Every file
quantmap reads goes through one helper (quantmap.io.torch_dist.files): links are followed only inside
the checkpoint, only regular files are read, and an ``--out`` copy holds real files that load."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import quantmap
from quantmap.cli import app
from quantmap.executor.torch_dist_checkpoint import read_state
from quantmap.io.torch_dist import locate

DATA = Path(__file__).parent / "data" / "dcp"
ITERATION = "iter_0000001"
QUANTIZERS = "__0_1.distcp"  # the fp8_kv_tp1 file holding its quantizer tensors (and some weights)


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.is_symlink()}


def _one_error(result, phrase: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], result.output
    return lines[0]


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    assert _invoke("export", "llama", "--megatron", DATA / "fp8_kv_tp1/ckpt", "--out", out, "-q").exit_code == 0
    return out


@pytest.fixture
def ckpt(tmp_path) -> Path:
    shutil.copytree(DATA / "fp8_kv_tp1/ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _values(path: Path) -> dict[str, torch.Tensor]:
    return read_state(locate(path))[1]


def test_links_inside_the_checkpoint_are_copied_as_the_files_they_point_to(ckpt, hf, tmp_path):
    iteration = ckpt / ITERATION
    (iteration / "modelopt_state").rename(iteration / "modelopt_real")
    (iteration / "modelopt_state").symlink_to("modelopt_real")
    (iteration / "data").mkdir()
    (iteration / QUANTIZERS).rename(iteration / "data" / QUANTIZERS)
    (iteration / QUANTIZERS).symlink_to(Path("data") / QUANTIZERS)
    result = _invoke("import", "llama", "--hf", hf, "--into", ckpt, "--out", tmp_path / "new", "-q")
    assert result.exit_code == 0, result.output
    copy = tmp_path / "new" / ITERATION
    assert not [p for p in copy.rglob("*") if p.is_symlink()], "the copy holds real files, not links"
    assert (copy / "modelopt_state" / "common.pt").read_bytes() == \
        (iteration / "modelopt_real" / "common.pt").read_bytes(), "the linked modelopt_state/ was copied"
    assert (copy / QUANTIZERS).read_bytes() == (iteration / "data" / QUANTIZERS).read_bytes()
    shutil.rmtree(ckpt)  # the copy must not depend on the original in any way
    want, got = _values(DATA / "fp8_kv_tp1/ckpt"), _values(tmp_path / "new")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("link", ["modelopt_state", QUANTIZERS])
def test_a_link_leading_out_of_the_checkpoint_is_refused_and_nothing_is_written(ckpt, hf, tmp_path, link):
    iteration = ckpt / ITERATION
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (iteration / link).rename(elsewhere / link)
    (iteration / link).symlink_to(elsewhere / link)
    before = _digest(ckpt)
    for extra in (["--out", tmp_path / "new"], ["--in-place"]):
        result = _invoke("import", "llama", "--hf", hf, "--into", ckpt, *extra, "-q")
        _one_error(result, "leads outside the checkpoint directory")
        assert _digest(ckpt) == before and not (tmp_path / "new").exists()
    _one_error(_invoke("export", "llama", "--megatron", ckpt, "--out", tmp_path / "out", "-q"),
               "leads outside the checkpoint directory")
    assert not (tmp_path / "out").exists()


def _point_metadata_at(iteration: Path, relative_path: str) -> None:
    """Rewrite ``.metadata`` so that every chunk stored in the quantizers' file is read from ``relative_path``."""
    with open(iteration / ".metadata", "rb") as stream:
        metadata = pickle.load(stream)  # the fixture's own file: trusted here
    metadata.storage_data = {index: dataclasses.replace(info, relative_path=relative_path)
                             if info.relative_path == QUANTIZERS else info
                             for index, info in metadata.storage_data.items()}
    with open(iteration / ".metadata", "wb") as stream:
        pickle.dump(metadata, stream)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_metadata_path_outside_the_checkpoint_is_refused_for_export_and_import(ckpt, hf, tmp_path, where):
    iteration = ckpt / ITERATION
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(iteration / QUANTIZERS, outside / QUANTIZERS)  # the same bytes, so only the path is wrong
    _point_metadata_at(iteration, f"../../outside/{QUANTIZERS}" if where == "parent" else str(outside / QUANTIZERS))
    before = _digest(ckpt)
    line = _one_error(_invoke("export", "llama", "--megatron", ckpt, "--out", tmp_path / "out", "-q"),
                      "not a file name inside the checkpoint directory")
    assert ".metadata" in line and "quantizer" in line
    for extra in (["--out", tmp_path / "new"], ["--in-place"]):
        result = _invoke("import", "llama", "--hf", hf, "--into", ckpt, *extra, "-q")
        _one_error(result, "not a file name inside the checkpoint directory")
    assert _digest(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "outside"], "nothing was written"


@pytest.mark.slow
def test_a_named_pipe_in_place_of_a_distcp_is_refused_at_once(ckpt, hf, tmp_path):
    (ckpt / ITERATION / QUANTIZERS).unlink()
    os.mkfifo(ckpt / ITERATION / QUANTIZERS)
    env = {**os.environ, "PYTHONPATH": str(Path(quantmap.__file__).parents[1])}  # the quantmap under test
    for argv in (["export", "llama", "--megatron", ckpt, "--out", tmp_path / "out"],
                 ["import", "llama", "--hf", hf, "--into", ckpt, "--out", tmp_path / "new"]):
        done = subprocess.run([sys.executable, "-m", "quantmap", *map(str, argv), "-q"], env=env, capture_output=True,
                              text=True, timeout=120)  # before the fix, export read the pipe forever
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{QUANTIZERS}: is a named pipe, not a regular file" in lines[0], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_output_inside_the_checkpoint_it_copies_is_refused(ckpt, hf):
    before = _digest(ckpt)
    for out in (ckpt / ITERATION / "copy", ckpt / ITERATION / "modelopt_state" / "copy"):
        result = _invoke("import", "llama", "--hf", hf, "--into", ckpt, "--out", out, "-q")
        _one_error(result, "lies inside the checkpoint")
        assert _digest(ckpt) == before and not out.exists()
    assert sorted(p.name for p in (ckpt / ITERATION).iterdir()) == sorted(
        p.name for p in (DATA / "fp8_kv_tp1/ckpt" / ITERATION).iterdir())
