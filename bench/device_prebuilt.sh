#!/usr/bin/env bash
# GPU runs from binaries built on the development machine. Device time is scarce (30 minutes a
# session, and a machine is not always lent), and building there costs minutes of it, so the GPU
# tests, benchmarks and longmem-run are built here (cuda preset, sm_90) and carried:
#
#   here:      bash bench/device_prebuilt.sh pack [BASELINE_REV]
#              builds the targets below in build/cuda, strips them into out/device/bin.tar.xz; with
#              BASELINE_REV also longmem_bench_longmem_gpu of that revision (a git worktree under
#              /tmp) into out/device/baseline.tar.xz, for a same-run A/B of the whole forward; makes
#              .devdeps (bench/pack_device_deps.sh) when it is missing.
#   GPU call:  carry [".devdeps", "out"]; command: bash bench/device_prebuilt.sh run [STEP...]
#              (no step: tests cli model peer profile retrieval retrieval-profile sanitize
#              compile-peer). Each step is skipped once the call is within a step's length of
#              LONGMEM_DEVICE_LIMIT_S (default 560, under the 600 s a command may run), so what
#              matters most goes first. Logs under $OUT (or /tmp/device-out), a summary on stdout.
# Steps:
#   tests            every GPU test binary (op table on every dtype, model fixtures, retrieval, storage,
#                    adaptation, training), each under a 200 s timeout
#   cli              longmem_cli_check against longmem-run (--device cuda, --dtype f32/bf16/f16)
#   model            the whole LongMem forward at the paper's shape, 8 streams, memory on and off:
#                    bf16 (the baseline binary first, when packed), then fp16 and tf32
#   peer             the PyTorch fp16 port of the same forward, eager
#   profile          Nsight Compute kernel times of one bf16 forward, memory on and off, summed by kernel
#   retrieval        longmem_bench_retrieval_gpu (TC select and retrieve, 64 Ki and 1 Mi tokens) and its
#                    PyTorch peer (fp16 bmm + topk)
#   retrieval-profile  ncu --set full of one tensor-core select launch at 64 Ki tokens (stall reasons,
#                    occupancy, instruction counts)
#   sanitize         compute-sanitizer racecheck on the attention ops of the op table, memcheck on the
#                    model test
#   compile-peer     the PyTorch port under torch.compile
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"
dev=out/device

targets=(longmem_gpu_test_ops_device longmem_gpu_test_model_device longmem_gpu_test_retrieval longmem_gpu_test_storage
         longmem_gpu_test_adapt_device longmem_gpu_test_train_device longmem_bench_longmem_gpu longmem_bench_attention_gpu
         longmem_bench_retrieval_gpu longmem_bench_train_gpu longmem_run longmem_cli_check)

