"""Lookups per second, both directions, over a DeepSeek-V3-sized name set (one core).

The spec's weight and ``_amax`` rules are filled for 61 layers and 256 experts; the HF names are
what those resolve to. The target set uses SequentialMLP expert naming (``local_experts.{i}``);
a second row uses TEGroupedMLP naming (``weight{i}``, one quantizer per block). Prints a table
and a JSON line. Run: ``python benchmarks/bench_lookup.py [--spec deepseek_v3] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import quantmap
from quantmap.rules import MOE_FANOUT

LAYERS, EXPERTS = 61, 256


def name_set(rules, expert_naming: str) -> tuple[list[str], list[str]]:
    """The concrete Megatron names of one expert naming at DeepSeek-V3 size, and their HF names."""
    megatron = []
    for rule in rules:
        grouped = rule.kind == MOE_FANOUT or rule.megatron.text.endswith("weight*")
        sequential = "local_experts" in rule.megatron.text
        wanted = grouped if expert_naming == "grouped" else not grouped
        if not wanted or (expert_naming == "grouped" and sequential):
            continue
        if rule.buffer is not None and not rule.buffer.endswith("._amax"):
            continue
        ranges = ([range(LAYERS)] + [range(EXPERTS)] * rule.megatron.arity)[:rule.megatron.arity]
        if rule.staged:  # W4A8's sequential weight quantizer: the last capture is its stage, 0 or 1
            ranges[-1] = range(2)
        megatron.extend(rule.megatron.fill([str(i) for i in values]) for values in itertools.product(*ranges))
    megatron = sorted(set(megatron))
    hf = set()
    for name in megatron:
        match = rules.to_hf(name)
        hf.update(match.expert_names(range(EXPERTS)) if match.kind == MOE_FANOUT else match.hf)
    return megatron, sorted(hf)


def rate(resolve, names: list[str], repeat: int) -> float:
    """Best-of-``repeat`` lookups per second."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for name in names:
            resolve(name)
        best = min(best, time.perf_counter() - start)
    return len(names) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="deepseek_v3")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    start = time.perf_counter()
    rules = quantmap.compile(args.spec, num_layers=LAYERS, num_experts=EXPERTS)
    compile_seconds = time.perf_counter() - start
    print(f"spec {args.spec}: {len(rules)} rules, compiled in {compile_seconds * 1e3:.1f} ms")
    print(f"{'expert naming':<15}{'direction':<18}{'names':>10}{'lookups/s':>14}{'µs/lookup':>12}")
    results = {}
    for naming in ("sequential", "grouped"):
        megatron, hf = name_set(rules, naming)
        assert all(rules.to_hf(n) for n in megatron) and all(rules.to_megatron(n) for n in hf), "all must resolve"
        for label, names, resolve in (("Megatron -> HF", megatron, rules.to_hf), ("HF -> Megatron", hf, rules.to_megatron)):
            speed = rate(resolve, names, args.repeat)
            results[f"{naming} {label}"] = {"names": len(names), "per_s": round(speed)}
            print(f"{naming:<15}{label:<18}{len(names):>10}{speed:>14,.0f}{1e6 / speed:>12.3f}")
    print(json.dumps({"bench": "lookup", "spec": args.spec, "rules": len(rules),
                      "compile_ms": round(compile_seconds * 1e3, 1), "results": results}))


if __name__ == "__main__":
    main()
