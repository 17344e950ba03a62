"""Lookups per second, both directions, over a DeepSeek-V3-sized name set (one core).

Every rule's Megatron pattern is filled for 61 layers and 256 experts (SequentialMLP naming,
weights and both amax buffers); the HF names are what those resolve to. Prints a table and a
JSON line. Run: ``python benchmarks/bench_lookup.py [--spec deepseek_v3] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import quantmap
from quantmap.rules import MOE_FANOUT

LAYERS, EXPERTS = 61, 256


def name_set(rules) -> tuple[list[str], list[str]]:
    """All concrete Megatron names the rules describe at DeepSeek-V3 size, and their HF names."""
    megatron = []
    for rule in rules:
        ranges = ([range(LAYERS)] + [range(EXPERTS)] * rule.megatron.arity)[:rule.megatron.arity]
        megatron.extend(rule.megatron.fill([str(i) for i in values]) for values in itertools.product(*ranges))
    megatron = sorted(set(megatron))
    hf = set()
    for name in megatron:
        match = rules.to_hf(name)
        hf.update(match.expert_names(range(EXPERTS)) if match.kind == MOE_FANOUT else match.hf)
    return megatron, sorted(hf)


def rate(resolve, names: list[str], repeat: int) -> tuple[float, int]:
    """Best-of-``repeat`` lookups per second, and how many names resolved."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        found = sum(resolve(name) is not None for name in names)
        best = min(best, time.perf_counter() - start)
    return len(names) / best, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="deepseek_v3")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    start = time.perf_counter()
    rules = quantmap.compile(args.spec, num_layers=LAYERS, num_experts=EXPERTS)
    compile_seconds = time.perf_counter() - start
    megatron, hf = name_set(rules)
    forward, forward_found = rate(rules.to_hf, megatron, args.repeat)
    reverse, reverse_found = rate(rules.to_megatron, hf, args.repeat)
    assert forward_found == len(megatron) and reverse_found == len(hf), "every generated name must resolve"
    print(f"spec {args.spec}: {len(rules)} rules, compiled in {compile_seconds * 1e3:.1f} ms")
    print(f"{'direction':<22}{'names':>10}{'lookups/s':>14}{'µs/lookup':>12}")
    for label, count, speed in (("Megatron -> HF", len(megatron), forward), ("HF -> Megatron", len(hf), reverse)):
        print(f"{label:<22}{count:>10}{speed:>14,.0f}{1e6 / speed:>12.3f}")
    print(json.dumps({"bench": "lookup", "spec": args.spec, "rules": len(rules), "compile_ms": compile_seconds * 1e3,
                      "forward_names": len(megatron), "forward_per_s": forward,
                      "reverse_names": len(hf), "reverse_per_s": reverse}))


if __name__ == "__main__":
    main()