pack() {
  set -e
  local baseline=${1:-}
  [ -d .devdeps ] || bash bench/pack_device_deps.sh
  cmake --preset cuda -DCMAKE_CUDA_COMPILER="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" >/dev/null
  ninja -C build/cuda "${targets[@]}"
  local tmp
  tmp=$(mktemp -d)
  find build/cuda/tests build/cuda/bench build/cuda/examples -maxdepth 2 -type f -perm -u+x \
    \( -name 'longmem_gpu_test_*' -o -name 'longmem_bench_*_gpu' -o -name longmem-run -o -name longmem_cli_check \) \
    -exec cp {} "$tmp/" \;
  strip "$tmp"/*
  mkdir -p "$dev"
  tar -C "$tmp" -cJf "$dev/bin.tar.xz" .
  rm -rf "$tmp"
  git rev-parse --short HEAD >"$dev/rev.txt"
  git status --porcelain --untracked-files=no | grep -q . && echo "(uncommitted changes)" >>"$dev/rev.txt"
  rm -f "$dev/baseline.tar.xz"
  if [ -n "$baseline" ]; then
    local wt=/tmp/longmem-baseline-$baseline
    [ -d "$wt" ] || git worktree add -f "$wt" "$baseline" >/dev/null
    (cd "$wt" && cmake --preset cuda -DCMAKE_CUDA_COMPILER="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" \
      -DLONGMEM_BUILD_TESTS=OFF >/dev/null && ninja -C build/cuda longmem_bench_longmem_gpu)
    tmp=$(mktemp -d)
    cp "$wt/build/cuda/bench/longmem_bench_longmem_gpu" "$tmp/" && strip "$tmp"/*
    tar -C "$tmp" -cJf "$dev/baseline.tar.xz" .
    rm -rf "$tmp"
    echo "$baseline" >"$dev/baseline-rev.txt"
  fi
  du -sh .devdeps "$dev"
  echo "carry [\".devdeps\", \"out\"] (64 MiB at most); command: bash bench/device_prebuilt.sh run"
}

# ------------------------------------------------------------------------------------------------
out=${OUT:-/tmp/device-out}
limit=${LONGMEM_DEVICE_LIMIT_S:-560}
t0=$(date +%s)
elapsed() { echo $(($(date +%s) - t0)); }
say() { echo "[$(elapsed) s] $*"; }
# room N: whether a step of about N seconds still fits before the limit
room() { [ $(($(elapsed) + $1)) -le "$limit" ]; }

paper=(--layers 24 --d 1024 --heads 16 --vocab 50257 --T 1024 --memory-layer 17 --memory-tokens 65536
       --chunk-size 4 --retrieved-tokens 64 --streams 8 --repeats 20)
bin=/tmp/longmem-bin
base=/tmp/longmem-baseline
ncu_bin() { command -v ncu || echo /usr/local/cuda/bin/ncu; }

step_tests() {
  local t n rc
  for t in "$bin"/longmem_gpu_test_model_device "$bin"/longmem_gpu_test_retrieval "$bin"/longmem_gpu_test_storage \
           "$bin"/longmem_gpu_test_ops_device "$bin"/longmem_gpu_test_adapt_device "$bin"/longmem_gpu_test_train_device; do
    [ -x "$t" ] || continue
    room 60 || { say "skipped $(basename "$t") (time)"; continue; }
    n=$(basename "$t")
    timeout 200 "$t" >"$out/$n.log" 2>&1
    rc=$?
    say "$n rc=$rc: $(tail -1 "$out/$n.log")"
    [ $rc -ne 0 ] && grep -E 'FAIL|fail|rror' "$out/$n.log" | head -30
  done
}

step_cli() {
  mkdir -p /tmp/longmem-cli-scratch
  timeout 90 "$bin/longmem_cli_check" "$bin/longmem-run" tests/fixtures /tmp/longmem-cli-scratch >"$out/cli_check.log" 2>&1
  say "cli_check rc=$?: $(tail -1 "$out/cli_check.log")"
}

model_bench() {  # binary, filter, log name
  timeout 120 "$1" --benchmark_counters_tabular=true --benchmark_filter="$2" \
    --benchmark_out="$out/$3.json" --benchmark_out_format=json >"$out/$3.txt" 2>&1
  say "$3 rc=$?"
  grep -E '^BM|streams' "$out/$3.txt" | cut -c1-170
}

step_model() {
  local bf16='streams:8/memory:./math:0/stacked:1/dtype:1'
  if [ -x "$base/longmem_bench_longmem_gpu" ]; then
    say "baseline $(cat $dev/baseline-rev.txt 2>/dev/null)"
    model_bench "$base/longmem_bench_longmem_gpu" "$bf16" model_bf16_baseline
  fi
  say "this build $(head -1 $dev/rev.txt 2>/dev/null)"
  model_bench "$bin/longmem_bench_longmem_gpu" "$bf16" model_bf16
  room 90 && model_bench "$bin/longmem_bench_longmem_gpu" 'streams:8/memory:./math:(0/stacked:1/dtype:2|1/stacked:1/dtype:0)' model_f16_tf32
}

step_peer() {
  timeout 150 python3 bench/peers/longmem_torch.py --device cuda --dtype float16 "${paper[@]}" >"$out/peer_eager.jsonl" 2>&1
  say "peer eager rc=$?"
  grep '^{' "$out/peer_eager.jsonl" | cut -c1-400
}

step_profile() {
  local m
  for m in 1 0; do
    room 60 || break
    LONGMEM_BENCH_PROFILE=1 timeout 90 "$(ncu_bin)" --profile-from-start off --clock-control none \
      --metrics gpu__time_duration.sum --print-kernel-base function --csv "$bin/longmem_bench_longmem_gpu" \
      --benchmark_filter="streams:8/memory:$m/math:0/stacked:1/dtype:1" >"$out/ncu_model_memory$m.csv" 2>"$out/ncu_model_memory$m.err"
    say "ncu memory $m rc=$?"
    python3 bench/profile_kernels.py "$out/ncu_model_memory$m.csv" 24
  done
}

step_retrieval() {
  timeout 80 "$bin/longmem_bench_retrieval_gpu" --benchmark_counters_tabular=true \
    --benchmark_filter='^(SelectTC|RetrieveTC)/(65536|1048576)/1024/half$' >"$out/bench_retrieval.txt" 2>&1
  say "bench retrieval rc=$?"
  grep -E '^(Select|Retrieve)' "$out/bench_retrieval.txt" | cut -c1-170
  room 40 || return
  timeout 60 python3 bench/peers/retrieval_torch.py --dtypes fp16 --shapes 65536:1024 1048576:1024 >"$out/retrieval_torch.jsonl" 2>&1
  say "retrieval peer rc=$?"
  cut -c1-200 "$out/retrieval_torch.jsonl"
}

step_retrieval_profile() {
  local ncu
  ncu=$(ncu_bin)
  timeout 100 "$ncu" --clock-control none --set full -k regex:retrieval_select_tc --launch-skip 2 --launch-count 1 \
    -o "$out/ncu_select" "$bin/longmem_bench_retrieval_gpu" --benchmark_filter='^SelectTC/65536/1024/half$' \
    --benchmark_min_time=0.01 >"$out/ncu_select.log" 2>&1
  say "ncu select rc=$?"
  "$ncu" --import "$out/ncu_select.ncu-rep" --page details >"$out/ncu_select_details.txt" 2>&1
  grep -E 'Duration|Registers Per|Achieved Occupancy|Theoretical Occ|Issue Slots Busy|Executed Ipc A|L2 Hit|Memory Throughput|Compute \(SM\) T|Stall|Warp Cycles Per Issued' \
    "$out/ncu_select_details.txt" | head -24
}

step_sanitize() {
  local cs
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  timeout 150 "$cs" --tool racecheck --error-exitcode 9 "$bin/longmem_gpu_test_ops_device" attention >"$out/racecheck_attention.log" 2>&1
  say "racecheck attention rc=$?: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$out/racecheck_attention.log" | tail -1)"
  room 60 || return
  timeout 90 "$cs" --tool memcheck --error-exitcode 9 "$bin/longmem_gpu_test_model_device" >"$out/memcheck_model.log" 2>&1
  say "memcheck model rc=$?: $(grep -E 'ERROR SUMMARY' "$out/memcheck_model.log" | tail -1)"
}

step_compile_peer() {
  timeout 240 python3 bench/peers/longmem_torch.py --device cuda --dtype float16 "${paper[@]}" --compile >"$out/peer_compile.jsonl" 2>&1
  say "peer compile rc=$?"
  grep '^{' "$out/peer_compile.jsonl" | cut -c1-400
}

run() {
  mkdir -p "$out" "$bin"
  bash .devdeps/install.sh >/dev/null 2>&1 || { echo "bash .devdeps/install.sh failed: is .devdeps carried?"; exit 1; }
  tar -C "$bin" -xJf "$dev/bin.tar.xz" || { echo "no $dev/bin.tar.xz: run 'bash bench/device_prebuilt.sh pack' here first"; exit 1; }
  if [ -f "$dev/baseline.tar.xz" ]; then mkdir -p "$base" && tar -C "$base" -xJf "$dev/baseline.tar.xz"; fi
  export LONGMEM_FIXTURE_DIR=$root/tests/fixtures
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch; print("torch", torch.__version__)'
    echo "binaries of $(cat $dev/rev.txt 2>/dev/null | tr '\n' ' ')"
    date -u '+%F %T UTC'
  } 2>&1 | tee "$out/machine.txt"
  local steps=("$@") s
  [ ${#steps[@]} -gt 0 ] || steps=(tests cli model peer profile retrieval retrieval-profile sanitize compile-peer)
  declare -A need=([tests]=120 [cli]=30 [model]=60 [peer]=45 [profile]=60 [retrieval]=40 [retrieval-profile]=70
                   [sanitize]=90 [compile-peer]=200)
  for s in "${steps[@]}"; do
    [ -n "${need[$s]:-}" ] || { echo "unknown step $s (${!need[*]})"; exit 64; }
    if ! room "${need[$s]}"; then say "skipped $s (time)"; continue; fi
    say "== $s"
    "step_${s//-/_}"
  done
  say done
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash bench/device_prebuilt.sh pack [BASELINE_REV] | run [STEP...]"; exit 64 ;;
esac
