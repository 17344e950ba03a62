"""The ``quantmap`` command: a thin shell over the library; each verb is one function.

Exit codes: 0 success; 1 the spec, the names, the checkpoint or another input have problems (each
printed as ``file:line:col: severity CODE: message`` or ``error: ...``), a missing input file or
directory included, or the output cannot be written; 2 the command line itself is wrong (an unknown
option, a malformed value); 141 (128 + SIGPIPE, quietly) when the reader of the output went away.
``compile``, ``validate``, ``lookup``, ``check``, ``names``, ``schema`` and ``specs`` never import torch.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import sys
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

import typer

from quantmap.diagnostics import SpecError
from quantmap.processes import start_fork_server
from quantmap.formats import DEFAULT, FORMATS
from quantmap.limits import MAX_EXPERTS, MAX_LAYERS, MAX_TIMEOUT_S, over
from quantmap.untrusted import MAX_DIGITS, decimal, parse_json

app = typer.Typer(
    help="Move quantization calibration state between Megatron-Core and Hugging Face names.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def existing(expected: str):
    """An option callback for an input path: one that does not exist is a problem with the run's inputs,
    reported like every other (``error:`` line naming the option and path, exit 1) before any work,
    not a usage error: the command line is well formed, the file is not there. ``-`` is stdin."""

    def check(param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
        if value is not None and value != "-" and not Path(value).exists():
            option = max(param.opts, key=len)
            typer.echo(f"error: {option} {value}: no such file or directory; expected {expected}; "
                       f"check the path", err=True)
            raise typer.Exit(1)
        return value

    return check


def input_error(option: str, error: Exception) -> typer.Exit:
    """An input that exists but cannot be used (unreadable, malformed): one line, exit 1."""
    typer.echo(f"error: {option}: {error}", err=True)
    return typer.Exit(1)


CONFIG_FILE = existing("a Hugging Face config.json or the directory holding it")
NAMES_FILE = existing("a text file of names, one per line")
NAMES_SOURCE = existing("a names source (a text file, a safetensors file or index, or a checkpoint directory)")
MEGATRON_CHECKPOINT = existing("a Megatron checkpoint (a torch_dist save directory, an iter_NNNNNNN/release "
                               "directory, or a shard directory with layout.json)")
HF_CHECKPOINT = existing("a Hugging Face checkpoint directory (sharded with an index, or model.safetensors)")
LAYOUT_FILE = existing("a layout.json or the directory holding one")
LIKE_MODEL = existing("a Hugging Face model directory holding config.json")
INTO_CHECKPOINT = existing("a torch_dist checkpoint (a save or iteration directory)")

SpecArg = typer.Argument(..., help="A spec file, or the name of a shipped spec (see 'quantmap specs').")
ParamOpt = typer.Option(None, "--param", "-p", help="A run-time parameter of the spec, NAME=INT; repeatable.")
ConfigOpt = typer.Option(None, "--config", callback=CONFIG_FILE, help="A Hugging Face config.json (or its directory) "
                         "giving the spec's parameters it knows: layers, head counts, hidden size, experts. "
                         "--param wins. import reads the --hf model directory's own config.json without it.")


class HfNaming(str, Enum):
    on_disk = "on-disk"
    in_memory = "in-memory"


HfNamingOpt = typer.Option(HfNaming.on_disk, "--hf-naming", help="The HF names to map: on-disk (what save_pretrained "
                           "writes) or in-memory (a live transformers v5 model: fused MoE experts, as ModelOpt names "
                           "their quantizers).")


class Format(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


def parse_params(values: Optional[List[str]]) -> dict[str, int]:
    """``["num_layers=61"]`` → ``{"num_layers": 61}``; a usage error otherwise."""
    params = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        number = decimal(value.strip())
        if not sep or not name.strip() or number is None:
            raise typer.BadParameter(f"{item!r} is not NAME=INT (INT: at most {MAX_DIGITS} decimal digits), e.g. "
                                     f"num_layers=61", param_hint="--param")
        params[name.strip()] = number
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
        raise input_error("--config", error) from None


def output(text: str, *, flush: bool = True) -> None:
    """Write ``text`` to standard output (and, with ``flush``, out of the buffer now). A command's result
    is its output, so a write that fails ends the command: quietly, with 128 + SIGPIPE as a command
    killed by that signal, when the reader went away (``| head``); else (standard output closed with
    ``>&-``, a full disk, ``/dev/full``) with one error line on stderr and exit code 1."""
    stream = sys.stdout
    try:
        if stream is None:  # Python's stand-in for a standard output closed before it started
            raise OSError(errno.EBADF, "it is closed")
        stream.write(text)
        if flush:
            stream.flush()
    except OSError as error:
        if stream is not None:  # what is left in the buffer must not fail again at exit, with a traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        if isinstance(error, BrokenPipeError):
            raise typer.Exit(128 + signal.SIGPIPE) from None
        typer.echo(f"error: cannot write the output to standard output: {error.strerror}; redirect it to a file "
                   f"with room, or to /dev/null", err=True)
        raise typer.Exit(1) from None


def fail(error: SpecError) -> typer.Exit:
    for diagnostic in error.diagnostics:
        typer.echo(str(diagnostic), err=True)
    return typer.Exit(1)


def compile_or_exit(spec: str, params: dict[str, int], hf_naming: HfNaming = HfNaming.on_disk):
    import quantmap

    try:
        return quantmap.compile(spec, hf_naming.value, **params)
    except SpecError as error:
        raise fail(error) from None


@app.command("compile")
def compile_command(
    spec: str = SpecArg,
    format: Format = typer.Option(Format.table, "--format", "-f", help="table (readable), json or yaml."),
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
    hf_naming: HfNaming = HfNamingOpt,
) -> None:
    """Compile a spec and print its rules. JSON output is deterministic, byte for byte."""
    rules = compile_or_exit(spec, spec_params(spec, param, config), hf_naming)
    for warning in rules.warnings:
        typer.echo(str(warning), err=True)
    if format is Format.json:
        output(json.dumps(rules.to_json(), indent=2) + "\n")
    elif format is Format.yaml:
        import yaml

        output(yaml.safe_dump(rules.to_json(), sort_keys=False, width=200))
    else:
        output(_table(rules) + "\n")


def _table(rules) -> str:
    """The spec files read (which file each ``extends`` found), then one line per rule: kind, priority,
    tensor-parallel split, both patterns and the spec line."""
    lines = [f"{rules.spec.name}: {len(rules)} rules", "spec files: " + " extends ".join(reversed(rules.spec.files)),
             f"{'kind':<10} {'prio':>4} {'parallel':<10} megatron  ->  hf"]
    width = max((len(r.megatron.text) for r in rules), default=0)
    for rule in rules:
        place = rule.origin.location
        targets = [f"{part}: {p.text}" if part else p.text for part, p in zip(rule.parts, rule.hf)]
        lines.append(f"{rule.kind:<10} {rule.priority:>4} {rule.parallel or '-':<10} "
                     f"{rule.megatron.text:<{width}}  ->  {targets[0]}   [{place}]")
        lines.extend(f"{'':<26} {'':<{width}}      {target}" for target in targets[1:])
    return "\n".join(lines)


@app.command()
def validate(
    specs: List[str] = typer.Argument(..., help="Spec files or shipped names."),
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
    hf_naming: Optional[HfNaming] = typer.Option(None, "--hf-naming", help="Validate for one HF naming only "
                                                 "(on-disk or in-memory); both by default."),
) -> None:
    """Check specs: exit 0 when all are valid, 1 with 'file:line:col: message' lines otherwise.

    Parameters the spec leaves to run time are set to a placeholder, unless given. Each spec is compiled
    for both HF namings unless --hf-naming picks one.
    """
    from quantmap.compiler import HF_NAMINGS, compile_spec
    from quantmap.spec import load_spec

    cli_params = parse_params(param)
    namings = (hf_naming.value,) if hf_naming else HF_NAMINGS
    failed = False
    for spec in specs:
        try:
            resolved = load_spec(spec)
            given = {**config_params(config, resolved.params), **cli_params}
            placeholders = {name: 0 for name, value in resolved.params.items() if value is None}
            bound = {**placeholders, **{k: v for k, v in given.items() if k in resolved.params}}
            # Warnings are the same under both namings for mappings that serve both: print each once.
            warnings = {str(w): None for naming in namings for w in compile_spec(resolved, bound, naming).warnings}
        except SpecError as error:
            failed = True
            for diagnostic in error.diagnostics:
                typer.echo(str(diagnostic), err=True)
        else:
            for warning in warnings:
                typer.echo(warning, err=True)
            output(f"{spec}: ok\n")
    if failed:
        raise typer.Exit(1)


@app.command()
def lookup(
    spec: str = SpecArg,
    names: Optional[List[str]] = typer.Argument(None, help="Concrete names to resolve."),
    reverse: bool = typer.Option(False, "--reverse", "-r", help="Resolve Hugging Face names to Megatron."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    from_file: Optional[str] = typer.Option(None, "--from-file", callback=NAMES_FILE,
                                            help="Read names, one per line, from a file or '-'."),
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
    hf_naming: HfNaming = HfNamingOpt,
) -> None:
    """Resolve concrete names. Exit 0 when every name matched, 1 when some did not. A fan-in HF name
    (one tensor for many Megatron quantizers) resolves to every source: the expert as '*', and with
    --json an 'expanded' list when the expert count is known."""
    from quantmap.rules import FAN_IN

    rules = compile_or_exit(spec, spec_params(spec, param, config), hf_naming)
    resolve = rules.to_megatron if reverse else rules.to_hf
    unmatched = 0
    for name in _names(names, from_file):
        match = resolve(name)
        unmatched += match is None
        why = _why_unmapped(rules, name) if match is None and reverse else None
        if as_json:
            record = {"name": name, "match": None} if match is None else match.to_json(name)
            output(json.dumps(record if why is None else {**record, "reason": why}) + "\n", flush=False)
        elif match is None:
            output(f"{name}\t(no match{'' if why is None else ': ' + why})\n", flush=False)
        else:
            sources = len(match.expanded) if reverse and match.kind == FAN_IN and match.expanded else None
            extra = "".join(f" {key}={value}" for key, value in (("part", match.part), ("expert", match.expert),
                                                                 ("sources", sources)) if value is not None)
            targets = ", ".join((match.megatron,) if reverse else match.hf)
            output(f"{name}\t{match.kind}\t{targets}{extra}\n", flush=False)
    output("")
    if unmatched:
        raise typer.Exit(1)


def _why_unmapped(rules, hf_name: str) -> str | None:
    """Why an HF quantizer buffer is not mapped, where the spec says so on purpose."""
    weight = rules.unquantized_part(hf_name)
    if weight is None:
        return None
    return (f"part {weight.part!r} of {weight.megatron} is not quantized (its mapping's quantized_parts: "
            f"{', '.join(weight.rule.quantized_parts)}; {weight.rule.origin.location})")


def _names(names: Optional[List[str]], from_file: Optional[str]):
    yield from names or []
    if from_file is None:
        return
    try:
        stream = sys.stdin.buffer if from_file == "-" else open(from_file, "rb")
    except OSError as exc:
        raise input_error("--from-file", f"cannot read {from_file}: {exc.strerror}") from None
    with stream:
        for number, raw in enumerate(stream, 1):
            try:
                name = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                typer.echo(f"error: {from_file}: line {number} is not UTF-8 text; give names one per line, "
                           f"UTF-8 encoded", err=True)
                raise typer.Exit(1) from None
            if name and not name.startswith("#"):
                yield name


class CheckFormat(str, Enum):
    text = "text"
    json = "json"


@app.command()
def check(
    spec: str = SpecArg,
    megatron: Optional[str] = typer.Option(None, "--megatron", "-m", callback=NAMES_SOURCE,
                                           help="Megatron names: a text file (one per "
                                           "line), a safetensors file or index, a checkpoint directory, or a "
                                           "torch_dist checkpoint (names and shapes from its .metadata)."),
    hf: Optional[str] = typer.Option(None, "--hf", callback=NAMES_SOURCE,
                                     help="Hugging Face names, from the same kinds of source."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when there is any finding (for CI)."),
    format: CheckFormat = typer.Option(CheckFormat.text, "--format", "-f", help="text or json."),
    iteration: Optional[int] = typer.Option(None, "--iteration", help="With a torch_dist save directory: this "
                                            "iteration instead of the tracker file's."),
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
    hf_naming: HfNaming = HfNamingOpt,
) -> None:
    """Check a spec against a real model's names: unclaimed names (QM101), missing targets (QM102),
    names claimed twice (QM103), fused groups missing a part (QM104), with both sides HF buffers whose
    reverse lookup the model lacks (QM106); notes list dead rules (QM105). Exit 0 unless --strict finds any."""
    from quantmap.check import check as check_names
    from quantmap.io.names import NamesFileError, read_names
    from quantmap.io.torch_dist import TorchDistError, is_shard_directory, is_torch_dist, names_and_swiglu

    if megatron is None and hf is None:
        raise typer.BadParameter("give --megatron, --hf, or both", param_hint="--megatron/--hf")
    rules = compile_or_exit(spec, spec_params(spec, param, config), hf_naming)
    try:
        if megatron is not None and Path(megatron).is_dir() and is_torch_dist(megatron) \
                and not is_shard_directory(megatron):
            megatron_names, swiglu = names_and_swiglu(megatron, iteration)  # from .metadata alone
        else:
            megatron_names, swiglu = None if megatron is None else read_names(megatron), None
        report = check_names(rules, megatron_names, None if hf is None else read_names(hf), swiglu)
    except (NamesFileError, TorchDistError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    output((json.dumps(report.to_json(), indent=2) if format is CheckFormat.json else report.to_text()) + "\n")
    if strict and not report.ok:
        raise typer.Exit(1)


class Side(str, Enum):
    megatron = "megatron"
    hf = "hf"


@app.command()
def names(
    spec: str = SpecArg,
    side: Side = typer.Option(..., "--side", help="megatron or hf."),
    layers: Optional[int] = typer.Option(None, "--layers", min=0, max=MAX_LAYERS, help="Decoder layers of the model "
                                         "(default: --config's num_hidden_layers)."),
    experts: Optional[int] = typer.Option(None, "--experts", min=0, max=MAX_EXPERTS, help="Routed experts per MoE "
                                          "layer (default: --config's expert count)."),
    mtp_layers: int = typer.Option(0, "--mtp-layers", min=0, max=MAX_LAYERS, help="Multi-token-prediction layers."),
    dense_layers: Optional[str] = typer.Option(None, "--dense-layers", help="Layers with a dense MLP in an MoE "
                                               "model, e.g. '0-2' or '0,3' (default: those --config makes dense, e.g. "
                                               "DeepSeek's first_k_dense_replace; else none, every layer of a dense spec)."),
    te: bool = typer.Option(True, "--te/--local", help="Transformer Engine layer spec (fused norms) or the local one."),
    grouped: bool = typer.Option(True, "--grouped/--sequential", help="TEGroupedMLP experts (weight{i}) or "
                                 "SequentialMLP (local_experts.{i})."),
    buffer: Optional[List[str]] = typer.Option(None, "--buffer", help="List only these quantizer buffers, e.g. "
                                               "weight_quantizer._amax; repeatable (default: every one the spec derives)."),
    weights_only: bool = typer.Option(False, "--weights-only", help="List weights only, no quantizer buffers."),
    omit: Optional[List[str]] = typer.Option(None, "--omit", help="Leave out the mappings whose Megatron pattern "
                                             "ends with this text (a form the model does not build); repeatable."),
    layer_kind: Optional[List[str]] = typer.Option(None, "--layer-kind", help="A hybrid spec's layers of one kind, "
                                                   "KIND=LAYERS, e.g. full_attention=3,7; repeatable, every layer once "
                                                   "(default: read from --config)."),
    as_json: bool = typer.Option(False, "--json", help="A JSON list instead of one name per line."),
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
    hf_naming: HfNaming = HfNamingOpt,
) -> None:
    """Every name a model of this size has on one side, as the spec maps it (weights and quantizer buffers;
    what the spec excludes is not listed): diff it against a real checkpoint's names."""
    from quantmap.model_names import ModelSize, ModelSizeError, iter_model_names, unlisted

    rules = compile_or_exit(spec, spec_params(spec, param, config), hf_naming)
    layers, experts = _model_size(layers, experts, config)
    kinds = _layer_kinds(layer_kind, layers, config, rules.spec.hybrid)
    dense = _layer_list(dense_layers, layers) if dense_layers is not None else _dense_layers(config, layers)
    size = ModelSize(layers, experts, mtp_layers, te, grouped, dense, kinds)
    try:
        found = iter_model_names(rules, side.value, size, [] if weights_only else buffer, omit or ())
    except ModelSizeError as error:
        raise typer.BadParameter(str(error), param_hint=error.option) from None
    for pattern in unlisted(rules, omit or ()):
        typer.echo(f"note: {pattern!r} has a '**' capture, names of any depth, which no size enumerates: its "
                   f"names are not listed (check them with 'quantmap check', or --omit {pattern} to leave them out)",
                   err=True)
    _stream(_json_list(found) if as_json else (name + "\n" for name in found))


