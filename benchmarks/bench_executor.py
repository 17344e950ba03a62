"""Executor benchmark: a DeepSeek-V3-sized quantizer state exported over 8 gloo ranks.

61 layers (the first 3 dense), 256 routed experts plus shared experts, MLA attention with weight
and input amax on every linear and KV-cache amax, in both Megatron expert layouts (TEGrouped: one
block quantizer per EP rank; SequentialMLP: one quantizer per local expert), at EP=8 and at
PP=2 x EP=4 (31 + 30 layers). Each case runs quantmap's bucketed export and, in the same
processes, a per-tensor baseline shaped like today's peer (Megatron-Bridge): for every tensor an
object gather over the pipeline group to find the owner, a broadcast from it, and, for expert
tensors, an all-gather over the expert group; the writer then saves one safetensors file.

Reported per case: wall time, collective calls per rank, bytes moved (all ranks), the writer's
peak resident-memory growth and the size of what it wrote, and SequentialMLP's time against the
grouped layout's. A second table splits one process's CPU time by phase (pack per rank, plan,
write), offline, to show where SequentialMLP's per-tensor cost goes. The rules are the shipped
deepseek_v3 spec.

    .venv/bin/python benchmarks/bench_executor.py [--layers 61] [--experts 256] [--no-baseline] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

import quantmap
from quantmap.executor import ParallelLayout, Placement, export
from quantmap.executor.placement import device_meshes
from quantmap.executor.launch import spawn
from quantmap.io.hf import write_checkpoint
from quantmap.executor.naming import is_expert, to_global

DENSE_LAYERS = 3
ATTENTION = ("linear_q_down_proj", "linear_kv_down_proj", "linear_q_up_proj", "linear_kv_up_proj", "linear_proj")
BUFFERS = ("weight_quantizer._amax", "input_quantizer._amax")


def cases(layers: int) -> list[tuple[str, dict]]:
    first = (layers + 1) // 2
    return [("EP8", dict(dp=8, ep=8)), ("PP2xEP4", dict(pp=2, dp=4, ep=4, layers_per_stage=[first, layers - first]))]


def local_state(layout: ParallelLayout, rank: int, form: str) -> dict[str, torch.Tensor]:
    """What rank ``rank`` holds under its local names (Megatron's numbering)."""
    coords = layout.coords(rank)
    generator = torch.Generator().manual_seed(rank)
    names = []
    for local in range(layout.stage_layers[coords.pp]):
        prefix = f"decoder.layers.{local}."
        modules = [f"self_attention.{m}" for m in ATTENTION]
        if layout.layer_offset(coords.pp) + local < DENSE_LAYERS:
            modules += ["mlp.linear_fc1", "mlp.linear_fc2"]
        else:
            modules += ["mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"]
            if form == "grouped":
                modules += ["mlp.experts.linear_fc1", "mlp.experts.linear_fc2"]
            else:
                modules += [f"mlp.experts.local_experts.{e}.linear_fc{i}"
                            for e in range(layout.experts_per_rank) for i in (1, 2)]
        names += [prefix + module + "." + buffer for module in modules for buffer in BUFFERS]
        names += [prefix + f"self_attention.core_attention.{kv}_bmm_quantizer._amax" for kv in ("k", "v")]
    values = torch.rand(len(names), generator=generator) + 0.5
    return {name: values[i].clone() for i, name in enumerate(names)}


def _peak_reset() -> int:
    """Reset the resident-set high-water mark (Linux), returning the current resident size."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _timed(run):
    import torch.distributed as dist

    dist.barrier()
    before = _peak_reset()
    start = time.perf_counter()
    calls, moved = run()
    dist.barrier()
    return time.perf_counter() - start, calls, moved, _status("VmHWM") - before


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir())


def quantmap_export(rules, state, placement, out: Path):
    result = export(rules, state, placement, out=out)
    return result.calls, result.bytes


class _Counted:
    """The baseline's collectives, counted the same way as quantmap's."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0

    def object_gather(self, obj, group):
        import torch.distributed as dist

        self.calls += 1
        self.bytes += len(pickle.dumps(obj))
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    def broadcast(self, tensor, src, group):
        import torch.distributed as dist

        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        dist.broadcast(tensor, src, group=group)

    def all_gather(self, tensor, group):
        import torch.distributed as dist

        self.calls += 1
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        self.bytes += tensor.numel() * tensor.element_size() * len(out)
        dist.all_gather(out, tensor, group=group)
        return out


def per_tensor_export(rules, state, placement, out: Path, names_by_stage, meshes):
    """Per tensor: find the owning stage (object gather over PP), broadcast from it, all-gather experts over EP."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    layout, coords = placement.layout, placement.coords
    dense, expert = meshes
    pp_group, ep_group = dense["pp"].get_group(), expert["ep"].get_group()
    counted = _Counted()
    writer = dist.get_rank() == 0
    collected = {}
    for stage, names in enumerate(names_by_stage):
        for local in names:
            owners = counted.object_gather(coords.pp == stage, pp_group)
            tensor = state[local].clone() if coords.pp == stage else torch.empty(())
            counted.broadcast(tensor, dist.get_global_rank(pp_group, owners.index(True)), pp_group)
            copies = counted.all_gather(tensor, ep_group) if is_expert(local) else [tensor]
            if not writer:
                continue
            for ep_rank, copy in enumerate(copies):
                place = coords._replace(pp=stage, ep=ep_rank)
                match = rules.to_hf(to_global(local, layout, place))
                hf = match.hf
                if match.kind == "moe_fanout":
                    per = layout.experts_per_rank
                    hf = match.expert_names(range(ep_rank * per, (ep_rank + 1) * per))
                for name in hf:
                    collected[name] = copy.clone()
    if writer:
        out.mkdir(parents=True)
        save_file(collected, str(out / "model.safetensors"), metadata={"format": "pt"})
    return counted.calls, counted.bytes


def _bench(layers: int, experts: int, label: str, form: str, method: str, scratch: str) -> dict | None:
    """One case in fresh processes, so that the writer's peak memory is this export's alone."""
    import torch.distributed as dist

    from quantmap.io import hf, safetensors_stream  # noqa: F401 - imported before measuring

    rank = dist.get_rank()
    sizes = dict(cases(layers))[label]
    layout = ParallelLayout(num_layers=layers, num_experts=experts, **sizes)
    meshes = device_meshes(layout)
    placement = Placement.from_meshes(layout, *meshes)
    rules = quantmap.compile("deepseek_v3", num_layers=layers, num_experts=experts)
    state = local_state(layout, rank, form)
    if method == "quantmap":
        run = quantmap_export
    else:
        names_by_stage = [list(local_state(layout, _first_rank_of_stage(layout, s), form)) for s in range(layout.pp)]

        def run(rules, state, placement, out):
            return per_tensor_export(rules, state, placement, out, names_by_stage, meshes)

    out = Path(scratch) / f"{label}-{form}-{method}"
    seconds, calls, moved, peak = _timed(lambda: run(rules, state, placement, out))
    totals = [None] * dist.get_world_size()
    dist.all_gather_object(totals, (calls, moved))
    if rank != 0:
        return None
    return dict(case=label, naming=form, method=method, seconds=round(seconds, 3),
                calls_per_rank=max(c for c, _ in totals), bytes_moved=sum(b for _, b in totals),
                writer_peak_bytes=peak, output_bytes=_size(out), tensors=_count(out))


def _first_rank_of_stage(layout: ParallelLayout, stage: int) -> int:
    return next(r for r in range(layout.world_size) if layout.coords(r).pp == stage)


def _count(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            total += len(handle.keys())
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--no-baseline", action="store_true", help="Skip the per-tensor baseline.")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args(argv)
    methods = ["quantmap"] + ([] if args.no_baseline else ["per-tensor"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantmap-bench-") as scratch:
        for label, _ in cases(args.layers):
            for form in ("grouped", "seq"):
                for method in methods:
                    outcomes = spawn(8, _bench, (args.layers, args.experts, label, form, method, scratch),
                                     timeout=timedelta(hours=1))
                    failed = [o for o in outcomes if o[0] != "ok"]
                    if failed:
                        sys.exit(f"benchmark failed: {failed[0][1]}\n{failed[0][2]}")
                    rows.append(outcomes[0][1])
    _print(rows)
    split = [phases(args.layers, args.experts, form) for form in ("grouped", "seq")]
    _print_phases(split)
    text = json.dumps({"runs": rows, "phases": split})
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def phases(layers: int, experts: int, form: str) -> dict:
    """CPU seconds of each export phase in one process (EP=8, one writer): pack (mean per rank), plan, write."""
    from quantmap.executor.export import Export
    from quantmap.executor.pack import pack
    from quantmap.executor.plan import Plan

    layout = ParallelLayout(num_layers=layers, num_experts=experts, dp=8, ep=8)
    rules = quantmap.compile("deepseek_v3", num_layers=layers, num_experts=experts)
    states = [local_state(layout, rank, form) for rank in range(layout.world_size)]
    start = time.process_time()
    packed = [pack(rules, state, Placement.offline(layout, rank)) for rank, state in enumerate(states)]
    pack_seconds = (time.process_time() - start) / len(states)
    start = time.process_time()
    plan = Plan(rules, layout, [p.meta for p in packed])
    plan_seconds = time.process_time() - start
    start = time.process_time()
    with tempfile.TemporaryDirectory(prefix="quantmap-bench-") as scratch:
        write_checkpoint(Path(scratch), Export(plan, {rank: p.buffer for rank, p in enumerate(packed)}).records(),
                         5 * 2**30)
    return dict(naming=form, tensors_per_rank=len(states[0]), records=len(plan.items), pack_per_rank=round(pack_seconds, 3),
                plan=round(plan_seconds, 3), write=round(time.process_time() - start, 3))


def _print_phases(split: list[dict]) -> None:
    head = f"{'naming':<8} {'tensors/rank':>12} {'records':>8} {'pack/rank s':>11} {'plan s':>7} {'write s':>7}"
    print(head)
    print("-" * len(head))
    for row in split:
        print(f"{row['naming']:<8} {row['tensors_per_rank']:>12} {row['records']:>8} {row['pack_per_rank']:>11.3f} "
              f"{row['plan']:>7.3f} {row['write']:>7.3f}")


def _print(rows: list[dict]) -> None:
    head = f"{'case':<8} {'naming':<8} {'method':<10} {'seconds':>9} {'calls/rank':>10} {'MB moved':>9} " \
           f"{'writer peak MB':>14} {'output MB':>9} {'peak/out':>8} {'tensors':>8} {'speed-up':>8}"
    print(head)
    print("-" * len(head))
    ours = {(r["case"], r["naming"]): r for r in rows if r["method"] == "quantmap"}
    for row in rows:
        mine = ours[(row["case"], row["naming"])]
        speedup = f"{row['seconds'] / mine['seconds']:.1f}x" if row["method"] != "quantmap" else ""
        if row["method"] == "quantmap" and row["naming"] == "seq":  # the per-tensor overhead, against grouped
            speedup = f"{row['seconds'] / ours[(row['case'], 'grouped')]['seconds']:.1f}x gr"
        print(f"{row['case']:<8} {row['naming']:<8} {row['method']:<10} {row['seconds']:>9.3f} {row['calls_per_rank']:>10} "
              f"{row['bytes_moved'] / 1e6:>9.2f} {row['writer_peak_bytes'] / 1e6:>14.2f} {row['output_bytes'] / 1e6:>9.2f} "
              f"{row['writer_peak_bytes'] / row['output_bytes']:>8.2f} {row['tensors']:>8} {speedup:>8}")


if __name__ == "__main__":
    main()
