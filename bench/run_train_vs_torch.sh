#!/usr/bin/env bash
# One training update (forward, backward, AdamW) in longmem and in PyTorch, back to back on this
# machine, same shapes (T 256, d 256, 4 layers, 8 heads, B 8; adaptation with a full 16 Ki-token
# memory per stream, csz 4, K 64), and the ratio PyTorch time / longmem time.
# usage: PYTHON=python3 bash bench/run_train_vs_torch.sh [build-dir]   (default build/cpu)
#        LONGMEM_BENCH_THREADS=N sets the thread count of both (default: all cores)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../build/cpu}
py=${PYTHON:-python3}
threads=${LONGMEM_BENCH_THREADS:-$(nproc)}
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads, $(date -u +%F)"
json=$(mktemp)
OMP_NUM_THREADS=$threads "$build/bench/longmem_bench_train" --benchmark_filter='Step' --benchmark_min_time=3 \
  --benchmark_format=console --benchmark_out="$json" --benchmark_out_format=json
ours() { "$py" -c "import json,sys; b=[x for x in json.load(open('$json'))['benchmarks'] if x['name'].startswith('$1')]; print(b[0]['real_time'])"; }
for mode in adapt full; do
  name=$([ $mode = adapt ] && echo BM_AdaptationStep || echo BM_PretrainStep)
  mine=$(ours $name)
  for compile in "" --compile; do
    line=$(OMP_NUM_THREADS=$threads "$py" "$here/peers/train_torch.py" --mode $mode --threads "$threads" --steps 10 $compile 2>/dev/null | tail -1) || line=""
    peer=$(printf '%s' "$line" | "$py" -c "import json,sys; print(json.loads(sys.stdin.read())['ms_median'])" 2>/dev/null || echo nan)
    echo "$mode ${compile:-eager}: longmem ${mine} ms/step, PyTorch ${peer} ms/step, ratio $("$py" -c "print(round($peer/$mine, 2))" 2>/dev/null || echo nan)  [$line]"
  done
done
rm -f "$json"
