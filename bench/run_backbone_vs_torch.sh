#!/usr/bin/env bash
# Runs the backbone benchmark and its PyTorch fp32 CPU peer back to back on this machine.
# usage: bash bench/run_backbone_vs_torch.sh [build-dir]   (default build/cpu)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../build/cpu}
threads=${LONGMEM_BENCH_THREADS:-$(nproc)}
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(date -u +%F)"
echo "== longmem (OMP_NUM_THREADS=$threads)"
OMP_NUM_THREADS=$threads "$build/bench/longmem_bench_backbone" --benchmark_counters_tabular=true
echo "== PyTorch fp32 (threads=$threads)"
/usr/bin/python3 "$here/peers/backbone_torch.py" --threads "$threads"
