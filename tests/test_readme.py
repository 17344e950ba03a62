"""The README runs as written: its two opening commands are the ones CI runs, and every command of its tour and
its Python example run against the fixtures shipped in tests/data/ with the exit code and output it claims."""

import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
BASH_BLOCKS = re.findall(r"^```bash\n(.*?)^```$", README, re.DOTALL | re.MULTILINE)
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, re.DOTALL | re.MULTILINE)
SETUP, TOUR_BLOCKS = BASH_BLOCKS[0].splitlines(), BASH_BLOCKS[1:]
ACTIVATE = "source .venv/bin/activate"
# This checkout's quantmap, whatever the interpreter has installed.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _commands(block: str) -> list[str]:
    """The block's commands, a backslash-continued command joined into one."""
    commands, pending = [], ""
    for line in block.splitlines():
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if pending.strip():
                commands.append(pending.strip())
            pending = ""
    return commands


TOUR = [command for block in TOUR_BLOCKS for command in _commands(block)]


def test_the_readme_opens_with_the_two_commands_and_ci_runs_both_verbatim():
    assert README.startswith("# quantmap\n\n```bash\n") and len(SETUP) == 2
    main_job, test_suite = SETUP
    assert main_job.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && ")
    assert main_job.endswith(" .venv/bin/quantmap compile specs/llama.yaml")
    # Two venvs: installing the test extras into the first would hide a runtime dependency missing from it.
    assert test_suite.startswith("python3 -m venv .venv-test && .venv-test/bin/pip install torch==2.13.0 -e '.[test]'")
    assert test_suite.endswith(" .venv-test/bin/python -m pytest")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_suite in ci and main_job in ci and ci.index(test_suite) < ci.index(main_job)
    ignored = (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert {".venv/", ".venv-test/", "out/"} <= set(ignored)
    assert TOUR[0].startswith(ACTIVATE + " "), "the tour starts in the first command's venv"


def _expected_exit(command: str) -> int:
    """1 where the command's comment starts 'exit 1:' (it reports problems on purpose), else 0."""
    claimed = re.search(r"\s#\s*exit (\d):", command)
    return int(claimed.group(1)) if claimed else 0


def test_a_command_is_expected_to_exit_1_only_where_its_comment_starts_so():
    assert _expected_exit("quantmap export x  # exit 1: a gap") == 1
    assert _expected_exit("quantmap validate x  # diagnostics, exit 1 on errors") == 0
    assert _expected_exit("quantmap check x --strict \\     # exit 1: findings") == 1


@pytest.mark.slow
def test_every_tour_command_runs_as_written_against_the_shipped_fixtures(tmp_path):
    shutil.copytree(REPO / "tests" / "data", tmp_path / "tests" / "data")
    (tmp_path / "specs").symlink_to(REPO / "specs")
    # `quantmap` is this interpreter's `python -m quantmap`, the same command (the README says so).
    prelude = f'quantmap() {{ "{sys.executable}" -m quantmap "$@"; }}\n'
    for command in TOUR[1:]:
        done = subprocess.run(["bash", "-c", prelude + command], cwd=tmp_path, env=ENV, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == _expected_exit(command), (command, done.stdout[-2000:], done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (command, done.stderr)
    # The tour writes only to out/ (what it tells the reader to remove) and leaves the fixtures as they were.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "specs", "tests"]
    assert {"hf", "hf-int8", "shards", "hf-again", "hf-partial", "ckpt"} <= {p.name for p in (tmp_path / "out").iterdir()}
    for directory, _, files in os.walk(REPO / "tests" / "data"):
        copy = tmp_path / Path(directory).relative_to(REPO)
        assert sorted(p.name for p in copy.iterdir() if p.is_file()) == sorted(files), directory
        assert not filecmp.cmpfiles(directory, copy, files, shallow=False)[1], directory


@pytest.mark.slow
def test_the_python_example_prints_what_its_comments_say(tmp_path):
    (code,) = PYTHON_BLOCKS
    claimed = re.findall(r"# -> (.*)$", code, re.MULTILINE)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == claimed and len(claimed) == 4
