#!/usr/bin/env bash
# Cold start, side by side in one run: time from pull start to container exit and registry bytes
# served, for containerd's overlayfs (ctr image pull + ctr run), soci-rs (soci image rpull +
# ctr run --snapshotter soci), stargz-snapshotter when bench/stargz.sh has built it, and the
# soci-rs fallback (full pull of the unconverted image, far profile).
#
# The registry runs in its own network namespace behind a veth pair. Profiles:
#   near: no shaping;  far: 20 ms RTT (delaying proxy) and 200 Mbit/s (tbf on both veth ends).
# Workloads: true (exit at once), small (read one small file), quarter (read 25% of the files).
# Every run uses a fresh containerd + snapshotter (nothing cached).
#
# Usage: bench/start.sh [RUNS]   (default 3; PROFILES="near far", WORKLOADS="true small quarter")
# Results: bench/results/start.md (table) and bench/results/start.png (chart).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PROFILES=${PROFILES:-near far}
WORKLOADS=${WORKLOADS:-true small quarter}
W1=${WORKLOADS%% *}
BIN=$PWD/target/release
command -v gnuplot >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gnuplot-nox >/dev/null; }
STARGZ=${STARGZ:-$PWD/target/stargz/stargz-snapshotter}
CTR_REMOTE=$(command -v ctr-remote || true)
W=$(mktemp -d /tmp/soci-bench.XXXXXX)
source scripts/env.sh
cleanup() {
  env_cleanup
  net_cleanup
}
trap cleanup EXIT
trap 'exit 130' INT TERM
source bench/net.sh

# --- image: >= 400 MiB in 5 gzip layers, from local files ------------------------------------
L=$W/layout
umoci init --layout "$L" >/dev/null
umoci new --image "$L:b" >/dev/null
mkdir -p "$W/l1/bin" "$W/l1/etc"
cp /bin/busybox "$W/l1/bin/"
for a in sh cat true xargs head wc; do ln -s busybox "$W/l1/bin/$a"; done
echo "hello from a lazily loaded container" > "$W/l1/etc/demo-message"
umoci insert --image "$L:b" "$W/l1" / >/dev/null
pick() { # pick DIR MiB -> file list
  find "$1" -xdev -type f -size -32M -printf '%s %p\n' 2>/dev/null | sort -k2 |
    awk -v lim=$(($2 << 20)) '{ s += $1; print substr($0, index($0, " ") + 1); if (s > lim) exit }' || true
}
usize=$(du -sb "$W/l1" | cut -f1)
for part in "lib 250" "share 150"; do
  set -- $part
  pick "/usr/$1" "$2" > "$W/files-$1"
  mkdir -p "$W/l-$1"
  sed 's|^/||' "$W/files-$1" > "$W/names-$1"
  { tar -C / -cf - --verbatim-files-from -T "$W/names-$1" 2>/dev/null || true; } | tar -C "$W/l-$1" -xf -
  umoci insert --image "$L:b" "$W/l-$1/usr/$1" "/usr/$1" >/dev/null
  usize=$((usize + $(du -sb "$W/l-$1" | cut -f1)))
  rm -rf "$W/l-$1"
