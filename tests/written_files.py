"""Shared by the deployable-format tests: what an export wrote, read back with plain safetensors, and a
byte-level comparison that names every tensor that differs (so a scale one ulp off is found)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def written(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``directory``."""
    found = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        found.update(load_file(path))
    return found


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def differences(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    """Every name whose dtype, shape or bytes differ, or that only one side has (``+name``: written, not
    expected; ``-name``: expected, not written)."""
    out = [f"+{name}" for name in got if name not in want] + [f"-{name}" for name in want if name not in got]
    out += [name for name, tensor in want.items() if name in got
            and (got[name].dtype, got[name].shape, bits(got[name])) != (tensor.dtype, tensor.shape, bits(tensor))]
    return sorted(out)
