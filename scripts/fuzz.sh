#!/usr/bin/env bash
# Runs every cargo-fuzz target for N seconds (default 60) with its seed corpus.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
bash scripts/fuzz-seeds.sh
cd fuzz
for t in $(cargo fuzz list); do
  echo "== fuzz $t for ${secs}s"
  cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 |
    grep -E '^(Done|#[0-9]+ +DONE)|SUMMARY|panicked|ERROR' || true
  ls artifacts/"$t"/crash-* 2>/dev/null && { echo "crash found in $t"; exit 1; } || true
done