done
mkdir -p "$W/l4"
head -c $((240 << 20)) /dev/urandom > "$W/l4/model.bin"
usize=$((usize + (240 << 20)))
umoci insert --image "$L:b" "$W/l4" /assets >/dev/null
mkdir -p "$W/l5/etc"
cat "$W/files-lib" "$W/files-share" | awk 'NR % 4 == 1' > "$W/l5/etc/bench-files"
umoci insert --image "$L:b" "$W/l5" / >/dev/null
rm -rf "$W/l1" "$W/l4" "$W/l5"
skopeo copy -q --dest-tls-verify=false "oci:$L:b" "docker://$NEAR/bench:v1"
"$BIN/soci" convert --plain-http "docker://$NEAR/bench:v1" "docker://$NEAR/bench:soci" >/dev/null
blobs=$(skopeo inspect --tls-verify=false --raw "docker://$NEAR/bench:v1" | python3 -c 'import json,sys; m=json.load(sys.stdin); print(sum(l["size"] for l in m["layers"]), len(m["layers"]))')
size=${blobs% *}; nlayers=${blobs#* }
if [ -x "$STARGZ" ] && [ -n "$CTR_REMOTE" ]; then
  bash bench/stargz.sh convert "$NEAR/bench:v1" "$NEAR/bench:esgz"
  KINDS=${KINDS:-overlayfs stargz soci}
else
  echo "stargz-snapshotter not built (bash bench/stargz.sh build): compared without it" >&2
  KINDS=${KINDS:-overlayfs soci}
fi

now() { date +%s.%N; }
measure() { # measure KIND PROFILE WORKLOAD -> "seconds bytes"
  local kind=$1 a ctd b0 t0 t1 img
  a=$(addr "$2")
  case $3 in
    true) cmd=(/bin/true) ;;
    small) cmd=(/bin/cat /etc/demo-message) ;;
    quarter) cmd=(/bin/sh -c 'xargs cat < /etc/bench-files > /dev/null') ;;
  esac
  if [ "$kind" = stargz ]; then
    bash bench/stargz.sh start "$W/run" "$a"
  else
    start_soci_containerd run "$a"
  fi
  ctd=$W/run/ctd.sock
  b0=$(served); t0=$(now)
  case $kind in
    soci)
      "$BIN/soci" -a "$ctd" image rpull --plain-http "$a/bench:soci" > /dev/null
      ctr -a "$ctd" run --rm --snapshotter soci "$a/bench:soci" c "${cmd[@]}" > /dev/null ;;
    soci-full)
      "$BIN/soci" -a "$ctd" image rpull --plain-http "$a/bench:v1" > /dev/null
      ctr -a "$ctd" run --rm --snapshotter soci "$a/bench:v1" c "${cmd[@]}" > /dev/null ;;
    stargz)
      "$CTR_REMOTE" -a "$ctd" image rpull --plain-http "$a/bench:esgz" > /dev/null
      ctr -a "$ctd" run --rm --snapshotter stargz "$a/bench:esgz" c "${cmd[@]}" > /dev/null ;;
    overlayfs)
      ctr -a "$ctd" image pull --plain-http "$a/bench:v1" > /dev/null
      ctr -a "$ctd" run --rm "$a/bench:v1" c "${cmd[@]}" > /dev/null ;;
  esac
  t1=$(now)
  echo "$(echo "$t1 - $t0" | bc -l) $(( $(served) - b0 ))"
  stop_soci_containerd run
}
# trace_run PROFILE: one soci-rs start of the `small` workload with the daemon's timeline on,
# drawn as bench/results/waterfall-PROFILE.png (+ .md): every step of the lazy start.
trace_run() {
  local p=$1 a d t0 t1 t2 ctd
  a=$(addr "$p"); d=$W/trace-$p
  mkdir -p "$d"
  SOCI_SNAPSHOTTER_TIMELINE=$d/timeline.jsonl start_soci_containerd run "$a"
  ctd=$W/run/ctd.sock
  t0=$(now)
  "$BIN/soci" -a "$ctd" image rpull --plain-http "$a/bench:soci" > /dev/null
  t1=$(now)
  ctr -a "$ctd" run --rm --snapshotter soci "$a/bench:soci" c /bin/cat /etc/demo-message > /dev/null
  t2=$(now)
  stop_soci_containerd run
  printf 'rpull %s %s\nrun %s %s\n' "$t0" "$t1" "$t1" "$t2" > "$d/markers"
  mkdir -p bench/results
  python3 bench/waterfall.py "$d/timeline.jsonl" --markers "$d/markers" \
    --title "soci-rs lazy start, $p profile, workload small" \
    --png "bench/results/waterfall-$p.png" --md "bench/results/waterfall-$p.md" >&2
  cp "$d/timeline.jsonl" "bench/results/timeline-$p.jsonl"
  cp "$d/markers" "bench/results/markers-$p"
}

