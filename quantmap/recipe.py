"""What ModelOpt's quantization recipe (``quant_cfg``) says about a quantizer: the parser output formats and
checks share, apart from the reading of the file that holds it (:mod:`quantmap.io.torch_dist.modelopt`).

``quant_cfg`` is ModelOpt's ordered list of ``{"quantizer_name": wildcard, "cfg": {...} | None, "enable": bool,
"parent_class": ...}``. ModelOpt applies the entries in order (``set_quantizer_by_cfg``, modelopt/torch/
quantization/conversion.py in 0.47): the wildcard is ``fnmatch``-ed against the quantizer's module name, an
entry with ``cfg`` replaces all its attributes, one without only toggles ``enable``. Entries restricted
to a ``parent_class`` are left out: the stock configs use them only to disable quantizers under
torch classes Megatron-Core's layers are not (``nn.BatchNorm1d``, ``nn.Embedding``, ...).
"""

from __future__ import annotations

from fnmatch import fnmatch


def per_tensor(quantizer: str, entries: list[dict]) -> bool | None:
    """Whether ModelOpt's config makes ``quantizer`` (a module name) an enabled per-tensor quantizer;
    ``None`` when it does not say (disabled, never configured, a sequential cfg)."""
    attributes, enabled = None, True
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("parent_class") or \
                not fnmatch(quantizer, str(entry.get("quantizer_name", ""))):
            continue
        cfg = entry.get("cfg")
        enabled = bool(entry.get("enable", True))
        if cfg is not None:
            if not isinstance(cfg, dict):
                return None
            attributes = cfg
    if attributes is None or not enabled:
        return None
    return attributes.get("axis") is None and attributes.get("block_sizes") is None
