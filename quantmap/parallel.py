"""The parallel layout: one small validated value from which rank coordinates follow.

Megatron-Core numbers ranks with ``RankGenerator`` and the order string ``"tp-cp-ep-dp-pp"``,
the first token varying fastest (megatron/core/parallel_state.py, ``initialize_model_parallel``).
It builds two generators over the same world:

* the dense view (``ep=1``): ``rank = tp + TP*(cp + CP*(dp + DP*pp))``;
* the expert view (``cp=1``, ``tp=ETP``, ``dp=EDP = world/(ETP*EP*PP)``):
  ``rank = etp + ETP*(ep + EP*(edp + EDP*pp))``,

so expert parallelism is carved out of data (and context) parallelism inside each pipeline stage,
and both views share the pipeline groups. Everything here is pure; meshes live in
:mod:`quantmap.executor.placement`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from quantmap.limits import MAX_EXPERTS, MAX_LAYERS, MAX_WORLD_SIZE, over
from quantmap.untrusted import parse_json

LAYOUT_FILE = "layout.json"
_SIZES = ("tp", "pp", "dp", "ep", "etp", "cp")


class LayoutError(ValueError):
    """A layout that cannot describe the run; raised before any collective."""


class Coords(NamedTuple):
    """Where one rank sits in both views of the world."""

    rank: int
    tp: int
    cp: int
    dp: int
    pp: int
    etp: int
    ep: int
    edp: int


@dataclass(frozen=True)
class ParallelLayout:
    """Parallel sizes and how layers and experts split over them.

    ``etp`` defaults to ``tp`` (Megatron's default); ``layers_per_stage`` is uniform when absent.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    etp: int | None = None
    cp: int = 1
    num_layers: int = 1
    num_experts: int | None = None
    layers_per_stage: tuple[int, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        if isinstance(self.layers_per_stage, (list, tuple)):
            object.__setattr__(self, "layers_per_stage", tuple(self.layers_per_stage))
        elif self.layers_per_stage is not None:
            raise LayoutError(f"invalid parallel layout: layers_per_stage must be a list with one layer count per "
                              f"pipeline stage (e.g. [2, 2] for pp=2), or null, got {self.layers_per_stage!r}.")
        problems = self._problems()
        if problems:
            raise LayoutError("invalid parallel layout: " + "; ".join(problems) + ".")

    def _problems(self) -> list[str]:
        problems = [f"{name} must be a whole number >= 1, got {getattr(self, name)!r}"
                    for name in _SIZES if not _positive(getattr(self, name))]
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            problems.append(f"num_layers must be a whole number >= 1, got {self.num_layers!r}")
        if isinstance(self.num_experts, int):
            problems.append(over("num_experts", self.num_experts, MAX_EXPERTS))
        problems.append(over("num_layers", self.num_layers, MAX_LAYERS))
        problems = [problem for problem in problems if problem]
        if problems:
            return problems
        if self.world_size > MAX_WORLD_SIZE:
            return [f"tp*cp*dp*pp = {self.tp}*{self.cp}*{self.dp}*{self.pp} = {self.world_size} ranks exceeds "
                    f"quantmap's bound of {MAX_WORLD_SIZE} ranks; check the sizes"]
        if self.layers_per_stage is not None:
            stages = self.layers_per_stage
            if len(stages) != self.pp or any(not isinstance(n, int) or n < 0 for n in stages):
                problems.append(f"layers_per_stage {list(stages)} must list one count >= 0 per pipeline stage (pp={self.pp})")
            elif sum(stages) != self.num_layers:
                problems.append(f"layers_per_stage {list(stages)} sums to {sum(stages)}, not num_layers={self.num_layers}")
        elif self.num_layers % self.pp:
            problems.append(f"num_layers={self.num_layers} does not split evenly over pp={self.pp} stages; "
                            f"give layers_per_stage explicitly")
        per_stage = self.tp * self.cp * self.dp
        if per_stage % (self.etp * self.ep):
            problems.append(f"etp*ep={self.etp * self.ep} must divide tp*cp*dp={per_stage}: expert parallelism is "
                            f"carved out of data parallelism within a pipeline stage (an EP=2 run on 2 ranks is dp=2, ep=2)")
        if self.num_experts is not None:
            if not isinstance(self.num_experts, int) or self.num_experts < 1:
                problems.append(f"num_experts must be a whole number >= 1 or null, got {self.num_experts!r}")
            elif self.num_experts % self.ep:
                problems.append(f"num_experts={self.num_experts} is not divisible by ep={self.ep}")
        elif self.ep > 1:
            problems.append(f"ep={self.ep} needs num_experts (null means a dense model)")
        return problems

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def edp(self) -> int:
        """Expert data-parallel size: the ranks of a stage that hold the same experts."""
        return self.tp * self.cp * self.dp // (self.etp * self.ep)

    @property
    def experts_per_rank(self) -> int | None:
        return None if self.num_experts is None else self.num_experts // self.ep

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return self.layers_per_stage or (self.num_layers // self.pp,) * self.pp

    def layer_offset(self, stage: int) -> int:
        """The global index of the stage's local layer 0 (``get_transformer_layer_offset``)."""
        return sum(self.stage_layers[:stage])

    def stage_of_layer(self, layer: int) -> int:
        start = 0
        for stage, count in enumerate(self.stage_layers):
            if layer < start + count:
                return stage
            start += count
        raise LayoutError(f"layer {layer} is beyond num_layers={self.num_layers}")

    def coords(self, rank: int) -> Coords:
        """The rank's coordinates in Megatron-Core's default order (tp fastest, pp slowest)."""
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside a world of {self.world_size}")
        tp, rest = rank % self.tp, rank // self.tp
        cp, rest = rest % self.cp, rest // self.cp
        dp, pp = rest % self.dp, rest // self.dp
        etp, rest = rank % self.etp, rank // self.etp
        ep, rest = rest % self.ep, rest // self.ep
        edp = rest % self.edp
        return Coords(rank, tp, cp, dp, pp, etp, ep, edp)

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise LayoutError(
                f"the world has {world_size} ranks but the layout needs tp*cp*dp*pp = "
                f"{self.tp}*{self.cp}*{self.dp}*{self.pp} = {self.world_size}; fix the sizes or the launch"
            )

    # -- layout.json ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        out = asdict(self)
        out["layers_per_stage"] = list(self.layers_per_stage) if self.layers_per_stage else None
        out["order"] = "tp-cp-ep-dp-pp"
        return out

    @classmethod
    def from_json(cls, data: dict, source: str = "layout") -> "ParallelLayout":
        if not isinstance(data, dict):
            raise LayoutError(f"{source}: a layout must be a JSON object such as "
                              f'{{"tp": 2, "pp": 1, "dp": 1, "num_layers": 4}}, got {type(data).__name__} {data!r:.40}')
        data = dict(data)
        order = data.pop("order", "tp-cp-ep-dp-pp")
        if order != "tp-cp-ep-dp-pp":
            raise LayoutError(f"{source}: rank order {order!r} is not supported; quantmap numbers ranks in "
                              f"Megatron-Core's default order 'tp-cp-ep-dp-pp'")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise LayoutError(f"{source}: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        missing = [key for key in ("tp", "pp", "dp", "num_layers") if key not in data]
        if missing:
            raise LayoutError(f"{source}: missing key(s) {missing}")
        try:
            return cls(**data)
        except LayoutError as error:
            raise LayoutError(f"{source}: {error}") from None

    @classmethod
    def read(cls, path: str | Path) -> "ParallelLayout":
        path = Path(path)
        if path.is_dir():
            path = path / LAYOUT_FILE
        if path.exists() and not path.is_file():  # a named pipe or a device would be read forever
            raise LayoutError(f"the layout {path} is not a regular file; give a layout.json (or its directory)")
        try:
            data = parse_json(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise LayoutError(f"cannot read the layout {path}: {error.strerror}") from None
        except json.JSONDecodeError as error:
            raise LayoutError(f"{path} is not valid JSON: {error}") from None
        except UnicodeDecodeError:
            raise LayoutError(f"{path} is not UTF-8 text; a layout.json is a JSON object written as UTF-8") from None
        except ValueError as error:  # an integer too long to convert, nesting too deep
            raise LayoutError(f"{path} cannot be read as a layout: {error}") from None
        return cls.from_json(data, str(path))

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / LAYOUT_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
