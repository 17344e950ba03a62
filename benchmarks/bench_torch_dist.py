"""torch_dist benchmark: ``check`` (metadata only) and the export read phase on a ~10⁵-key checkpoint.

Builds a synthetic Megatron ``torch_dist`` checkpoint with ``torch.distributed.checkpoint.save`` (no
megatron needed), keyed the way Megatron-Core + ModelOpt save one: DeepSeek-V3-like, 61 layers (3
dense), SequentialMLP experts under ``experts.experts.{E}``, MLA attention, per-tensor weight and
input amax stored ``[1]``, plus one 1 MiB weight per layer between them so that reads must skip
weight bytes. The default 432 experts give 100,000+ scalar quantizer keys (DeepSeek-V3's 256 give
60,000). Times, on one core (``torch.set_num_threads(1)``):

Each phase is reported as wall and CPU seconds (targets apply to CPU seconds: on a shared machine the
wall time includes waiting for other processes):

* ``check``: ``.metadata`` → the state_dict names quantmap checks (torch-free; target <= 2 s), and
  ``quantmap.check`` of those names against the shipped deepseek_v3 spec;
* ``export read``: what ``quantmap export --megatron`` reads first, the quantizer tensors only in
  state_dict form, from ``.metadata`` on (target <= 3 s), next to plain
  ``torch.distributed.checkpoint.load`` of the same keys, and the whole offline export to HF names.

    .venv/bin/python benchmarks/bench_torch_dist.py [--experts 432] [--dir /tmp/ckpt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYERS, DENSE = 61, 3
ATTENTION = ("linear_q_down_proj", "linear_kv_down_proj", "linear_q_up_proj", "linear_kv_up_proj", "linear_proj")
BUFFERS = ("weight_quantizer._amax", "input_quantizer._amax")


def checkpoint_state(experts: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(LAYERS):
        prefix = f"decoder.layers.{layer}."
        modules = [f"self_attention.{m}" for m in ATTENTION]
        if layer < DENSE:
            modules += ["mlp.linear_fc1", "mlp.linear_fc2"]
        else:
            modules += ["mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"]
            modules += [f"mlp.experts.experts.{e}.linear_fc{i}" for e in range(experts) for i in (1, 2)]
        for module in modules:
            for buffer in BUFFERS:
                state[f"{prefix}{module}.{buffer}"] = torch.rand(1, generator=generator) + 0.5
        state[f"{prefix}self_attention.linear_proj.weight"] = torch.rand(512, 512, generator=generator)
    return state


def build(directory: Path, experts: int) -> int:
    import torch.distributed.checkpoint as dcp

    if (directory / ".metadata").is_file():
        from quantmap.io.torch_dist.metadata import read_entries
        return sum("quantizer" in key for key in read_entries(directory))
    state = checkpoint_state(experts)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(directory, thread_count=4), no_dist=True)
    return sum("quantizer" in key for key in state)


def timed(fn, repeat: int = 3):
    """Best wall time and best CPU time of this process over ``repeat`` runs (on a shared machine the CPU
    time is what the code costs; the wall time adds the waits for other processes), and the value."""
    wall, cpu, value = float("inf"), float("inf"), None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        value = fn()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return (wall, cpu), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=432)
    parser.add_argument("--dir", type=Path, default=None, help="Keep (and reuse) the checkpoint here.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import quantmap
    from quantmap.check import check
    from quantmap.executor import export_offline
    from quantmap.executor.torch_dist_checkpoint import read_state
    from quantmap.io.torch_dist import checkpoint_names, locate
    from quantmap.io.torch_dist.metadata import read_entries

    scratch = None
    if args.dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="quantmap-bench-dcp-")
        args.dir = Path(scratch.name) / "iter_0000001"
    built, keys = timed(lambda: build(args.dir, args.experts), repeat=1)
    files = len(list(args.dir.glob("*.distcp")))

    rules = quantmap.compile("deepseek_v3", num_layers=LAYERS, num_experts=args.experts)
    t_names, names = timed(lambda: checkpoint_names(args.dir))
    t_check, report = timed(lambda: check(rules, names), repeat=1)

    location = locate(args.dir)
    t_read, (layout, state) = timed(lambda: read_state(location))  # what `quantmap export --megatron` runs
    wanted = [key for key in read_entries(args.dir) if "quantizer" in key]

    def plain_load():
        import torch.distributed.checkpoint as dcp
        target = {key: torch.empty(1) for key in wanted}
        dcp.load(target, storage_reader=dcp.FileSystemReader(args.dir), no_dist=True)
        return target

    t_plain, plain = timed(plain_load, repeat=1)
    assert all(torch.equal(state[name.replace(".experts.experts.", ".experts.local_experts.")].reshape(1), plain[name])
               for name in plain), "quantmap's reader and dcp.load disagree"
    t_export, exported = timed(lambda: export_offline(rules, [state], layout), repeat=1)
    hf = len(exported.records())

    rows = [("build (dcp.save, not timed against a target)", built, None),
            ("check: .metadata -> names", t_names, 2.0),
            ("check: names against the deepseek_v3 spec", t_check, None),
            ("export read: quantizer tensors, state_dict form", t_read, 3.0),
            ("plain dcp.load of the same keys", t_plain, None),
            ("export offline (plan, no files) from the read state", t_export, None)]
    print(f"torch_dist checkpoint: {keys:,} quantizer keys, {files} .distcp files, {len(state):,} state names, "
          f"{hf:,} HF tensors; findings: {len(report.findings)}")
    print(f"{'phase':<54} {'wall s':>8} {'cpu s':>8} {'target':>7}")
    for label, (wall, cpu), target in rows:
        print(f"{label:<54} {wall:>8.2f} {cpu:>8.2f} {'' if target is None else f'<= {target:g}':>7}")
    record = {"benchmark": "torch_dist", "quantizer_keys": keys, "distcp_files": files, "hf_tensors": hf,
              "findings": len(report.findings), "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
              **{f"{name}_{kind}_s": round(value, 3) for name, times in (
                  ("check_names", t_names), ("check_rules", t_check), ("export_read", t_read), ("dcp_load", t_plain),
                  ("export_plan", t_export)) for kind, value in zip(("wall", "cpu"), times)}}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record) + "\n")
    if scratch:
        scratch.cleanup()
    sys.exit(0 if t_names[1] <= 2.0 and t_read[1] <= 3.0 else 1)


if __name__ == "__main__":
    main()
