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
  ``[r*E/ep, (r+1)*E/ep)``; SequentialMLP experts were already renamed to global indices.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, groupby

import torch

from quantmap.executor.layout import Layout
from quantmap.executor.naming import NamingError, expert_block, expert_hf_names, is_expert, to_local
from quantmap.executor.pack import unpack
from quantmap.executor.report import ExecutorError, Report, natural
from quantmap.executor.sharding import LayoutProblem, export_pipeline, is_scalar, max_of_copies, run
from quantmap.rules import MOE_FANOUT

ONE, MAX, SHAPED = "one", "max", "shaped"
_MAX_LISTED = 8


@dataclass(frozen=True, slots=True)
class Item:
    """One combined tensor and the HF names it goes to."""

    megatron: str
    combine: str
    sources: tuple[tuple[int, int], ...]  # (rank, entry index) in tensor-parallel rank order
    count: int  # how many HF names
    experts: range | None = None  # moe_fanout: the experts of this block
    pipeline: tuple | None = None  # shaped: (ops, the shape of each HF name's tensor)

    @property
    def records(self) -> int:
        """Tensors written for the item: one shared by every name, or one per name when shaped."""
        return self.count if self.combine == SHAPED else 1


class _Items(Sequence):
    """Items stored column-wise (a large MoE export has 10^5 of them); an :class:`Item` is built when read."""

    _CODES = (ONE, MAX, SHAPED)

    def __init__(self):
        self._names: list[str] = []
        self._combine = bytearray()
        self._start = array("q", [0])
        self._sources = array("q")  # rank << 32 | entry index
        self._count = array("q")
        self._experts: dict[int, range] = {}
        self._pipelines: dict[int, tuple] = {}

    def append(self, item: Item) -> None:
        if item.experts is not None:
            self._experts[len(self._names)] = item.experts
        if item.pipeline is not None:
            self._pipelines[len(self._names)] = item.pipeline
        self._names.append(item.megatron)
        self._combine.append(self._CODES.index(item.combine))
        self._sources.extend(rank << 32 | index for rank, index in item.sources)
        self._start.append(len(self._sources))
        self._count.append(item.count)

    def __len__(self) -> int:
        return len(self._names)

    def names_total(self) -> int:
        """How many HF names the items go to."""
        return sum(self._count)

    def __getitem__(self, i: int) -> Item:
        codes = self._sources[self._start[i]:self._start[i + 1]]
        return Item(self._names[i], self._CODES[self._combine[i]], tuple((c >> 32, c & 0xFFFFFFFF) for c in codes),
                    self._count[i], self._experts.get(i), self._pipelines.get(i))