def _json_list(items) -> Iterator[str]:
    """The text of ``json.dumps(list(items), indent=2)``, a line at a time."""
    first = True
    for item in items:
        yield ("[\n  " if first else ",\n  ") + json.dumps(item)
        first = False
    yield "[]\n" if first else "\n]\n"


def _stream(pieces: Iterable[str]) -> None:
    """Write to stdout as the text is made, so that a large listing starts at once and ``| head`` ends it
    early (:func:`output` ends the command when the reader goes away)."""
    for piece in pieces:
        output(piece, flush=False)
    output("")


def _model_size(layers: Optional[int], experts: Optional[int], config: Optional[str]) -> tuple[int, Optional[int]]:
    """``--layers`` and ``--experts``, each defaulting to what ``--config`` gives."""
    given = config_params(config, {"num_layers", "num_experts"})
    for name, limit in (("num_layers", MAX_LAYERS), ("num_experts", MAX_EXPERTS)):
        too_big = over(f"{config}: its {name}", given.get(name, 0), limit)
        if too_big:
            typer.echo(f"error: {too_big}; check the file", err=True)
            raise typer.Exit(1)
    layers = given.get("num_layers") if layers is None else layers
    if layers is None:
        where = f"{config} has no num_hidden_layers; pass --layers N" if config else "pass --layers N (or --config)"
        raise typer.BadParameter(f"the model's decoder layer count is needed: {where}", param_hint="--layers")
    return layers, given.get("num_experts") if experts is None else experts


