#!/usr/bin/env python3
"""Where one GPU forward spends its time, kernel by kernel.

Reads the CSV that Nsight Compute writes for one profiled range, e.g.

    LONGMEM_BENCH_PROFILE=1 ncu --profile-from-start off --clock-control none \
        --metrics gpu__time_duration.sum --print-kernel-base function --csv \
        build/cuda/bench/longmem_bench_longmem_gpu \
        --benchmark_filter='streams:8/memory:1/math:0/stacked:1/dtype:1' > forward.csv
    python3 bench/profile_kernels.py forward.csv

and prints the kernels grouped by name and launch shape (grid, block): launches, total time, share
of the summed kernel time, mean time per launch. ncu runs the kernels one by one, so the sum is the
device time without overlap or launch gaps; compare it with the benchmark's own event time.
"""
import csv
import sys
from collections import defaultdict


def main(path: str, top: int = 40) -> None:
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's own messages start with ==
    rows = list(csv.DictReader(lines))
    if not rows:
        sys.exit(f"{path}: no kernel rows (did the range hold a forward?)")
    groups = defaultdict(lambda: [0, 0.0])
    total_ns = 0.0
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "nsecond")
        ns = value * {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1.0)
        key = (r["Kernel Name"][:70], r.get("Grid Size", ""), r.get("Block Size", ""))
        groups[key][0] += 1
        groups[key][1] += ns
        total_ns += ns
    launches = sum(g[0] for g in groups.values())
    print(f"{launches} launches, kernel time summed {total_ns / 1e6:.3f} ms")
    print(f"{'ms':>8} {'share':>6} {'n':>5} {'us/launch':>10}  kernel  grid  block")
    for (name, grid, block), (n, ns) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{ns / 1e6:8.3f} {100 * ns / total_ns:5.1f}% {n:5d} {ns / n / 1e3:10.1f}  {name}  {grid}  {block}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: profile_kernels.py NCU_CSV [TOP]")
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
