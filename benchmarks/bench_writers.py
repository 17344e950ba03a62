"""Multi-writer benchmark: a per-block quantizer state of about 2 GB exported over 8 gloo ranks.

PP=4 x TP=2 with the shipped deepseek_v3 rules: every layer's MLA up-projections
(``linear_q_up_proj``, ``linear_kv_up_proj``, column-parallel 1:1) carry a static block amax
(INT4 AWQ-style, flattened ``[rows * blocks, 1]``, split on dim 0 over the TP ranks) plus
per-tensor input amax. The HF files are written by one writer per pipeline stage (or
``--writers N``), each file's entries moved to its writer in one round of transfers.

Reported: wall time, collective calls per rank, and per writer the files and bytes it wrote and its
peak resident-memory growth during the export (``VmHWM`` after resetting it, minus the resident size
before), against the largest file it wrote (the bound is 2x). Keep ``--gb`` modest on a shared
machine: each rank holds its own slice once (the state) and the writers one file's inputs.

    .venv/bin/python benchmarks/bench_writers.py [--gb 2] [--shard-mb 256] [--writers 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

import quantmap
from quantmap.executor import ParallelLayout, Placement, RunOptions, export
from quantmap.executor.launch import spawn
from quantmap.executor.writers import writer_ranks
from quantmap.io.hf import INDEX

sys.path.insert(0, str(Path(__file__).parent))
from bench_executor import _peak_reset, _status  # noqa: E402 - the same resident-memory measure

SIZES = dict(pp=4, tp=2)
LAYERS = 32
BLOCKED = ("linear_q_up_proj", "linear_kv_up_proj")


def local_state(layout: ParallelLayout, rank: int, rows: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s slice: per layer of its stage, each up-projection's block amax (``rows`` values
    over the TP group) and input amax."""
    coords = layout.coords(rank)
    generator = torch.Generator().manual_seed(rank)
    state = {}
    for local in range(layout.stage_layers[coords.pp]):
        prefix = f"decoder.layers.{local}.self_attention."
        for module in BLOCKED:
            state[prefix + module + ".weight_quantizer._amax"] = torch.rand((rows // layout.tp, 1), generator=generator)
            state[prefix + module + ".input_quantizer._amax"] = torch.tensor(1.0)
    return state


def _bench(rows: int, shard_size: int, writers: int, out: str) -> dict:
    import torch.distributed as dist

    rank = dist.get_rank()
    layout = ParallelLayout(num_layers=LAYERS, **SIZES)
    placement = Placement.from_world(layout)
    rules = quantmap.compile("deepseek_v3", num_layers=LAYERS, num_experts=8)
    state = local_state(layout, rank, rows)
    dist.barrier()
    before = _peak_reset()
    start = time.perf_counter()
    result = export(rules, state, placement, out=out, writers=writers, options=RunOptions(shard_size=shard_size))
    dist.barrier()
    seconds = time.perf_counter() - start
    return dict(rank=rank, seconds=seconds, calls=result.calls, peak=_status("VmHWM") - before,
                state_bytes=sum(t.numel() * t.element_size() for t in state.values()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="Total block-amax state (GB, 1e9 bytes).")
    parser.add_argument("--shard-mb", type=int, default=256, help="HF shard size (MiB).")
    parser.add_argument("--writers", type=int, default=SIZES["pp"])
    parser.add_argument("--json", type=Path, help="Also write the result here.")
    args = parser.parse_args(argv)
    rows = int(args.gb * 1e9 / 4 / (LAYERS * len(BLOCKED))) // SIZES["tp"] * SIZES["tp"]
    world = SIZES["pp"] * SIZES["tp"]
    with tempfile.TemporaryDirectory(prefix="quantmap-bench-writers-") as scratch:
        out = Path(scratch) / "hf"
        outcomes = spawn(world, _bench, (rows, args.shard_mb * 2**20, args.writers, str(out)),
                         timeout=timedelta(minutes=30))
        failed = [o for o in outcomes if o[0] != "ok"]
        if failed:
            sys.exit(f"benchmark failed: {failed[0][1]}\n{failed[0][2]}")
        ranks = [o[1] for o in outcomes]
        files = sorted(out.glob("model-*.safetensors"))
        sizes = [f.stat().st_size for f in files]
        index_bytes = (out / INDEX).stat().st_size
    spread = writer_ranks(world, args.writers)
    rows_out = []
    for position, rank in enumerate(spread):
        mine = [sizes[s] for s in range(len(sizes)) if spread[s % len(spread)] == rank]
        rows_out.append(dict(rank=rank, files=len(mine), bytes_written=sum(mine), largest_file=max(mine, default=0),
                             peak_bytes=ranks[rank]["peak"], state_bytes=ranks[rank]["state_bytes"]))
    summary = dict(layout="PP4xTP2", ranks=world, state_bytes=sum(r["state_bytes"] for r in ranks),
                   seconds=round(max(r["seconds"] for r in ranks), 3), calls_per_rank=max(r["calls"] for r in ranks),
                   files=len(sizes), largest_file=max(sizes), index_bytes=index_bytes,
                   non_writer_peak_bytes=max((r["peak"] for r in ranks if r["rank"] not in spread), default=0),
                   writers=rows_out)
    _print(summary)
    line = json.dumps(summary)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


def _print(s: dict) -> None:
    print(f"{s['layout']} over {s['ranks']} gloo ranks: {s['state_bytes'] / 1e9:.2f} GB of block amax, "
          f"{s['files']} files (largest {s['largest_file'] / 2**20:.0f} MiB), {s['seconds']:.2f} s, "
          f"{s['calls_per_rank']} calls/rank; non-writer peak growth {s['non_writer_peak_bytes'] / 2**20:.0f} MiB")
    head = f"{'writer rank':>11} {'files':>5} {'MiB written':>11} {'largest MiB':>11} {'peak MiB':>9} {'peak/largest':>12}"
    print(head)
    print("-" * len(head))
    for w in s["writers"]:
        ratio = w["peak_bytes"] / w["largest_file"] if w["largest_file"] else 0.0
        print(f"{w['rank']:>11} {w['files']:>5} {w['bytes_written'] / 2**20:>11.0f} {w['largest_file'] / 2**20:>11.0f} "
              f"{w['peak_bytes'] / 2**20:>9.0f} {ratio:>12.2f}")


if __name__ == "__main__":
    main()
