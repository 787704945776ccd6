#!/usr/bin/env bash
# Cold start over a slow link: time from pull start to container exit, soci-rs (soci image rpull
# + ctr run --snapshotter soci) vs containerd's overlayfs (ctr image pull + ctr run), side by side
# in one run, through a delaying TCP proxy in front of the registry.
# Usage: bench/start.sh [RTT_MS] [RUNS]     (default 20 ms, 3 runs; results in bench/results/start.md)
# Every run uses a fresh daemon and containerd (nothing cached). Stargz is not compared yet.
set -euo pipefail
cd "$(dirname "$0")/.."
RTT=${1:-20}
RUNS=${2:-3}
BIN=$PWD/target/release
[ -x "$BIN/soci-delay-proxy" ] || cargo build --release -p integration-tests --bin soci-delay-proxy
W=$(mktemp -d /tmp/soci-bench.XXXXXX)
source scripts/env.sh
trap env_cleanup EXIT

REG=127.0.0.1:$(free_port)
start_registry "$REG"
PROXY=127.0.0.1:$(free_port)
"$BIN/soci-delay-proxy" "$PROXY" "$REG" $((RTT / 2)) > "$W/proxy.log" 2>&1 & PIDS+=($!)
for _ in $(seq 50); do grep -q ready "$W/proxy.log" && break; sleep 0.1; done
build_sample_image "$W/layout"
skopeo copy -q --dest-tls-verify=false "oci:$W/layout:demo" "docker://$REG/demo:v1"
"$BIN/soci" convert --plain-http "$REG/demo:v1" "$REG/demo:soci" >/dev/null
size=$(du -cb "$W/layout"/blobs/sha256/* | tail -1 | cut -f1)

now() { date +%s.%N; }
measure() { # measure KIND -> prints "seconds bytes"
  start_soci_containerd run "$PROXY"
  local ctd=$W/run/ctd.sock b0 t0 t1
  b0=$(served); t0=$(now)
  if [ "$1" = soci ]; then
    "$BIN/soci" -a "$ctd" image rpull --plain-http "$PROXY/demo:soci" > /dev/null
    ctr -a "$ctd" run --rm --snapshotter soci "$PROXY/demo:soci" c > /dev/null
  elif [ "$1" = soci-full ]; then
    # No SOCI index: the snapshotter pulls every layer in full (the fallback path).
    "$BIN/soci" -a "$ctd" image rpull --plain-http "$PROXY/demo:v1" > /dev/null
    ctr -a "$ctd" run --rm --snapshotter soci "$PROXY/demo:v1" c > /dev/null
  else
    ctr -a "$ctd" image pull --plain-http "$PROXY/demo:v1" > /dev/null
    ctr -a "$ctd" run --rm "$PROXY/demo:v1" c > /dev/null
  fi
  t1=$(now)
  echo "$(echo "$t1 - $t0" | bc -l) $(( $(served) - b0 ))"
  stop_soci_containerd run
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for kind in soci soci-full overlayfs; do
  for i in $(seq "$RUNS"); do measure "$kind"; done > "$W/$kind.txt"
done
s_t=$(cut -d' ' -f1 "$W/soci.txt" | median); o_t=$(cut -d' ' -f1 "$W/overlayfs.txt" | median)
s_b=$(cut -d' ' -f2 "$W/soci.txt" | median); o_b=$(cut -d' ' -f2 "$W/overlayfs.txt" | median)
f_t=$(cut -d' ' -f1 "$W/soci-full.txt" | median); f_b=$(cut -d' ' -f2 "$W/soci-full.txt" | median)
mkdir -p bench/results
{
  echo "Cold start, $RTT ms RTT (delaying proxy), $((size >> 20)) MiB image (3 gzip layers), median of $RUNS runs, fresh containerd + daemon each run"
  echo
  echo "| snapshotter | pull start to container exit (s) | registry bytes served |"
  echo "|---|---|---|"
  printf '| soci-rs (soci image rpull + ctr run) | %.2f | %d (%.1f%%) |\n' "$s_t" "$s_b" "$(echo "100 * $s_b / $size" | bc -l)"
  printf '| soci-rs full pull, no SOCI index (fallback) | %.2f | %d |\n' "$f_t" "$f_b"
  printf '| overlayfs (ctr image pull + ctr run) | %.2f | %d |\n' "$o_t" "$o_b"
  echo
  printf 'soci-rs / overlayfs = **%.3f**; fallback / overlayfs = **%.3f**\n' "$(echo "$s_t / $o_t" | bc -l)" "$(echo "$f_t / $o_t" | bc -l)"
  echo "command: bash bench/start.sh $RTT $RUNS; machine: $(nproc) cores, $(uname -m), $(date -u +%F)"
} | tee bench/results/start.md
