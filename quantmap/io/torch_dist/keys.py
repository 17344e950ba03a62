"""Checkpoint keys and shapes ↔ the ``state_dict()`` names and shapes the rules are written for.

What Megatron-Core + ModelOpt 0.47 store in a ``torch_dist`` checkpoint differs from what a
single-rank model's ``state_dict()`` holds (facts from tests/data/dcp, see docs/checkpoints.md):

* SequentialMLP experts are keyed ``experts.experts.{E}`` with the GLOBAL expert index, where
  ``state_dict()`` says ``experts.local_experts.{E}``;
* per-tensor amax is ``[1]`` (``k_bmm``/``v_bmm`` amax ``[]``); ``state_dict()`` holds ``[]``;
* block amax is ``[rows, nblocks]``; ``state_dict()`` holds it flattened, ``[rows * nblocks, 1]``;
* NeMo wraps the model: keys may start with ``model.`` or ``module.`` (any repetition of them);
* an unquantized Megatron-Core save (``singleton_local_shards`` off, Megatron-LM's default) stacks every
  layer on a leading axis, ``decoder.layers.self_attention...`` ``[L, ...]`` (one chunk per layer: PP stages
  are offsets on it), SequentialMLP or grouped experts on a second one, ``mlp.experts.linear_fc1.weight``
  ``[L, E, ...]``, and keeps a SwiGLU ``linear_fc1.weight`` whole (``[gate; up]``); with
  ``singleton_local_shards`` on (the fixtures, ModelOpt's saves) every layer and expert has its own key and
  ``linear_fc1`` is saved as two halves, ``weight_w`` (gate) and ``weight_v`` (up);
* optimizer state (``optimizer.*``) and bytes entries (``_extra_state``, ``rng_state``, 0.19's
  ``common_state``) are not the model's;
* ModelOpt saves the per-channel or block weight amax of a SwiGLU ``linear_fc1`` (W4A8: its stage 0) TP-interleaved
  (``[gate_0; up_0; gate_1; up_1; ...]``, one ``[gate_r; up_r]`` per saving TP rank) instead of
  ``[gate; up]``: its gate/up split (the weight's ``weight_w``/``weight_v``) is never applied to the
  quantizer. The saving TP size is the number of pieces dim 0 is saved in.

Everything here is names and shapes only (no torch): :mod:`~quantmap.io.torch_dist.read` and
:mod:`~quantmap.io.torch_dist.write` move the values.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from quantmap.gc_pause import paused_gc
from quantmap.io.torch_dist.files import TorchDistError
from quantmap.io.torch_dist.metadata import Entry
from quantmap.limits import MAX_EXPERTS, MAX_LAYERS, over
from quantmap.untrusted import MAX_DIGITS, decimal

_PREFIX = re.compile(r"^(?:(?:model|module)\.)*")
_STACKED = re.compile(r"(?:^|(?<=\.))decoder\.layers\.(?![0-9]+\.)")
_LAYER = re.compile(r"(?:^|(?<=\.))decoder\.layers\.([0-9]+)\.")
_EXPERT = re.compile(r"\.experts\.(?:local_experts|experts)\.([0-9]+)\.|\.experts\.linear_fc[0-9]+\.weight([0-9]+)$")
# A linear_fc1's weight amax: its one weight quantizer's, or one stage of a sequential one (W4A8's
# weight_quantizer.{S}, quantmap.stages); on a grouped linear the index is an expert's instead.
FC1_WEIGHT_AMAX = re.compile(r"\.linear_fc1\.weight_quantizer(\.[0-9]+)?\._amax$")
_WRAPPERS = ("model.", "module.")
CHECKPOINT_EXPERTS = ".experts.experts."
STATE_EXPERTS = ".experts.local_experts."


def is_quantizer(entry: Entry) -> bool:
    """A quantizer buffer (``_amax``, ``_pre_quant_scale``, ...) as ``save_shard`` keeps them."""
    return entry.dtype is not None and "quantizer" in entry.key


class Quantizer(NamedTuple):  # a tuple: 10⁵ of them are built per read
    """One quantizer buffer: its state_dict name and shape, and where and how the checkpoint holds it."""

    name: str  # global state_dict name
    key: str  # checkpoint key
    layer: int | None  # its index on a stacked checkpoint's leading axis; None when not stacked
    shape: tuple[int, ...]  # state_dict shape
    stored: tuple[int, ...]  # checkpoint shape (one layer's, when stacked)
    interleaved: int  # ModelOpt's TP-interleaved linear_fc1 rows: the saving TP size (1: in order)


class Part(NamedTuple):
    """One stored piece of a model tensor: a key, and its indices on the key's stacked leading axes."""

    key: str
    index: tuple[int, ...]  # (layer,), (layer, expert) or (expert,) on a stacked key; () for a key of its own
    shape: tuple[int, ...]  # the piece's shape (the key's, without the stacked axes)


