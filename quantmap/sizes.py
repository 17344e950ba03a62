"""The spec's size parameters and gating against the shapes a checkpoint really has.

``num_attention_heads``, ``num_query_groups``, ``head_dim`` and ``hidden_size`` decide where the rows of
a shaped quantizer tensor go (:mod:`quantmap.element_layout`): the QKV cut, and a row-parallel layer's rows.
A wrong value does not always fail the cut itself: ``num_attention_heads=6, num_query_groups=1`` cuts
128 QKV rows into 96 + 16 + 16 as readily as the right ``4, 2`` cuts them into 64 + 32 + 32. The
weights' global shapes do contradict it (Megatron-Core's ``SelfAttention``: ``linear_qkv.weight`` is
``[(heads + 2 * groups) * head_dim, hidden]`` and ``linear_proj.weight`` ``[hidden, heads * head_dim]``),
so every size that drives a cut is checked against them before anything is moved.

The same holds for a gated MLP: a spec that maps ``linear_fc1`` as one ungated tensor (``nemotron``) on a
SwiGLU checkpoint would write gate and up together as ``up_proj``, and a gated spec on an ungated one would
cut one tensor in two. Megatron-Core saves a gated ``linear_fc1`` (``gated_linear_unit``) as two halves,
``weight_w`` and ``weight_v`` (``apply_swiglu_sharded_factory``), so a torch_dist checkpoint says which it is.

Torch-free: it reads shapes and names only (``quantmap check`` uses it).
"""

from __future__ import annotations

from quantmap.element_layout import ROWS
from quantmap.ops import Split
from quantmap.rules import WEIGHT

_QKV, _PROJ = "linear_qkv.weight", "linear_proj.weight"


def size_contradiction(rules, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The first contradiction between ``rules.params`` and ``shapes`` (global Megatron weight name → global
    shape), as a sentence naming the parameter, the tensor and both numbers; ``None`` when they agree."""
    params = rules.params
    heads, groups, head_dim = (params.get(p) or 0 for p in ("num_attention_heads", "num_query_groups", "head_dim"))
    gated = bool(params.get("attention_output_gate"))
    for name, shape in shapes.items():
        match = rules.to_hf(name)
        if match is None or match.kind != WEIGHT:
            continue
        layout = match.rule.layout
        if layout is not None and layout.rows is not None and shape and shape[0] != layout.rows:
            return f"{layout.rows_from} give {name} {layout.rows} rows, but it has {shape[0]} (shape {list(shape)}): " \
                   f"pass the model's sizes with --param (or --config)"
        if len(shape) != 2:
            continue
        if heads and groups and _cut_by_heads(match.rule, heads, groups, gated):
            problem = _qkv(name, shape, heads, groups, head_dim, shapes, gated)
            if problem:
                return problem
        quantizer = rules.to_hf(name[: -len("weight")] + "weight_quantizer._amax")
        tp = quantizer.rule.layout.tp if quantizer is not None and quantizer.rule.layout is not None else None
        if tp is not None and tp.mode == ROWS and tp.rows and shape[0] != tp.rows:
            return (f"hidden_size={tp.rows} gives the row-parallel {name} {tp.rows} output rows, but it has "
                    f"{shape[0]} (shape {list(shape)}): pass the model's --param hidden_size (or --config)")
    return None


def _cut_by_heads(rule, heads: int, groups: int, gated: bool) -> bool:
    """Whether the rule's layout starts with the QKV cut these head counts made (:func:`quantmap.element_layout.derive`;
    ``gated``: with each group's gate heads after its query heads)."""
    ops = rule.layout.ops if rule.layout is not None else None
    per_group = (heads // groups,) * (2 if gated else 1)
    return bool(ops) and isinstance(ops[0], Split) and ops[0].units == (*per_group, 1, 1) and \
        ops[0].groups == groups


def _qkv(name: str, shape: tuple[int, ...], heads: int, groups: int, head_dim: int,
         shapes: dict[str, tuple[int, ...]], gated: bool) -> str | None:
    rows, units = shape[0], heads * (2 if gated else 1) + 2 * groups
    given = f"num_attention_heads={heads} and num_query_groups={groups}" + (" with gated attention" if gated else "")
    fix = "pass the model's --param num_attention_heads, num_query_groups and head_dim (or --config)"
    if rows % units:
        return (f"{given} make linear_qkv ({'2 x heads' if gated else 'heads'} + 2 x groups) = {units} heads of rows, "
                f"but {name} has {rows} rows, not a multiple of {units}: {fix}")
    implied = rows // units
    if head_dim and head_dim != implied:
        return (f"{given} with head_dim={head_dim} give {name} {units} x {head_dim} = {units * head_dim} rows, but "
                f"it has {rows}: {fix}")
    proj = name[: -len(_QKV)] + _PROJ if name.endswith(_QKV) else None
    columns = shapes.get(proj, (None, None))[1] if proj else None
    if columns is not None and columns != heads * implied:
        return (f"{given} give {name}'s {rows} rows a head dim of {implied}, so {proj} should have {heads} x "
                f"{implied} = {heads * implied} input columns, but it has {columns}: {fix}")
    return None


def gating_contradiction(rules, name: str, halves: bool) -> str | None:
    """Why the rule for Megatron weight ``name`` contradicts how the checkpoint saves it (``halves``: as
    SwiGLU's ``weight_w`` and ``weight_v``), or ``None`` (agreeing, or a weight no rule cuts either way)."""
    match = rules.to_hf(name)
    if match is None or match.kind != WEIGHT or match.rule.layout is None or match.rule.layout.ops is None:
        return None
    cut = any(isinstance(op, Split) and len(op.units) == 2 for op in match.rule.layout.ops)
    if cut == halves:
        return None
    if halves:
        return (f"the checkpoint saves {name} gated, as SwiGLU halves ({name}_w and {name}_v), but the spec maps "
                f"it as one ungated tensor ({', '.join(match.hf)}), which would hold gate and up together: use a "
                f"spec for a gated MLP (kind: gated_mlp)")
    return (f"the checkpoint saves {name} as one ungated tensor (no {name}_w and {name}_v halves), but the spec "
            f"cuts it into gate and up ({', '.join(match.hf)}): use a spec for an ungated MLP (kind: plain)")
