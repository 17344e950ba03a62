"""Deployable-export benchmark: ``quantmap export SPEC --megatron CKPT --format modelopt`` (FP8 and NVFP4) of the
4+ GB synthetic checkpoints of ``bench_weights.py``, against the same physical floor.

The checkpoints are ``bench_weights``' own (a TP=2 x PP=2 save, one key per layer with global layer numbers,
per-tensor ``[1]`` fp32 ``weight_quantizer._amax`` / ``input_quantizer._amax`` for every linear, experts'
as ``mlp.experts.experts.{E}.linear_fc1...``, ``[]`` KV-cache amax: the key layout, dtypes and shapes of the
real ModelOpt saves in ``tests/data/dcp/``) plus the recipe that ``--format modelopt`` reads:
``iter_0000001/modelopt_state/common.pt`` holding ``{"modelopt_state_dict": [("quantize", {"config":
{"quant_cfg": [...]}})]}``, saved with ``torch.save`` (loadable with ``weights_only=True``), whose
``quant_cfg`` is the one a real ModelOpt 0.47 save recorded: ``FP8_DEFAULT_CFG`` + FP8 KV from
``tests/data/dcp/fp8_kv_tp1``, ``NVFP4_DEFAULT_CFG`` + ``NVFP4_KV_CFG`` from ``tests/data/dcp/nvfp4_kv_tp2``.
Only that file differs between the recipes, so one checkpoint per variant serves both: it is rewritten
before each recipe's runs.

Measured as ``bench_weights`` measures (its ``run``): the floor (warm ``cat`` of the ``.distcp`` files +
``dd`` of as many bytes, no fsync) just before each export, the export's wall time, and every process's
peak resident memory. The floor writes the checkpoint's bytes, more than a quantized output holds (FP8
about half, NVFP4 about a quarter of the bf16 weights): the same floor as the ``hf`` export's, so the two
compare. Each run's ``hf_quant_config.json`` must declare the recipe's ``quant_algo`` (FP8 / NVFP4), or
the benchmark stops.

Target (issue 17): export <= 3x the floor on this CPU. The peak columns keep issue 16's bound
(2x the largest shard + 256 MiB) for comparison.

    .venv/bin/python benchmarks/bench_deploy.py [--dir /tmp/quantmap-bench-deploy] [--variants dense moe]
        [--recipes fp8 nvfp4] [--nproc 1 4] [--shard-size BYTES] [--tiny] [--json out.json]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from bench_weights import ITERATION, arguments, build, finish, run, workspace
from quantmap.io.torch_dist.modelopt import STATE_FILE, quant_cfg

FIXTURES = Path(__file__).parents[1] / "tests" / "data" / "dcp"
#: Per recipe: the real ModelOpt save whose quant_cfg the synthetic checkpoint records, and the quant_algo the
#: export must declare.
RECIPES = {"fp8": (FIXTURES / "fp8_kv_tp1" / "ckpt" / ITERATION, "FP8"),
           "nvfp4": (FIXTURES / "nvfp4_kv_tp2" / "ckpt" / "release", "NVFP4")}
TARGET = 3.0


def write_recipe(save: Path, recipe: str) -> None:
    """Record ``recipe``'s quant_cfg in ``save``'s ``modelopt_state/common.pt``, as Megatron-LM saves ModelOpt's."""
    path = save / ITERATION / STATE_FILE
    path.parent.mkdir(exist_ok=True)
    torch.save({"modelopt_state_dict": [("quantize", {"config": {"quant_cfg": quant_cfg(RECIPES[recipe][0])}})]},
               path)


def main(argv=None) -> None:
    parser = arguments(Path("/tmp/quantmap-bench-deploy"), 2**30, "--shard-size for the export (default 1 GiB).")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["fp8", "nvfp4"])
    args = parser.parse_args(argv)
    models, root = workspace(args)
    rows = []
    for variant in args.variants:
        save = build(root, models[variant])
        for recipe in args.recipes:
            write_recipe(save, recipe)
            for nproc in args.nproc:
                rows.append(run(save, models[variant], nproc, args.shard_size, root / "scratch", "modelopt", TARGET))
                declared, expected = rows[-1]["quant_algo"], RECIPES[recipe][1]
                if declared != expected:
                    sys.exit(f"{variant} {recipe}: the export declares quant_algo {declared}, not {expected}")
                print(f"done: {variant} {recipe} --nproc {nproc}: {rows[-1]['export_s']:.1f} s "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
    finish(rows, "deploy", args.json, all(r["time_pass"] for r in rows))


if __name__ == "__main__":
    main()
