"""Reads a Google Benchmark JSON file (--benchmark_out_format=json) for the run_*_vs_torch.sh scripts."""
import json
import re


def our_times(path, pattern):
    """{tuple of int(groups of `pattern` in the benchmark's name): real_time} for the plain iterations
    (no aggregates, no errors); real_time is in the benchmark's unit (ms in ours)."""
    times = {}
    for b in json.load(open(path))["benchmarks"]:
        m = re.search(pattern, b["name"])
        if m and b.get("run_type", "iteration") == "iteration" and "error_occurred" not in b:
            times[tuple(map(int, m.groups()))] = b["real_time"]
    return times
