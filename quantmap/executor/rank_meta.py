"""What one rank tells the writer before any tensor moves: its entries and what it found.

Every rank's :class:`RankMeta` goes to every rank in one object gather, so the writer plans the whole
export from metadata alone (:mod:`quantmap.executor.plan`). It is pickled once per rank: the
per-entry columns are plain lists and arrays (10^4 entries on a large rank), and an entry names the
rule that claimed it by its number in the rule set (:meth:`quantmap.ruleset.RuleSet.number`): every
rank compiles the same rules, and a rule itself does not pickle.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quantmap.parallel import Coords

if TYPE_CHECKING:
    import torch

    from quantmap.executor.expert_runs import Run


@dataclass(slots=True)
class RankMeta:
    """One rank's packed entries (columns indexed by entry number) and its findings.

    A writer that receives only some entries points their ``offsets`` into its own buffer
    (:func:`quantmap.executor.pack.rebase`), on its own copy.
    """

    coords: Coords  # the rank's place in the layout
    error: str | None = None  # why the rank could not pack: the export fails on every rank with it
    # -- per entry
    names: list[str] = field(default_factory=list)  # global Megatron names (an expert run's: its first expert's)
    dtypes: list[torch.dtype] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # an expert run's: (its expert count,)
    rules: array = field(default_factory=lambda: array("I"))  # the number of the rule that claimed each
    offsets: array = field(default_factory=lambda: array("q"))  # bytes into the rank's buffer
    runs: dict[int, Run] = field(default_factory=dict)  # entry -> the expert run it folds
    # entry -> the name any process of the run reads it by (a torch_dist weight): a writer reads it, no rank sends it
    shared: dict[int, str] = field(default_factory=dict)
    # -- the rank's buffer and findings
    size: int = 0  # bytes of the buffer of every entry
    unclaimed: list[str] = field(default_factory=list)  # names no rule claims, for the report
    weights: int = 0  # weights the rules claim (not moved), counted for the report
    experts: int = 0  # expert tensors packed: every expert-parallel rank of a stage must hold as many
    top_layer: int | None = None  # the highest local layer index seen, checked against the layout
    top_expert: int | None = None  # the highest local expert index seen, likewise
    copies: dict[str, tuple] = field(default_factory=dict)  # a replica's name -> copy digest (values.py)
    uncalibrated: list[str] = field(default_factory=list)  # names whose amax holds a zero

    def claim(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], rule: int) -> None:
        """Add an entry (its offset comes when the rank's entries are laid out)."""
        self.names.append(name)
        self.dtypes.append(dtype)
        self.shapes.append(shape)
        self.rules.append(rule)

    def entry_names(self) -> list[str]:
        """Every Megatron name the entries hold, runs unfolded (in entry order)."""
        if not self.runs:
            return self.names
        out = []
        for entry, name in enumerate(self.names):
            if entry in self.runs:
                out += self.runs[entry].megatron_names()
            else:
                out.append(name)
        return out