class Weight(NamedTuple):
    """A model tensor (weight, bias, norm, any parameter) in state_dict form and where its bytes are: one
    part, or SwiGLU's gate and up halves, concatenated along dim 0."""

    name: str  # global state_dict name
    parts: tuple[Part, ...]
    shape: tuple[int, ...]  # state_dict shape
    dtype: str


_FLOATS = {"float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2"}
_OPTIMIZER = re.compile(r"^(?:(?:model|module)\.)*optimizer\.")
_EXPERT_AXIS = re.compile(r"\.experts\.(?=linear_fc[0-9]+\.(?:weight|bias)(?:_[wv])?$)")
_HALF = re.compile(r"(?<=\.linear_fc1)\.(weight|bias)_([wv])$")


def is_optimizer(key: str) -> bool:
    """Optimizer state (Megatron's ``optimizer.state.exp_avg.<param>``, ``optimizer.distributed...``)."""
    return key.startswith("optimizer.") or _OPTIMIZER.match(key) is not None


def _is_model_tensor(entry: Entry) -> bool:
    return entry.dtype is not None and not is_optimizer(entry.key)


def model_weights(entries: dict[str, Entry], num_layers: int) -> list[Weight]:
    """Every tensor of the model that is not quantizer state, in state_dict form, from ``.metadata`` alone:
    stacked keys cut into one name per layer (and per expert, on a second stacked axis), SwiGLU halves
    joined, ``experts.experts`` renamed. Refused with the key named: a non-float weight, halves of
    different shapes or one half alone, a stacked key whose leading axis is not ``num_layers`` long."""
    prefix = prefix_of(entries, among=_is_model_tensor)
    halves: dict[str, dict[str, Part]] = {}
    out: dict[str, Weight] = {}
    for key, entry in entries.items():
        if not _is_model_tensor(entry) or is_quantizer(entry):
            continue
        if entry.dtype not in _FLOATS:
            raise TorchDistError(f"{key}: a model tensor of dtype {entry.dtype}; quantmap moves floating-point "
                                 f"weights only (is this key the model's, or a counter saved beside it?)")
        for name, part in _parts(key, _state_name(key, prefix), entry, num_layers):
            half = _HALF.search(name)
            if half:
                halves.setdefault(name[:half.start()] + "." + half.group(1), {})[half.group(2)] = part
            else:
                out[name] = Weight(name, (part,), part.shape, entry.dtype)
    for name, pair in halves.items():
        if set(pair) != {"w", "v"}:
            present = "".join(pair)
            raise TorchDistError(f"{pair[present].key}: a SwiGLU half without its {'v' if present == 'w' else 'w'} "
                                 f"half; the checkpoint is incomplete")
        gate, up = pair["w"], pair["v"]
        if gate.shape != up.shape:
            raise TorchDistError(f"{gate.key} and {up.key}: SwiGLU halves of shapes {list(gate.shape)} and "
                                 f"{list(up.shape)}; gate and up must have the same shape")
        out[name] = Weight(name, (gate, up), (gate.shape[0] * 2, *gate.shape[1:]) if gate.shape else (),
                           entries[gate.key].dtype)
    return list(out.values())


def _parts(key: str, name: str, entry: Entry, num_layers: int):
    """(state_dict name, part) for each layer and expert a key holds on its stacked leading axes."""
    shape, layers = entry.shape, [None]
    if _is_stacked(entry):
        if shape[0] != num_layers:
            raise TorchDistError(f"{key}: a stacked-layers key of {shape[0]} layers (its leading axis), but the "
                                 f"checkpoint has {num_layers} layers; the .metadata is damaged or mixes models")
        layers, shape = range(num_layers), shape[1:]
    experts = [None]
    if _EXPERT_AXIS.search(name):  # SequentialMLP or grouped experts stacked on an axis of their own
        if not shape:
            raise TorchDistError(f"{key}: experts stacked on a leading axis, but its shape is {list(entry.shape)}")
        experts, shape = range(shape[0]), shape[1:]
    for layer in layers:
        named = name if layer is None else _STACKED.sub(f"decoder.layers.{layer}.", name, count=1)
        for expert in experts:
            index = tuple(i for i in (layer, expert) if i is not None)
            yield (named if expert is None else _EXPERT_AXIS.sub(f".experts.local_experts.{expert}.", named, count=1),
                   Part(key, index, shape))


