"""Spec parameters read from a Hugging Face ``config.json``, so that a user points at the model's own
config instead of copying head counts and widths into ``--param`` flags.

Only parameters the spec declares are taken; an explicit ``--param`` wins over the config. A
vision-language config keeps its decoder's sizes under ``text_config``, which is read instead.
"""

from __future__ import annotations

import json
from pathlib import Path

# spec parameter -> config keys, first present wins (num_local_experts: Mixtral, GPT-OSS;
# num_experts: Qwen-MoE, OLMoE; n_routed_experts: DeepSeek).
_KEYS = {
    "num_layers": ("num_hidden_layers",),
    "hidden_size": ("hidden_size",),
    "num_attention_heads": ("num_attention_heads",),
    "num_query_groups": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
}


class ConfigError(ValueError):
    """A config.json that cannot be read; the message names the file and what to do."""


def params_from_config(path: str | Path, declared) -> dict[str, int]:
    """The values of the ``declared`` spec parameters that ``path`` (a config.json, or a directory
    holding one) gives."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read the config {path}: {error.strerror}; give a Hugging Face config.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not a JSON config ({error}); give a Hugging Face config.json") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a Hugging Face config: its top level is not a JSON object")
    config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    values = {}
    for param, keys in _KEYS.items():
        found = next((config[key] for key in keys if isinstance(config.get(key), int)), None)
        if found is not None:
            values[param] = found
    # Derived the way transformers derives them: multi-head attention has as many KV heads as heads,
    # and head_dim defaults to hidden_size / num_attention_heads.
    if "num_attention_heads" in values:
        values.setdefault("num_query_groups", values["num_attention_heads"])
        if "hidden_size" in values:
            values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    return {name: value for name, value in values.items() if name in declared}
