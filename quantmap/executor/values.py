"""Quantizer values that cannot be right, and data-parallel replicas that should be equal.

A NaN, an infinity or a negative amax would quantize every value of its tensor to garbage (and a
NaN on one tensor-parallel rank would win the ``max`` that combines the copies), and quantizer state
is floating point by construction, so these are refused in both directions, naming the tensor. A
zero amax is what ModelOpt leaves on a quantizer that never saw data ("uncalibrated"): legal, but
worth saying, so it is reported.

Data-parallel (and context-parallel) replicas hold copies of the same state, and only the first
replica's bytes travel. The others send a small *copy digest* per tensor in the metadata (the value
itself for a scalar, a hash otherwise), so the writer can compare them with the first replica's,
as tensor-parallel copies are compared, without another collective or any extra bytes moved.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
from collections.abc import Sequence

import torch

from quantmap.executor.naming import is_expert
from quantmap.executor.rank_meta import RankMeta
from quantmap.executor.report import ExecutorError, distinct
from quantmap.roles import AMAX_ROLES

_LISTED = 8
_BATCHED = 1 << 12  # elements: tensors up to this size are checked together, larger ones one by one


class BadValues(ExecutorError):
    """Quantizer state that must not be moved (NaN, inf, negative amax, a non-float dtype)."""


def check_values(tensors: Sequence[tuple[str, torch.Tensor, str | None]]) -> list[str]:
    """The names whose amax has a zero (uncalibrated); raises :class:`BadValues` listing every bad tensor.
    ``tensors``: each name, value and role (:mod:`quantmap.roles`, from the rule that claimed it): sign
    and zero matter for an amax only, a pre-quant scale is checked for finiteness alone.

    One vectorised pass per dtype and shape for small tensors (10^5 scalars cost one ``stack``, not
    10^5 checks), one reduction each for large ones."""
    check_dtypes([(name, value) for name, value, _ in tensors])
    problems: list[str] = []
    by_kind: dict[tuple, list[tuple[str, torch.Tensor, bool]]] = {}  # (dtype, shape): stacked in one call
    large: list[tuple[str, torch.Tensor, bool]] = []
    for name, value, role in tensors:
        if value.numel() > _BATCHED:
            large.append((name, value, role in AMAX_ROLES))
        else:
            by_kind.setdefault((value.dtype, value.shape), []).append((name, value, role in AMAX_ROLES))
    zero: set[str] = set()
    for (_, shape), group in by_kind.items():
        with torch.no_grad():  # the values may be a live model's parameters
            flat = torch.stack([value for _, value, _ in group]).reshape(-1)
            flat = flat.to(_checked_dtype(flat.dtype))
        amax = torch.tensor([amax for _, _, amax in group]).repeat_interleave(math.prod(shape))
        if not bool(torch.isfinite(flat).all()) or bool(((flat < 0) & amax).any()):
            problems += [problem for name, value, amax in group if (problem := _bad(name, value, amax))]
        if bool(((flat == 0) & amax).any()):
            zero.update(name for name, value, amax in group if amax and bool((value == 0).any()))
    for name, value, amax in large:
        # A block amax can be gigabytes: a min/max reduction allocates nothing and propagates NaN, so
        # it settles finiteness, sign and zero without a copy of the tensor.
        low, high = (float(x) for x in torch.aminmax(value.detach().reshape(-1)))
        if not (math.isfinite(low) and math.isfinite(high)) or (amax and low < 0):
            problems.append(_bad(name, value, amax))
        elif amax and low == 0:
            zero.add(name)
    if problems:
        raise BadValues(_listing(problems))
    return [name for name, _, _ in tensors if name in zero]


def _checked_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype values are checked in: float32 or wider, never narrower than their own (a float64 of
    1e300 cast to float32 would read as an infinity it is not)."""
    return torch.promote_types(dtype, torch.float32)


