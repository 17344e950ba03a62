"""Two commands writing one checkpoint or output at once, and a signal at an in-place import's commit
point (issue 19, items 11, 12 and the concurrent-output case of 20). Real processes: the CLI run as a
subprocess, stopped or signalled at a chosen point by a sitecustomize hook, against real locks."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import quantmap
from quantmap.cli import app
from quantmap.executor.torch_dist_checkpoint import read_state
from quantmap.io.torch_dist import locate

pytestmark = pytest.mark.slow  # every test races real CLI processes against each other

DATA = Path(__file__).parent / "data" / "dcp"
SHARD = "model-00001-of-00001.safetensors"

# Every process of the command runs this: just before (STOP) or just after (TERM) the rename that
# publishes an in-place import's new .metadata, the process stops itself or sends itself SIGTERM.
AT_METADATA_RENAME = """\
import os, signal

_replace = os.replace

def replace(source, target, *args, **kwargs):
    at_commit = str(target).endswith("/.metadata") and str(source).endswith(".quantmap-partial")
    if at_commit and {when!r} == "before":
        os.kill(os.getpid(), signal.SIGSTOP)
    _replace(source, target, *args, **kwargs)
    if at_commit and {when!r} == "after":
        os.kill(os.getpid(), signal.SIGTERM)

os.replace = replace
"""

# The output is filled by someone else just before this command publishes its own.
FILLED_BEFORE_PUBLISH = """\
from pathlib import Path
from quantmap.io import staging

_publish = staging.Staged.publish

def publish(self):
    Path(self.target).mkdir(exist_ok=True)
    (Path(self.target) / "theirs").write_text("another writer's output")
    return _publish(self)

staging.Staged.publish = publish
"""


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _start(tmp_path: Path, argv, hook: str | None = None) -> subprocess.Popen:
    path = [str(Path(quantmap.__file__).parents[1])]  # the quantmap under test
    if hook is not None:
        directory = tmp_path / f"hook-{len(list(tmp_path.glob('hook-*')))}"
        directory.mkdir()
        (directory / "sitecustomize.py").write_text(hook)
        path.insert(0, str(directory))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.Popen([sys.executable, "-m", "quantmap", *map(str, argv), "-q"], env=env,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _finish(command: subprocess.Popen) -> tuple[int, str]:
    _, stderr = command.communicate(timeout=180)
    return command.returncode, stderr


def _state(path: Path) -> dict[str, torch.Tensor]:
    return read_state(locate(path))[1]


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, Path]:
    """The fixture's own quantizer state in HF form, and the same with every value tripled."""
    root = tmp_path_factory.mktemp("hf")
    same, tripled = root / "same", root / "tripled"
    assert _invoke("export", "llama", "--megatron", DATA / "fp8_kv_tp1/ckpt", "--out", same, "-q").exit_code == 0
    shutil.copytree(same, tripled)
    save_file({k: v * 3 for k, v in load_file(same / SHARD).items()}, tripled / SHARD)
    return same, tripled


@pytest.fixture
def ckpt(tmp_path) -> Path:
    shutil.copytree(DATA / "fp8_kv_tp1/ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.02)
    raise AssertionError("the first import never reached its .metadata rename")


def test_a_second_in_place_import_is_refused_naming_the_first_which_then_completes(ckpt, exports, tmp_path):
    same, tripled = exports
    first = _start(tmp_path, ["import", "llama", "--hf", tripled, "--into", ckpt, "--in-place"],
                   hook=AT_METADATA_RENAME.format(when="before"))
    try:
        _wait_stopped(first.pid)  # holds the checkpoint, its new .metadata about to be published
        second = _start(tmp_path, ["import", "llama", "--hf", same, "--into", ckpt, "--in-place"])
        rc, stderr = _finish(second)
        assert rc == 1, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
        assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0] and "--in-place" in lines[0], stderr
        assert "in use by another process" in lines[0], stderr
    finally:
        os.kill(first.pid, signal.SIGCONT)
    rc, stderr = _finish(first)
    assert rc == 0, stderr
    want = {k: v * 3 for k, v in _state(DATA / "fp8_kv_tp1/ckpt").items()}
    assert _equal(_state(ckpt), want), "the first import is on disk, whole"


def test_a_checkpoint_locked_by_another_process_is_neither_rewritten_nor_read_beside_it(ckpt, exports, tmp_path):
    same, _ = exports
    before = (ckpt / "iter_0000001" / ".metadata").read_bytes()
    descriptor = os.open(ckpt / "iter_0000001", os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as an in-place import holds it
        for argv in (["import", "llama", "--hf", same, "--into", ckpt, "--in-place"],
                     ["import", "llama", "--hf", same, "--into", ckpt, "--out", tmp_path / "new"],
                     ["export", "llama", "--megatron", ckpt, "--out", tmp_path / "hf"]):
            rc, stderr = _finish(_start(tmp_path, argv))
            assert rc == 1 and stderr.count("\n") == 1, stderr
            assert f"pid {os.getpid()} on host {socket.gethostname()}" in stderr, stderr
    finally:
        os.close(descriptor)
    assert (ckpt / "iter_0000001" / ".metadata").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("hook-")) == ["ckpt"]


def test_an_output_another_process_is_publishing_is_refused(ckpt, exports, tmp_path):
    same, _ = exports
    out = tmp_path / "new"
    descriptor = os.open(tmp_path / ".new.quantmap-lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a command publishing --out new holds it
        for argv in (["import", "llama", "--hf", same, "--into", ckpt, "--out", out],
                     ["export", "llama", "--megatron", ckpt, "--out", out]):
            rc, stderr = _finish(_start(tmp_path, argv))
            assert rc == 1 and stderr.count("\n") == 1 and f"pid {os.getpid()}" in stderr, stderr
    finally:
        os.close(descriptor)
    assert not out.exists()


def test_an_output_filled_by_another_process_before_publishing_is_named_as_the_cause(ckpt, exports, tmp_path):
    same, _ = exports
    out = tmp_path / "new"
    rc, stderr = _finish(_start(tmp_path, ["import", "llama", "--hf", same, "--into", ckpt, "--out", out],
                                hook=FILLED_BEFORE_PUBLISH))
    assert rc == 1 and stderr.count("\n") == 1, stderr
    assert "was created by another process while this command ran" in stderr and "Errno" not in stderr, stderr
    assert sorted(p.name for p in out.iterdir()) == ["theirs"], "the other writer's output is left alone"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new.")], "no staging or lock left"


def test_sigterm_after_the_metadata_rename_says_the_import_was_written(ckpt, exports, tmp_path):
    _, tripled = exports
    rc, stderr = _finish(_start(tmp_path, ["import", "llama", "--hf", tripled, "--into", ckpt, "--in-place"],
                                hook=AT_METADATA_RENAME.format(when="after")))
    assert rc == 128 + signal.SIGTERM, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and "nothing was written" not in lines[0], stderr
    assert "the import was written" in lines[0] and str(ckpt / "iter_0000001") in lines[0], stderr
    want = {k: v * 3 for k, v in _state(DATA / "fp8_kv_tp1/ckpt").items()}
    assert _equal(_state(ckpt), want), "what the message says is what is on disk"
