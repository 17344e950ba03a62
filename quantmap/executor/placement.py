"""Where this rank sits: coordinates from PyTorch ``DeviceMesh``es, caller groups, or the rank order.

The default builds two meshes over the same world with ``init_device_mesh`` and named dims,
``("pp", "dp", "cp", "tp")`` for the dense view and ``("pp", "edp", "ep", "etp")`` for the expert
view; row-major mesh order (last dim fastest) is exactly Megatron-Core's ``tp-cp-ep-dp-pp`` order.
A caller that already has Megatron's groups passes them instead, and the coordinates come from
those groups, so a non-default order still exports correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantmap.parallel import Coords, LayoutError, ParallelLayout

DENSE_DIMS = ("pp", "dp", "cp", "tp")
EXPERT_DIMS = ("pp", "edp", "ep", "etp")


@dataclass(frozen=True)
class Placement:
    """A rank's coordinates plus the group that spans the layout (``None``: one process plays every rank)."""

    layout: ParallelLayout
    coords: Coords
    group: Any = None

    @classmethod
    def offline(cls, layout: ParallelLayout, rank: int) -> "Placement":
        return cls(layout, layout.coords(rank))

    @classmethod
    def from_world(cls, layout: ParallelLayout, device_type: str | None = None) -> "Placement":
        """Build both meshes over the default process group (already initialised by the launcher)."""
        return cls.from_meshes(layout, *device_meshes(layout, device_type))

    @classmethod
    def from_meshes(cls, layout: ParallelLayout, dense, expert) -> "Placement":
        """Coordinates from a dense and an expert ``DeviceMesh`` with the dims named as above."""
        import torch.distributed as dist

        _check_mesh(dense, DENSE_DIMS, (layout.pp, layout.dp, layout.cp, layout.tp), "dense")
        _check_mesh(expert, EXPERT_DIMS, (layout.pp, layout.edp, layout.ep, layout.etp), "expert")
        local = {name: dense.get_local_rank(name) for name in DENSE_DIMS}
        local.update({name: expert.get_local_rank(name) for name in EXPERT_DIMS[1:]})
        coords = Coords(dist.get_rank(), **{k: local[k] for k in Coords._fields[1:]})
        return cls(layout, coords)

    @classmethod
    def from_groups(cls, layout: ParallelLayout, *, tp=None, cp=None, dp=None, pp=None, etp=None, ep=None, edp=None,
                    group=None) -> "Placement":
        """Coordinates from a caller's process groups (Megatron's ``parallel_state`` groups); a size-1
        dimension may be left out. ``group`` spans the layout's ranks (default: the world)."""
        import torch.distributed as dist

        given = dict(tp=tp, cp=cp, dp=dp, pp=pp, etp=etp, ep=ep, edp=edp)
        sizes = dict(tp=layout.tp, cp=layout.cp, dp=layout.dp, pp=layout.pp, etp=layout.etp, ep=layout.ep, edp=layout.edp)
        local = {}
        for name, handle in given.items():
            if handle is None:
                if sizes[name] != 1:
                    raise LayoutError(f"the layout has {name}={sizes[name]} but no {name} group was given")
                local[name] = 0
                continue
            if dist.get_world_size(handle) != sizes[name]:
                raise LayoutError(f"the {name} group has {dist.get_world_size(handle)} ranks but the layout says "
                                  f"{name}={sizes[name]}")
            local[name] = dist.get_rank(handle)
        layout.check_world(dist.get_world_size(group))
        return cls(layout, Coords(dist.get_rank(group), **local), group)


def device_meshes(layout: ParallelLayout, device_type: str | None = None) -> tuple[Any, Any]:
    """The dense and the expert ``DeviceMesh`` of ``layout`` over the default process group (already
    initialised by the launcher), with the dims named as above."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    layout.check_world(dist.get_world_size())
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    dense = init_device_mesh(device_type, (layout.pp, layout.dp, layout.cp, layout.tp), mesh_dim_names=DENSE_DIMS)
    expert = init_device_mesh(device_type, (layout.pp, layout.edp, layout.ep, layout.etp), mesh_dim_names=EXPERT_DIMS)
    return dense, expert


def _check_mesh(mesh, names: tuple[str, ...], shape: tuple[int, ...], view: str) -> None:
    if tuple(mesh.mesh_dim_names or ()) != names or tuple(mesh.mesh.shape) != shape:
        raise LayoutError(f"the {view} mesh has dims {mesh.mesh_dim_names} of shape {tuple(mesh.mesh.shape)}; "
                          f"the layout needs {names} of shape {shape}")
