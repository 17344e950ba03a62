"""Spec parameters read from a Hugging Face ``config.json``, so that a user points at the model's own
config instead of copying head counts and widths into ``--param`` flags.

Only parameters the spec declares are taken; an explicit ``--param`` wins over the config. A
vision-language config keeps its decoder's sizes under ``text_config``, which is read instead. A
hybrid spec's layer kinds (``quantmap names``) are read from the keys its ``hybrid.config`` names.
"""

from __future__ import annotations

from pathlib import Path

from quantmap.untrusted import parse_json, special_file

# spec parameter -> config keys, first present wins (num_local_experts: Mixtral, GPT-OSS;
# num_experts: Qwen-MoE, OLMoE; n_routed_experts: DeepSeek; moe_num_experts: ERNIE 4.5).
_KEYS = {
    "num_layers": ("num_hidden_layers",),
    "hidden_size": ("hidden_size",),
    "num_attention_heads": ("num_attention_heads",),
    "num_query_groups": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"),
    # Gated DeltaNet (Qwen3-Next, Qwen3.5): transformers and Megatron-Core name them alike.
    "linear_num_key_heads": ("linear_num_key_heads",),
    "linear_key_head_dim": ("linear_key_head_dim",),
    "linear_num_value_heads": ("linear_num_value_heads",),
    "linear_value_head_dim": ("linear_value_head_dim",),
}


def config_hint(*params: str) -> str:
    """How ``--config`` gives ``params``: the config.json keys it reads them from (for error messages)."""
    keys = [" or ".join(_KEYS[param]) for param in params]
    return f"--config with a config.json that has {' and '.join(keys)}"


class ConfigError(ValueError):
    """A config.json that cannot be read; the message names the file and what to do."""


def params_from_config(path: str | Path, declared) -> dict[str, int]:
    """The values of the ``declared`` spec parameters that ``path`` (a config.json, or a directory
    holding one) gives."""
    config = _text_config(path)
    values = {}
    for param, keys in _KEYS.items():
        key = next((key for key in keys if isinstance(config.get(key), int)), None)
        if key is None:
            continue
        if config[key] < 1 and (param in declared or param == "num_attention_heads"):
            # Every size a spec takes counts something a model has; zero heads would also divide by zero below.
            raise ConfigError(f"{_config_file(path)}: {key} is {config[key]}; a model has at least 1, so this is not "
                              f"the model's config.json (or pass --param {param}=N)")
        values[param] = config[key]
    # Derived the way transformers derives them: multi-head attention has as many KV heads as heads,
    # and head_dim defaults to hidden_size / num_attention_heads.
    if "num_attention_heads" in values:
        values.setdefault("num_query_groups", values["num_attention_heads"])
        if "hidden_size" in values:
            values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    return {name: value for name, value in values.items() if name in declared}


def tied_embeddings(path: str | Path) -> bool | None:
    """What the config at ``path`` says of the output head: its ``tie_word_embeddings`` (the text model's,
    for a vision-language model); ``None`` where it does not say (the model class's default then decides)."""
    value = _text_config(path).get("tie_word_embeddings")
    return value if isinstance(value, bool) else None


def dense_layers_from_config(path: str | Path, layers: int) -> tuple[int, ...] | None:
    """The decoder layers of an MoE model that have a dense MLP, decided from the config the way
    transformers builds each layer (transformers 5.x modeling code): DeepSeek-V2/V3, Kimi K2 and
    GLM-4.5 make the first ``first_k_dense_replace`` layers dense; Qwen2/Qwen3-MoE every layer in
    ``mlp_only_layers`` or not a multiple of ``decoder_sparse_step`` (layer i is MoE when
    (i + 1) % step == 0); ERNIE 4.5 every layer outside ``moe_layer_start_index`` ..
    ``moe_layer_end_index`` (-1: the last) or off ``moe_layer_interval``. ``None``: the config has
    none of these keys."""
    config = _text_config(path)
    where = _config_file(path)

    def number(key: str, default: int, least: int) -> int:
        value = config.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{where}: {key} is {value!r}, not an integer >= {least}")
        return value

    if "first_k_dense_replace" in config:
        first = number("first_k_dense_replace", 0, 0)
        return tuple(i for i in range(layers) if i < first)
    if "mlp_only_layers" in config or "decoder_sparse_step" in config:
        only = config.get("mlp_only_layers", [])
        if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
            raise ConfigError(f"{where}: mlp_only_layers is {only!r}, not a list of layer indices")
        step = number("decoder_sparse_step", 1, 1)
        return tuple(i for i in range(layers) if i in only or (i + 1) % step)
    if "moe_layer_start_index" in config:
        start, interval = number("moe_layer_start_index", 0, 0), number("moe_layer_interval", 1, 1)
        end = number("moe_layer_end_index", -1, -1)
        end = layers - 1 if end == -1 else end
        return tuple(i for i in range(layers) if (i + 1) % interval or not start <= i <= end)
    return None


def layer_kinds_from_config(path: str | Path, hybrid, layers: int) -> tuple[str, ...]:
    """Each of the ``layers`` decoder layers' kind, from the first of ``hybrid.config``'s keys (a spec's
    :class:`~quantmap.spec.schema.Hybrid`) that the config at ``path`` has."""
    config = _text_config(path)
    where = _config_file(path)
    source = next((s for s in hybrid.config if s.key in config), None)
    if source is None:
        keys = ", ".join(s.key for s in hybrid.config) or "none declared"
        raise ConfigError(f"{where} gives no layer kinds: it has none of the keys {keys}; give each layer's kind "
                          f"with --layer-kind KIND=LAYERS (kinds: {', '.join(hybrid.kinds)})")
    value = config[source.key]
    if source.every is not None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}: {source.key} is {value!r}, not a layer interval (an integer >= 1)")
        return tuple(source.every if (index + 1) % value == 0 else source.others for index in range(layers))
    if not isinstance(value, (list, str)) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where}: {source.key} is {value!r}, not a list of layer kinds or a pattern string")
    if len(value) != layers:
        raise ConfigError(f"{where}: {source.key} gives {len(value)} layers, but the model has {layers} (--layers)")
    kinds = source.values or {kind: kind for kind in hybrid.kinds}
    unknown = sorted({item for item in value if item not in kinds})
    if unknown:
        raise ConfigError(f"{where}: {source.key} holds {', '.join(map(repr, unknown))}, which the spec does not "
                          f"know; it knows {', '.join(map(repr, kinds))}")
    return tuple(kinds[item] for item in value)


def _config_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def _text_config(path: str | Path) -> dict:
    """The config's JSON object: the decoder's (``text_config``) for a vision-language model."""
    path = _config_file(path)
    special = special_file(path)
    if special:
        raise ConfigError(f"{path} is {special}, not a file (reading it could block forever); give a Hugging Face "
                          f"config.json")
    try:
        config = parse_json(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read the config {path}: {error.strerror}; give a Hugging Face config.json") from None
    except ValueError as error:  # not UTF-8, not JSON, an integer too long, nesting too deep
        raise ConfigError(f"{path} is not a JSON config ({error}); give a Hugging Face config.json") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a Hugging Face config: its top level is not a JSON object")
    return config.get("text_config") if isinstance(config.get("text_config"), dict) else config
