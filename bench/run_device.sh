#!/usr/bin/env bash
# The runs on the lent GPU machine (H200, 16 CPU cores, CUDA, torch + transformers installed), in
# stages so that each call stays within the machine's per-command limit:
#
#   build       configure and build everything with the cuda preset (sm_90), all cores
#   test        all tests (GPU tests included) against the committed fixtures
#   sanitize    compute-sanitizer memcheck, racecheck and initcheck over every GPU test
#   bench-gpu   the CUDA benchmarks (CUDA events: kernels, retrieval, the training update) and their
#               PyTorch peers on the GPU
#   bench-model-gpu  the whole LongMem forward at the paper's shape on the GPU (bench_longmem_gpu:
#               fp32/tf32/bf16 device math) and the PyTorch fp16 port (eager, then torch.compile)
#   profile-model-gpu  one forward of the bf16 model at the paper's shape (8 streams, memory on, then
#               off) under Nsight Compute, kernel times summed by name (bench/profile_kernels.py)
#   bench-cpu   the CPU benchmarks beside their PyTorch peers on this machine's cores (training
#               step, backbone forward, memory-augmented attention)
#   fixtures    regenerate the fixtures with this machine's torch/transformers, compare them with
#               the committed ones and re-run the fixture tests against the fresh ones
#
# (bench/device_prebuilt.sh runs the same kinds of steps from binaries built on the development
# machine, which saves the build's minutes of device time.)
# usage (repo root, after `bash .devdeps/install.sh`; `bash bench/pack_device_deps.sh` makes .devdeps here,
#       and the call carries it): bash bench/run_device.sh STAGE...
#       (no stage: build test sanitize bench-gpu bench-cpu)
# Logs go to $OUT (or /tmp/device-out), one file per stage plus machine.txt.
set -u
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"
cores=$(nproc)
build=build/cuda
step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%T)"; }
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test sanitize bench-gpu bench-model-gpu bench-cpu)

machine() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    lscpu | sed -n 's/^Model name: *//p'
    echo "cores: $cores"
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "mkl", torch.backends.mkl.is_available())'
    cmake --version | head -1; nvcc --version | tail -1
    date -u +%F
  } 2>&1 | tee "$out/machine.txt"
}

stage_build() {
  cmake --preset cuda -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" >"$out/build.log" 2>&1 &&
    cmake --build --preset cuda -j "$cores" >>"$out/build.log" 2>&1
  local rc=$?
  echo "build rc=$rc"; grep -E "error|FAILED" "$out/build.log" | head -20; tail -2 "$out/build.log"
  return $rc
}

stage_test() {
  (cd $build && ctest -j "$cores" --output-on-failure --timeout 400) >"$out/ctest.log" 2>&1
  echo "ctest rc=$?"; grep -E "tests passed|tests failed|Not Run|\*\*\*Failed|\(Failed\)|Skipped|gpu\." "$out/ctest.log" | tail -20
  for t in $build/tests/gpu/longmem_gpu_*; do
    [ -x "$t" ] || continue
    "$t" >"$out/$(basename "$t").log" 2>&1; echo "$(basename "$t") rc=$?"; tail -4 "$out/$(basename "$t").log"
  done
}

stage_sanitize() {
  local cs
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for t in $build/tests/gpu/longmem_gpu_*; do
    [ -x "$t" ] || continue
    for tool in memcheck racecheck initcheck; do
      timeout 200 "$cs" --tool $tool --error-exitcode 9 "$t" >"$out/sanitize-$tool-$(basename "$t").log" 2>&1
      echo "$tool $(basename "$t") rc=$?  $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitize-$tool-$(basename "$t").log" | tail -1)"
    done
  done
}

