"""The records of a format that computes what it writes per Hugging Face module (a deployable checkpoint).

The plan's records (:class:`quantmap.executor.export._Records`) are the source's tensors under their HF
names: ``q_proj.weight`` (a part of Megatron's fused QKV weight), ``q_proj.weight_quantizer._amax`` (one
amax fanned out to q, k and v). A deployable format writes other tensors, each computed from several of
those of one module: the FP8 ``q_proj.weight`` from the weight and its amax, ``q_proj.weight_scale`` from
the amax. Here the plan's records are grouped by module (:func:`quantmap.roles.module_of`), the format says
from metadata alone what it writes for each module (:attr:`quantmap.formats.OutputFormat.modules`), and
each written tensor becomes a record whose sources are its inputs' sources, so the writers' schedule moves
exactly what each file needs, as it does for any record.

Order: a record is placed after the plan record of its first input (the weight, for a quantized weight),
so the records built from one fused weight's parts follow each other and the plan builds that weight once
(it keeps the last item's tensors); the quantizer tensors they also need are small and kept per file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from quantmap.executor.options import CASTS
from quantmap.executor.report import ExecutorError
from quantmap.formats.declaration import Derived, FormatError, ModuleView
from quantmap.roles import MODEL_ROLES, module_of


class ModuleRecords:
    """Records of a module-wise format over the plan's records ``base``."""

    def __init__(self, base, options):
        self.base = base
        fmt = options.output_format
        modules: dict[str, dict[str, tuple[int, int]]] = {}  # module -> buffer -> (base record, name's position)
        roles: dict[str, dict[str, str]] = {}
        for i in range(len(base)):
            role = base.plan.items.role(base.item(i))
            for position, name in enumerate(base.names(i)):
                module = module_of(name, role)
                modules.setdefault(module, {})[name[len(module) + 1:]] = (i, position)
                roles.setdefault(module, {})[name[len(module) + 1:]] = role
        self._names: dict[str, tuple[int, int]] = {}  # every HF name -> (base record, position)
        self._holders: dict[str, tuple[str, ...]] = {}  # every global Megatron name -> its HF names, first first
        for module, buffers in modules.items():
            for buffer, source in buffers.items():
                self._names[f"{module}.{buffer}"] = source
                megatron = base.plan.items[base.item(source[0])].megatron
                self._holders[megatron] = self._holders.get(megatron, ()) + (f"{module}.{buffer}",)
        self._config = _model_config(options)
        self.facts: dict[str, dict] = {}  # what the format said of each module, for its added files
        placed: list[tuple[tuple[int, int], int, Derived, tuple]] = []
        for module, buffers in modules.items():
            try:
                output = fmt.modules(self._view(module, buffers, roles[module], options))
            except FormatError as error:
                raise ExecutorError(f"format {fmt.name!r}: {error}") from None
            self.facts[module] = dict(output.facts)
            for derived in output.tensors:
                inputs = tuple(self._input(module, buffers, buffer, derived) for buffer in derived.inputs)
                anchor = next((source for source in inputs if isinstance(source, tuple)), next(iter(buffers.values())))
                placed.append((anchor, len(placed), derived, inputs))
        if fmt.summarize is not None:
            try:
                self.plan.report.deployed = fmt.summarize(self.facts)
            except FormatError as error:
                raise ExecutorError(f"format {fmt.name!r}: {error}") from None
        placed.sort(key=lambda entry: entry[:2])
        self._derived = [entry[2] for entry in placed]
        index = {derived.name: i for i, derived in enumerate(self._derived)}
        self._inputs = [tuple(index[source] if isinstance(source, str) else source for source in entry[3])
                        for entry in placed]
        self._kept: dict[tuple[int, int], torch.Tensor] = {}  # small inputs (not the model's tensors) of this file
        self._last: tuple[int, torch.Tensor] | None = None  # the last tensor computed: another one's input, next
        self._refuse_uncalibrated(options)

    def _view(self, module: str, buffers: dict[str, tuple[int, int]], roles: dict[str, str], options) -> ModuleView:
        base, specs, megatron = self.base, {}, {}
        for buffer, (i, _) in buffers.items():
            _, dtype, shape = base.spec(i)
            specs[buffer] = (str(dtype).removeprefix("torch."), tuple(shape))
            megatron[buffer] = base.plan.items[base.item(i)].megatron
        return ModuleView(module, specs, roles, megatron, CASTS[options.dtype] if options.dtype else None,
                          options.recipe, options.kv_scales, self._first_holder, self._all_holders, self._config)

    def _first_holder(self, megatron: str) -> str | None:
        return self._holders.get(megatron, (None,))[0]

    def _all_holders(self, megatron: str) -> tuple[str, ...]:
        return self._holders.get(megatron, ())

    def _input(self, module: str, buffers, buffer: str, derived: Derived) -> tuple[int, int] | float | str:
        """Where input ``buffer`` of ``derived`` comes from: a buffer of the module (its base record and name's
        position), a full HF name of another module's, a constant (``=value``: the value), or a tensor the format
        writes for the module (``@weight_scale``: its name, made the record's number once they are ordered)."""
        if buffer.startswith("="):
            return float(buffer[1:])
        if buffer.startswith("@"):
            return f"{module}.{buffer[1:]}"
        source = buffers.get(buffer) or self._names.get(buffer)
        if source is None:
            raise ExecutorError(f"{derived.name}: computed from {module}.{buffer}, which the checkpoint does not "
                                f"have (it has {sorted(buffers)})")
        return source

    def _refuse_uncalibrated(self, options) -> None:
        """Quantizers the format wrote with a bound for lack of an amax: reported as uncalibrated, refused under
        ``--strict`` before anything is written."""
        missing = [name for facts in self.facts.values() for name in facts.get("uncalibrated", ())]
        if missing and options.strict:
            shown = ", ".join(missing[:3]) + (f", and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ExecutorError(f"export refused (--strict): {len(missing)} quantizer(s) the recipe enables hold no "
                                f"amax (uncalibrated): {shown}; ModelOpt would export them with its maximum bound. "
                                f"Calibrate them, or drop --strict. Nothing was written.")
        self.plan.report.uncalibrated += missing

    @property
    def plan(self):
        return self.base.plan

    @property
    def buffers(self):
        return self.base.buffers

    def __len__(self) -> int:
        return len(self._derived)

    def spec(self, i: int):
        derived = self._derived[i]
        return 1, getattr(torch, derived.dtype), derived.shape

    def names(self, i: int) -> list[str]:
        return [self._derived[i].name]

    def tensor(self, i: int) -> torch.Tensor:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        derived = self._derived[i]
        tensor = derived.compute(*(self._tensor(source) for source in self._inputs[i]))
        if tensor.dtype != getattr(torch, derived.dtype) or tuple(tensor.shape) != derived.shape:
            raise ExecutorError(f"{derived.name}: computed as {tensor.dtype} {tuple(tensor.shape)}, planned as "
                                f"{derived.dtype} {derived.shape}: a bug in format "
                                f"{self.plan.options.format!r}, please report it")
        self._last = i, tensor
        return tensor

    def _tensor(self, source: tuple[int, int] | float | int) -> torch.Tensor:
        if isinstance(source, float):
            return torch.tensor(source)
        if isinstance(source, int):  # another record's tensor: placed just before this one, so computed last
            return self.tensor(source)
        record, position = source
        if source in self._kept:
            return self._kept[source]
        tensor = self.base.named_tensor(record, position)
        if self.plan.items.role(self.base.item(record)) not in MODEL_ROLES:
            self._kept[source] = tensor
        return tensor

    def named_tensors(self, i: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield self._derived[i].name, self.tensor(i)

    def sources(self, i: int):
        """The (rank, entry) pairs record ``i``'s inputs are built from: what its writer must receive."""
        pairs = []
        for source in self._inputs[i]:
            if isinstance(source, tuple):
                pairs += self.base.sources(source[0])
            elif isinstance(source, int):
                pairs += self.sources(source)
        return tuple(dict.fromkeys(pairs))

    def destinations(self) -> list[tuple[str, range]]:
        return [("", range(len(self)))]

    def release(self) -> None:
        """Drop the tensors kept for the file just written (see :meth:`_Records.release`)."""
        self.base.release()
        self._kept.clear()
        self._last = None


def _model_config(options) -> dict | None:
    """The ``config.json`` a model export copies beside its weights, read once for every module's view."""
    source = next((path for path, name in options.model_files if name == "config.json"), None)
    return None if source is None else json.loads(Path(source).read_text(encoding="utf-8"))
