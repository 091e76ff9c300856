#!/usr/bin/env bash
# One call on the lent GPU machine (H100/H200, 16 CPU cores, torch + transformers installed):
#   1. regenerates the fixtures with that machine's torch/transformers and compares them with
#      the committed ones,
#   2. builds everything with the cuda preset (sm_90) and runs all tests (GPU tests included),
#      then re-runs the fixture tests against the freshly generated fixtures,
#   3. times the backbone and memory-attention CPU benchmarks beside their PyTorch peers on
#      that machine's CPU.
# usage (repo root, after `bash .devdeps/install.sh`): bash bench/run_device.sh
# Logs and the fixture archive go to $OUT (or /tmp/device-out).
set -u
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%T)"; }
cores=$(nproc)

step "machine"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  lscpu | sed -n 's/^Model name: *//p'
  echo "cores: $cores"
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "mkl", torch.backends.mkl.is_available())'
  cmake --version | head -1; nvcc --version | tail -1
} 2>&1 | tee "$out/machine.txt"

step "fixtures"
rm -rf /tmp/fx
timeout 240 bash tests/fixtures/generate_all.sh /tmp/fx >"$out/fixtures.log" 2>&1; echo "generate_all rc=$?"
cp /tmp/fx/fixtures.tar.gz "$out/" 2>/dev/null
python3 tests/fixtures/compare_fixtures.py tests/fixtures /tmp/fx >>"$out/fixtures.log" 2>&1; echo "compare rc=$?"
tail -5 "$out/fixtures.log"

step "build (cuda preset)"
cmake --preset cuda -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" >"$out/build.log" 2>&1 &&
  cmake --build --preset cuda -j "$cores" >>"$out/build.log" 2>&1
echo "build rc=$?"; tail -3 "$out/build.log"

step "tests (all labels, committed fixtures)"
(cd build/cuda && ctest -j "$cores" --output-on-failure --timeout 300) >"$out/ctest.log" 2>&1
echo "ctest rc=$?"; grep -E "tests passed|tests failed|Skipped|\*\*\*Failed|gpu" "$out/ctest.log" | tail -12

step "fixture tests against this machine's fresh fixtures"
if [ -d /tmp/fx/hf_gpt2_small ]; then
  for f in hf_gpt2_small hf_gpt2_medium longmem_gpt2star longmem_gpt2; do rm -rf "tests/fixtures/$f"; cp -r "/tmp/fx/$f" tests/fixtures/; done
  build/cuda/tests/longmem_tests "[hf],[reference]" 2>&1 | tail -3
  (cd build/cuda && ctest -R cli --output-on-failure) 2>&1 | grep -E "tests passed|failed"
fi

step "benchmarks on this machine's CPU: longmem vs PyTorch fp32"
OMP_NUM_THREADS=$cores timeout 150 build/cuda/bench/longmem_bench_backbone --benchmark_min_time=1 \
  --benchmark_out="$out/bench_backbone.json" --benchmark_out_format=json --benchmark_counters_tabular=true 2>&1 | tail -6
timeout 150 python3 bench/peers/backbone_torch.py --threads "$cores" --repeats 20 2>&1 | tee "$out/torch_backbone.jsonl"
OMP_NUM_THREADS=$cores timeout 120 build/cuda/bench/longmem_bench_memory_attention --benchmark_min_time=0.5 \
  --benchmark_filter='1024' --benchmark_out="$out/bench_memory_attention.json" --benchmark_out_format=json 2>&1 | tail -12
timeout 120 python3 bench/peers/memory_attention_torch.py --help >/dev/null 2>&1 &&
  timeout 120 python3 bench/peers/memory_attention_torch.py --threads "$cores" --T 1024 2>&1 | tee "$out/torch_memory_attention.txt" | tail -8
step "done"
