"""Import (Hugging Face → Megatron): each rank builds its local state dict from the HF names it needs.

A rank resolves every HF name to its global Megatron name once (metadata only), keeps the names
its layout position holds (its pipeline stage's layers, its expert block), localises them, and
reads just those tensors, lazily. Fan-in is the reverse of export's fan-out: a fused quantizer
takes the max of its HF parts (q/k/v, gate/up) and a grouped-MoE block the max over its
experts; parts that disagree are reported. A fan-in HF tensor (one for many Megatron quantizers) is
copied to every source (:mod:`quantmap.executor.fan_in`). Scalars are replicated on every
tensor-parallel rank; any other tensor runs its rule's layout backwards
(:mod:`quantmap.executor.sharding`): the HF parts are joined into the full Megatron tensor and the
rank's piece is cut out; an expert of a fused-experts weight takes its own slice of the HF tensor
first. Nothing talks to other ranks except to agree on the output directory and
on success.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from quantmap.executor.completeness import required_names
from quantmap.executor.deployed import DeployedCheckpoint
from quantmap.executor.fan_in import copy_to_source, sources
from quantmap.executor.placement import Placement
from quantmap.parallel import ParallelLayout
from quantmap.executor.naming import expert_block, expert_hf_names, holder, is_expert, to_local
from quantmap.executor.options import RunOptions
from quantmap.executor.progress import bar as progress_bar
from quantmap.executor.report import ExecutorError, Report
from quantmap.name_groups import natural
from quantmap.executor.sharding import (LayoutProblem, import_pipeline, is_scalar, max_of_copies, run,
                                        stacks_experts)
from quantmap.executor.values import check_dtypes, check_values
from quantmap.formats import OutputFormat
from quantmap.formats.quantizers import QUANTIZERS
from quantmap.io.hf import Checkpoint
from quantmap.io.shards import write_rank
from quantmap.io.staging import Staged
from quantmap.roles import MODEL_ROLES
from quantmap.rules import FAN_IN, MOE_FANOUT


class Catalog:
    """The HF checkpoint's names resolved to global Megatron names, shared by every rank's import.

    Only the roles ``output_format`` reads back are imported, and with ``weights`` (a target that takes the
    model's own tensors, and no ``--only quantizers``) the model roles too, as is under the rules' HF names
    (weights have one HF form, whatever form the quantizer state is in); the others (a model's weights,
    for the ``quantizers`` format) are counted in the report and never read.
    A name no rank of the layout holds goes to ``outside``: each rank alone would just skip it.
    ``megatron`` is every name the layout requires (:mod:`quantmap.executor.completeness`), so the
    rank that should hold a layer or expert the checkpoint lacks reports its HF names as missing."""

    def __init__(self, rules, names: list[str], layout: ParallelLayout, target: Iterable[str] = (),
                 output_format: OutputFormat = QUANTIZERS, weights: bool = False):
        self.rules = rules
        self.available = set(names)
        self.report = Report()
        self._format, self._weights = output_format, weights
        claimed: set[str] = set()
        imported: dict[int, bool] = {}  # id(rule) -> whether its role is read back (10^5 names, few rules)
        supplied: set[bool] = set()  # the kinds the HF checkpoint gives: True, the model's own; False, quantizers
        for name in names:
            match = rules.to_megatron(name)
            if match is None:
                self.report.unclaimed.append(name)
                continue
            if id(match.rule) not in imported:
                imported[id(match.rule)] = self._reads(match.rule.role)
            if not imported[id(match.rule)]:
                self.report.weights += 1
            elif not _held(match, layout):
                self.report.outside.append(name)
            else:
                claimed.update(sources(match, layout))
                supplied.add(match.rule.role in MODEL_ROLES)
        if not claimed:
            what = "tensor" if weights else "quantizer tensor"
            raise ExecutorError(f"the checkpoint holds no {what} that the spec claims for this layout "
                                f"({len(names)} name(s): {self.report.weights} weight(s), "
                                f"{len(self.report.unclaimed)} unclaimed, {len(self.report.outside)} beyond the "
                                f"layout); nothing to import. Check --hf, the spec and layout.json")
        # ``target``: the tensors an existing checkpoint holds (import --into); each one the spec maps must get
        # its value, or it would keep its old one silently. A kind the HF checkpoint gives none of (no
        # weights: a quantizer-state export; no quantizer state: a plain HF model) is kept, and said so.
        held, kept = set(), {True: 0, False: 0}
        for name in target:
            match = rules.to_hf(name)
            if match is None or not self._reads(match.rule.role) or holder(name, layout) is None:
                continue
            model = match.rule.role in MODEL_ROLES
            if model in supplied:
                held.add(name)
            else:
                kept[model] += 1
        for model, count in kept.items():
            if count:
                self.report.kept.append(f"{count} {'weight' if model else 'quantizer'} tensor(s) of the checkpoint "
                                        f"kept as they were: the HF checkpoint holds no "
                                        f"{'weights' if model else 'quantizer state (no quantizer_state/)'}")
        self.megatron = sorted(required_names(claimed, layout) | held)

    def _reads(self, role: str) -> bool:
        """Whether the import reads ``role`` back."""
        return self._format.reads_back(role) or (self._weights and role in MODEL_ROLES)

    def is_weight(self, hf_name: str) -> bool:
        """Whether ``hf_name`` is one of the model's own tensors (a weight, norm, bias) in the spec."""
        match = self.rules.to_megatron(hf_name)
        return match is not None and match.rule.role in MODEL_ROLES


def _held(match, layout: ParallelLayout) -> bool:
    """Whether some rank of the layout holds a reverse match: its layer and expert lie within the layout
    (a grouped block's expert is in the HF name only, so it is checked against the block's size)."""
    if match.kind == MOE_FANOUT:
        total = match.rule.num_experts or layout.num_experts
        if total is not None and match.expert >= total:
            return False
    return holder(match.megatron, layout) is not None


def import_rank(catalog: Catalog, checkpoint: Checkpoint, placement: Placement) -> tuple[dict, Report]:
    """This rank's local state dict (local names → tensors) and what it found missing or disagreeing."""
    layout, coords = placement.layout, placement.coords
    report = Report()
    state, read = {}, []
    for megatron in catalog.megatron:
        local = to_local(megatron, layout, coords)
        if local is None:
            continue
        match = catalog.rules.to_hf(megatron)
        if match.kind == MOE_FANOUT:
            expected = expert_hf_names(match, expert_block(megatron, match, layout, coords.ep))
        else:
            expected = match.hf
        present = [name for name in expected if name in catalog.available]
        report.missing += [name for name in expected if name not in catalog.available]
        if not present:
            continue
        # One expert of a fused-experts weight reads its own slice of the HF tensor, never the whole of it.
        expert = match.expert if stacks_experts(match.rule) else None
        parts = [checkpoint.get(name, expert) for name in present]
        check_dtypes(list(zip(present, parts)))  # before they are combined: max() has no float8 kernel
        role = catalog.rules.role(catalog.rules.number(match.rule))
        read += ((name, part, role) for name, part in zip(present, parts))
        if match.kind == FAN_IN:
            state[local] = copy_to_source(megatron, present[0], parts[0])
            continue
        shapes = tuple(tuple(p.shape) if expert is None else checkpoint.shape(name) for name, p in zip(present, parts))
        try:
            state[local] = _fan_in(megatron, match, parts, shapes, present, layout, coords, report)
        except _Incomplete:
            continue
    report.uncalibrated = check_values(read)
    report.written = len(state)
    return state, report


def _fan_in(megatron, match, parts, shapes, names, layout: ParallelLayout, coords, report: Report) -> torch.Tensor:
    """The rank's tensor of ``megatron`` from its HF ``parts`` (``shapes``: the HF tensors' whole shapes,
    of which ``parts`` are one expert's slice for a fused-experts weight)."""
    size, rank = (layout.etp, coords.etp) if is_expert(megatron) else (layout.tp, coords.tp)
    if all(is_scalar(shape) for shape in shapes):
        if len(set(shapes)) > 1:
            raise ExecutorError(f"the HF parts of {megatron} have different shapes "
                                f"({', '.join(f'{n}: {list(s)}' for n, s in zip(names, shapes))}); "
                                f"they cannot be combined into one quantizer")
        value, spread = (parts[0], None) if len(parts) == 1 else max_of_copies(parts, list(names))
    else:
        if len(parts) != len(match.hf):  # the absent parts are reported missing
            raise _Incomplete
        try:
            ops, which = import_pipeline(megatron, match.rule, shapes, size, rank)
        except LayoutProblem as problem:
            raise ExecutorError(str(problem)) from None
        outputs, spread = run(ops, list(parts), list(names))
        value = outputs[which or 0].clone()
    if spread:
        report.disagreements.append(f"{megatron}: {len(parts)} HF parts differ ({spread}); imported the max")
    return value


class _Incomplete(Exception):
    """A shaped tensor with a part missing: it cannot be built (the missing names are reported)."""


def merge(reports: list[Report]) -> Report:
    """One report for the run: names deduplicated over ranks (replicas find the same things)."""
    out = Report()
    out.written = sum(r.written for r in reports)
    out.missing = sorted({name for r in reports for name in r.missing}, key=natural)
    out.uncalibrated = sorted({name for r in reports for name in r.uncalibrated}, key=natural)
    out.disagreements = sorted({note for r in reports for note in r.disagreements}, key=natural)
    return out


def finish(catalog: Catalog, report: Report, strict: bool, allow_partial: bool = False) -> Report:
    """The run's report: the ranks' findings with the catalog's; refused under ``strict`` if any, and a
    weight the target holds but the HF checkpoint lacks refused unless ``allow_partial``: it would keep
    its old value, a model that is neither the old one nor the new."""
    report.unclaimed = catalog.report.unclaimed
    report.outside = catalog.report.outside
    report.weights = catalog.report.weights
    report.kept = list(catalog.report.kept)
    if strict and report.problems:
        raise ExecutorError(f"import refused (--strict): {report.refusal()}. Nothing was written.")
    weights = [name for name in report.missing if catalog.is_weight(name)]
    if weights and not allow_partial:
        shown = ", ".join(weights[:3]) + (f", and {len(weights) - 3} more" if len(weights) > 3 else "")
        raise ExecutorError(f"import refused: {len(weights)} weight(s) the checkpoint holds are missing from the HF "
                            f"checkpoint: {shown}; they would keep their old values. Give the whole model, or "
                            f"--allow-partial to import the rest and keep these. Nothing was written.")
    if weights:
        report.kept.append(f"{len(weights)} weight(s) missing from the HF checkpoint kept as they were "
                           f"(--allow-partial)")
    return report


def import_state(rules, hf_dir: str | Path, placement: Placement) -> tuple[dict, Report]:
    """This rank's local state dict from a HF checkpoint, ready for ``model.load_state_dict(strict=False)``.

    Rank-local (no collectives): for refitting a live model in place."""
    checkpoint = Checkpoint(hf_dir)
    catalog = Catalog(rules, checkpoint.names(), placement.layout)
    state, report = import_rank(catalog, checkpoint, placement)
    return state, finish(catalog, report, strict=False)


def import_offline(rules, hf_dir: str | Path, layout: ParallelLayout, out: str | Path, *,
                   options: RunOptions = RunOptions()) -> Report:
    """One process builds and writes every rank's shard."""
    from quantmap.executor.comm import Offline

    placements = {rank: Placement.offline(layout, rank) for rank in range(layout.world_size)}
    return run_import(Offline(layout.world_size), rules, hf_dir, placements, ShardTarget(out, layout), options)


def import_(rules, hf_dir: str | Path, placement: Placement, out: str | Path, *,
            options: RunOptions = RunOptions()) -> Report:
    """Distributed import: every rank writes its own shard; call on every rank of ``placement``'s group."""
    from quantmap.executor.comm import Comm

    comm = Comm(placement.group, options.timeout)
    return run_import(comm, rules, hf_dir, {comm.rank: placement}, ShardTarget(out, placement.layout), options)


class ShardTarget:
    """Where an import writes: a new Megatron shard directory for ``layout``, staged beside ``out`` and
    renamed into place once every rank's file is written. (The other target, a torch_dist checkpoint, is
    :class:`quantmap.executor.torch_dist_checkpoint.TorchDistTarget`.)"""

    def __init__(self, out: str | Path, layout: ParallelLayout):
        self.out, self.layout = out, layout
        self.staged: Staged | None = None
        self.holds: tuple[str, ...] = ()  # tensors the target already holds: none, it is new
        self.takes_weights = False  # its rank files hold what the format reads back

    def open(self, path: str | None = None) -> str:
        """Stage the output (the writer: ``path=None``), or join the writer's staging ``path``; its path."""
        self.staged = Staged(self.out, path)
        return str(self.staged.path)

    def write(self, placement: Placement, state: dict) -> None:
        write_rank(self.staged.path, self.layout, placement.coords, state)

    def publish(self, report: Report) -> None:
        self.layout.write(self.staged.path)
        self.staged.publish()

    def discard(self) -> None:
        if self.staged is not None:
            self.staged.discard()


def run_import(comm, rules, hf_dir: str | Path, placements: dict[int, Placement], target, options: RunOptions) -> Report:
    """The one import path, for the ranks this process plays (``placements``, by group rank; ``comm``: a
    :class:`~quantmap.executor.comm.Comm` of one rank or :class:`~quantmap.executor.comm.Offline` for all):
    the writer opens the target, each rank builds its state from the HF names it needs and writes it, and
    the writer checks every outcome and publishes, or nothing is left behind."""
    opened = None
    if comm.is_writer:
        try:
            opened = {"path": target.open()}
        except OSError as error:
            opened = {"error": str(error)}
    try:
        opened = comm.broadcast_object(opened)
        if "error" in opened:
            raise ExecutorError(opened["error"])
        if target.staged is None:
            target.open(opened["path"])
        return _import_staged(comm, rules, hf_dir, placements, target, options)
    except BaseException:
        # Any rank may be the only one to see the failure (an interrupt, a lost peer): each removes
        # the staging directory, a no-op once it is published or gone.
        target.discard()
        raise


def _open_hf(hf_dir, fmt: OutputFormat):
    """The HF checkpoint, read as the names the ``hf`` format has: as it is, or a deployable checkpoint's
    tensors computed back per module (:class:`~quantmap.executor.deployed.DeployedCheckpoint`)."""
    checkpoint = Checkpoint(hf_dir)
    return checkpoint if fmt.restore_modules is None else DeployedCheckpoint(checkpoint, fmt)


def _import_staged(comm, rules, hf_dir, placements: dict[int, Placement], target, options: RunOptions) -> Report:
    """Every rank writes its state into the staged ``target``; the writer checks every outcome and publishes."""
    outcomes: dict[int, dict] = {}
    every_rank = len(placements) == comm.size  # one process plays them all: its first failure is the run's
    catalog = None
    with progress_bar(len(placements), "import", options.progress and comm.is_writer) as bar:
        for rank, placement in placements.items():
            try:
                checkpoint = _open_hf(hf_dir, options.output_format)
                catalog = catalog or Catalog(rules, checkpoint.names(), placement.layout, target=target.holds,
                                             output_format=options.output_format,
                                             weights=target.takes_weights and options.only != "quantizers")
                state, report = import_rank(catalog, checkpoint, placement)
                target.write(placement, state)
                outcomes[rank] = {"report": report}
            except Exception as error:
                if every_rank:
                    raise
                outcomes[rank] = {"error": f"rank {placement.coords.rank}: {error}"}
            bar.update()
    outcomes = comm.gather_objects(outcomes)
    status = None
    if comm.is_writer:
        errors = [o["error"] for o in outcomes if "error" in o]
        try:
            if errors:
                raise ExecutorError("import failed on " + "; ".join(errors) + ". Nothing was written.")
            final = finish(catalog, merge([o["report"] for o in outcomes]), options.strict, options.allow_partial)
            final.restored = checkpoint.notes if isinstance(checkpoint, DeployedCheckpoint) else []
            target.publish(final)
            status = {"report": final}
        except Exception as error:
            target.discard()
            if every_rank:
                raise
            status = {"error": str(error)}
    status = comm.broadcast_object(status)
    if "error" in status:
        raise ExecutorError(status["error"])
    return status["report"]