def check_dtypes(tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Refuse, listing every one, tensors of a dtype quantizer state never has or that quantmap cannot
    compute on (max, finiteness): called before copies are combined, as well as by :func:`check_values`."""
    problems = [problem for name, value in tensors if (problem := _dtype_problem(name, value.dtype))]
    if problems:
        raise BadValues(_listing(problems))


def _dtype_problem(name: str, dtype: torch.dtype) -> str | None:
    shown = str(dtype).removeprefix("torch.")
    if not dtype.is_floating_point:
        return (f"{name}: dtype {shown} is not a floating-point type; quantizer state is float (was it written "
                f"by another tool, or cast?)")
    if dtype.itemsize < 2:  # float8 and smaller: torch has no max, comparison or isfinite for them on CPU
        return (f"{name}: dtype {shown} is an 8-bit float, which quantmap does not move (torch can neither check "
                f"it nor take the max of its copies); cast the tensor to float32")
    return None


def _bad(name: str, value: torch.Tensor, amax: bool) -> str | None:
    value = value.detach().to(_checked_dtype(value.dtype))
    for what, mask in (("NaN", torch.isnan(value)), ("infinite", torch.isinf(value)),
                       ("negative", (value < 0) if amax else None)):
        if mask is not None and bool(mask.any()):
            return (f"{name} holds {int(mask.sum())} {what} value(s) of {value.numel()}; an amax must be a finite "
                    f"number >= 0: recalibrate, or fix the tool that wrote it")
    return None


def converted(name: str, value: torch.Tensor, dtype: torch.dtype, *, exact: bool = False) -> torch.Tensor:
    """``value`` in ``dtype`` (the dtype the target checkpoint stores the tensor in); raises :class:`BadValues`
    when the conversion changes what the value means: a finite value that becomes an infinity (overflow), or
    a nonzero one that becomes zero or loses its precision as a subnormal (underflow). An amax of 0 reads as
    "uncalibrated" and an infinite one quantizes everything to zero, so neither may appear silently.
    ``exact`` (a model's weights): any value that changes at all is refused, rounding included, since a
    weight written back must be the weight that was read."""
    out = value.detach().to("cpu", dtype)
    if out.dtype == value.dtype or not dtype.is_floating_point:
        return out
    wide = value.detach().to(_checked_dtype(value.dtype))
    back = out.to(wide.dtype)
    if exact and not torch.equal(back, wide):
        changed = back != wide
        first = wide.reshape(-1)[changed.reshape(-1)][0].item()
        raise BadValues(f"{name}: {int(changed.sum())} of {value.numel()} {_dtype(value)} value(s) change when "
                        f"stored as {_dtype(out)}, the dtype the target checkpoint stores it in (e.g. {first!r} "
                        f"becomes {back.reshape(-1)[changed.reshape(-1)][0].item()!r}); a weight is written back "
                        f"exactly or not at all: cast the HF model to {_dtype(out)} first if that rounding is meant")
    info = torch.finfo(dtype)
    overflow = torch.isinf(back) & torch.isfinite(wide)
    # A value already subnormal in its own dtype may stay subnormal; it must not become zero.
    underflow = (wide != 0) & ((back == 0) | ((back.abs() < info.tiny) & (wide.abs() >= torch.finfo(value.dtype).tiny)))
    target = _dtype(out)
    for what, mask, bound, stored in (("overflows", overflow, f"largest finite {target}: {info.max:.6g}", "inf"),
                                      ("underflows", underflow, f"smallest normal {target}: {info.tiny:.6g}",
                                       "0 or a subnormal")):
        if bool(mask.any()):
            first = wide.reshape(-1)[mask.reshape(-1)][0].item()
            raise BadValues(f"{name}: the {_dtype(value)} value {first:.6g} {what} {target}, the dtype the target "
                            f"checkpoint stores it in ({bound}; {int(mask.sum())} of {value.numel()} value(s) would "
                            f"be stored as {stored}): recalibrate, or fix the tool that wrote it")
    return out


def _listing(problems: list[str]) -> str:
    more = f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
    return "bad quantizer values: " + "; ".join(problems[:_LISTED]) + more


def quiet(values: torch.Tensor, role: str | None) -> bool:
    """Whether :func:`check_values` would find nothing in ``values`` (an expert run's, stacked, of one
    role): floating point, finite and, for an amax, above zero. Only a run that is not quiet is checked
    name by name."""
    if _dtype_problem("", values.dtype):
        return False
    with torch.no_grad():
        return bool(torch.isfinite(values).all()) and (role not in AMAX_ROLES or bool((values > 0).all()))


def copy_digest(value: torch.Tensor):
    """What a replica's copy is compared by: dtype, shape and the value (a scalar) or an 8-byte hash."""
    value = value.detach().cpu().contiguous()
    if value.numel() == 1:
        return scalar_digests(value.reshape(1), tuple(value.shape))[0]
    raw = (ctypes.c_ubyte * (value.numel() * value.element_size())).from_address(value.data_ptr())  # no copy
    return _dtype(value), tuple(value.shape), hashlib.blake2b(raw, digest_size=8).hexdigest()


def scalar_digests(values: torch.Tensor, shape: tuple[int, ...]) -> list[tuple]:
    """The :func:`copy_digest` of each of ``values`` (one-element tensors of ``shape``, stacked)."""
    dtype = _dtype(values)
    return [(dtype, shape, value) for value in values.detach().cpu().tolist()]


def replica_disagreements(metas: Sequence[RankMeta]) -> list[str]:
    """Tensors a data-parallel replica holds differently from the first replica (the copy exported),
    from every rank's ``copies`` (name -> :func:`copy_digest`), one note per tensor."""
    first: dict[tuple, int] = {}
    for rank, meta in enumerate(metas):
        for view in ("dense", "expert"):
            if _replica(meta.coords, view) == 0:
                first[_position(meta.coords, view)] = rank
    notes: dict[str, str] = {}
    for rank, meta in enumerate(metas):
        for name, digest in meta.copies.items():
            view = "expert" if is_expert(name) else "dense"
            if _replica(meta.coords, view) == 0:
                continue
            owner = first[_position(meta.coords, view)]
            theirs = metas[owner].copies.get(name)
            if theirs == digest or name in notes:
                continue
            if theirs is None:
                notes[name] = f"{name}: rank {rank} (a data-parallel replica) holds it but rank {owner} does not"
            else:
                notes[name] = (f"{name}: data-parallel replicas differ ({_shown((owner, theirs), (rank, digest))}); "
                               f"exported rank {owner}'s copy")
    return [notes[name] for name in sorted(notes)]


def replicated(layout, expert: bool) -> bool:
    """Whether this rank's view (dense or expert) has replicas to compare, so digests are worth making."""
    return layout.edp > 1 if expert else layout.dp * layout.cp > 1


def owns(coords, expert: bool) -> bool:
    """The first replica of its view: the rank whose copy is exported."""
    return _replica(coords, "expert" if expert else "dense") == 0


def _replica(coords, view: str) -> int:
    return coords.edp if view == "expert" else coords.dp + coords.cp


def _position(coords, view: str) -> tuple:
    return (coords.pp, coords.ep, coords.etp) if view == "expert" else (coords.pp, coords.tp)


def _dtype(value: torch.Tensor) -> str:
    return str(value.dtype).removeprefix("torch.")


def _shown(*copies: tuple[int, tuple]) -> str:
    """Each ``(rank, digest)``: a scalar's value, with the digits that tell the copies apart, or a hash."""
    scalars = [digest[2] for _, digest in copies if isinstance(digest[2], float)]
    shown = dict(zip(scalars, distinct(scalars)))
    return ", ".join(f"rank {rank}: {shown[value]}" if isinstance(value, float) else
                     f"rank {rank}: {dtype} {list(shape)} #{value}" for rank, (dtype, shape, value) in copies)
