#!/usr/bin/env bash
# The whole LongMem forward on the CPU (issue 9: backbone + SideNet + retrieval + memory attention;
# d 512, 8 layers, T 512, 16 Ki-token memory per stream, 1 and 8 streams, memory on and off) in longmem
# (bench/bench_longmem.cpp) and in the user-style PyTorch peer (bench/peers/longmem_torch.py), back to
# back on this machine, then the ratios PyTorch ms / longmem ms (> 1: longmem is faster).
# First the peer's correctness check against the library's logits at a small shape (stops on failure).
# usage: bash bench/run_longmem_vs_torch.sh [build-dir]   (default build/cpu)
#   LONGMEM_BENCH_THREADS=N  thread count of both (default: nproc)
#   PYTHON=...               the peer's Python (default: .venv-bench/bin/python when present, else python3)
#   LONGMEM_BENCH_COMPILE=1  also time the torch.compile peer
#   LONGMEM_BENCH_PEER_ARGS  extra peer arguments (e.g. "--repeats 20", "--streams 1")
#   LONGMEM_BENCH_FILTER     --benchmark_filter of ours (default: all; e.g. 'streams:1/')
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../build/cpu}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/../.venv-bench/bin/python" ]; then PYTHON="$here/../.venv-bench/bin/python"; else PYTHON=python3; fi
fi
py=$PYTHON
threads=${LONGMEM_BENCH_THREADS:-$(nproc)}
bin="$build/bench/longmem_bench_longmem"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads, $(date -u +%F)"
echo "== peer check: same logits as the library at a small shape"
"$bin" --export_check="$tmp/check" >/dev/null
if ! OMP_NUM_THREADS=$threads "$py" "$here/peers/longmem_torch.py" --threads "$threads" --check "$tmp/check" >"$tmp/check.json"; then
  cat "$tmp/check.json"
  echo "peer check FAILED: the ratios would compare different computations" >&2
  exit 1
fi
"$py" -c "import json; j = json.load(open('$tmp/check.json')); print(j['check'], 'max rel err', j['max_rel_err'], 'retrieved sets equal', j['retrieved_sets_equal_fraction'])"
echo "== longmem (OMP_NUM_THREADS=$threads)"
OMP_NUM_THREADS=$threads "$bin" --benchmark_filter="${LONGMEM_BENCH_FILTER:-.}" --benchmark_counters_tabular=true --benchmark_out="$tmp/ours.json" --benchmark_out_format=json
styles=("")
[ "${LONGMEM_BENCH_COMPILE:-0}" = 1 ] && styles+=(--compile)
for style in "${styles[@]}"; do
  echo "== PyTorch fp32 ${style:-eager} (threads=$threads)"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$threads "$py" "$here/peers/longmem_torch.py" --threads "$threads" $style ${LONGMEM_BENCH_PEER_ARGS:-} \
    2>"$tmp/peer.err" | tee -a "$tmp/peer.jsonl" || { echo "peer exited with an error:"; tail -5 "$tmp/peer.err"; }
done
echo "== ratios (PyTorch ms / longmem ms; > 1: longmem faster)"
"$py" - "$tmp/ours.json" "$tmp/peer.jsonl" "$here/peers" <<'EOF'
import json, sys
sys.path.insert(0, sys.argv[3])
from bench_json import our_times
ours = our_times(sys.argv[1], r"streams:(\d+)/batched:(\d)/memory:(\d)")  # ms
try:
    peers = [json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")]
except FileNotFoundError:
    peers = []
for p in peers:
    style = "compile" if p["compiled"] else "eager"
    what = "streams %d, memory %s" % (p["streams"], "on " if p["memory"] else "off")
    if p.get("ms") is None:
        print("%s, PyTorch %s: no time (%s)" % (what, style, p.get("error")))
        continue
    for batched in (0, 1):
        mine = ours.get((p["streams"], batched, int(p["memory"])))
        if mine is None:
            continue
        mode = "" if p["streams"] == 1 else (" batched" if batched else " per stream")
        print("%s: longmem%s %.1f ms, PyTorch %s %.1f ms, ratio %.2f"
              % (what, mode, mine, style, p["ms"], p["ms"] / mine))
EOF
