"""The shipped spec library: found by name, listed, installable, and editor-friendly."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest

import quantmap
from quantmap.spec import load_spec, shipped_specs
from quantmap.spec.library import SPEC_DIR

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ["deepseek_v2", "deepseek_v3", "ernie4_5_moe", "exaone4", "gemma2", "gemma3", "glm4_moe", "gpt_oss",
           "kimi_k2", "llama", "minimax_m2", "mistral", "mixtral", "nemotron", "nemotron_h", "olmoe", "phi3",
           "qwen2", "qwen2_5_vl", "qwen2_moe", "qwen3", "qwen3_5", "qwen3_5_moe", "qwen3_moe", "qwen3_next"]
NEEDS = {"deepseek_v3": {"num_layers": 61}, "glm4_moe": {"num_layers": 92}}


def test_the_library_ships_every_architecture_and_no_base_file_by_name():
    assert list(shipped_specs()) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_spec_compiles_by_name_without_warnings(name):
    rules = quantmap.compile(name, **NEEDS.get(name, {}))
    assert rules.spec.name == name and rules.spec.architectures and rules.warnings == ()


@pytest.mark.slow
def test_quantmap_specs_lists_each_spec_with_its_architectures():
    result = subprocess.run([sys.executable, "-m", "quantmap", "specs"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert sorted(listed) == SHIPPED
    assert "DeepseekV3ForCausalLM" in listed["deepseek_v3"]


@pytest.mark.parametrize("path", sorted(SPEC_DIR.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_spec_file_points_editors_at_the_schema_beside_the_library(path):
    first = path.read_text().splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix) and (path.parent / first[len(prefix):]).resolve() == SPEC_DIR / "schema.json"


def test_every_spec_file_is_package_data_so_names_work_without_a_checkout():
    tomllib = pytest.importorskip("tomllib")
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["quantmap"]
    package = SPEC_DIR.parent
    for path in SPEC_DIR.rglob("*.yaml"):
        assert any(fnmatch.fnmatch(path.relative_to(package).as_posix(), g) for g in globs), path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_spec_records_where_its_names_come_from(name):
    assert "source" in load_spec(name).metadata


def test_check_never_imports_torch(tmp_path):
    names = tmp_path / "hf.txt"
    names.write_text("model.norm.weight\n")
    code = (
        "import sys\n"
        "from quantmap.cli import main\n"
        f"sys.argv = ['quantmap', 'check', 'llama', '--hf', {str(names)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ},
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_shipped_spec_has_a_row_in_the_docs_table():
    rows = [line.split("|")[1].strip().strip("`") for line in (REPO / "docs" / "specs.md").read_text().splitlines()
            if line.startswith("| `")]
    assert [name for name in SHIPPED if name not in rows] == []