# trace_full: one soci-rs fallback full pull (unconverted image, far profile, `true`) with the
# daemon's timeline on, drawn as bench/results/waterfall-full-far.png (+ .md): each layer's
# download, unpack-slot wait and unpack.
trace_full() {
  local a d t0 t1 t2 ctd
  a=$(addr far); d=$W/trace-full
  mkdir -p "$d"
  SOCI_SNAPSHOTTER_TIMELINE=$d/timeline.jsonl start_soci_containerd run "$a"
  ctd=$W/run/ctd.sock
  t0=$(now)
  "$BIN/soci" -a "$ctd" image rpull --plain-http "$a/bench:v1" > /dev/null
  t1=$(now)
  ctr -a "$ctd" run --rm --snapshotter soci "$a/bench:v1" c /bin/true > /dev/null
  t2=$(now)
  stop_soci_containerd run
  printf 'rpull %s %s\nrun %s %s\n' "$t0" "$t1" "$t1" "$t2" > "$d/markers"
  mkdir -p bench/results
  python3 bench/waterfall.py "$d/timeline.jsonl" --markers "$d/markers" \
    --title "soci-rs fallback full pull (no SOCI index), far profile, workload true" \
    --png bench/results/waterfall-full-far.png --md bench/results/waterfall-full-far.md >&2
  cp "$d/timeline.jsonl" bench/results/timeline-full-far.jsonl
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

: > "$W/results"
for p in $PROFILES; do
  shape "$p"
  for wl in $WORKLOADS; do
    for kind in $KINDS; do
      for i in $(seq "$RUNS"); do
        echo "$p $wl $kind $(measure "$kind" "$p" "$wl")" | tee -a "$W/results" >&2
      done
    done
  done
  [ "${WATERFALL:-1}" = 1 ] && [[ " $KINDS " == *" soci "* ]] && trace_run "$p"
  if [ "$p" = far ] && [[ " $KINDS " == *" overlayfs "* ]]; then
    for i in $(seq "$RUNS"); do
      echo "$p $W1 soci-full $(measure soci-full "$p" "$W1")" | tee -a "$W/results" >&2
    done
    [ "${WATERFALL:-1}" = 1 ] && trace_full
  fi
done
shape near

med() { awk -v p="$1" -v w="$2" -v k="$3" -v c="$4" '$1==p && $2==w && $3==k {print $c}' "$W/results" | median; }
ratio() { [ -n "$2" ] && printf '%.3f' "$(echo "$1 / $2" | bc -l)" || echo -; }
mkdir -p bench/results
{
  echo "Cold start: pull start to container exit (s), median of $RUNS runs; registry bytes served."
  echo "Image: $((usize >> 20)) MiB unpacked, $((size >> 20)) MiB in $nlayers gzip layers; registry in a"
  echo "network namespace; near = veth, far = 20 ms RTT + 200 Mbit/s. Fresh containerd + snapshotter each run."
  echo
  echo "| profile | workload | snapshotter | time (s) | bytes served | time / overlayfs | time / stargz |"
  echo "|---|---|---|---|---|---|---|"
  for p in $PROFILES; do for wl in $WORKLOADS; do
    o=$(med "$p" "$wl" overlayfs 4); g=$(med "$p" "$wl" stargz 4)
    for kind in $KINDS; do
      t=$(med "$p" "$wl" "$kind" 4); b=$(med "$p" "$wl" "$kind" 5)
      printf '| %s | %s | %s | %.2f | %d MiB (%.1f%%) | %s | %s |\n' "$p" "$wl" "$kind" "$t" $((b >> 20)) \
        "$(echo "100 * $b / $size" | bc -l)" "$(ratio "$t" "$o")" "$(ratio "$t" "$g")"
    done
  done; done
  if [[ " $PROFILES " == *" far "* ]] && [[ " $KINDS " == *" overlayfs "* ]]; then
    o=$(med far "$W1" overlayfs 4); f=$(med far "$W1" soci-full 4)
    printf '| far | %s | soci-rs fallback (no index, full pull) | %.2f | %d MiB | %.3f | |\n' "$W1" "$f" \
      $(( $(med far "$W1" soci-full 5) >> 20 )) "$(echo "$f / $o" | bc -l)"
  fi
  echo
  echo "command: bash bench/start.sh $RUNS; machine: $(nproc) cores, $(uname -m), kernel $(uname -r), $(date -u +%F)"
} | tee bench/results/start.md

# Chart: time to exit per snapshotter, per profile and workload.
{
  echo "case $KINDS"
  for p in $PROFILES; do for wl in $WORKLOADS; do
    printf '%s/%s' "$p" "$wl"
    for kind in $KINDS; do printf ' %s' "$(med "$p" "$wl" "$kind" 4)"; done
    echo
  done; done
} > "$W/chart.dat"
n=$(echo $KINDS | wc -w)
gnuplot <<GP
set terminal pngcairo size 900,480 noenhanced
set output 'bench/results/start.png'
set title 'Cold start to container exit (s, lower is better, log scale)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y
set ylabel 'seconds'
set key top left
set grid ytics
plot for [i=2:$((n + 1))] '$W/chart.dat' using i:xtic(1) title columnheader(i)
GP
