"""A deployable checkpoint (``--format modelopt``) read back as the ``hf`` format's names and tensors.

Import reads a Hugging Face checkpoint by the HF names the rules give: the weight, ``weight_quantizer._amax``.
A deployable checkpoint holds other tensors (the FP8 ``q_proj.weight`` and its ``weight_scale``), each module's
computed from the module's; its format says, per module, how to compute those names back
(:attr:`quantmap.formats.OutputFormat.restore_modules`: a dequantized weight, amax from the scales). This is
that checkpoint as an :class:`~quantmap.io.hf.Checkpoint` of the names it restores, so the one import path
reads it as it reads any other; each tensor is computed when the import asks for it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from quantmap.formats.declaration import Derived, FormatError, ModuleView
from quantmap.io.hf import Checkpoint
from quantmap.io.safetensors_stream import DTYPES
from quantmap.executor.report import ExecutorError
from quantmap.untrusted import parse_json

_TORCH_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in DTYPES.items()}


class DeployedCheckpoint:
    """The checkpoint ``checkpoint`` (in ``fmt``) as the names and tensors ``fmt`` restores, per module."""

    def __init__(self, checkpoint: Checkpoint, fmt):
        self.checkpoint = checkpoint
        modules: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for name in checkpoint.names():
            module, _, leaf = name.rpartition(".")
            code = checkpoint.dtype(name)
            modules.setdefault(module, {})[leaf] = (_TORCH_NAMES.get(code, code), checkpoint.shape(name))
        quantization = _quantization(checkpoint.directory)
        self._restored: dict[str, tuple[str, Derived]] = {}  # HF name -> (its module, how it is computed)
        for module, leaves in modules.items():
            try:
                restored = fmt.restore_modules(ModuleView(module, leaves, {}, {}, None, quantization))
            except FormatError as error:
                raise ExecutorError(f"{checkpoint.directory} (format {fmt.name!r}): {error}") from None
            for derived in restored:
                self._restored[derived.name] = (module, derived)
        notes = Counter(derived.note for _, derived in self._restored.values() if derived.note)
        self.notes = [f"{count} tensor(s) {note}" for note, count in notes.items()]

    def names(self) -> list[str]:
        return list(self._restored)

    def get(self, name: str, expert: int | None = None) -> torch.Tensor:
        """The restored tensor ``name``; with ``expert``, its slice ``[expert:expert + 1]`` of dim 0."""
        module, derived = self._restored[name]
        tensor = derived.compute(*(self.checkpoint.get(f"{module}.{leaf}") for leaf in derived.inputs))
        return tensor if expert is None else tensor[expert:expert + 1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._restored[name][1].shape


def _quantization(directory: Path) -> dict | None:
    """The checkpoint's own account of its format: ``hf_quant_config.json``'s ``quantization`` block, or
    ``config.json``'s ``quantization_config``; ``None`` where it has neither."""
    for name, key in (("hf_quant_config.json", "quantization"), ("config.json", "quantization_config")):
        path = directory / name
        if path.is_file():
            try:
                found = parse_json(path.read_bytes())
            except ValueError as error:
                raise ExecutorError(f"{path} cannot be read as JSON ({error}); a deployable checkpoint's config "
                                    f"files are JSON objects") from None
            if isinstance(found, dict) and isinstance(found.get(key), dict):
                return found[key]
    return None
