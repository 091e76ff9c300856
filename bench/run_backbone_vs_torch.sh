#!/usr/bin/env bash
# The backbone forward on the CPU (bench/bench_backbone.cpp, every shape) and its PyTorch fp32 peer
# (bench/peers/backbone_torch.py: SDPA, then torch.compile), back to back on this machine, then the
# ratios PyTorch ms / longmem ms (> 1: longmem is faster) against each peer style and the best of them.
# usage: bash bench/run_backbone_vs_torch.sh [build-dir]   (default build/cpu)
#   LONGMEM_BENCH_THREADS=N  thread count of both (default: nproc)
#   PYTHON=...               the peer's Python (default: .venv-bench/bin/python when present, else python3)
#   LONGMEM_BENCH_STYLES     peer styles, in order (default "sdpa compile"; also "explicit")
#   LONGMEM_BENCH_MIN_TIME   --benchmark_min_time of ours in seconds (default: the benchmark's 2)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../build/cpu}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/../.venv-bench/bin/python" ]; then PYTHON="$here/../.venv-bench/bin/python"; else PYTHON=python3; fi
fi
threads=${LONGMEM_BENCH_THREADS:-$(nproc)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads, $(date -u '+%F %T') UTC"
echo "== longmem (OMP_NUM_THREADS=$threads)"
min_time=()
[ -n "${LONGMEM_BENCH_MIN_TIME:-}" ] && min_time=(--benchmark_min_time="$LONGMEM_BENCH_MIN_TIME")
OMP_NUM_THREADS=$threads "$build/bench/longmem_bench_backbone" "${min_time[@]}" --benchmark_counters_tabular=true \
  --benchmark_out="$tmp/ours.json" --benchmark_out_format=json
for style in ${LONGMEM_BENCH_STYLES:-sdpa compile}; do
  echo "== PyTorch fp32 $style (threads=$threads)"
  OMP_NUM_THREADS=$threads "$PYTHON" "$here/peers/backbone_torch.py" --threads "$threads" --style "$style" \
    2>"$tmp/peer.err" | tee -a "$tmp/peer.jsonl" || { echo "peer exited with an error:"; tail -5 "$tmp/peer.err"; }
done
echo "== ratios (PyTorch ms / longmem ms; > 1: longmem faster)"
"$PYTHON" - "$tmp/ours.json" "$tmp/peer.jsonl" "$here/peers" <<'EOF'
import json, sys
sys.path.insert(0, sys.argv[3])
from bench_json import our_times
ours = our_times(sys.argv[1], r"T:(\d+)/d:(\d+)/L:(\d+)/V:(\d+)/star:(\d)")  # ms
peers = {}
for line in open(sys.argv[2]):
    if line.startswith("{"):
        p = json.loads(line)
        key = (p["T"], p["d"], p["L"], p["V"], int(p["block"] == "gpt2-star"))
        peers.setdefault(key, {})[p["style"]] = p["ms"]
styles = sorted({s for v in peers.values() for s in v})
print("| T, d, L, V, block | longmem ms | " + " | ".join("PyTorch %s ms" % s for s in styles) + " | best PyTorch / longmem |")
print("| --- | ---: | " + " | ".join("---:" for _ in styles) + " | ---: |")
for key, mine in ours.items():
    times = peers.get(key, {})
    cells = ["%.3g" % times[s] if s in times else "" for s in styles]
    best = min(times.values()) if times else None
    ratio = "%.2fx" % (best / mine) if best else "no peer"
    print("| %d, %d, %d, %d, %s | %.3g | %s | %s |" % (*key[:4], "GPT-2*" if key[4] else "GPT-2", mine, " | ".join(cells), ratio))
EOF
