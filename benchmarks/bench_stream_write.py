"""Tensor bytes to a file: the streaming writer's numpy-free path against the ``.numpy().tobytes()``
it replaced (numpy is not a dependency), for one big tensor, one tensor written under 3 names, and
many small ones. Prints a table and a JSON line. Run: ``python benchmarks/bench_stream_write.py [--mib 256]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from quantmap.io.safetensors_stream import raw_bytes


def via_numpy(tensor: torch.Tensor, count: int):
    return [tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes() * count]


def via_raw(tensor: torch.Tensor, count: int):
    data = raw_bytes(tensor)
    return [data] * count


def best_of(write, tensors, count: int, path: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        with open(path, "wb") as out:
            for tensor in tensors:
                for chunk in write(tensor, count):
                    out.write(chunk)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    big = torch.rand(args.mib * 2**20 // 4)
    cases = {"one big tensor": ([big], 1), "big, 3 names": ([big], 3),
             "100k scalars": ([torch.rand(()) for _ in range(100_000)], 1)}
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "out.bin")
        for label, (tensors, count) in cases.items():
            rows[label] = {"numpy_s": best_of(via_numpy, tensors, count, path, args.repeat),
                           "raw_s": best_of(via_raw, tensors, count, path, args.repeat)}
    print(f"{'case':<16} {'numpy s':>9} {'raw s':>9} {'speed-up':>9}")
    for label, row in rows.items():
        print(f"{label:<16} {row['numpy_s']:>9.3f} {row['raw_s']:>9.3f} {row['numpy_s'] / row['raw_s']:>8.2f}x")
    print(json.dumps({"benchmark": "stream_write", "mib": args.mib, "rows": rows}))


if __name__ == "__main__":
    main()
