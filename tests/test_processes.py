"""quantmap/processes.py: the launch mode, and the cores spawned workers may use (a fresh process narrows its
own CPU affinity)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import quantmap
from quantmap.executor.report import ExecutorError
from quantmap.processes import mode, usable_cores


def _python(program: str) -> str:
    environment = {**os.environ, "PYTHONPATH": str(Path(quantmap.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", program], env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_launch_mode_follows_nproc_and_torchrun(monkeypatch):
    for variable in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(variable, raising=False)
    assert mode(None) == "offline" and mode(2) == "spawn"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert mode(None) == "torchrun" and mode(2) == "spawn", "--nproc wins over stray WORLD_SIZE/RANK"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert mode(None) == "torchrun"
    with pytest.raises(ExecutorError, match="--nproc cannot be used under torchrun"):
        mode(2)


def test_usable_cores_are_the_affinity_the_process_was_given():
    assert usable_cores() == len(os.sched_getaffinity(0)) >= 1
    narrowed = _python("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
                       "from quantmap.processes import usable_cores; print(usable_cores())")
    assert narrowed == "1"
