#!/usr/bin/env bash
# One command from a fresh Debian 12 / Ubuntu machine to a running longmem.
#
#   bash cmake/quickstart.sh demo       build and run the demo
#   bash cmake/quickstart.sh test       build everything and run every test (GPU tests skip without a GPU)
#   bash cmake/quickstart.sh sanitize   build with AddressSanitizer + UBSan and run the CPU tests
#   bash cmake/quickstart.sh bench      build the benchmarks and run them (extra args go to each benchmark)
#
# Missing Debian packages are installed with apt-get (as root, or through sudo). The CUDA
# backend is compiled when nvcc is found on PATH or in /usr/local/cuda/bin (preset `cuda`),
# otherwise the CPU preset is used (`cpu`). Build trees: build/<preset>.
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in demo | test | sanitize | bench) ;; *) usage ;; esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

say() { printf '\n== %s\n' "$*"; }

# --- packages ---------------------------------------------------------------------------
packages=(ca-certificates cmake ninja-build g++ make pkg-config libeigen3-dev catch2 nlohmann-json3-dev libbenchmark-dev libcli11-dev gnuplot-nox libdnnl-dev)
if [ "$cmd" = bench ]; then
  packages+=(libfaiss-dev libblas-dev liblapack-dev libopenblas0-pthread python3 python3-numpy python3-torch)
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
if command -v dpkg-query >/dev/null; then
  for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done
else
  echo "quickstart: not a Debian-based system; make sure these are installed: ${packages[*]}" >&2
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null; then
    sudo=(sudo)
  else
    echo "quickstart: missing packages (${missing[*]}); run as root or install sudo" >&2
    exit 1
  fi
  say "installing with apt-get: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- preset ---------------------------------------------------------------------------
nvcc=$(command -v nvcc || true)
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; fi
configure_args=()
if [ "$cmd" = sanitize ]; then
  preset=sanitize
elif [ -n "$nvcc" ]; then
  preset=cuda
  configure_args+=("-DCMAKE_CUDA_COMPILER=$nvcc")
else
  preset=cpu
fi
jobs=$(nproc 2>/dev/null || echo 2)

say "configure (preset $preset${nvcc:+, nvcc $nvcc})"
cmake --preset "$preset" "${configure_args[@]}"

case "$cmd" in
  demo)
    say "build longmem_demo"
    cmake --build --preset "$preset" -j "$jobs" --target longmem_demo
    say "run"
    "build/$preset/examples/longmem_demo"
    ;;
  test | sanitize)
    say "build"
    cmake --build --preset "$preset" -j "$jobs"
    say "test"
    ctest --preset "$preset" -j 2 --output-on-failure
    ;;
  bench)
    say "build benchmarks"
    cmake --build --preset "$preset" -j "$jobs"
    shopt -s nullglob
    benches=("build/$preset"/bench/longmem_bench_*)
    if [ ${#benches[@]} -eq 0 ]; then
      echo "quickstart: no benchmarks were built (bench/bench_*.cpp missing, or Google Benchmark not found)" >&2
      exit 1
    fi
    for b in "${benches[@]}"; do
      [ -x "$b" ] || continue
      say "run $(basename "$b")"
      "$b" "$@"
    done
    ;;
esac