class Plan:
    """The checked plan of one export, plus what is needed to build its tensors on the writer."""

    def __init__(self, rules, layout: Layout, metas: list[dict]):
        self.rules = rules
        self.layout = layout
        self.metas = metas
        self.report = Report()
        self.items = _Items()
        self._disagreeing: set[str] = set()
        self._build()
        self.report.written = self.items.names_total()

    @property
    def sizes(self) -> list[int]:
        return [meta["size"] for meta in self.metas]

    def hf_names(self, item: Item) -> list[str] | tuple[str, ...]:
        match = self.rules.to_hf(item.megatron)
        return match.hf if item.experts is None else expert_hf_names(match, item.experts)

    def spec(self, item: Item, part: int = 0) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of the item's tensor (``part``: which HF name's, when shaped), from metadata."""
        rank, index = item.sources[0]
        dtype, shape = self.metas[rank]["dtypes"][index], self.metas[rank]["shapes"][index]
        if item.combine == SHAPED:
            shape = item.pipeline[1][part]
        return dtype, shape

    def tensors(self, item: Item, buffers: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """The item's tensors: one shared by every HF name, or one per name when shaped; disagreeing
        copies combined by ``max`` go to the report."""
        parts = [unpack(buffers[rank], self.metas[rank], index) for rank, index in item.sources]
        labels = [f"rank {rank}" for rank, _ in item.sources]
        if item.combine == ONE:
            return parts
        if item.combine == SHAPED:
            out, spread = run(item.pipeline[0], parts, labels)
        else:
            combined, spread = max_of_copies(parts, labels)
            out = [combined]
        if spread and item.megatron not in self._disagreeing:
            self._disagreeing.add(item.megatron)  # tensors may be built more than once (files, then a state dict)
            self.report.disagreements.append(f"{item.megatron}: tensor-parallel copies differ ({spread}); exported the max")
        return out

    # -- checking -------------------------------------------------------------------------------
    def _build(self) -> None:
        failed = [f"rank {rank}: {meta['error']}" for rank, meta in enumerate(self.metas) if meta["error"]]
        if failed:
            raise ExecutorError(_listing("export failed on ", failed, "rank"))
        short = self._short_of_layout()
        if short:
            raise ExecutorError(_listing("the shards do not match the layout: ", short, "rank") +
                                "\nNothing was written.")
        self._dense = {(m["coords"].tp, m["coords"].cp, m["coords"].dp, m["coords"].pp): r for r, m in enumerate(self.metas)}
        self._expert = {(m["coords"].etp, m["coords"].ep, m["coords"].edp, m["coords"].pp): r
                        for r, m in enumerate(self.metas)}
        unclaimed: set[str] = set()
        for meta in self.metas:
            unclaimed.update(meta["unclaimed"])
            self.report.weights += meta["weights"]
        self.report.unclaimed = sorted(unclaimed, key=natural)
        # Every rank's entries sorted by name: a name's copies are adjacent, and the order does not
        # depend on the layout. Sorting flat positions keeps this cheap in memory at 10^5 names.
        names = [name for meta in self.metas for name in meta["names"]]
        starts = list(accumulate((len(meta["names"]) for meta in self.metas), initial=0))
        errors = self._expert_blocks()
        for name, group in groupby(sorted(range(len(names)), key=names.__getitem__), key=names.__getitem__):
            sources = []
            for position in group:
                rank = bisect_right(starts, position) - 1
                sources.append((rank, position - starts[rank]))
            try:
                self._add(name, self._owned(name, sources))
            except (_Problem, NamingError) as problem:
                errors.append(str(problem))
        if errors:
            raise ExecutorError(_listing("export stopped before any tensor moved: ", errors, "problem") +
                                "\nNothing was written.")

    def _short_of_layout(self) -> list[str]:
        """Ranks whose highest local layer or expert falls short of what the layout gives them: a layout
        that claims more layers or experts than the model has would shift every later index."""
        layout, problems = self.layout, []
        for rank, meta in enumerate(self.metas):
            stage = meta["coords"].pp
            if meta["top_layer"] is not None and meta["top_layer"] + 1 != layout.stage_layers[stage]:
                problems.append(f"rank {rank} holds local layers 0..{meta['top_layer']} but the layout puts "
                                f"{layout.stage_layers[stage]} layer(s) on pipeline stage {stage}; check num_layers "
                                f"and layers_per_stage in layout.json")
            if meta["top_expert"] is not None and meta["top_expert"] + 1 != layout.experts_per_rank:
                problems.append(f"rank {rank} holds local experts 0..{meta['top_expert']} but the layout gives each "
                                f"of its ep={layout.ep} ranks {layout.experts_per_rank}; check num_experts in layout.json")
        return problems

    def _expert_blocks(self) -> list[str]:
        """Every expert-parallel rank of a stage holds its block under the same local names; a rank short
        of one expert would otherwise just export fewer experts. Counted first, named on a mismatch."""
        counts: dict[int, dict[int, int]] = {}
        for rank, meta in enumerate(self.metas):
            if meta["coords"].edp == 0:
                counts.setdefault(meta["coords"].pp, {})[rank] = meta["experts"]
        problems = []
        for stage in sorted(counts):
            if len(set(counts[stage].values())) <= 1:
                continue
            local = {rank: {to_local(name, self.layout, self._coords(rank)) for name in self.metas[rank]["names"]
                            if is_expert(name)} for rank in counts[stage]}
            held = set().union(*local.values())
            for rank, names in sorted(local.items()):
                for name in sorted(held - names)[:_MAX_LISTED]:
                    holder = next(r for r, other in sorted(local.items()) if name in other)
                    problems.append(f"rank {rank} has no local {name!r} but rank {holder} of the same pipeline stage "
                                    f"holds it; every expert-parallel rank must hold a full block of experts")
        return problems

    def _coords(self, rank: int):
        return self.metas[rank]["coords"]

    def _owned(self, name: str, sources: list[tuple[int, int]]) -> list[tuple[int, int]]:
        stages = sorted({self._coords(rank).pp for rank, _ in sources})
        if len(stages) > 1:
            self.report.duplicates.append(f"{name}: held by pipeline stages {stages}; used stage {stages[0]}")
        return [s for s in sources if self._coords(s[0]).pp == stages[0]]

    def _add(self, name: str, sources: list[tuple[int, int]]) -> None:
        match = self.rules.to_hf(name)
        expert = is_expert(name)
        stage = self._coords(sources[0][0]).pp
        if match.kind != MOE_FANOUT:
            ep = self._coords(sources[0][0]).ep
            peers = self._peers(name, sources, expert, stage, ep)
            combine, pipeline = self._combine(name, match, peers)
            self.items.append(Item(name, combine, tuple(peers), len(match.hf), pipeline=pipeline))
            return
        for ep in range(self.layout.ep):
            block = [s for s in sources if self._coords(s[0]).ep == ep]
            peers = self._peers(name, block, True, stage, ep)
            experts = expert_block(name, match, self.layout, ep)
            combine, pipeline = self._combine(name, match, peers)
            self.items.append(Item(name, combine, tuple(peers), len(experts) * len(match.rule.hf), experts, pipeline))

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
        holder = f"rank {sources[0][0]} holds it" if sources else "the other expert-parallel ranks hold it"
        raise _Problem(f"rank {', '.join(map(str, lacking))} has no {name!r} but {holder}; every tensor-parallel "
                       f"(and, for a grouped-MoE block, expert-parallel) rank of a stage must hold the same quantizer "
                       f"tensors: check that each rank's state or shard file is complete")

    def _combine(self, name: str, match, peers: list[tuple[int, int]]) -> tuple[str, tuple | None]:
        shapes = [self.metas[r]["shapes"][i] for r, i in peers]
        dtypes = [self.metas[r]["dtypes"][i] for r, i in peers]
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


class _Problem(Exception):
    pass


def _listing(head: str, problems: list[str], noun: str) -> str:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more {noun}(s)" if len(problems) > _MAX_LISTED else ""
    if len(problems) == 1:
        return head + problems[0]
    return head + f"{len(problems)} {noun}s:\n  " + "\n  ".join(shown) + more