def not_quantizer_state(entries: dict[str, Entry], weights: bool = False) -> tuple[int, int]:
    """What an export of the checkpoint leaves out: (tensors that are not quantizer state, such as
    weights and norms, or with ``weights`` read too, the optimizer's; entries that hold no tensor, such as
    ``_extra_state`` and ``rng_state``)."""
    tensors = sum(entry.dtype is not None and not is_quantizer(entry) and (not weights or is_optimizer(key))
                  for key, entry in entries.items())
    return tensors, sum(entry.dtype is None for entry in entries.values())


def prefix_of(entries: dict[str, Entry], among=is_quantizer) -> str:
    """The NeMo-style wrapper prefix (``model.``, ``module.``) the checkpoint's quantizer keys (or the
    entries ``among`` picks) share."""
    prefixes, known = set(), None
    for key, entry in entries.items():
        if not among(entry):
            continue
        if known is not None and key.startswith(known) and not key.startswith(_WRAPPERS, len(known)):
            continue  # the prefix seen last, checked without a regex
        known = _PREFIX.match(key).group(0)
        prefixes.add(known)
    if len(prefixes) > 1:
        raise TorchDistError(f"the checkpoint's model keys start with different wrapper prefixes "
                             f"({', '.join(repr(p) for p in sorted(prefixes))}); expected one model")
    return prefixes.pop() if prefixes else ""


def state_shape(stored: tuple[int, ...]) -> tuple[int, ...]:
    """``[1]`` → ``[]``; block ``[rows, nblocks]`` → ``[rows * nblocks, 1]``; anything else unchanged."""
    if stored == (1,):
        return ()
    if len(stored) == 2 and stored[1] > 1:
        return (stored[0] * stored[1], 1)
    return stored


def quantizers(entries: dict[str, Entry]) -> list[Quantizer]:
    """Every quantizer buffer of the checkpoint, in state_dict form."""
    with paused_gc():
        return _quantizers(entries)


def _quantizers(entries: dict[str, Entry]) -> list[Quantizer]:
    prefix = prefix_of(entries)
    out = []
    for key, entry in entries.items():
        if not is_quantizer(entry):
            continue
        if _is_stacked(entry):
            stored = entry.shape[1:]
            interleaved = _interleaving(entries, entry, stored, axis=1)
            out += [Quantizer(name, key, layer, state_shape(stored), stored, interleaved)
                    for name, layer in _layer_names(_state_name(key, prefix), entry)]
        else:  # the usual case, kept free of list building: 10⁵ keys pass here
            out.append(Quantizer(_state_name(key, prefix), key, None, state_shape(entry.shape), entry.shape,
                                 _interleaving(entries, entry, entry.shape, axis=0)))
    return out


def state_names(entries: dict[str, Entry]) -> list[str]:
    """The state_dict names of every tensor of the checkpoint (what ``quantmap check`` checks): quantizers,
    and weights with SwiGLU's ``weight_w``/``weight_v`` halves as the one ``weight`` they are in the model."""
    prefix = prefix_of(entries)
    names = []
    for key, entry in entries.items():
        if entry.dtype is None:
            continue
        if _is_stacked(entry):
            names += [name for name, _ in _layer_names(_state_name(key, prefix), entry)]
        else:
            names.append(_state_name(key, prefix))
    return list(dict.fromkeys([name[:-2] if name.endswith(_SWIGLU_HALVES) else name for name in names]))


_SWIGLU_HALVES = (".weight_w", ".weight_v")


def swiglu_weights(entries: dict[str, Entry]) -> set[str]:
    """The state_dict names of the weights the checkpoint saves as SwiGLU halves (``weight_w``, ``weight_v``)."""
    prefix = prefix_of(entries)
    return {_state_name(key, prefix)[:-2] for key, entry in entries.items()
            if key.endswith(".weight_w") and entry.dtype is not None}


def weight_shapes(entries: dict[str, Entry]) -> dict[str, tuple[int, ...]]:
    """The state_dict name and global shape of every weight the checkpoint holds one key per layer for
    (SwiGLU's ``weight_w`` and ``weight_v`` as the one ``weight`` of their summed rows), from ``.metadata``."""
    prefix = prefix_of(entries)
    shapes: dict[str, tuple[int, ...]] = {}
    for key, entry in entries.items():
        if entry.dtype is None or is_quantizer(entry) or not key.endswith(("weight",) + _SWIGLU_HALVES) or \
                _is_stacked(entry):
            continue
        name = _state_name(key, prefix)
        if name.endswith(_SWIGLU_HALVES):
            name, half = name[:-2], entry.shape
            other = shapes.get(name)
            shapes[name] = half if other is None else (other[0] + half[0], *half[1:])
        else:
            shapes[name] = entry.shape
    return shapes


