"""The executor's side of :mod:`quantmap.element_layout`: the op pipeline that moves one quantizer tensor
between tensor-parallel ranks and HF names, in one place for export and import.

Per-tensor amax is a scalar, identical on every rank and copied to every name: it needs no
pipeline (:func:`is_scalar`). Any other tensor goes through its rule's layout: on export the
ranks' copies are gathered (``layout.tp``) and cut into the HF names (``layout.ops``); on import
the HF names are joined by the inverse ops and the rank's piece is cut out. A pipeline is checked
on ``meta`` tensors before any data moves, so a shape the layout cannot place stops the run with
an error naming the tensor, its shape and the rule, and nothing written. Pipelines depend only on
the rule, the shapes and the rank count, so they are built once per distinct combination.

The weight of a fused-experts tensor (:attr:`~quantmap.rules.Rule.fans_in`) is many Megatron tensors,
one per expert, for one HF tensor: export gathers each expert's ranks in turn (:class:`EachExpert`),
then stacks them as the layout says; import runs the layout backwards on one expert's slice of the HF
tensor, so an import never holds more than that expert of it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from quantmap.executor.report import distinct
from quantmap.element_layout import ElementLayout
from dataclasses import dataclass

from quantmap.ops import Max, Op, OpError, Stack, apply, reverse
from quantmap.rules import WEIGHT, Rule


class LayoutProblem(ValueError):
    """A non-scalar tensor that its rule cannot place; the message names the tensor and the rule."""


def is_scalar(shape) -> bool:
    return math.prod(shape) == 1


def stacks_experts(rule: Rule) -> bool:
    """Whether ``rule`` is the weight of a fused-experts tensor: its HF tensor stacks every expert's."""
    return rule.kind == WEIGHT and rule.fans_in


def export_pipeline(name: str, rule: Rule, shape: tuple[int, ...], ranks: int, experts: int = 1
                    ) -> tuple[tuple[Op, ...], tuple]:
    """The ops from ``ranks`` tensor-parallel copies of ``shape`` to one tensor per HF name, and the
    shapes of those tensors; for the weight of a fused-experts tensor, from ``experts`` experts' copies,
    each expert's ``ranks`` in turn."""
    try:
        return _export_pipeline(rule.layout, len(rule.hf), tuple(shape), ranks, experts)
    except (OpError, _Unplaced) as problem:
        what = f"shape {list(shape)} on each of {ranks} tensor-parallel rank(s)"
        raise LayoutProblem(_describe(name, what + (f" for each of {experts} experts" if experts > 1 else ""),
                                      rule, problem)) from None


def import_pipeline(name: str, rule: Rule, shapes: tuple[tuple[int, ...], ...], ranks: int, rank: int
                    ) -> tuple[tuple[Op, ...], int | None]:
    """The ops from the HF names' tensors (of ``shapes``, in the rule's order) to the tensor of
    tensor-parallel rank ``rank`` of ``ranks``, and which output is that rank's (``None``: the only one).
    For the weight of a fused-experts tensor (:func:`stacks_experts`), ``shapes`` are the whole HF
    tensors' and the ops take one expert's slice of each (``[e:e + 1]`` on the expert axis)."""
    try:
        return _import_pipeline(rule.layout, len(rule.hf), tuple(map(tuple, shapes)), ranks, rank,
                                stacks_experts(rule))
    except (OpError, _Unplaced) as problem:
        raise LayoutProblem(_describe(name, f"HF parts shaped {[list(s) for s in shapes]}", rule, problem)) from None


def run(ops: tuple[Op, ...], tensors: list, labels: list[str]) -> tuple[list, str | None]:
    """Apply ``ops``; a :class:`~quantmap.ops.Max` of copies that disagree is described in the second value."""
    spread = None
    for op in ops:
        if isinstance(op, Max):
            out, spread = max_of_copies(tensors, labels)
            tensors = [out]
        elif isinstance(op, EachExpert):
            tensors, spread = op.run(tensors, labels)
        else:
            tensors = op(tensors)
    return tensors, spread


@dataclass(frozen=True, slots=True)
class EachExpert:
    """Export of a fused-experts weight: ``ops`` (the tensor-parallel gather) on each expert's ``ranks``
    copies in turn, one full tensor per expert, in expert order. Not an op of the rules: it says how the
    executor lays out an item's sources, not where a tensor's elements go."""

    ranks: int
    ops: tuple[Op, ...]

    def __call__(self, tensors: list) -> list:
        return [out for start in range(0, len(tensors), self.ranks)
                for out in apply(self.ops, tensors[start:start + self.ranks])]

    def run(self, tensors: list, labels: list[str]) -> tuple[list, str | None]:
        out, spread = [], None
        for start in range(0, len(tensors), self.ranks):
            gathered, differ = run(self.ops, tensors[start:start + self.ranks], labels[start:start + self.ranks])
            out += gathered
            spread = spread or differ
        return out, spread