def _layer_list(text: Optional[str], layers: int, option: str = "--dense-layers") -> Optional[tuple[int, ...]]:
    """``"0-2,5"`` → ``(0, 1, 2, 5)``; a usage error for anything else."""
    if text is None:
        return None
    out: list[int] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        head, dash, tail = item.partition("-")
        first, last = decimal(head.strip()), decimal((tail if dash else head).strip())
        if first is None or last is None:
            raise typer.BadParameter(f"{item!r} is not a layer or a range like 0-2", param_hint=option)
        if last >= layers:  # checked before the range is enumerated
            raise typer.BadParameter(f"{text!r} names a layer >= --layers {layers}", param_hint=option)
        out += range(first, last + 1)
    return tuple(out)


def _dense_layers(config: Optional[str], layers: int) -> Optional[tuple[int, ...]]:
    """The layers ``--config`` says have a dense MLP (DeepSeek's ``first_k_dense_replace``, ...), if it says."""
    if config is None:
        return None
    from quantmap.spec.hf_config import ConfigError, dense_layers_from_config

    try:
        return dense_layers_from_config(config, layers)
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--config") from None


def _layer_kinds(items: Optional[List[str]], layers: int, config: Optional[str], hybrid) -> Optional[tuple[str, ...]]:
    """Each layer's kind for a hybrid spec: from ``--layer-kind KIND=LAYERS``, else from ``--config``."""
    if not items:
        if config is None or hybrid is None:
            return None
        from quantmap.spec.hf_config import ConfigError, layer_kinds_from_config

        try:
            return layer_kinds_from_config(config, hybrid, layers)
        except ConfigError as error:
            raise input_error("--config", error) from None
    kinds: list[Optional[str]] = [None] * layers
    for item in items:
        kind, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not kind:
            raise typer.BadParameter(f"{item!r} is not KIND=LAYERS, e.g. full_attention=3,7", param_hint="--layer-kind")
        for index in _layer_list(text, layers, "--layer-kind") or ():
            if kinds[index] not in (None, kind):
                raise typer.BadParameter(f"layer {index} is given two kinds, {kinds[index]} and {kind}",
                                         param_hint="--layer-kind")
            kinds[index] = kind
    missing = [str(index) for index, kind in enumerate(kinds) if kind is None]
    if missing:
        raise typer.BadParameter(f"layers {','.join(missing)} have no kind: give every layer one",
                                 param_hint="--layer-kind")
    return tuple(kinds)