stage_bench_gpu() {
  for b in $build/bench/longmem_bench_*_gpu; do
    [ -x "$b" ] || continue
    [ "$(basename "$b")" = longmem_bench_longmem_gpu ] && continue  # bench-model-gpu
    timeout 200 "$b" --benchmark_min_time=0.5 --benchmark_counters_tabular=true \
      --benchmark_out="$out/$(basename "$b").json" --benchmark_out_format=json 2>&1 | tee "$out/$(basename "$b").txt" | tail -25
  done
  for p in bench/peers/*_torch_gpu.py bench/peers/retrieval_torch.py; do
    [ -f "$p" ] || continue
    timeout 200 python3 "$p" 2>&1 | tee "$out/$(basename "$p" .py).jsonl" | tail -12
  done
  # the peers of longmem_bench_train_gpu (fp32): the from-scratch update at its three batches, the
  # adaptation update (banks full at 16 Ki tokens) at its two; eager, then torch.compile
  for c in "" --compile; do
    for b in 8 32 128; do
      timeout 150 python3 bench/peers/train_torch.py --device cuda --mode full --batch $b --steps 30 $c 2>&1 |
        tee -a "$out/train_torch_gpu.jsonl" | tail -1
    done
    for b in 8 32; do
      timeout 150 python3 bench/peers/train_torch.py --device cuda --mode adapt --batch $b --steps 30 $c 2>&1 |
        tee -a "$out/train_torch_gpu.jsonl" | tail -1
    done
  done
}

paper_shape=(--layers 24 --d 1024 --heads 16 --vocab 50257 --T 1024 --memory-layer 17 --memory-tokens 65536
             --chunk-size 4 --retrieved-tokens 64 --streams 1 8)
stage_bench_model_gpu() {
  timeout 300 $build/bench/longmem_bench_longmem_gpu --benchmark_counters_tabular=true \
    --benchmark_out="$out/bench_longmem_gpu.json" --benchmark_out_format=json 2>&1 | tee "$out/bench_longmem_gpu.txt" | tail -16
  timeout 200 python3 bench/peers/longmem_torch.py --device cuda --dtype float16 "${paper_shape[@]}" --repeats 20 2>&1 |
    tee "$out/longmem_torch_gpu.jsonl" | tail -4
  timeout 400 python3 bench/peers/longmem_torch.py --device cuda --dtype float16 "${paper_shape[@]}" --repeats 20 --compile 2>&1 |
    tee "$out/longmem_torch_gpu_compile.jsonl" | grep '^{' | tail -4
}

stage_profile_model_gpu() {
  local ncu m
  ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  for m in 1 0; do
    LONGMEM_BENCH_PROFILE=1 timeout 200 "$ncu" --profile-from-start off --clock-control none \
      --metrics gpu__time_duration.sum --print-kernel-base function --csv $build/bench/longmem_bench_longmem_gpu \
      --benchmark_filter="streams:8/memory:$m/math:0/stacked:1/dtype:1" >"$out/ncu-model-memory$m.csv" 2>"$out/ncu-model-memory$m.err"
    echo "ncu memory $m rc=$?"
    python3 bench/profile_kernels.py "$out/ncu-model-memory$m.csv" 25
  done
}

stage_bench_cpu() {
  LONGMEM_BENCH_THREADS=$cores PYTHON=python3 timeout 240 bash bench/run_train_vs_torch.sh $build 2>&1 | tee "$out/train_vs_torch.txt" | grep -vE '^-|^Benchmark'
  OMP_NUM_THREADS=$cores timeout 150 $build/bench/longmem_bench_backbone --benchmark_min_time=1 \
    --benchmark_out="$out/bench_backbone.json" --benchmark_out_format=json --benchmark_counters_tabular=true 2>&1 | tail -12
  timeout 150 python3 bench/peers/backbone_torch.py --threads "$cores" --repeats 20 2>&1 | tee "$out/torch_backbone.jsonl" | tail -12
}

stage_fixtures() {
  rm -rf /tmp/fx
  timeout 240 bash tests/fixtures/generate_all.sh /tmp/fx >"$out/fixtures.log" 2>&1; echo "generate_all rc=$?"
  cp /tmp/fx/fixtures.tar.gz "$out/" 2>/dev/null
  python3 tests/fixtures/compare_fixtures.py tests/fixtures /tmp/fx >>"$out/fixtures.log" 2>&1; echo "compare rc=$?"
  tail -5 "$out/fixtures.log"
  if [ -d /tmp/fx/hf_gpt2_small ]; then
    for f in hf_gpt2_small hf_gpt2_medium longmem_gpt2star longmem_gpt2; do rm -rf "tests/fixtures/$f"; cp -r "/tmp/fx/$f" tests/fixtures/; done
    $build/tests/longmem_tests "[hf],[reference]" 2>&1 | tail -3
    git checkout -- tests/fixtures 2>/dev/null || true
  fi
}

step "machine"; machine
for s in "${stages[@]}"; do
  step "$s"
  case "$s" in
    build) stage_build ;;
    test) stage_test ;;
    sanitize) stage_sanitize ;;
    bench-gpu) stage_bench_gpu ;;
    bench-model-gpu) stage_bench_model_gpu ;;
    profile-model-gpu) stage_profile_model_gpu ;;
    bench-cpu) stage_bench_cpu ;;
    fixtures) stage_fixtures ;;
    *) echo "unknown stage $s (build test sanitize bench-gpu bench-model-gpu profile-model-gpu bench-cpu fixtures)"; exit 64 ;;
  esac
done
step "done"
