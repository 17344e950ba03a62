"""The Megatron shard directory: ``layout.json`` plus ``rank_{global_rank:05d}.safetensors`` per rank,
each holding that rank's quantizer tensors under its LOCAL names (what its ``state_dict()`` says), and where
the run recorded it, ``recipe.json``: the ModelOpt ``quant_cfg`` the state was calibrated with.

Local names carry no position (every stage has a ``decoder.layers.0``), so a renamed or swapped file
would export a wrong model silently. quantmap therefore writes each rank's coordinates into the file's
safetensors ``__metadata__`` (key ``quantmap.coordinates``) and checks them on read when present."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from quantmap.parallel import Coords, LayoutError, ParallelLayout
from quantmap.io.safetensors_stream import DTYPES, write_state
from quantmap.untrusted import parse_json, special_file

COORDINATES_KEY = "quantmap.coordinates"
_TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}
_RANK_FILE = re.compile(r"rank_(\d+)\.safetensors")
_LISTED = 5
RECIPE_FILE = "recipe.json"  # the ModelOpt quant_cfg the shards were calibrated with, where save_shard was given it


def rank_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank_{rank:05d}.safetensors"


def check_rank_files(directory: str | Path, layout: ParallelLayout) -> None:
    """Every rank of the layout has its file and no file lies beyond the layout's world, checked from the
    directory listing before any work: extra files would never be read (a silently partial export), and a
    layout far bigger than the files (``dp: 1000000000``) would otherwise run for minutes first."""
    directory = Path(directory)
    try:
        found = [(entry.name, int(match.group(1))) for entry in os.scandir(directory)
                 if (match := _RANK_FILE.fullmatch(entry.name))]
    except OSError as error:
        raise LayoutError(f"cannot list the shard directory {directory}: {error.strerror}") from None
    misnamed = sorted(name for name, rank in found if name != rank_file("", rank).name)
    if misnamed:  # never read (only rank_NNNNN is), so it would be a silently missing rank or a second copy of one
        raise LayoutError(f"{directory} holds {', '.join(misnamed[:_LISTED])}: a rank file is named with five digits "
                          f"(e.g. {rank_file('', 1).name}) and quantmap reads no other name; rename or remove it")
    present = sorted(rank for _, rank in found)
    world = layout.world_size
    sizes = f"tp*cp*dp*pp = {layout.tp}*{layout.cp}*{layout.dp}*{layout.pp} = {world}"
    beyond = [rank for rank in present if rank >= world]
    if beyond:
        raise LayoutError(f"{directory} holds {len(beyond)} rank file(s) beyond the layout's {world} rank(s) "
                          f"({sizes}): {_names(beyond)}; they would not be exported. Fix layout.json or remove them")
    if len(present) < world:  # the ranks below ``world`` are distinct, so a count says whether any is absent
        held = set(present)
        absent = (rank for rank in range(world) if rank not in held)
        first = [next(absent) for _ in range(min(_LISTED, world - len(present)))]
        raise LayoutError(f"{directory} holds {len(present)} rank file(s) but its layout.json needs {world} ({sizes}); "
                          f"missing {_names(first, world - len(present))}. Fix the sizes in layout.json or supply "
                          f"every rank's file")


def _names(ranks: list[int], total: int | None = None) -> str:
    total = len(ranks) if total is None else total
    shown = ", ".join(rank_file("", rank).name for rank in ranks[:_LISTED])
    return shown + (f" and {total - _LISTED} more" if total > _LISTED else "")


def coordinates(layout: ParallelLayout, coords: Coords) -> dict:
    """What a rank's file records about where it sits: its position in both views and the global layer
    and expert ranges its local indices stand for (``[start, stop)``; experts ``None`` for a dense model)."""
    start = layout.layer_offset(coords.pp)
    per_rank = layout.experts_per_rank
    return {**coords._asdict(), "layers": [start, start + layout.stage_layers[coords.pp]],
            "experts": None if per_rank is None else [coords.ep * per_rank, (coords.ep + 1) * per_rank]}


def _is_range(value) -> bool:
    """A recorded layer or expert range: ``[start, stop)`` of two integers, or ``None``."""
    return value is None or (isinstance(value, list) and len(value) == 2
                             and all(isinstance(i, int) and not isinstance(i, bool) for i in value))


def _described(recorded: dict) -> str:
    layers, experts = recorded.get("layers"), recorded.get("experts")
    where = " ".join(f"{key}={recorded.get(key)}" for key in ("tp", "cp", "dp", "pp", "etp", "ep", "edp"))
    held = f", layers {layers[0]}..{layers[1] - 1}" if layers else ""
    held += f", experts {experts[0]}..{experts[1] - 1}" if experts else ""
    return f"rank {recorded.get('rank')} ({where}{held})"


class LazyShard(Mapping):
    """One rank's shard as a mapping; the file is opened on first use and a tensor is read only when
    asked for (so an unreadable file fails inside the export, where every rank hears of it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handle = None

    def check_coordinates(self, layout: ParallelLayout, coords: Coords) -> None:
        """Refuse a file whose recorded coordinates are not the position it is read for (a swapped or
        renamed file, or one written for another layout); files without coordinates pass."""
        recorded = self._open().metadata() or {}
        if COORDINATES_KEY not in recorded:
            return
        try:
            found = parse_json(recorded[COORDINATES_KEY])
        except ValueError as error:
            raise ValueError(f"{self.path}: its {COORDINATES_KEY} metadata is not JSON ({error}); rewrite the "
                             f"file") from None
        expected = coordinates(layout, coords)
        if not isinstance(found, dict) or not all(_is_range(found.get(key)) for key in ("layers", "experts")):
            raise ValueError(f"{self.path}: its {COORDINATES_KEY} metadata is not a JSON object of a rank's "
                             f"coordinates such as {json.dumps(expected)}; rewrite the file (save_shard writes it)")
        if found != expected:
            raise ValueError(f"{self.path.name} was written for {_described(found)} but is read as "
                             f"{_described(expected)}; the rank files were swapped or renamed, or come from "
                             f"another layout.json: put each file back under its own rank number")

    def _open(self):
        if self._handle is None:
            if not self.path.is_file():
                special = special_file(self.path)
                raise FileNotFoundError(f"{self.path} {'is ' + special + ', not a file' if special else 'does not exist'}; "
                                        f"a shard directory needs one rank_NNNNN.safetensors per rank of its layout.json")
            self._handle = safe_open(self.path, "pt")
        return self._handle

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._open().get_tensor(name)

    def tensor_spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """Tensor ``name``'s dtype and shape, from the file's header alone: an export that writes it later
        plans it from these, and reads its data only when its output file is written."""
        piece = self._open().get_slice(name)
        return _TORCH_DTYPES[piece.get_dtype()], tuple(piece.get_shape())

    def __iter__(self):
        return iter(self._open().keys())

    def __len__(self) -> int:
        return len(self._open().keys())

    def keys(self):
        return self._open().keys()


def write_rank(directory: str | Path, layout: ParallelLayout, coords: Coords, state: Mapping[str, torch.Tensor]) -> Path:
    """Write one rank's tensors with its coordinates (temporary name, then rename)."""
    path = rank_file(directory, coords.rank)
    partial = path.with_suffix(".partial")
    # not safetensors' save_file, which copies every tensor through numpy
    write_state(partial, state, metadata={COORDINATES_KEY: json.dumps(coordinates(layout, coords))})
    os.replace(partial, path)
    return path


def save_shard(state_dict: Mapping, layout: ParallelLayout, directory: str | Path, rank: int | None = None, *,
               quantizers_only: bool = True, recipe: list | None = None) -> Path:
    """Write this rank's quantizer state from a live model's ``state_dict()``; call it on every rank.

    Keeps the tensors whose name contains ``quantizer`` (``_amax``, ``_pre_quant_scale``, ...), or, with
    ``quantizers_only=False``, every tensor (for an output format that reads the model's weights too); rank 0
    also writes ``layout.json``, and with ``recipe`` (ModelOpt's ``quant_cfg``, the ``quant_cfg`` of
    ``mtq.quantize``'s config) ``recipe.json``, which a deployable export follows (:func:`read_recipe`). ``rank`` is this rank's position in Megatron-Core's default order
    (``tp-cp-ep-dp-pp``, the order ``layout.json`` declares); it defaults to the global rank of the
    default process group, which is that position when Megatron built its groups in the default
    order. A run with another order must pass the position, or export renumbers the wrong ranks.
    """
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        layout.write(directory)
        if recipe is not None:
            (directory / RECIPE_FILE).write_text(json.dumps({"quant_cfg": recipe}, indent=2) + "\n", encoding="utf-8")
    kept = {name: value for name, value in state_dict.items()
            if isinstance(value, torch.Tensor) and ("quantizer" in name or not quantizers_only)}
    return write_rank(directory, layout, layout.coords(rank), kept)


def read_recipe(directory: str | Path) -> list | None:
    """The ModelOpt ``quant_cfg`` a shard directory records (``recipe.json``, written by :func:`save_shard`), or
    ``None`` without one."""
    path = Path(directory) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        data = parse_json(path.read_bytes())
    except (OSError, ValueError) as error:
        raise LayoutError(f"{path} cannot be read as JSON ({error}); write it again with save_shard(..., "
                         f"recipe=quant_cfg) or remove it") from None
    cfg = data.get("quant_cfg") if isinstance(data, dict) else None
    if not (isinstance(cfg, list) and all(isinstance(entry, dict) for entry in cfg)):
        raise LayoutError(f'{path}: expected {{"quant_cfg": [{{"quantizer_name": ..., "cfg": ..., "enable": ...}}, '
                         f'...]}}, ModelOpt\'s quant_cfg list; write it again with save_shard(..., recipe=quant_cfg)')
    return cfg
