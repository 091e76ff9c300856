#!/usr/bin/env bash
# Packs the Debian packages that the lent GPU machine lacks (it has CUDA, CMake, ninja and PyTorch,
# no package registry) into .devdeps/ at the repository root, ready to travel with a device run:
#
#   here, once:         bash bench/pack_device_deps.sh
#   in each GPU run:    carry [".devdeps"], begin the command with  bash .devdeps/install.sh &&
#
# The packages are the build's own dependencies (Eigen, nlohmann-json, Catch2, Google Benchmark,
# CLI11 and oneDNN for the host GEMMs): their files as dpkg lists them, documentation left out, as
# one xz archive (about 8 MB: the tree that travels is limited to 64 MiB), unpacked there under /.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
out="$root/.devdeps"
packages=(libeigen3-dev nlohmann-json3-dev catch2 libbenchmark-dev libbenchmark1debian libcli11-dev libdnnl-dev libdnnl2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
rm -rf "$out"
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$out"
for p in "${packages[@]}"; do
  dpkg -L "$p" | grep -v -e '^/usr/share/doc' -e '^/\.$' | while read -r f; do
    if [ -f "$f" ] || [ -L "$f" ]; then
      mkdir -p "$tree$(dirname "$f")"
      cp -a "$f" "$tree$f"
    fi
  done
done
tar -C "$tree" -cJf "$out/root.tar.xz" usr  # every file is under /usr
cat >"$out/install.sh" <<'INNER'
#!/usr/bin/env bash
# Runs on the GPU machine: puts the carried packages' files where CMake and the loader find them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tar -C / --no-overwrite-dir -xJf "$here/root.tar.xz"
ldconfig
INNER
chmod +x "$out/install.sh"
echo "packed ${packages[*]} into $out ($(du -sh "$out" | cut -f1))"