def _is_stacked(entry: Entry) -> bool:
    at = entry.key.find("decoder.layers.")
    if at < 0 or entry.key[at + 15: at + 16].isdigit() or not _STACKED.search(entry.key):
        return False
    if not entry.shape:
        raise TorchDistError(f"{entry.key}: a stacked-layers key (no layer index) must have the layers on a "
                             f"leading axis, but its shape is []")
    _bounded(entry.key, "stacked layer", entry.shape[0], MAX_LAYERS)
    return True


def _state_name(key: str, prefix: str) -> str:
    name = key[len(prefix):] if key.startswith(prefix) else key
    return name.replace(CHECKPOINT_EXPERTS, STATE_EXPERTS)


def _layer_names(name: str, entry: Entry) -> list[tuple[str, int]]:
    """A stacked key's name for each layer on its leading axis."""
    return [(_STACKED.sub(f"decoder.layers.{layer}.", name, count=1), layer) for layer in range(entry.shape[0])]


def _interleaving(entries: dict[str, Entry], entry: Entry, stored: tuple[int, ...], axis: int) -> int:
    """The saving TP size when ``entry`` is a SwiGLU linear_fc1 weight amax saved TP-interleaved, else 1."""
    found = FC1_WEIGHT_AMAX.search(entry.key) if len(stored) == 2 else None
    if found is None:
        return 1
    splits = sorted({chunk.offsets[axis] for chunk in entry.chunks})
    if len(splits) == 1:
        return 1
    module = entry.key[: found.start()] + ".linear_fc1"
    if f"{module}.weight_w" not in entries:
        if f"{module}.weight" in entries or found.group(1):
            return 1  # not gated (one block of rows, no gate/up halves), or a grouped linear's expert (weight{E})
        raise TorchDistError(f"{entry.key} is saved in {len(splits)} TP pieces, but the checkpoint holds neither "
                             f"{module}.weight_w (SwiGLU) nor {module}.weight, so quantmap cannot tell whether its "
                             f"rows are ModelOpt's interleaved [gate_r; up_r] pieces")
    rows, tp = stored[0], len(splits)
    if rows % (2 * tp) or splits != [rank * rows // tp for rank in range(tp)]:
        raise TorchDistError(f"{entry.key}: {rows} rows saved in pieces starting at {splits}; a SwiGLU linear_fc1 "
                             f"amax saved at TP={tp} has {tp} equal pieces of [gate_r; up_r]")
    return tp


def model_size(entries: dict[str, Entry]) -> tuple[int, int | None]:
    """``(num_layers, num_experts)`` the checkpoint's keys show (``None``: no experts), each within
    :mod:`quantmap.limits`: the layers and experts are enumerated next."""
    layers, experts = 0, None
    for key, entry in entries.items():
        found = _LAYER.search(key)
        if found:
            layers = max(layers, _bounded(key, "layer", _index(found.group(1), "layer", key) + 1, MAX_LAYERS))
        elif _STACKED.search(key) and entry.shape:
            layers = max(layers, entry.shape[0])  # bounded by _is_stacked
        expert = _EXPERT.search(key)
        if expert:
            experts = max(experts or 0, _bounded(key, "expert", _index(expert.group(1) or expert.group(2), "expert", key) + 1,
                                                 MAX_EXPERTS))
        elif ".experts.linear_fc" in key and entry.shape and _EXPERT_AXIS.search(key) and not is_optimizer(key):
            axis = 0 if found else 1  # experts stacked on a leading axis of their own, after the layers' if stacked
            if len(entry.shape) > axis:
                experts = max(experts or 0, _bounded(key, "expert", entry.shape[axis], MAX_EXPERTS))
    if not layers:
        raise TorchDistError("the checkpoint holds no decoder.layers.* key; is it a GPT model's checkpoint?")
    return layers, experts


def _bounded(key: str, what: str, count: int, limit: int) -> int:
    too_big = over(f"the {what} count it implies", count, limit)
    if too_big:
        raise TorchDistError(f".metadata key {key!r:.200}: {too_big}; the .metadata is damaged or not a model's")
    return count


def _index(digits: str, what: str, key: str) -> int:
    index = decimal(digits)
    if index is None:
        shown = key if len(key) <= 200 else f"{key[:100]}...{key[-60:]} ({len(key)} characters)"
        raise TorchDistError(f"the .metadata key {shown} has a {what} index of {len(digits)} digits, beyond any "
                             f"model (at most {MAX_DIGITS}); the .metadata is damaged or not a model's checkpoint")
    return index
