#!/usr/bin/env bash
# zTOC build throughput vs `gzip -dc` of the same layer, measured side by side in one run.
# Layer: a tar of local files (/usr) of at least 200 MiB uncompressed, gzip -6.
# Usage: bench/ztoc.sh [MIN_MIB]   (results also written to bench/results/ztoc.md)
set -euo pipefail
cd "$(dirname "$0")/.."
MIN_MIB=${1:-300}
SOCI=target/release/soci
[ -x "$SOCI" ] || cargo build --release -p soci-cli
work=$(mktemp -d /tmp/soci-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Collect files from /usr until MIN_MIB of data is listed.
find /usr -xdev -type f -size -64M -printf '%s %p\n' 2>/dev/null | sort -k2 |
  awk -v lim=$((MIN_MIB << 20)) '{ s += $1; print substr($0, index($0, " ") + 2); if (s > lim) exit }' > "$work/list" || true
tar -C / -cf "$work/layer.tar" -T "$work/list" 2>/dev/null || true
gzip -6 -c "$work/layer.tar" > "$work/layer.tar.gz"
usize=$(stat -c %s "$work/layer.tar"); csize=$(stat -c %s "$work/layer.tar.gz")
cat "$work/layer.tar.gz" > /dev/null  # warm the page cache

best() { # best of 3 wall-clock seconds for "$@"
  local b=999999 t
  for _ in 1 2 3; do
    local s=$(date +%s.%N); "$@" > /dev/null 2>&1; local e=$(date +%s.%N)
    t=$(echo "$e - $s" | bc -l); b=$(echo "if ($t < $b) $t else $b" | bc -l)
  done
  printf '%.3f' "$b"
}
t_gzip=$(best sh -c "gzip -dc '$work/layer.tar.gz' > /dev/null")
t_ztoc=$(best "$SOCI" ztoc build "$work/layer.tar.gz" -o "$work/layer.ztoc")
ratio=$(echo "$t_gzip / $t_ztoc" | bc -l)
mibs() { echo "$usize / 1048576 / $1" | bc -l; }
mkdir -p bench/results
{
  echo "| measure (layer: $((usize >> 20)) MiB tar, $((csize >> 20)) MiB gzip -6) | seconds (best of 3) | MiB/s uncompressed |"
  echo "|---|---|---|"
  printf '| `gzip -dc LAYER > /dev/null` | %s | %.0f |\n' "$t_gzip" "$(mibs "$t_gzip")"
  printf '| `soci ztoc build LAYER` (4 MiB spans) | %s | %.0f |\n' "$t_ztoc" "$(mibs "$t_ztoc")"
  printf '\nzTOC build throughput / gzip -dc throughput = **%.2f** (target >= 0.8)\n' "$ratio"
  echo "machine: $(nproc) cores, $(uname -m), $(date -u +%F)"
} | tee bench/results/ztoc.md
