"""The quantizer configuration a checkpoint's ``modelopt_state/`` records, read from the file, to catch
tensors that contradict it; what the configuration means is :mod:`quantmap.recipe`.

Megatron-LM saves ModelOpt's state as a second, tensor-free DCP checkpoint; its ``common.pt`` loads
with ``torch.load(weights_only=True)`` and holds ``modelopt_state_dict``: ``[(mode, {"config": ...})]``
where the ``quantize`` mode's ``config["quant_cfg"]`` is ModelOpt's ordered list of
``{"quantizer_name": wildcard, "cfg": {...} | None, "enable": bool, "parent_class": ...}``.

What is checked: an enabled quantizer whose effective ``cfg`` is per-tensor (``axis`` and
``block_sizes`` both ``None``) must have a one-element ``_amax``.
"""

from __future__ import annotations

import math
from pathlib import Path

from quantmap.io.torch_dist.files import TorchDistError
from quantmap.recipe import per_tensor

STATE_FILE = Path("modelopt_state") / "common.pt"


def quant_cfg(directory: str | Path) -> list[dict] | None:
    """The ``quant_cfg`` list of an iteration directory's ``modelopt_state``, or ``None`` without one."""
    import torch

    from quantmap.io.torch_dist.files import open_regular

    path = Path(directory) / STATE_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        with open_regular(directory, STATE_FILE) as stream:
            state = torch.load(stream, map_location="cpu", weights_only=True)
    except TorchDistError:
        raise
    except Exception as error:  # noqa: BLE001 - not loadable as plain data: nothing to validate against
        raise TorchDistError(f"{path}: cannot be read with torch.load(weights_only=True) "
                             f"({type(error).__name__}); quantmap reads ModelOpt's state only as plain data") from None
    modes = state.get("modelopt_state_dict", []) if isinstance(state, dict) else None
    if not isinstance(modes, list):
        raise _malformed(path, f"its {'modelopt_state_dict' if isinstance(state, dict) else 'content'} is "
                               f"{type(modes if isinstance(state, dict) else state).__name__}")
    for item in modes:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict)
                and isinstance(item[1].get("config", {}), dict)):
            raise _malformed(path, f"a mode is {_shown(item)}")
        mode, data = item
        config = data.get("config", {})
        if mode == "quantize" and isinstance(config.get("quant_cfg"), list):
            return config["quant_cfg"]
    return None


def _malformed(path: Path, problem: str) -> TorchDistError:
    return TorchDistError(f"{path}: not ModelOpt's saved state: {problem}, where ModelOpt writes a dict whose "
                          f"modelopt_state_dict is a list of (mode, {{'config': {{...}}}}) pairs; the file is damaged "
                          f"or not ModelOpt's (remove modelopt_state/ to export without checking against it)")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:60]}..."


def check_shapes(directory: str | Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse an ``_amax`` with several elements where the checkpoint's ModelOpt config says per-tensor."""
    entries = quant_cfg(directory)
    if not entries:
        return
    for name, shape in shapes.items():
        if not name.endswith("._amax") or math.prod(shape) == 1:
            continue
        module = name.removesuffix("._amax")
        if per_tensor(module, entries):
            raise TorchDistError(f"{name} has shape {list(shape)}, but {Path(directory) / STATE_FILE} configures "
                                 f"{module} per-tensor (axis and block_sizes None), which has one amax; the tensors "
                                 f"and the ModelOpt config do not belong together")
