"""Where each element of a shaped quantizer tensor goes: a rule's layout, derived from its mapping.

Per-tensor amax is a scalar: identical on every tensor-parallel rank and copied to every HF name,
so it needs no layout. Every other tensor follows a dimension of its weight, and which one decides
where its elements go (facts from Megatron-Core 0.16 + ModelOpt 0.47, ``tests/data/megatron``):

* the **weight side** (``weight_quantizer._amax``: per-channel ``[out, 1]``, or per-block flattened
  ``[out * blocks, 1]``) follows the weight's output rows. A column-parallel layer splits the rows
  over TP ranks (SwiGLU ``linear_fc1`` rank ``r`` holds ``[gate_r; up_r]``, i.e. the split happens
  inside each of the two halves); a row-parallel layer keeps every row, so a per-channel amax is
  whole on every rank and a block amax is split by blocks within each row. A fused group cuts the
  rows into its parts (the QKV interleave, the gate/up halves).
* the **input side** (``input_quantizer._pre_quant_scale``, ``[in]``) follows the weight's input
  columns: whole on every rank of a column-parallel layer (AWQ searches it per rank, so copies may
  differ and are reported), split on dim 0 over the ranks of a row-parallel one, and the same for
  every part of a fused group (q, k and v read the same input).

A :class:`ElementLayout` says both things: ``tp`` (how the full Megatron tensor lies over TP ranks) and
``ops`` (the :mod:`quantmap.ops` pipeline from the full Megatron tensor to one tensor per HF name).
Export gathers the ranks, then runs ``ops``; import runs the inverse pipeline, then cuts the rank's
piece. Where the mapping does not say enough, the part is ``None`` with a ``reason``, and the
executor refuses the tensor instead of guessing.

A weight's layout also says what its mapping declares about the HF tensor's elements (facts from
transformers 5.x, whose ``use_experts_implementation`` flags the same two things, ``is_concatenated``
and ``is_transposed``):

* a fused-experts HF tensor (``fused_experts``) stacks every expert on its dim 0, so the pipeline
  starts with a ``stack`` of the E experts' full Megatron tensors and cuts each expert's rows on dim 1;
* ``hf_layout: [interleaved]``: the parts of ``hf_parts`` alternate row by row (gpt-oss
  ``gate_up_proj``: even rows gate, odd rows up), a strided ``concat`` instead of a contiguous one;
* ``hf_layout: [transposed]``: the HF tensor is ``[in, out]`` (``x @ W``), Megatron's ``[out, in]``
  swapped, a ``transpose`` last.

How ModelOpt lays out a non-scalar quantizer of an interleaved or transposed HF tensor is not
known, so those are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantmap.ops import STRIDED, Concat, Copy, Each, Max, Offset, Op, OpError, Select, Split, Stack, Transpose, reverse
from quantmap.spec.hf_config import config_hint

REPLICATED, SPLIT, ROWS = "replicated", "split", "rows"
#: What a mapping's ``hf_layout`` may say about the HF tensor (see the module docstring).
INTERLEAVED, TRANSPOSED, ZERO_CENTERED = "interleaved", "transposed", "zero_centered"

#: The parts of a fused group, in Megatron's order, for the kinds whose cut is known.
GROUP_PARTS = {"qkv": ("q", "k", "v"), "gated_mlp": ("gate", "up")}

#: Gated DeltaNet (Megatron-Core 0.16 ssm/gated_delta_net.py, GatedDeltaNet): in_proj's output rows are
#: ``[q; k; v; z; b; a]`` (``in_proj_dim = 2 * qk_dim + 2 * v_dim + 2 * num_value_heads``) and conv1d's
#: channels ``[q; k; v]``, and each component is split over the TP ranks on its own: rank ``r`` holds
#: ``[q_r; k_r; v_r; z_r; b_r; a_r]`` (its forward cuts the rank's rows by ``qk_dim // tp``, ...;
#: ``sharded_state_dict`` saves each component as a key of its own). The kinds name those two tensors.
GDN_IN_PROJ, GDN_CONV1D = "gdn_in_proj", "gdn_conv1d"
#: The spec parameters their rows need (HF config.json keys of the same names).
GDN_SIZES = ("linear_num_key_heads", "linear_key_head_dim", "linear_num_value_heads", "linear_value_head_dim")
#: How HF holds in_proj's rows, by the mapping's parts: Qwen3.5's four tensors, ``[q; k; v]`` whole then z,
#: b, a; Qwen3-Next's two, per key head ``g``: ``[q_g k_g v_g z_g]`` and ``[b_g a_g]`` (transformers
#: ``fix_query_key_value_ordering``; Megatron-Bridge ``merge_gdn_linear_weights``).
GDN_FLAT, GDN_PER_KEY_HEAD = ("qkv", "z", "b", "a"), ("qkvz", "ba")


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """How the full Megatron tensor lies over ``n`` tensor-parallel ranks.

    ``replicated``: every rank holds all of it. ``split``: rank ``r`` holds the ``r``-th piece of
    dim ``dim`` within each of ``groups`` equal groups. ``rows``: a row-parallel weight quantizer,
    whose per-channel amax (``rows`` long) is whole on every rank and whose block amax is split by
    blocks within each of the ``rows`` rows; ``block_size`` (0: per-channel) settles the one shape
    that fits both, a rank holding exactly one block per row. ``sections`` (with ``split``): the full
    tensor is contiguous components of these sizes (in rows), each split over the ranks on its own, so
    rank ``r`` holds the ``r``-th slice of every component (Gated DeltaNet's in_proj and conv1d).
    """

    mode: str
    dim: int = 0
    groups: int = 1
    rows: int | None = None
    block_size: int | None = None
    sections: tuple[int, ...] | None = None

    def gather(self, n: int, shape: tuple[int, ...]) -> tuple[Op, ...]:
        """The ops that turn the ``n`` ranks' tensors (each of ``shape``) into the full tensor."""
        if n == 1:
            return ()
        if self.mode == REPLICATED:
            return (Max(n),)
        if self.mode == SPLIT:
            return self._sectioned(n) if self.sections else (Concat(self.dim, (1,) * n, self.groups),)
        per_rank = self._blocks_per_row(shape[0], "each rank's")
        if per_rank == 1 and self.block_size is None:
            raise OpError(f"on a row-parallel layer, {self.rows} rows x 1 per rank is either a per-channel amax (whole "
                          f"on every rank) or a block amax with one block per rank; pass --param weight_block_size=N "
                          f"(0 for per-channel) to say which")
        if per_rank == 1 and self.block_size == 0:
            return (Max(n),)
        return (Concat(0, (1,) * n, self.rows),)

    def scatter(self, n: int, shape: tuple[int, ...]) -> tuple[Op, ...] | None:
        """The ops that cut the full tensor (of ``shape``) into the ``n`` ranks' pieces; ``None``: every
        rank takes the whole tensor."""
        if n == 1 or self.mode == REPLICATED:
            return None
        if self.mode == SPLIT:
            return reverse(self._sectioned(n)) if self.sections else (Split(self.dim, (1,) * n, self.groups),)
        # A full per-channel amax is exactly `rows` long, and a block amax split over n ranks has at
        # least n blocks per row: the full tensor's shape alone tells them apart.
        if self._blocks_per_row(shape[0], "the") == 1:
            return None
        return (Split(0, (1,) * n, self.rows),)

    def _sectioned(self, n: int) -> tuple[Op, ...]:
        """Gather of ``sections``: each rank's tensor cut into its slices of the components, the slices
        put in component order, each component's ``n`` slices joined, then the components."""
        uneven = [size for size in self.sections if size % n]
        if uneven:
            raise OpError(f"the components of {list(self.sections)} rows do not split evenly over {n} tensor-parallel "
                          f"ranks ({uneven[0]} rows)")
        count = len(self.sections)
        return (Each((Split(self.dim, tuple(size // n for size in self.sections)),) * n),
                Select(tuple(rank * count + part for part in range(count) for rank in range(n))),
                Each((Concat(self.dim, (1,) * n),) * count),
                Concat(self.dim, self.sections))

    def _blocks_per_row(self, length: int, whose: str) -> int:
        if not self.rows:
            raise OpError("a row-parallel weight quantizer's rows are the layer's output features: pass "
                          f"--param hidden_size=N, or {config_hint('hidden_size')}")
        if length % self.rows:
            raise OpError(f"{whose} tensor has {length} elements on dim 0, not a multiple of hidden_size={self.rows}")
        # A per-channel amax has one element per row: any other length means hidden_size is wrong,
        # and reading the extra rows as blocks would put them in the wrong places.
        if self.block_size == 0 and length != self.rows:
            raise OpError(f"a per-channel amax (weight_block_size=0) of a row-parallel layer has hidden_size="
                          f"{self.rows} rows, but {whose} tensor has {length}; check --param hidden_size (or "
                          f"--config), or pass weight_block_size=N if the amax is per block")
        return length // self.rows

    def to_json(self) -> dict:
        out: dict = {"mode": self.mode}
        if self.mode == SPLIT:
            out.update(dim=self.dim, groups=self.groups)
            if self.sections:
                out.update(sections=list(self.sections))
        elif self.mode == ROWS:
            out.update(rows=self.rows, block_size=self.block_size)
        return out


@dataclass(frozen=True, slots=True)
class ElementLayout:
    """A rule's shaped layout: ``tp`` and ``ops`` (``None`` where unknown, with the ``reason``).

    For the weight of a fused-experts tensor, ``tp`` is how each expert's Megatron tensor lies over
    the (expert) tensor-parallel ranks and ``ops`` take the E experts' full tensors, in expert order.
    """

    tp: TensorParallel | None
    ops: tuple[Op, ...] | None
    reason: str | None = None
    #: A weight whose cut takes sizes from the spec's parameters: its full Megatron tensor's rows (dim 0)
    #: as they give them, and which values gave them. The cut is in proportions, so a wrong size could
    #: still cut cleanly, into the wrong pieces: the executor checks the rows first (:meth:`check_rows`).
    #: Such a layout splits its rows over the TP ranks and keeps them on dim 0 (the HF parts hold them
    #: between them).
    rows: int | None = None
    rows_from: str | None = None

    def check_rows(self, shape: tuple[int, ...]) -> None:
        """Refuse a full Megatron tensor whose rows are not the ones the spec's sizes give."""
        if self.rows is not None and shape and shape[0] != self.rows:
            raise OpError(f"{self.rows_from} give {self.rows} rows, but the tensor has {shape[0]} (shape "
                          f"{list(shape)}): pass the model's sizes with --param (or --config)")

    def to_json(self) -> dict:
        out = {"tp": None if self.tp is None else self.tp.to_json(),
               "ops": None if self.ops is None else [op.to_json() for op in self.ops],
               "reason": self.reason}
        if self.rows is not None:
            out.update(rows=self.rows)
        return out


def derive(buffer: str | None, parallel: str | None, kind: str, parts: tuple[str, ...],
           hf_parts: tuple[str, ...] | None, params: dict, hf_layout: tuple[str, ...] = (),
           experts: int | None = None, quantized: tuple[str, ...] | None = None) -> ElementLayout:
    """The layout of a weight (``buffer`` None) or of one of its quantizer buffers.

    ``kind`` and ``parts`` describe the Megatron weight (a fused group's parts in Megatron's order),
    ``hf_parts`` the order of the parts inside one fused HF tensor (Phi-3's ``qkv_proj``), if any, and
    ``hf_layout`` how that tensor's elements lie otherwise (:data:`INTERLEAVED`, :data:`TRANSPOSED`). ``experts``, for the
    weight of a fused-experts tensor only, is how many experts its dim 0 stacks (0: unknown). ``quantized``,
    for a quantizer of a group only some of whose HF parts are quantized, names those parts.
    ``params`` are the spec's bound run-time parameters (``num_attention_heads``, ``num_query_groups``,
    ``head_dim``, ``hidden_size``, ``weight_block_size``, the Gated DeltaNet sizes :data:`GDN_SIZES`;
    missing or 0 means unknown; ``attention_output_gate``: 1 for gated attention's QKV rows).
    """
    if buffer is None:
        side = "weight"
    elif buffer.startswith("weight_quantizer."):
        side = "rows"
    elif buffer == "input_quantizer._pre_quant_scale":
        side = "input"
    else:
        return ElementLayout(None, None, f"{buffer} is per-tensor; a non-scalar one has no known layout")
    if side == "weight" and kind in (GDN_IN_PROJ, GDN_CONV1D) and parallel == "column":
        return _gated_delta_net(kind, parts, params)
    tp, tp_reason = _tensor_parallel(side, parallel, kind, params)
    if side != "weight" and quantized is not None:
        ops, ops_reason = _partly_quantized(side, parts, quantized)
    elif side != "weight" and hf_layout:
        ops, ops_reason = None, (f"the HF tensor is declared {' and '.join(hf_layout)}; where ModelOpt puts the "
                                 f"elements of a non-scalar quantizer of it is not known")
    else:
        rows = 0 if experts is None else 1  # a fused-experts tensor's rows follow its expert axis
        ops, ops_reason = _ops(side, kind, parts, hf_parts, params, rows, INTERLEAVED in hf_layout)
        if ops is not None:
            ops, ops_reason = _hf_tensor(ops, rows, TRANSPOSED in hf_layout, experts)
        if ops is not None and ZERO_CENTERED in hf_layout:
            ops += (Offset(1.0),)  # HF's weight is Megatron's zero-centred one plus 1
    return ElementLayout(tp, ops, "; ".join(r for r in (tp_reason, ops_reason) if r) or None)


def _tensor_parallel(side: str, parallel: str | None, kind: str, params: dict):
    if parallel == "replicated":
        return TensorParallel(REPLICATED), None
    if parallel is None:
        return None, ("the mapping does not declare 'parallel', so the tensor-parallel split is unknown; declare it in "
                      "the spec, as Megatron splits this tensor (parallel: column for output rows, e.g. a "
                      "vocab-parallel embedding; row for input columns; replicated for a whole copy on every rank)")
    column = parallel == "column"
    if side == "input":
        return (TensorParallel(REPLICATED) if column else TensorParallel(SPLIT, 0)), None
    if column:
        # Each rank holds its slice of every part that Megatron splits separately: [gate_r; up_r].
        return TensorParallel(SPLIT, 0, 2 if kind == "gated_mlp" else 1), None
    if side == "weight":
        return TensorParallel(SPLIT, 1), None
    return TensorParallel(ROWS, rows=params.get("hidden_size") or None,
                          block_size=params.get("weight_block_size")), None


def _gated_delta_net(kind: str, parts: tuple[str, ...], params: dict) -> ElementLayout:
    """The weight of a Gated DeltaNet in_proj or conv1d (see :data:`GDN_IN_PROJ`): its rows are components
    sized by the spec's GDN parameters, each split over the TP ranks on its own. (Its quantizers follow
    the ordinary rules: a scalar is copied, a non-scalar one of in_proj is refused, see
    :func:`_partly_quantized`.)"""
    sizes = {name: params.get(name) or 0 for name in GDN_SIZES}
    if not all(sizes.values()):
        return ElementLayout(None, None, (
            f"Gated DeltaNet's {kind} rows need the spec parameters {', '.join(GDN_SIZES)}: pass them with "
            f"--param, or {config_hint(*GDN_SIZES)}"))
    key_heads, key_dim, value_heads, value_dim = sizes.values()
    if value_heads % key_heads:
        return ElementLayout(None, None, (
            f"linear_num_value_heads={value_heads} is not a multiple of linear_num_key_heads={key_heads}, so the "
            f"value heads do not share the key heads evenly; check --param (or --config)"))
    qk, v = key_heads * key_dim, value_heads * value_dim
    sections = (qk, qk, v, v, value_heads, value_heads) if kind == GDN_IN_PROJ else (qk, qk, v)
    tp = TensorParallel(SPLIT, 0, sections=sections)
    given = ", ".join(f"{name}={value}" for name, value in sizes.items())
    if kind == GDN_CONV1D:
        ops = () if parts == ("",) else None
    elif parts == GDN_FLAT:
        ops = (Split(0, (2 * qk + v, v, value_heads, value_heads)),)
    elif parts == GDN_PER_KEY_HEAD:
        per_head = value_heads // key_heads
        ops = (Split(0, sections), Each((Concat(0, (key_dim, key_dim, per_head * value_dim, per_head * value_dim),
                                                key_heads),
                                         Concat(0, (per_head, per_head), key_heads))))
    else:
        ops = None
    if ops is None:
        known = (f"{list(GDN_FLAT)} (Qwen3.5) or {list(GDN_PER_KEY_HEAD)} (Qwen3-Next)" if kind == GDN_IN_PROJ
                 else "one HF name")
        return ElementLayout(tp, None, f"how the HF parts {list(parts)} hold a {kind}'s rows is not known "
                                       f"(known: {known})")
    return ElementLayout(tp, ops, rows=sum(sections), rows_from=given)


def _partly_quantized(side: str, parts: tuple[str, ...], quantized: tuple[str, ...]):
    """A quantizer of a group only some of whose HF parts carry quantizers. The input side is the one
    input every part reads, so each quantized part gets the same tensor. The weight side covers every
    part's rows, and the rows of the unquantized parts have no HF tensor: an export could drop them,
    but an import could not give them back, so a non-scalar one is refused."""
    if side == "input":
        return ((Copy(len(quantized)),) if len(quantized) > 1 else ()), None
    others = [part for part in parts if part not in quantized]
    return None, (f"only the parts {list(quantized)} of the group {list(parts)} carry quantizers on the HF side; "
                  f"a non-scalar weight quantizer also covers the rows of {others}, which no HF tensor holds, "
                  f"so it cannot be cut to the quantized parts and rebuilt on import (a per-tensor amax can)")


def _ops(side: str, kind: str, parts: tuple[str, ...], hf_parts: tuple[str, ...] | None, params: dict, dim: int,
         interleaved: bool):
    if side == "input":
        return ((Copy(len(parts)),) if len(parts) > 1 else ()), None
    if kind == "plain":
        return (), None
    megatron_parts = GROUP_PARTS.get(kind)
    if megatron_parts is None or (hf_parts is None and parts != megatron_parts):
        return None, f"how a {kind!r} group with parts {list(hf_parts or parts)} cuts its rows is not known"
    if kind == "gated_mlp":
        units, cut = (1, 1), Split(dim, (1, 1))
    else:
        heads, groups = params.get("num_attention_heads") or 0, params.get("num_query_groups") or 0
        if not heads or not groups:
            return None, ("the QKV interleave needs the spec parameters num_attention_heads and num_query_groups: "
                          "pass --param num_attention_heads=N --param num_query_groups=N, or "
                          f"{config_hint('num_attention_heads', 'num_query_groups')}")
        if heads % groups:
            return None, (f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}, so the "
                          f"query heads do not share the key/value heads evenly; check --param (or --config)")
        if params.get("attention_output_gate"):
            return _gated_qkv(dim, heads, groups, params.get("head_dim") or 1, hf_parts)
        # Megatron interleaves per query group: heads/groups query heads, then one key and one value head.
        units, cut = (heads, groups, groups), Split(dim, (heads // groups, 1, 1), groups, params.get("head_dim") or 1)
    if hf_parts is None:
        return (cut,), None
    order = tuple(megatron_parts.index(part) for part in hf_parts)
    select = () if order == tuple(range(len(order))) else (Select(order),)
    # Interleaved: one row of each part in turn (the compiler allows it for gate/up, whose parts are equal).
    join = (Concat(dim, (1,) * len(order), STRIDED) if interleaved
            else Concat(dim, tuple(units[i] for i in order), 1, cut.multiple))
    return (cut, *select, join), None


def _gated_qkv(dim: int, heads: int, groups: int, head_dim: int, hf_parts: tuple[str, ...] | None):
    """Gated attention (Megatron-Core ``attention_output_gate``; Qwen3-Next and Qwen3.5's full-attention
    layers): each query group of ``linear_qkv`` is ``[q heads; their gate heads; k; v]``
    (``SelfAttention.get_query_key_value_tensors``), and HF's ``q_proj`` holds each head's query then its
    gate (``[q_h; g_h]`` per head, transformers' ``view(..., head_dim * 2)`` then ``chunk``)."""
    if hf_parts is not None:
        return None, "where one fused HF tensor holds the gate of gated attention is not known"
    per_group = heads // groups
    cut = Split(dim, (per_group, per_group, 1, 1), groups, head_dim)
    return (cut, Each((Concat(dim, (1, 1), heads, head_dim), Select((0, 1))))), None


def _hf_tensor(ops: tuple[Op, ...], dim: int, transposed: bool, experts: int | None):
    """A weight's per-expert ``ops`` (rows on ``dim``) with what the HF tensor adds: the transpose of
    an ``[in, out]`` tensor, and the stack of a fused-experts tensor's experts on dim 0."""
    if transposed:
        ops += (Transpose(dim, dim + 1),)
    if experts is None:
        return ops, None
    if not experts:
        return None, ("the expert axis of a fused-experts tensor needs the number of experts: pass --param "
                      "num_experts=N (or the parameter the mapping's 'experts' names), or "
                      f"{config_hint('num_experts')}")
    return (Stack(0, experts), *ops), None
