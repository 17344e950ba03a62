"""The writer's half of an export: check every rank's metadata, then decide how each tensor combines.

Everything here runs on metadata alone, before any tensor moves, so a mistake (a rank missing a
tensor, shapes that differ across tensor-parallel ranks, a tensor that cannot be combined
correctly yet) stops the export with nothing transferred and nothing written.

Combining, per global Megatron name:

* pipeline: the owning stage's copy (a layer lives on one stage; any other name on the lowest
  stage that has it, the rest reported);
* tensor parallel (the expert-tensor group for experts): a scalar amax is replicated, so the
  copies are combined with ``max`` and disagreement is reported, and the one tensor goes to every
  HF name of the rule; any other tensor goes through its rule's layout
  (:mod:`quantmap.executor.sharding`): the copies are gathered as the layout says, then cut into
  one tensor per HF name. A tensor the layout cannot place is an error, never a guess;
* expert parallel: a grouped block's amax from EP rank ``r`` goes to experts
  ``[r*E/ep, (r+1)*E/ep)``; SequentialMLP experts were already renamed to global indices;
* fan-in (:mod:`quantmap.executor.fan_in`): every source of one HF tensor, over experts and EP
  ranks, becomes one item combined by ``max``; the weight of a fused-experts HF tensor is gathered
  the same way, every expert's (expert-)tensor-parallel pieces in expert order, into one item whose
  pipeline joins each expert's pieces and stacks the experts as its rule's layout says.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch

from quantmap.executor.completeness import missing_parsed, parse, parse_run
from quantmap.executor.expert_runs import Run
from quantmap.executor.fan_in import Gathered, check_scalar
from quantmap.executor.whole_model import whole_model
from quantmap.parallel import ParallelLayout
from quantmap.executor.naming import (NamingError, expert_block, expert_count, expert_hf_names, expert_span,
                                      is_expert, to_local)
from quantmap.executor.pack import unpack
from quantmap.executor.read_ahead import ReadAhead
from quantmap.executor.options import RunOptions
from quantmap.executor.rank_meta import RankMeta
from quantmap.executor.report import ExecutorError, Report
from quantmap.name_groups import group_names, natural
from quantmap.executor.sharding import (LayoutProblem, copies_shown, export_pipeline, is_scalar, max_of_copies,
                                        run, stacks_experts)
from quantmap.executor.values import replica_disagreements
from quantmap.roles import module_of
from quantmap.rules import FAN_IN, MOE_FANOUT, Rule

ONE, MAX, SHAPED = "one", "max", "shaped"
_MAX_LISTED = 8


class Item(NamedTuple):
    """One combined tensor and the HF names it goes to (a tuple: 10^5 are built in a large export), with
    the rule that claimed it on its rank and what it is (:mod:`quantmap.roles`)."""

    megatron: str
    combine: str
    sources: tuple[tuple[int, int], ...]  # (rank, entry index) in tensor-parallel rank order
    hf: tuple[str, ...] | None  # the HF names; None for a grouped block's, made from ``experts`` when read
    count: int  # how many HF names
    rule: Rule
    role: str | None  # the rule's role; None for a quantizer buffer that has none
    experts: range | None = None  # moe_fanout: the experts of this block (an expert run's are its own)
    pipeline: tuple | None = None  # shaped: (ops, the shape of each HF name's tensor)
    run: Run | None = None  # an expert run: one value per expert (:mod:`quantmap.executor.expert_runs`)

    @property
    def records(self) -> int:
        """Tensors written for the item: one shared by every name, or one per name when shaped."""
        return _records(self.combine, self.count)


def _records(combine: str, count: int) -> int:
    return count if combine == SHAPED else 1


class _Items(Sequence):
    """Items stored column-wise (a large MoE export has 10^5 of them); an :class:`Item` is built when
    read. A grouped block's HF names (hundreds per item) are not kept but made again when asked for;
    an item's rule is kept as its number in ``rules``."""

    _CODES = (ONE, MAX, SHAPED)
    _CODE = {code: number for number, code in enumerate(_CODES)}

    def __init__(self, rules):
        self._rule_set = rules
        self._rules = array("I")
        self._names: list[str] = []
        self._hf: list[tuple[str, ...] | None] = []
        self._combine = bytearray()
        self._start = array("q", [0])
        self._sources = array("q")  # rank << 32 | entry index
        self._count = array("q")
        self._experts: dict[int, range] = {}
        self._pipelines: dict[int, tuple] = {}
        self._runs: dict[int, Run] = {}

    def append(self, item: Item) -> None:
        if item.experts is not None:
            self._experts[len(self._names)] = item.experts
        if item.pipeline is not None:
            self._pipelines[len(self._names)] = item.pipeline
        if item.run is not None:
            self._runs[len(self._names)] = item.run
        self._names.append(item.megatron)
        self._rules.append(self._rule_set.number(item.rule))
        self._hf.append(item.hf)
        self._combine.append(self._CODE[item.combine])
        self._sources.extend([rank << 32 | index for rank, index in item.sources])
        self._start.append(len(self._sources))
        self._count.append(item.count)

    def __len__(self) -> int:
        return len(self._names)

    def names_total(self) -> int:
        """How many HF names the items go to."""
        return sum(self._count)

    def sources(self, i: int) -> tuple[tuple[int, int], ...]:
        return tuple((c >> 32, c & 0xFFFFFFFF) for c in self._sources[self._start[i]:self._start[i + 1]])

    def source_codes(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sources of ``items`` at once: each source's ``(rank, entry)`` as ``rank << 32 | entry``, and
        which of ``items`` (its position in the list) it belongs to."""
        bounds = torch.frombuffer(self._start, dtype=torch.int64)
        chosen = torch.tensor(items, dtype=torch.int64)
        first, counts = bounds[chosen], bounds[chosen + 1] - bounds[chosen]
        owner = torch.repeat_interleave(torch.arange(len(items)), counts)
        within = torch.arange(len(owner)) - (torch.cumsum(counts, 0) - counts)[owner]
        return torch.frombuffer(self._sources, dtype=torch.int64)[first[owner] + within], owner

    def hf(self, i: int) -> tuple[str, ...] | None:
        """Item ``i``'s HF names, where kept (see :attr:`Item.hf`)."""
        return self._hf[i]

    def combine(self, i: int) -> str:
        return self._CODES[self._combine[i]]

    def count(self, i: int) -> int:
        return self._count[i]

    def first_source(self, i: int) -> tuple[int, int]:
        code = self._sources[self._start[i]]
        return code >> 32, code & 0xFFFFFFFF

    def records(self, i: int) -> int:
        """:attr:`Item.records` of item ``i``, without building the item."""
        return _records(self._CODES[self._combine[i]], self._count[i])

    def __getitem__(self, i: int) -> Item:
        rule = self._rules[i]
        return Item(self._names[i], self._CODES[self._combine[i]], self.sources(i), self._hf[i], self._count[i],
                    self._rule_set.rules[rule], self._rule_set.role(rule), self._experts.get(i),
                    self._pipelines.get(i), self._runs.get(i))

    def run(self, i: int) -> Run | None:
        return self._runs.get(i)

    def role(self, i: int) -> str | None:
        """Item ``i``'s role (:mod:`quantmap.roles`), without building the item."""
        return self._rule_set.role(self._rules[i])


class Plan:
    """The checked plan of one export, plus what is needed to build its tensors on the writer."""

    def __init__(self, rules, layout: ParallelLayout, metas: list[RankMeta], options: RunOptions = RunOptions()):
        self.rules = rules
        self.layout = layout
        self.metas = metas
        self.options = options
        self.strict, self.allow_partial = options.strict, options.allow_partial
        self.report = Report(model=options.output_format.model)
        self.items = _Items(rules)
        self._disagreeing: set[str] = set()
        self._fan_in = Gathered()
        # item name -> (HF target, source count, each copy's label)
        self._fan_in_targets: dict[str, tuple[str, int, tuple[str, ...]]] = {}
        self._members: dict[int, set[str]] = {}
        self._ahead: ReadAhead | None = None  # the writer's reads in progress (reading_ahead)
        self._build()
        self.report.written = self.items.names_total()

    @property
    def sizes(self) -> list[int]:
        return [meta.size for meta in self.metas]

    def hf_names(self, item: Item) -> list[str] | tuple[str, ...]:
        if item.hf is not None:
            return item.hf
        if item.run is not None:
            return item.run.hf_names()
        return expert_hf_names(self.rules.to_hf_by(self.rules.number(item.rule), item.megatron), item.experts)

    def module(self, item: Item, part: int = 0) -> str:
        """The HF module of the item's ``part``-th HF name (in :meth:`hf_names` order), from its role: what a
        format that needs a tensor and its scales together groups records by."""
        return module_of(self.hf_names(item)[part], item.role)

    def spec(self, item: Item, part: int = 0) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of the item's tensor (``part``: which HF name's, when shaped), from metadata."""
        rank, index = item.sources[0]
        dtype, shape = self.metas[rank].dtypes[index], self.metas[rank].shapes[index]
        if item.combine == SHAPED:
            shape = item.pipeline[1][part]
        if item.run is not None:
            shape = item.run.shape
        return dtype, shape

    @contextmanager
    def reading_ahead(self, ahead: ReadAhead):
        """For the ``with`` block, :meth:`tensors` first waits for its item's entries to be read by ``ahead``."""
        self._ahead = ahead
        try:
            yield
        finally:
            self._ahead = None

    def tensors(self, item: Item, buffers: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """The item's tensors: one shared by every HF name, or one per name when shaped; disagreeing
        copies combined by ``max`` go to the report."""
        if self._ahead is not None:
            self._ahead.wait(item.sources)
        parts = [unpack(buffers[rank], self.metas[rank], index) for rank, index in item.sources]
        fan_in = self._fan_in_targets.get(item.megatron)
        labels = list(fan_in[2]) if fan_in else [f"rank {rank}" for rank, _ in item.sources]
        if item.combine == ONE:
            return parts
        if item.combine == SHAPED:
            out, spread = run(item.pipeline[0], parts, labels)
        elif item.run is not None:
            return [self._run_max(item, parts, labels)]
        else:
            combined, spread = max_of_copies(parts, labels)
            out = [combined]
        if spread and item.megatron not in self._disagreeing:
            self._disagreeing.add(item.megatron)  # tensors may be built more than once (files, then a state dict)
            self.report.disagreements.append(self._disagreement(item, spread))
        return out

    def _run_max(self, item: Item, parts: list[torch.Tensor], labels: list[str]) -> torch.Tensor:
        """An expert run's tensor-parallel copies combined by ``max``; each expert whose copies differ
        reported under its own name, as if it had not been folded."""
        stacked = torch.stack(parts)
        out = stacked.amax(0)
        if item.megatron not in self._disagreeing:
            self._disagreeing.add(item.megatron)
            names = item.run.megatron_names()
            for k in (stacked != out).any(0).nonzero().flatten().tolist():
                spread = copies_shown(labels, [part[k].item() for part in parts[:4]], len(parts))
                self.report.disagreements.append(f"{names[k]}: tensor-parallel copies differ ({spread}); "
                                                 f"exported the max")
        return out

    def _disagreement(self, item: Item, spread: str) -> str:
        if item.megatron in self._fan_in_targets:
            target, count, _ = self._fan_in_targets[item.megatron]
            if item.combine == SHAPED:  # a fused-experts weight: an expert's tensor-parallel copies
                return f"{target}: the tensor-parallel copies of an expert's weight differ ({spread}); exported the max"
            return f"{target}: its {count} Megatron source(s) differ ({spread}); exported the max"
        return f"{item.megatron}: tensor-parallel copies differ ({spread}); exported the max"

    # -- checking -------------------------------------------------------------------------------
    def _build(self) -> None:
        failed = [f"rank {rank}: {meta.error}" for rank, meta in enumerate(self.metas) if meta.error]
        if failed:
            raise ExecutorError(_listing("export failed on ", failed, "rank"))
        short = self._short_of_layout()
        if short:
            raise ExecutorError(_listing("the shards do not match the layout: ", short, "rank") +
                                "\nNothing was written.")
        self._dense = {(m.coords.tp, m.coords.cp, m.coords.dp, m.coords.pp): r for r, m in enumerate(self.metas)}
        self._expert = {(m.coords.etp, m.coords.ep, m.coords.edp, m.coords.pp): r
                        for r, m in enumerate(self.metas)}
        unclaimed: set[str] = set()
        for meta in self.metas:
            unclaimed.update(meta.unclaimed)
            self.report.weights += meta.weights
        self.report.unclaimed = sorted(unclaimed, key=natural)
        self.report.uncalibrated = sorted({name for meta in self.metas for name in meta.uncalibrated}, key=natural)
        self.report.disagreements += replica_disagreements(self.metas)
        # Every name's copies (rank, entry), in name order (experts last, see _order): the order does
        # not depend on the layout, nor on whether a rank moved its experts as runs.
        copies: dict[str, list[tuple[int, int]]] = {}
        for rank, meta in enumerate(self.metas):
            for index, name in enumerate(meta.names):
                held = copies.get(name)
                if held is None:
                    copies[name] = [(rank, index)]
                else:
                    held.append((rank, index))
        errors = self._expert_blocks() + self._incomplete(copies)
        if self.options.output_format.model:
            roles = {name: self.rules.role(self._rule(sources[0])) for name, sources in copies.items()}
            errors = whole_model(self.rules, roles, self.report, self.options) + errors
        for name in sorted(copies, key=_order):
            sources = copies[name]
            try:
                self._add(name, sources if len(sources) == 1 else self._owned(name, sources))
            except (_Problem, NamingError) as problem:
                errors.append(str(problem))
            except _InRun:
                pass
        self._add_fan_ins(errors)
        if errors:
            raise ExecutorError(_listing("export stopped before any tensor moved: ", errors, "problem") +
                                "\nNothing was written.")
        if self.strict and self.report.problems:
            raise ExecutorError(f"export refused (--strict): {self.report.refusal('Megatron')}. Nothing was written.")

    def _incomplete(self, copies: dict[str, list[tuple[int, int]]]) -> list[str]:
        """The shards against the layout: every layer and expert of every quantizer kind they hold
        (:mod:`quantmap.executor.completeness`). Refused unless ``allow_partial``, then reported.
        ``copies``: every entry name (an expert run's: its first expert's) with its (rank, entry) copies."""
        if not copies:
            return ["the shards hold no quantizer tensor that the spec claims; check --megatron and the spec"]
        parsed = []
        for name, sources in copies.items():
            folded = next((self.metas[r].runs[i] for r, i in sources if i in self.metas[r].runs), None)
            parsed.append(parse(name) if folded is None else parse_run(name, range(folded.first,
                                                                                   folded.first + folded.count)))
        present = lambda: {n for meta in self.metas for n in meta.entry_names()}  # noqa: E731
        missing = missing_parsed(list(dict.fromkeys(parsed)), self.layout, present)
        if not missing or self.allow_partial or self.strict:  # --strict refuses it with the other findings
            self.report.missing = missing
            return []
        shapes = ", ".join(f"{count} x {shape}" for shape, count in group_names(missing)[:_MAX_LISTED])
        return [f"the shards lack {len(missing)} quantizer tensor(s) that the layout requires ({shapes}), e.g. "
                f"{', '.join(missing[:3])}: a rank file or pipeline stage is incomplete. Pass --allow-partial "
                f"(allow_partial=True) to export what is there and report the rest"]

    def _short_of_layout(self) -> list[str]:
        """Ranks whose highest local layer or expert falls short of what the layout gives them: a layout
        that claims more layers or experts than the model has would shift every later index."""
        layout, problems = self.layout, []
        for rank, meta in enumerate(self.metas):
            stage = meta.coords.pp
            if meta.top_layer is not None and meta.top_layer + 1 != layout.stage_layers[stage]:
                problems.append(f"rank {rank} holds local layers 0..{meta.top_layer} but the layout puts "
                                f"{layout.stage_layers[stage]} layer(s) on pipeline stage {stage}; check num_layers "
                                f"and layers_per_stage in layout.json")
            if meta.top_expert is not None and meta.top_expert + 1 != layout.experts_per_rank:
                problems.append(f"rank {rank} holds local experts 0..{meta.top_expert} but the layout gives each "
                                f"of its ep={layout.ep} ranks {layout.experts_per_rank}; check num_experts in layout.json")
        return problems

    def _expert_blocks(self) -> list[str]:
        """Every expert-parallel rank of a stage holds its block under the same local names; a rank short
        of one expert would otherwise just export fewer experts. Counted first, named on a mismatch."""
        counts: dict[int, dict[int, int]] = {}
        for rank, meta in enumerate(self.metas):
            if meta.coords.edp == 0:
                counts.setdefault(meta.coords.pp, {})[rank] = meta.experts
        problems = []
        for stage in sorted(counts):
            if len(set(counts[stage].values())) <= 1:
                continue
            local = {rank: {to_local(name, self.layout, self._coords(rank)) for name in self.metas[rank].entry_names()
                            if is_expert(name)} for rank in counts[stage]}
            held = set().union(*local.values())
            for rank, names in sorted(local.items()):
                for name in sorted(held - names)[:_MAX_LISTED]:
                    holder = next(r for r, other in sorted(local.items()) if name in other)
                    problems.append(f"rank {rank} has no local {name!r} but rank {holder} of the same pipeline stage "
                                    f"holds it; every expert-parallel rank must hold a full block of experts")
        return problems

    def _coords(self, rank: int):
        return self.metas[rank].coords

    def _rule(self, source: tuple[int, int]) -> int:
        """The number of the rule that claimed entry ``source`` (rank, entry) on its rank."""
        rank, entry = source
        return self.metas[rank].rules[entry]

    def _owned(self, name: str, sources: list[tuple[int, int]]) -> list[tuple[int, int]]:
        stages = sorted({self._coords(rank).pp for rank, _ in sources})
        if len(stages) > 1:
            self.report.duplicates.append(f"{name}: held by pipeline stages {stages}; used stage {stages[0]}")
        return [s for s in sources if self._coords(s[0]).pp == stages[0]]

    def _add(self, name: str, sources: list[tuple[int, int]]) -> None:
        if any(i in self.metas[r].runs for r, i in sources):  # resolved on its rank, member by member
            self._add_run(name, sources)
            return
        rule = self._rule(sources[0])  # the rule that claimed the name on its rank (the same on every rank)
        match, role = self.rules.to_hf_by(rule, name), self.rules.role(rule)
        expert = is_expert(name)
        if stacks_experts(match.rule):
            self._gather_expert_weight(name, match, sources)
            return
        if match.kind not in (FAN_IN, MOE_FANOUT):
            if len(sources) == 1 and (self.layout.etp if expert else self.layout.tp) == 1:
                peers = sources  # no tensor parallelism: the one copy is the tensor
            else:
                coords = self._coords(sources[0][0])
                peers = self._peers(name, sources, expert, coords.pp, coords.ep)
            combine, pipeline = self._combine(name, match, peers)
            self.items.append(Item(name, combine, tuple(peers), match.hf, len(match.hf), match.rule, role,
                                   pipeline=pipeline))
            return
        stage = self._coords(sources[0][0]).pp
        if match.kind == FAN_IN:
            self._gather_fan_in(name, match, sources, expert, stage)
            return
        for ep in range(self.layout.ep):
            block = [s for s in sources if self._coords(s[0]).ep == ep]
            peers = self._peers(name, block, True, stage, ep)
            experts = expert_block(name, match, self.layout, ep)
            combine, pipeline = self._combine(name, match, peers)
            self.items.append(Item(name, combine, tuple(peers), None, len(experts) * len(match.rule.hf), match.rule,
                                   role, experts, pipeline))

    def _add_run(self, name: str, sources: list[tuple[int, int]]) -> None:
        """An expert run: its copies on the expert-tensor-parallel ranks must be the same run; where a
        rank kept the names one by one (it lacks an expert), the experts it lacks are named."""
        coords = self._coords(sources[0][0])
        peers = self._peers(name, sources, True, coords.pp, coords.ep)
        runs = [self.metas[r].runs.get(i) for r, i in peers]
        complete = next(r for r in runs if r is not None)
        if any(r is None for r in runs):
            short = next(rank for (rank, _), r in zip(peers, runs) if r is None)
            held = set(self.metas[short].entry_names())
            lacking = [n for n in complete.megatron_names() if n not in held]
            raise _Problem(f"rank {short} has no {', '.join(map(repr, lacking[:3]))}"
                           f"{' ...' if len(lacking) > 3 else ''} but the other tensor-parallel rank(s) of its expert "
                           f"group hold them; every tensor-parallel rank must hold the same quantizer tensors: check "
                           f"that each rank's state or shard file is complete")
        if len(set(runs)) > 1:
            raise _Problem(f"{name}: the tensor-parallel ranks {[r for r, _ in peers]} hold different runs of experts")
        dtypes = {self.metas[r].dtypes[i] for r, i in peers}
        if len(dtypes) > 1:
            raise _Problem(f"{name} has different dtypes across tensor-parallel ranks ({sorted(map(str, dtypes))}); "
                           f"the shards do not come from one model")
        rule = self._rule(peers[0])
        self.items.append(Item(name, ONE if len(peers) == 1 else MAX, tuple(peers), None,
                               complete.count * len(complete.hf), self.rules.rules[rule], self.rules.role(rule),
                               run=complete))

    def _gather_fan_in(self, name: str, match, sources, expert: bool, stage: int) -> None:
        """One source of a fan-in: its copies in tensor-parallel order on each EP rank that holds it (a grouped
        block's shared quantizer is on every one), gathered by HF target."""
        shared = expert and match.rule.expert_capture is None
        blocks = sorted({self._coords(r).ep for r, _ in sources}) if expert else [self._coords(sources[0][0]).ep]
        if shared and len(blocks) != self.layout.ep:
            raise _Problem(f"{name} is a grouped block's quantizer, held by every expert-parallel rank, but only "
                           f"EP rank(s) {blocks} of {self.layout.ep} hold it")
        peers = []
        for ep in blocks:
            block = [s for s in sources if self._coords(s[0]).ep == ep] if expert else sources
            peers += self._peers(name, block, expert, stage, ep)
        for rank, index in peers:
            problem = check_scalar(name, self.metas[rank].shapes[index], match.hf[0])
            if problem:
                raise _Problem(problem)
        experts = None if match.rule.expert_capture is None else expert_count(name, match.rule, self.layout)
        self._fan_in.add(name, match, peers, experts)

    def _gather_expert_weight(self, name: str, match, sources) -> None:
        """One expert's weight of a fused-experts HF tensor: its copies in expert-tensor-parallel order on
        the EP rank that holds it, gathered by HF target like a fan-in's sources."""
        coords = self._coords(sources[0][0])
        peers = self._peers(name, sources, True, coords.pp, coords.ep)
        self._fan_in.add(name, match, peers, expert_count(name, match.rule, self.layout))

    def _add_fan_ins(self, errors: list[str]) -> None:
        """One item per fan-in HF tensor, once every name's sources are gathered."""
        for target, names, copies, labels in self._fan_in.targets():
            rule = self._rule(copies[0])
            stacked = stacks_experts(self.rules.rules[rule])
            problem = self._fan_in.short(target, names)
            if problem:
                errors.append(problem)
                continue
            dtypes = {self.metas[rank].dtypes[index] for rank, index in copies}
            if len(dtypes) > 1:
                errors.append(f"{target}: its Megatron sources have different dtypes ({sorted(map(str, dtypes))})")
                continue
            if stacked:
                try:
                    combine, pipeline = SHAPED, self._stacked(target, names, copies)
                except _Problem as problem:
                    errors.append(str(problem))
                    continue
            else:
                combine, pipeline = ONE if len(copies) == 1 else MAX, None
            self.items.append(Item(names[0], combine, tuple(copies), (target,), 1, self.rules.rules[rule],
                                   self.rules.role(rule), pipeline=pipeline))
            self._fan_in_targets[names[0]] = (target, len(names), labels)

    def _stacked(self, target: str, names: list[str], copies: list[tuple[int, int]]) -> tuple:
        """The pipeline that stacks every expert's weight (``copies``: each expert's ranks in turn) into
        ``target``; every piece must have one shape, as the experts of one layer do."""
        shapes = {self.metas[rank].shapes[index] for rank, index in copies}
        if len(shapes) > 1:
            raise _Problem(f"{target} stacks the weights of {len(names)} experts, but their pieces have different "
                           f"shapes ({', '.join(str(list(shape)) for shape in sorted(shapes))}); the shards do not "
                           f"come from one model")
        try:
            return export_pipeline(names[0], self.rules.rules[self._rule(copies[0])], shapes.pop(),
                                   len(copies) // len(names), len(names))
        except LayoutProblem as problem:
            raise _Problem(str(problem)) from None

    def _peers(self, name, sources, expert: bool, stage: int, ep: int) -> list[tuple[int, int]]:
        """The sources in (expert-)tensor-parallel rank order, or a problem naming the ranks that lack it."""
        size = self.layout.etp if expert else self.layout.tp
        by_tp = {(self._coords(r).etp if expert else self._coords(r).tp): (r, i) for r, i in sources}
        if len(by_tp) < len(sources):  # e.g. an expert-side tensor without an expert index, on every EP rank
            raise _Problem(f"{name} is held by several ranks of one tensor-parallel position "
                           f"({', '.join(f'rank {r}' for r, _ in sources)}), so no one copy is the model's; map it "
                           f"with a rule that names the expert, or as a grouped-MoE quantizer")
        if len(by_tp) == size:
            return [by_tp[t] for t in range(size)]
        lacking = [self._expert.get((t, ep, 0, stage)) if expert else self._dense.get((t, 0, 0, stage))
                   for t in range(size) if t not in by_tp]
        if lacking and all(rank is not None and name in self._run_members(rank) for rank in lacking):
            raise _InRun()  # the run's own name reports the ranks' difference
        holder = f"rank {sources[0][0]} holds it" if sources else "the other expert-parallel ranks hold it"
        raise _Problem(f"rank {', '.join(map(str, lacking))} has no {name!r} but {holder}; every tensor-parallel "
                       f"(and, for a grouped-MoE block, expert-parallel) rank of a stage must hold the same quantizer "
                       f"tensors: check that each rank's state or shard file is complete")

    def _run_members(self, rank: int) -> set[str]:
        """The names rank ``rank`` holds inside its expert runs (for error messages only)."""
        if rank not in self._members:
            self._members[rank] = {n for r in self.metas[rank].runs.values() for n in r.megatron_names()}
        return self._members[rank]

    def _combine(self, name: str, match, peers: list[tuple[int, int]]) -> tuple[str, tuple | None]:
        if len(peers) == 1 and is_scalar(self.metas[peers[0][0]].shapes[peers[0][1]]):
            return ONE, None
        shapes = [self.metas[r].shapes[i] for r, i in peers]
        dtypes = [self.metas[r].dtypes[i] for r, i in peers]
        if len(set(shapes)) > 1 or len(set(dtypes)) > 1:
            listed = ", ".join(f"rank {r}: {list(s)} {d}".replace("torch.", "")
                               for (r, _), s, d in zip(peers, shapes, dtypes))
            raise _Problem(f"{name} has different shapes or dtypes across tensor-parallel ranks ({listed}); "
                           f"the shards do not come from one model")
        if is_scalar(shapes[0]):
            return (ONE if len(peers) == 1 else MAX), None
        try:
            return SHAPED, export_pipeline(name, match.rule, shapes[0], len(peers))
        except LayoutProblem as problem:
            raise _Problem(str(problem)) from None


def _order(name: str) -> str:
    """A name's place in the export: by name, except that the expert index counts last, so that each
    quantizer's experts are adjacent and ascending (an expert run is where its first expert is)."""
    span = expert_span(name)
    if span is None:
        return name
    start, end = span
    return f"{name[:start]}\0{name[end:]}\0{int(name[start:end]):012d}"


class _Problem(Exception):
    pass


class _InRun(Exception):
    """A name one rank holds by itself while its peer holds it inside an expert run: reported once,
    under the run's name."""


def _listing(head: str, problems: list[str], noun: str) -> str:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more {noun}(s)" if len(problems) > _MAX_LISTED else ""
    if len(problems) == 1:
        return head + problems[0]
    return head + f"{len(problems)} {noun}s:\n  " + "\n  ".join(shown) + more
