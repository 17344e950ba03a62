"""The specs shipped inside the package, found by name (``quantmap compile llama``)."""

from __future__ import annotations

import difflib
from pathlib import Path

from quantmap.diagnostics import Diagnostic, Location, SpecError
from quantmap.untrusted import special_file

SPEC_DIR = Path(__file__).resolve().parent.parent / "specs"


def shipped_specs() -> dict[str, Path]:
    """Shipped spec names and their files, sorted by name."""
    return {p.stem: p for p in sorted(SPEC_DIR.glob("*.yaml"))}


def display_path(path: Path) -> str:
    """How diagnostics and rule sources name a spec file: stable across machines and clones."""
    resolved = path.resolve()
    if resolved.is_relative_to(SPEC_DIR):
        return f"quantmap/specs/{resolved.relative_to(SPEC_DIR).as_posix()}"
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def shipped_bases() -> dict[str, Path]:
    """The shipped bases, named as ``extends`` names them from anywhere: ``base/gqa``."""
    return {f"base/{p.stem}": p for p in sorted((SPEC_DIR / "base").glob("*.yaml"))}


def find_spec(spec: str | Path, beside: Path | None = None) -> Path:
    """A spec's file: ``spec`` as a path, else the shipped spec or base of that name (``llama``,
    ``base/gqa``, ``base/gqa.yaml``).

    A path is taken relative to the directory ``beside`` when given (``extends`` names a file next
    to the spec that extends it), else to the working directory (a command-line argument). Where
    ``beside`` is given the working directory is never consulted: the same spec must compile to
    the same rules wherever it is run.
    """
    path = Path(spec) if beside is None else beside / spec
    if path.is_file():
        return path
    special = special_file(path)
    if special:  # not a spec name either: say what the path is rather than that there is none
        raise SpecError([Diagnostic("QM006", f"{display_path(path)} is {special}, not a spec file", Location(str(spec)),
                                    "give a spec file (reading this could block forever) or a shipped spec's name")])
    shipped = {**shipped_specs(), **shipped_bases()}
    name = str(spec).removesuffix(".yaml")
    if name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(Path(spec).stem, list(shipped), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"shipped specs: {', '.join(shipped) or 'none'}"
    place = f"no file {display_path(path)}" if beside is not None else "no spec file"
    raise SpecError([Diagnostic("QM006", f"{place} or shipped spec named {str(spec)!r}", Location(str(spec)), hint)])
