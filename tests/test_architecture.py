"""quantmap's import graph, read statically from the source (every import statement, those inside functions
included): the layers go spec → patterns → compiler → rules/index → executor → io, with no circle; io reads
and writes files and never imports the executor; and what ``compile``, ``validate``, ``lookup``, ``names`` and
``check`` load never imports torch at module level (``test_cli.py`` checks the same at run time).

The checks are functions of a source tree, so the last tests plant each violation in a small package and
see it caught."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: What the torch-free commands load at module level (quantmap/cli.py imports the rest inside the commands).
TORCH_FREE = ("quantmap", "quantmap.cli", "quantmap.spec", "quantmap.spec.loader", "quantmap.spec.hf_config",
              "quantmap.patterns", "quantmap.compiler", "quantmap.rules", "quantmap.index", "quantmap.ruleset",
              "quantmap.check", "quantmap.model_names", "quantmap.diagnostics", "quantmap.sizes",
              "quantmap.element_layout", "quantmap.parallel", "quantmap.io.names", "quantmap.io.torch_dist")


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (a directory under ``root``), by dotted name."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(root: Path, package: str) -> dict[str, dict[str, bool]]:
    """Module → {imported name: whether at module level}. ``from a import b`` counts as importing ``a.b``
    when that is a module of the package, else ``a``; relative imports are resolved; imports under
    ``if TYPE_CHECKING:`` are left out (they never run)."""
    known = modules(root, package)
    graph: dict[str, dict[str, bool]] = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, bool] = {}

        def visit(node: ast.AST, top: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    visit(ast.Module(body=child.orelse, type_ignores=[]), top)
                    continue
                if isinstance(child, ast.Import):
                    targets = [alias.name for alias in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        anchor = name.split(".") if is_package else name.split(".")[:-1]
                        anchor = anchor[:len(anchor) - child.level + 1]
                        base = ".".join(anchor + ([base] if base else []))
                    targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                               for alias in child.names]
                else:
                    visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
                    continue
                for target in targets:
                    edges[target] = edges.get(target, False) or top

        visit(ast.parse(path.read_text(encoding="utf-8")), True)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself): each is a
    circle. Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(t for t in graph[start] if t in graph)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(t for t in graph[child] if t in graph))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return found


def crossings(graph: dict[str, dict[str, bool]], lower: str, upper: str) -> list[str]:
    """``module -> target`` for every import from the ``lower`` layer into the ``upper`` one."""
    def inside(name: str, layer: str) -> bool:
        return name == layer or name.startswith(layer + ".")
    return [f"{module} -> {target}" for module, edges in sorted(graph.items()) if inside(module, lower)
            for target in sorted(edges) if inside(target, upper)]


def torch_at_load(graph: dict[str, dict[str, bool]], roots) -> list[str]:
    """The chains by which loading ``roots`` imports torch: module-level imports only, and a module's
    packages count as loaded with it (Python runs their ``__init__`` first)."""
    parent = {}
    seen = set()
    todo = list(roots)
    found = []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        loaded = [target for target, top in graph.get(module, {}).items() if top]
        loaded += [module.rsplit(".", 1)[0]] if "." in module else []
        for target in loaded:
            if target == "torch" or target.startswith("torch."):
                chain, at = [target], module
                while at is not None:
                    chain.append(at)
                    at = parent.get(at)
                found.append(" <- ".join(chain))
            elif target in graph and target not in seen:
                parent.setdefault(target, module)
                todo.append(target)
    return found


GRAPH = imports(ROOT, "quantmap")


def test_the_graph_is_read_from_every_module_including_imports_inside_functions():
    assert len(GRAPH) == len(modules(ROOT, "quantmap")) > 50
    # the CLI imports the executor only inside the commands that move tensors
    assert GRAPH["quantmap.cli"]["quantmap.executor.launch"] is False
    assert GRAPH["quantmap.executor.export"]["quantmap.io.hf"] is True


def test_no_module_of_quantmap_imports_itself_back_through_a_circle():
    assert cycles(GRAPH) == []


def test_io_reads_and_writes_files_and_never_imports_the_executor():
    assert crossings(GRAPH, "quantmap.io", "quantmap.executor") == []


def test_the_pure_layers_import_neither_the_executor_nor_io():
    """spec → patterns → compiler → rules/index sit below the executor and io: nothing of theirs reaches up."""
    for layer in ("quantmap.spec", "quantmap.patterns", "quantmap.compiler", "quantmap.rules", "quantmap.index",
                  "quantmap.ruleset", "quantmap.element_layout", "quantmap.ops", "quantmap.parallel"):
        assert crossings(GRAPH, layer, "quantmap.executor") == crossings(GRAPH, layer, "quantmap.io") == []


def test_the_torch_free_commands_load_no_module_that_imports_torch_at_module_level():
    assert torch_at_load(GRAPH, TORCH_FREE) == []


def test_the_design_document_names_every_module():
    """docs/design.md names each module (by its path, or by its file name in its package's paragraph)."""
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    unnamed = [str(path.relative_to(ROOT)) for path in modules(ROOT, "quantmap").values()
               if str(path.relative_to(ROOT)) not in design and f"`{path.name}`" not in design
               and f"{path.name}`" not in design and path.name != "__init__.py"]
    assert unnamed == []


def _plant(tmp_path: Path, files: dict[str, str]) -> dict[str, dict[str, bool]]:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return imports(tmp_path, "pkg")


def test_a_planted_circle_an_io_import_of_the_executor_and_a_torch_import_are_each_caught(tmp_path):
    graph = _plant(tmp_path, {
        "__init__.py": "",
        "io/__init__.py": "",
        "io/files.py": "def read():\n    from pkg.executor.run import go\n",
        "executor/__init__.py": "",
        "executor/run.py": "from pkg.io import files\nfrom . import launch\ngo = 1\n",
        "executor/launch.py": "def f():\n    from .run import go\n",
        "pure.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\nfrom pkg import heavy\n",
        "heavy.py": "import torch.distributed\n",
    })
    assert cycles(graph) == [["pkg.executor.launch", "pkg.executor.run", "pkg.io.files"]]
    assert crossings(graph, "pkg.io", "pkg.executor") == ["pkg.io.files -> pkg.executor.run"]
    assert torch_at_load(graph, ["pkg.pure"]) == ["torch.distributed <- pkg.heavy <- pkg.pure"]
    assert torch_at_load(graph, ["pkg.executor.launch"]) == []  # inside a function: not at load
