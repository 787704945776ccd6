#!/usr/bin/env bash
# Ad-hoc: cold start of a language-runtime image (Debian's python3.11 and its standard library;
# the workload imports a dozen stdlib packages) with the prefetch `soci prefetch record` wrote,
# against the same image without prefetch, over a 20 ms RTT delaying proxy on loopback.
# Every measured run uses a fresh containerd + daemon (`[prefetch] enable = true`).
#
# Usage: bench/prefetch-record.sh [RUNS]   (default 5). Prints one line per run and medians.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
BIN=$PWD/target/release
[ -x "$BIN/soci-delay-proxy" ] || cargo build --release -p integration-tests --bin soci-delay-proxy
W=$(mktemp -d /tmp/soci-record-bench.XXXXXX)
source scripts/env.sh
trap env_cleanup EXIT
trap 'exit 130' INT TERM

NEAR=127.0.0.1:$(free_port)
start_registry "$NEAR"
FAR=127.0.0.1:$(free_port)
"$BIN/soci-delay-proxy" "$FAR" "$NEAR" 10 > "$W/proxy.log" 2>&1 & PIDS+=($!)
for _ in $(seq 50); do grep -q ready "$W/proxy.log" && break; sleep 0.1; done

# --- image: busybox layer, python3.11 + libs + stdlib layer --------------------------------
L=$W/layout
umoci init --layout "$L" >/dev/null
umoci new --image "$L:py" >/dev/null
mkdir -p "$W/l1/bin" "$W/l1/usr/bin" "$W/l1/lib/x86_64-linux-gnu" "$W/l1/lib64"
cp /bin/busybox "$W/l1/bin/"
for a in sh cat true; do ln -s busybox "$W/l1/bin/$a"; done
umoci insert --image "$L:py" "$W/l1" / >/dev/null
mkdir -p "$W/l2/usr/bin" "$W/l2/lib/x86_64-linux-gnu" "$W/l2/lib64" "$W/l2/usr/lib"
cp /usr/bin/python3.11 "$W/l2/usr/bin/python3"
for so in $(ldd /usr/bin/python3.11 | awk '/=>/ {print $3}'); do cp "$so" "$W/l2/lib/x86_64-linux-gnu/"; done
cp /lib64/ld-linux-x86-64.so.2 "$W/l2/lib64/"
cp -a /usr/lib/python3.11 "$W/l2/usr/lib/"
umoci insert --image "$L:py" "$W/l2" / >/dev/null
IMPORTS='import json, email.mime.multipart, http.client, urllib.request, asyncio, decimal, argparse, logging.handlers, unittest, xml.etree.ElementTree, csv, difflib, inspect, tarfile, zipfile, pydoc; print("ok")'
umoci config --image "$L:py" --config.cmd /usr/bin/python3 --config.cmd -c --config.cmd "$IMPORTS" >/dev/null
rm -rf "$W/l1" "$W/l2"
skopeo copy -q --dest-tls-verify=false "oci:$L:py" "docker://$NEAR/py:v1"
"$BIN/soci" convert --plain-http "docker://$NEAR/py:v1" "docker://$NEAR/py:soci" >/dev/null

start_run() { # start_run NAME: daemon (prefetch on) + containerd under $W/NAME
  local d=$W/$1
  mkdir -p "$d"
  printf '[resolver]\nplain_http_hosts = ["%s", "%s"]\n[prefetch]\nenable = true\n' "$NEAR" "$FAR" > "$d/soci.toml"
  "$BIN/soci-snapshotter-grpc" --root "$d/soci" --address "$d/soci.sock" --config "$d/soci.toml" > "$d/soci.log" 2>&1 & PIDS+=($!)
  start_containerd_with "$d" soci "$d/soci.sock"
}

# --- record once (through the delay proxy, as a user would) --------------------------------
start_run rec
t0=$(date +%s.%N)
DIGEST=$("$BIN/soci" -a "$W/rec/ctd.sock" prefetch record --plain-http --daemon-root "$W/rec/soci" \
  --dst "docker://$FAR/py:rec" "docker://$FAR/py:soci" 2> "$W/record.err")
echo "recorded: $DIGEST in $(echo "$(date +%s.%N) - $t0" | bc -l) s" >&2
grep '^layer' "$W/record.err" >&2 || true
stop_soci_containerd rec

now() { date +%s.%N; }
measure() { # measure TAG -> "seconds bytes"
  local b0 t0 t1
  start_run run
  b0=$(served); t0=$(now)
  "$BIN/soci" -a "$W/run/ctd.sock" image rpull --plain-http "$FAR/py:$1" > /dev/null
  out=$(ctr -a "$W/run/ctd.sock" run --rm --snapshotter soci "$FAR/py:$1" c)
  t1=$(now)
  [ "$out" = ok ] || { echo "unexpected output: $out" >&2; exit 1; }
  echo "$(echo "$t1 - $t0" | bc -l) $(( $(served) - b0 ))"
  stop_soci_containerd run
}
: > "$W/results"
for i in $(seq "$RUNS"); do
  for tag in soci rec; do
    echo "$tag $(measure $tag)" | tee -a "$W/results" >&2
  done
done
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for tag in soci rec; do
  printf '%s: median %.3f s, %d KiB served\n' "$tag" \
    "$(awk -v t=$tag '$1==t {print $2}' "$W/results" | median)" \
    "$(( $(awk -v t=$tag '$1==t {print $3}' "$W/results" | median) >> 10 ))"
done