NprocOpt = typer.Option(None, "--nproc", min=1, help="Spawn N gloo worker processes (one per rank). Under torchrun "
                        "the launcher's ranks are used; otherwise one process plays every rank.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar and no report.")
TimeoutOpt = typer.Option(600, "--timeout", min=1, max=MAX_TIMEOUT_S,
                          help="Seconds a collective may wait before every rank fails (at most a week).")
#: The registered output formats (quantmap.formats), offered as choices.
OutputFormatName = Enum("OutputFormatName", {name: name for name in FORMATS}, type=str)
#: What ``import --into --only`` may restrict an import to.
OnlyRoles = Enum("OnlyRoles", {"quantizers": "quantizers"}, type=str)
FORMAT_HELP = "; ".join(f"{name}: {fmt.summary}" for name, fmt in FORMATS.items())
#: ``--kv-scales`` choices (quantmap.executor.options.KV_SCALES).
KvScales = Enum("KvScales", {name: name for name in ("megatron", "hf")}, type=str)
#: ``--dtype`` choices: the casts a model export offers (quantmap.executor.options.CASTS).
CastName = Enum("CastName", {name: name for name in ("bf16", "fp16", "fp32")}, type=str)


@app.command("export")
def export_command(
    spec: str = SpecArg,
    megatron: str = typer.Option(..., "--megatron", "-m", callback=MEGATRON_CHECKPOINT,
                                 help="Megatron checkpoint: a torch_dist save directory "
                                 "(latest_checkpointed_iteration.txt), an iter_NNNNNNN/release directory, or a "
                                 "shard directory (layout.json + rank_NNNNN.safetensors)."),
    iteration: Optional[int] = typer.Option(None, "--iteration", help="With a torch_dist save directory: this "
                                            "iteration instead of the tracker file's."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory for the Hugging Face checkpoint (must not exist)."),
    format: OutputFormatName = typer.Option(DEFAULT, "--format", help=f"The output format; {FORMAT_HELP}."),
    shard_size: int = typer.Option(5 * 2**30, "--shard-size", min=1, help="Largest shard, in bytes."),
    strict: bool = typer.Option(False, "--strict", help="Fail on any finding: unclaimed, missing or uncalibrated "
                                "(zero amax) names."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Export shards short of what the layout "
                                       "requires (a layer, expert or stage missing) and report the rest; refused "
                                       "by default."),
    nproc: Optional[int] = NprocOpt,
    quiet: bool = QuietOpt,
    timeout: int = TimeoutOpt,
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
    hf_naming: HfNaming = HfNamingOpt,
    like: Optional[str] = typer.Option(None, "--like", callback=LIKE_MODEL, help="With --format hf or modelopt: the "
                                       "Hugging Face model the Megatron run started from; its config.json (which also gives the "
                                       "spec's parameters, as --config does), generation config and tokenizer files "
                                       "are copied beside the weights (or give --config config.json alone)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="With --format modelopt: ModelOpt's quant_cfg as "
                                         "JSON (a list, or {\"quant_cfg\": [...]}), for a checkpoint that records "
                                         "none; one that records its own must agree with it."),
    kv_scales: KvScales = typer.Option(KvScales.megatron, "--kv-scales", help="With --format modelopt: KV-cache "
                                       "scales as ModelOpt's Megatron exporter writes them (self_attn.k_scale, FP8 "
                                       "clamped at 1.0) or its Hugging Face exporter (hf: self_attn.k_proj.k_scale, "
                                       "amax / 448)."),
    dtype: Optional[CastName] = typer.Option(None, "--dtype", help="With --format hf or modelopt: the dtype of the "
                                             "weights written and, for modelopt, the one a quantized weight is "
                                             "divided by its scale in (default: the checkpoint's; ModelOpt's own "
                                             "exporter uses bf16); quantizer state keeps its own."),
) -> None:
    """Export Megatron quantizer state to Hugging Face names (model-0000i-of-0000n.safetensors + index), or with
    --format hf the whole model: a directory that transformers' from_pretrained loads."""
    start_fork_server(nproc)  # first: its imports overlap this command's own
    from quantmap.executor.launch import export_from

    model = FORMATS[format.value].model
    if like is not None and (config is not None or not model):
        raise typer.BadParameter("--like goes with --format hf, without --config (the config.json it names is "
                                 "--like's)", param_hint="--like")
    like_config = Path(like or ".") / "config.json"
    params = spec_params(spec, param, config or (str(like_config) if like and like_config.is_file() else None))
    same = [spec, *(arg for name, value in params.items() for arg in ("-p", f"{name}={value}")),
            *(["--iteration", str(iteration)] if iteration is not None else []),
            *(["--hf-naming", hf_naming.value] if hf_naming is not HfNaming.on_disk else [])]
    check_it = shlex.join(["quantmap", "check", *same, "--megatron", megatron, "--hf", out, "--strict"])
    next_step = f"next: check the export against its source (it must be clean): {check_it}"
    if FORMATS[format.value].next_step:
        next_step = FORMATS[format.value].next_step.format(out=shlex.quote(out), out_py=json.dumps(str(out)))
    elif model:
        load = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({json.dumps(str(out))})"
        deploy = shlex.join(["quantmap", "export", *same, "--megatron", megatron, "--out", f"{out}-deploy",
                             "--format", "modelopt", *(["--like", like] if like else ["--config", config or ""])])
        next_step = (f"next: load the model: {shlex.join(['python', '-c', load])}\n{next_step}\n"
                     f"next: or a deployable quantized checkpoint: {deploy}")
    rules = compile_or_exit(spec, params, hf_naming)
    options = _run_options(strict=strict, allow_partial=allow_partial, timeout=timeout, shard_size=shard_size,
                           quiet=quiet, nproc=nproc, format=format.value, dtype=dtype and dtype.value,
                           model_files=_model_files(like, config) if model else (), export=True,
                           recipe=_read_recipe(recipe), kv_scales=kv_scales.value)
    _run_executor(quiet, lambda: export_from(rules, megatron, out, options, iteration=iteration),
                  next_step=next_step)


def _read_recipe(path: Optional[str]) -> Optional[list]:
    """``--recipe``'s quant_cfg, or one ``error:`` line naming the file and what it must hold."""
    if path is None:
        return None
    try:
        data = parse_json(Path(path).read_bytes())
    except (OSError, ValueError) as error:
        typer.echo(f"error: --recipe {path}: cannot be read as JSON ({error})", err=True)
        raise typer.Exit(1) from None
    cfg = data.get("quant_cfg") if isinstance(data, dict) else data
    if not (isinstance(cfg, list) and all(isinstance(entry, dict) for entry in cfg)):
        typer.echo(f"error: --recipe {path}: expected ModelOpt's quant_cfg, a list of {{\"quantizer_name\": ..., "
                   f"\"cfg\": ..., \"enable\": ...}} (or an object holding it under \"quant_cfg\")", err=True)
        raise typer.Exit(1) from None
    return cfg


def _model_files(like: Optional[str], config: Optional[str]) -> tuple:
    """The files a model export copies beside its weights, from --like or --config (none without either: the
    run options refuse that, saying how to give them)."""
    from quantmap.io.hf import CheckpointError, model_files

    if like is None and config is None:
        return ()
    if config is not None and Path(config).is_dir():
        config = str(Path(config) / "config.json")
    try:
        return model_files(like=like, config=config)
    except CheckpointError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


@app.command("import")
def import_command(
    context: typer.Context,
    spec: str = SpecArg,
    hf: str = typer.Option(..., "--hf", callback=HF_CHECKPOINT,
                             help="Hugging Face checkpoint directory (sharded with an index, or model.safetensors)."),
    layout: Optional[str] = typer.Option(None, "--layout", "-l", callback=LAYOUT_FILE,
                                         help="The target layout.json (or a directory "
                                         "holding one), for a shard directory."),
    into: Optional[str] = typer.Option(None, "--into", callback=INTO_CHECKPOINT,
                                       help="Write into this torch_dist checkpoint instead (save or "
                                       "iteration directory): a new copy at --out, or --in-place."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory (must not exist)."),
    format: OutputFormatName = typer.Option(DEFAULT, "--format", help=f"The format --hf holds (what is read back); "
                                            f"{FORMAT_HELP}."),
    in_place: bool = typer.Option(False, "--in-place", help="With --into: rewrite that checkpoint itself (atomic)."),
    iteration: Optional[int] = typer.Option(None, "--iteration", help="With --into a save directory: this "
                                            "iteration instead of the tracker file's."),
    only: Optional[OnlyRoles] = typer.Option(None, "--only", help="With --into: 'quantizers' writes the quantizer "
                                             "state alone and keeps every weight (without it, the weights the HF "
                                             "checkpoint holds are written too)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on any unclaimed, missing, out-of-layout or "
                                "uncalibrated (zero amax) name."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="With --into: keep the checkpoint's weights "
                                       "the HF checkpoint lacks (and report them); refused by default."),
    nproc: Optional[int] = NprocOpt,
    quiet: bool = QuietOpt,
    timeout: int = TimeoutOpt,
    param: Optional[List[str]] = ParamOpt,
    config: Optional[str] = ConfigOpt,
    hf_naming: HfNaming = HfNamingOpt,
) -> None:
    """Import Hugging Face quantizer state into a Megatron shard directory for a layout, or a Hugging Face model
    (its weights, and its quantizer_state/) into an existing torch_dist checkpoint (--into; every other tensor
    stays byte-identical)."""
    start_fork_server(nproc if into is None else None)  # first: its imports overlap this command's own
    if (layout is None) == (into is None):
        raise typer.BadParameter("give --layout (a shard directory) or --into (a torch_dist checkpoint)",
                                 param_hint="--layout/--into")
    if into is not None:
        if (out is None) == (not in_place):
            raise typer.BadParameter("with --into, give --out NEW or --in-place", param_hint="--out/--in-place")
        _one_process_only(context, nproc)
    elif out is None or in_place or iteration is not None or only is not None or allow_partial:
        raise typer.BadParameter("with --layout, give --out (--in-place, --iteration, --only and --allow-partial go "
                                 "with --into)", param_hint="--out")
    if config is None and (Path(hf) / "config.json").is_file():
        config = str(Path(hf) / "config.json")  # a model directory says its own sizes
    rules = compile_or_exit(spec, spec_params(spec, param, config), hf_naming)
    options = _run_options(strict=strict, timeout=timeout, quiet=quiet, nproc=nproc, format=format.value,
                           only=only and only.value, allow_partial=allow_partial)
    if into is not None:
        from quantmap.executor.launch import import_checkpoint_into

        _run_executor(quiet, lambda: import_checkpoint_into(rules, hf, into, options, out=out, in_place=in_place,
                                                            iteration=iteration))
        return
    from quantmap.executor.launch import import_checkpoint

    _run_executor(quiet, lambda: import_checkpoint(rules, hf, layout, out, options))


def _one_process_only(context: typer.Context, nproc: Optional[int]) -> None:
    """``import --into`` runs in one process: the checkpoint's names are global and its new ``.metadata`` is
    written once, so there are no ranks to spawn and no collective to wait for. --nproc and --timeout would
    change nothing, and are refused rather than silently ignored."""
    if nproc is not None:
        raise typer.BadParameter("--into runs in one process (a torch_dist checkpoint's names are global and its "
                                 ".metadata is written once); drop --nproc", param_hint="--nproc")
    if context.get_parameter_source("timeout").name != "DEFAULT":  # given on the command line
        raise typer.BadParameter("--into runs in one process and waits for no other rank, which is all --timeout "
                                 "bounds; drop --timeout", param_hint="--timeout")


def _run_options(*, timeout: int, quiet: bool, export: bool = False, **given):
    """The run's options from the command's flags (already range-checked by their typer options); flags that do
    not go together (an export of a model format without its config, an import of a format never read back) are one
    ``error:`` line before any work."""
    from quantmap.executor.options import OptionsError, RunOptions

    try:
        options = RunOptions(timeout=timedelta(seconds=timeout), progress=not quiet, **given)
        if export:
            options.check_export()
        else:
            options.check_import()
        return options
    except OptionsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


def _run_executor(quiet: bool, run, next_step: Optional[str] = None) -> None:
    """Run an export/import (``run()``, given the compiled rules and options); its report on stderr,
    then ``next_step`` (the command to run next), its failure as one message and exit code 1."""
    from quantmap.executor import ExecutorError, LayoutError
    from quantmap.executor.naming import NamingError
    from quantmap.io.hf import CheckpointError
    from quantmap.io.names import NamesFileError
    from quantmap.io.torch_dist import TorchDistError

    from quantmap.executor.launch import Interrupted

    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        report = run()
    except (ExecutorError, LayoutError, NamingError, NamesFileError, CheckpointError, TorchDistError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as error:  # Ctrl-C or a terminating signal: abort, never publish
        signum = error.signum if isinstance(error, Interrupted) else signal.SIGINT
        written = getattr(error, "written", None)  # past an in-place write's commit point (write.commit_reported)
        outcome = f"the import was written all the same: {written} holds the new values" if written \
            else "nothing was written"
        typer.echo(f"error: interrupted by {signal.Signals(signum).name}; {outcome}", err=True)
        raise typer.Exit(128 + signum) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not quiet:
        for line in report.lines() + ([next_step] if next_step else []):
            typer.echo(line, err=True)


def _interrupt(signum, frame) -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so that the staging cleanup on the way out runs."""
    from quantmap.executor.launch import Interrupted

    raise Interrupted(signum)


@app.command()
def schema() -> None:
    """Print the spec format's JSON Schema (for editors: '# yaml-language-server: $schema=...')."""
    from quantmap.spec.schema import SpecFile

    output(json.dumps(SpecFile.model_json_schema(), indent=2) + "\n")


@app.command()
def specs() -> None:
    """List the shipped specs and the architectures they serve."""
    from quantmap.spec import load_spec, shipped_specs

    for name in shipped_specs():
        resolved = load_spec(name)
        output(f"{name:<14} {', '.join(resolved.architectures):<40} {resolved.description}\n")


def main() -> None:
    app(prog_name="quantmap")


if __name__ == "__main__":
    main()
