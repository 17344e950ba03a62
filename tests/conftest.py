"""--modules-exercised: fail the run unless its tests call into every module of quantmap/.

The fast subset (`pytest -m "not slow"`) must still exercise every module; run it with this option to check
(`coverage` must be installed: `pip install coverage`). A module counts as exercised when a line inside one of
its functions ran in the test process (importing it is not enough); a module without functions counts when
it was imported. Child processes are measured too (the `quantmap` and `python -m quantmap` processes of the
CLI tests, spawned gloo workers): `COVERAGE_PROCESS_START` and a `sitecustomize` that starts coverage are put
in their environment, and their data is combined with this process's at the end.
"""

from __future__ import annotations

import ast
import os
import shutil
import tempfile
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "quantmap"


def pytest_addoption(parser):
    parser.addoption("--modules-exercised", action="store_true",
                     help="fail unless the tests run call into every module of quantmap/ (needs coverage)")


def pytest_configure(config):
    if not config.getoption("modules_exercised"):
        return
    try:
        import coverage
    except ImportError:
        raise pytest.UsageError("--modules-exercised needs coverage: pip install coverage") from None
    data = Path(tempfile.mkdtemp(prefix="quantmap-modules-exercised-"))
    rc = data / "coveragerc"
    rc.write_text(f"[run]\nparallel = True\nsource = {PACKAGE}\ndata_file = {data / 'coverage'}\n", encoding="utf-8")
    (data / "site").mkdir()
    (data / "site" / "sitecustomize.py").write_text("import coverage\ncoverage.process_startup()\n", encoding="utf-8")
    os.environ["COVERAGE_PROCESS_START"] = str(rc)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(data / "site"), os.environ.get("PYTHONPATH")]))
    measured = coverage.Coverage(config_file=str(rc))
    measured.start()
    config.stash[_COVERAGE] = (measured, rc, data)


_COVERAGE = pytest.StashKey()


def _function_lines(source: str) -> set[int]:
    """The lines of statements inside functions: what runs when the module is used, not when it is imported."""
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines |= {statement.lineno for statement in ast.walk(node)
                      if isinstance(statement, ast.stmt) and statement is not node}
    return lines


def unexercised(executed: dict[str, set[int]]) -> list[str]:
    """The modules of quantmap/ that no test called into, given the lines each file ran."""
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        ran = executed.get(str(path), set())
        inside = _function_lines(path.read_text(encoding="utf-8"))
        if not (ran & inside if inside else ran):
            missing.append(str(path.relative_to(PACKAGE.parent)))
    return missing


def pytest_sessionfinish(session, exitstatus):
    stashed = session.config.stash.get(_COVERAGE, None)
    if stashed is None:
        return
    measured, rc, directory = stashed
    measured.stop()
    measured.save()
    import coverage

    combined = coverage.Coverage(config_file=str(rc))
    combined.combine([str(directory)])
    data = combined.get_data()
    missing = unexercised({path: set(data.lines(path) or ()) for path in data.measured_files()})
    shutil.rmtree(directory)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if missing:
        reporter.write_line(f"--modules-exercised: {len(missing)} module(s) of quantmap/ that no test called into: "
                            + ", ".join(missing), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        reporter.write_line(f"--modules-exercised: every module of quantmap/ ({len(list(PACKAGE.rglob('*.py')))}) "
                            "was called into", green=True)