def max_of_copies(parts: list[torch.Tensor], labels: list[str]) -> tuple[torch.Tensor, str | None]:
    """Copies that should agree (tensor-parallel replicas on export, fused parts or experts on import)
    combine by elementwise max; the second value describes them when they do not agree."""
    stacked = torch.stack(parts)
    out = stacked.amax(0)
    equal = (stacked == out).reshape(len(parts), -1)
    if bool(equal.all()):
        return out, None
    # Shown where they disagree: at the first element some copy falls short of the max, the first copy
    # holding the max there and up to three below it (the first four copies may all agree).
    at = stacked.reshape(len(parts), -1)[:, int((~equal).any(0).nonzero()[0])]
    below = (at != at.max()).nonzero().flatten().tolist()
    shown = [int((at == at.max()).nonzero()[0])] + below[:3]
    return out, copies_shown([labels[i] for i in shown], [at[i].item() for i in shown], len(parts))


def copies_shown(labels: list[str], values: list[float], count: int) -> str:
    """Copies that differ as a report shows them: at most four values, labelled (``count``: of how many)."""
    shown = ", ".join(f"{label}: {value}" for label, value in zip(labels[:4], distinct(values[:4])))
    return shown + (", ..." if count > min(len(labels), 4) else "")


class _Unplaced(Exception):
    pass


# Pipelines depend on the layout, the HF name count, the shapes, the ranks and experts only: a model has few
# distinct combinations, and building one runs its ops on meta tensors.
@lru_cache(maxsize=4096)
def _export_pipeline(layout: ElementLayout | None, count: int, shape: tuple[int, ...], ranks: int, experts: int):
    layout = _placeable(layout, ranks)
    if layout.rows is not None and shape:  # a layout with rows splits them over the ranks
        layout.check_rows((shape[0] * ranks, *shape[1:]))
    gather = () if ranks == 1 else layout.tp.gather(ranks, shape)
    ops = (EachExpert(ranks, gather),) + layout.ops if experts > 1 and gather else gather + layout.ops
    outputs = apply(ops, [torch.empty(shape, device="meta")] * (ranks * experts))
    _check_count(count, len(outputs))
    return ops, tuple(tuple(t.shape) for t in outputs)


@lru_cache(maxsize=4096)
def _import_pipeline(layout: ElementLayout | None, count: int, shapes: tuple[tuple[int, ...], ...], ranks: int,
                     rank: int, per_expert: bool):
    layout = _placeable(layout, ranks)
    _check_count(count, len(shapes))
    if layout.rows is not None and shapes and all(shapes):  # the parts hold the full tensor's rows between them
        layout.check_rows((sum(s[0] for s in shapes), *shapes[0][1:]))
    ops = reverse(layout.ops)
    outputs = apply(ops, [torch.empty(s, device="meta") for s in shapes])  # the whole HF tensors: checks their shapes
    if per_expert:
        ops = reverse(_one_expert(layout.ops))
        outputs = outputs[:1]
    if len(outputs) != 1:
        raise _Unplaced(f"the layout makes {len(outputs)} Megatron tensors of the HF name(s), not one")
    (full,) = outputs
    scatter = None if ranks == 1 else layout.tp.scatter(ranks, tuple(full.shape))
    if scatter is None:
        return ops, None
    apply(scatter, [full])  # checks that the full tensor cuts into the ranks' pieces
    return ops + scatter, rank


def _one_expert(ops: tuple[Op, ...]) -> tuple[Op, ...]:
    """A fused-experts weight's ops for one expert's slice of the HF tensor: the stack of one. The ops after
    the stack work on each expert alone (the expert axis stays dim 0), so the slice takes them unchanged."""
    first, *rest = ops
    if not isinstance(first, Stack):
        raise _Unplaced("a fused-experts weight's layout does not start with the stack of its experts")
    return (Stack(first.dim, 1), *rest)


def _placeable(layout: ElementLayout | None, ranks: int) -> ElementLayout:
    if layout is None or layout.ops is None or (ranks > 1 and layout.tp is None):
        raise _Unplaced(layout.reason if layout is not None and layout.reason else "the rule has no shaped layout")
    return layout


def _check_count(names: int, tensors: int) -> None:
    if names != tensors:
        raise _Unplaced(f"the layout makes {tensors} tensor(s) for the rule's {names} HF name(s)")


def _describe(name: str, what: str, rule: Rule, problem: Exception) -> str:
    origin = rule.origin
    return (f"{name} has {what}, which its rule ({rule.kind} from {origin.mapping!r} at {origin.location}) cannot "
            f"place: {problem}")
