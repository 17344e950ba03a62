"""The ``quantmap`` command: a thin shell over the library; each verb is one function.

Exit codes: 0 success; 1 the spec, the names or the checkpoint have problems (each printed as
``file:line:col: severity CODE: message``); 2 the command line itself is wrong.
``compile``, ``validate``, ``lookup``, ``check``, ``schema`` and ``specs`` never import torch.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from quantmap.diagnostics import SpecError

app = typer.Typer(
    help="Move quantization calibration state between Megatron-Core and Hugging Face names.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

SpecArg = typer.Argument(..., help="A spec file, or the name of a shipped spec (see 'quantmap specs').")
ParamOpt = typer.Option(None, "--param", "-p", help="A run-time parameter of the spec, NAME=INT; repeatable.")
ConfigOpt = typer.Option(None, "--config", help="A Hugging Face config.json (or its directory) giving the spec's "
                         "parameters it knows: layers, head counts, hidden size, experts. --param wins.")


class Format(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


def parse_params(values: Optional[List[str]]) -> dict[str, int]:
    """``["num_layers=61"]`` → ``{"num_layers": 61}``; a usage error otherwise."""
    params = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit():
            raise typer.BadParameter(f"{item!r} is not NAME=INT, e.g. num_layers=61", param_hint="--param")
        params[name.strip()] = int(value)
    return params


def spec_params(spec: str, values: Optional[List[str]], config: Optional[str]) -> dict[str, int]:
    """The run-time parameters from ``--param`` and, for those it does not give, ``--config``."""
    params = parse_params(values)
    if config is None:
        return params
    from quantmap.spec import load_spec

    try:
        declared = load_spec(spec).params
    except SpecError as error:
        raise fail(error) from None
    return {**config_params(config, declared), **params}


def config_params(config: Optional[str], declared) -> dict[str, int]:
    """The ``declared`` parameters that ``--config`` gives (none without it)."""
    if config is None:
        return {}
    from quantmap.spec.hf_config import ConfigError, params_from_config

    try:
        return params_from_config(config, declared)
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--config") from None


def fail(error: SpecError) -> typer.Exit:
    for diagnostic in error.diagnostics:
        typer.echo(str(diagnostic), err=True)
    return typer.Exit(1)


def compile_or_exit(spec: str, params: dict[str, int]):
    import quantmap

    try:
        return quantmap.compile(spec, **params)
    except SpecError as error:
        raise fail(error) from None


@app.command("compile")
def compile_command(
    spec: str = SpecArg,
    format: Format = typer.Option(Format.table, "--format", "-f", help="table (readable), json or yaml."),
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
) -> None:
    """Compile a spec and print its rules. JSON output is deterministic, byte for byte."""
    rules = compile_or_exit(spec, spec_params(spec, param, config))
    for warning in rules.warnings:
        typer.echo(str(warning), err=True)
    if format is Format.json:
        typer.echo(json.dumps(rules.to_json(), indent=2))
    elif format is Format.yaml:
        import yaml

        typer.echo(yaml.safe_dump(rules.to_json(), sort_keys=False, width=200), nl=False)
    else:
        typer.echo(_table(rules))


def _table(rules) -> str:
    lines = [f"{rules.spec.name}: {len(rules)} rules"]
    width = max((len(r.megatron.text) for r in rules), default=0)
    for rule in rules:
        place = rule.origin.location
        targets = [f"{part}: {p.text}" if part else p.text for part, p in zip(rule.parts, rule.hf)]
        lines.append(f"{rule.kind:<10} {rule.megatron.text:<{width}}  ->  {targets[0]}   [{place}]")
        lines.extend(f"{'':<10} {'':<{width}}      {target}" for target in targets[1:])
    return "\n".join(lines)


@app.command()
def validate(
    specs: List[str] = typer.Argument(..., help="Spec files or shipped names."),
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
) -> None:
    """Check specs: exit 0 when all are valid, 1 with 'file:line:col: message' lines otherwise.

    Parameters the spec leaves to run time are set to a placeholder, unless given.
    """
    from quantmap.compiler import compile_spec
    from quantmap.spec import load_spec

    cli_params = parse_params(param)
    failed = False
    for spec in specs:
        try:
            resolved = load_spec(spec)
            given = {**config_params(config, resolved.params), **cli_params}
            placeholders = {name: 0 for name, value in resolved.params.items() if value is None}
            rules = compile_spec(resolved, {**placeholders, **{k: v for k, v in given.items() if k in resolved.params}})
        except SpecError as error:
            failed = True
            for diagnostic in error.diagnostics:
                typer.echo(str(diagnostic), err=True)
        else:
            for warning in rules.warnings:
                typer.echo(str(warning), err=True)
            typer.echo(f"{spec}: ok")
    if failed:
        raise typer.Exit(1)


@app.command()
def lookup(
    spec: str = SpecArg,
    names: Optional[List[str]] = typer.Argument(None, help="Concrete names to resolve."),
    reverse: bool = typer.Option(False, "--reverse", "-r", help="Resolve Hugging Face names to Megatron."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    from_file: Optional[str] = typer.Option(None, "--from-file", help="Read names, one per line, from a file or '-'."),
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
) -> None:
    """Resolve concrete names. Exit 0 when every name matched, 1 when some did not."""
    rules = compile_or_exit(spec, spec_params(spec, param, config))
    resolve = rules.to_megatron if reverse else rules.to_hf
    unmatched = 0
    out = sys.stdout
    for name in _names(names, from_file):
        match = resolve(name)
        unmatched += match is None
        if as_json:
            record = {"name": name, "match": None} if match is None else match.to_json(name)
            out.write(json.dumps(record) + "\n")
        elif match is None:
            out.write(f"{name}\t(no match)\n")
        else:
            extra = "".join(f" {key}={value}" for key, value in (("part", match.part), ("expert", match.expert))
                            if value is not None)
            targets = ", ".join((match.megatron,) if reverse else match.hf)
            out.write(f"{name}\t{match.kind}\t{targets}{extra}\n")
    if unmatched:
        raise typer.Exit(1)


def _names(names: Optional[List[str]], from_file: Optional[str]):
    yield from names or []
    if from_file is None:
        return
    try:
        stream = sys.stdin if from_file == "-" else open(from_file, encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {from_file}: {exc.strerror}", param_hint="--from-file") from None
    with stream:
        for line in stream:
            name = line.strip()
            if name and not name.startswith("#"):
                yield name


class CheckFormat(str, Enum):
    text = "text"
    json = "json"


@app.command()
def check(
    spec: str = SpecArg,
    megatron: Optional[str] = typer.Option(None, "--megatron", "-m", help="Megatron names: a text file (one per "
                                           "line), a safetensors file or index, or a checkpoint directory."),
    hf: Optional[str] = typer.Option(None, "--hf", help="Hugging Face names, from the same kinds of source."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when there is any finding (for CI)."),
    format: CheckFormat = typer.Option(CheckFormat.text, "--format", "-f", help="text or json."),
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
) -> None:
    """Check a spec against a real model's names: unclaimed names (QM101), missing targets (QM102),
    names claimed twice (QM103), fused groups missing a part (QM104). Exit 0 unless --strict finds any."""
    from quantmap.check import check as check_names
    from quantmap.io.names import NamesError, read_names

    if megatron is None and hf is None:
        raise typer.BadParameter("give --megatron, --hf, or both", param_hint="--megatron/--hf")
    rules = compile_or_exit(spec, spec_params(spec, param, config))
    try:
        report = check_names(rules, None if megatron is None else read_names(megatron),
                             None if hf is None else read_names(hf))
    except NamesError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(report.to_json(), indent=2) if format is CheckFormat.json else report.to_text())
    if strict and not report.ok:
        raise typer.Exit(1)


NprocOpt = typer.Option(None, "--nproc", min=1, help="Spawn N gloo worker processes (one per rank). Under torchrun "
                        "the launcher's ranks are used; otherwise one process plays every rank.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar and no report.")
TimeoutOpt = typer.Option(600, "--timeout", min=1, help="Seconds a collective may wait before every rank fails.")


@app.command("export")
def export_command(
    spec: str = SpecArg,
    megatron: str = typer.Option(..., "--megatron", "-m", help="Megatron shard directory: layout.json + "
                                 "rank_NNNNN.safetensors (local names)."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory for the Hugging Face checkpoint (must not exist)."),
    shard_size: int = typer.Option(5 * 2**30, "--shard-size", min=1, help="Largest shard, in bytes."),
    nproc: Optional[int] = NprocOpt,
    quiet: bool = QuietOpt,
    timeout: int = TimeoutOpt,
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
) -> None:
    """Export Megatron quantizer state to Hugging Face names (model-0000i-of-0000n.safetensors + index)."""
    from quantmap.executor.launch import export_shards

    _run_executor(spec, spec_params(spec, param, config), quiet, lambda params: export_shards(
        spec, params, megatron, out, shard_size=shard_size, nproc=nproc, progress=not quiet,
        timeout=timedelta(seconds=timeout)))


@app.command("import")
def import_command(
    spec: str = SpecArg,
    hf: str = typer.Option(..., "--hf", help="Hugging Face checkpoint directory (sharded with an index, or model.safetensors)."),
    layout: str = typer.Option(..., "--layout", "-l", help="The target layout.json (or a directory holding one)."),
    out: str = typer.Option(..., "--out", "-o", help="Output Megatron shard directory (must not exist)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on any unclaimed or missing name."),
    nproc: Optional[int] = NprocOpt,
    quiet: bool = QuietOpt,
    timeout: int = TimeoutOpt,
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
) -> None:
    """Import Hugging Face quantizer state into a Megatron shard directory for a layout."""
    from quantmap.executor.launch import import_checkpoint

    _run_executor(spec, spec_params(spec, param, config), quiet, lambda params: import_checkpoint(
        spec, params, hf, layout, out, strict=strict, nproc=nproc, progress=not quiet,
        timeout=timedelta(seconds=timeout)))


def _run_executor(spec: str, params: dict[str, int], quiet: bool, run) -> None:
    """Run an export/import after checking the spec; its report on stderr, its failure as one
    message and exit code 1. ``run`` gets the spec's run-time parameters."""
    from quantmap.executor import ExecutorError, LayoutError
    from quantmap.executor.naming import NamingError
    from quantmap.io.names import NamesError

    compile_or_exit(spec, params)
    try:
        report = run(params)
    except (ExecutorError, LayoutError, NamingError, NamesError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    if not quiet:
        for line in report.lines():
            typer.echo(line, err=True)


@app.command()
def schema() -> None:
    """Print the spec format's JSON Schema (for editors: '# yaml-language-server: $schema=...')."""
    from quantmap.spec.schema import SpecFile

    typer.echo(json.dumps(SpecFile.model_json_schema(), indent=2))


@app.command()
def specs() -> None:
    """List the shipped specs and the architectures they serve."""
    from quantmap.spec import load_spec, shipped_specs

    for name in shipped_specs():
        resolved = load_spec(name)
        typer.echo(f"{name:<14} {', '.join(resolved.architectures):<40} {resolved.description}")


def main() -> None:
    app(prog_name="quantmap")


if __name__ == "__main__":
    main()
