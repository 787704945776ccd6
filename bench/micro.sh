#!/usr/bin/env bash
# Micro benchmarks, side by side in one run (results in bench/results/micro.md):
#  - warm reads: a 160 MiB file read through the lazy FUSE mount vs the same file in
#    containerd's overlayfs snapshot, once the daemon is idle (every span of the file local,
#    background fetch finished, passthrough backing files written). Sequential (1 MiB reads)
#    and random 4 KiB reads, each in two cache states, applied to both sides alike:
#      cold: page cache, dentries and inodes dropped before every measured read;
#      hot:  the file read once just before (its pages in memory on both sides).
#    The two sides alternate (lazy first on even repetitions, overlayfs first on odd ones), so
#    load from other processes hits both alike; MICRO_REPS repetitions (default 5), median
#    and every run reported. The daemon's metrics are read around the measurement: FUSE READs
#    that reached the daemon and passthrough opens show whether the kernel read the file
#    without the daemon.
#  - daemon RSS idle, and with one image of 20 lazily mounted layers.
# Usage: bench/micro.sh   (MICRO_REPS=N; SOCI_CONFIG_EXTRA=$'[fuse]\npassthrough = false' for
# the path without passthrough)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/target/release
W=$(mktemp -d /tmp/soci-micro.XXXXXX)
source scripts/env.sh
trap env_cleanup EXIT
trap 'exit 130' INT TERM

REG=127.0.0.1:$(free_port)
MET=127.0.0.1:$(free_port)
start_registry "$REG"
build_sample_image "$W/layout"
skopeo copy -q --dest-tls-verify=false "oci:$W/layout:demo" "docker://$REG/demo:v1"
"$BIN/soci" convert --plain-http "docker://$REG/demo:v1" "docker://$REG/demo:soci" >/dev/null
# As start_soci_containerd, with the metrics endpoint (a top-level key, before any table) and
# a background fetch that does not wait 30 s after the last read: the state measured is the
# same (everything local), it is only reached sooner.
d=$W/run
mkdir -p "$d"
printf 'metrics_address = "%s"\n[resolver]\nplain_http_hosts = ["%s"]\n[background_fetch]\nsilence_period_msec = 1000\nfetch_period_msec = 50\n%s\n' \
  "$MET" "$REG" "${SOCI_CONFIG_EXTRA:-}" > "$d/soci.toml"
"$BIN/soci-snapshotter-grpc" --root "$d/soci" --address "$d/soci.sock" --config "$d/soci.toml" > "$d/soci.log" 2>&1 & PIDS+=($!)
start_containerd_with "$d" soci "$d/soci.sock"
CTD=$d/ctd.sock
rss() { awk '/VmRSS/ {print $2}' "/proc/$(pgrep -f "soci-snapshotter-grpc --root $W/run/soci" | head -1)/status"; }
metric() { curl -fs "http://$MET/metrics" | awk -v k="$1" '$1 == k {print $2}'; }
idle_rss=$(rss)

"$BIN/soci" -a "$CTD" image rpull --plain-http "$REG/demo:soci" >/dev/null
ctr -a "$CTD" image pull --plain-http "$REG/demo:v1" >/dev/null
lazy=$(grep ' fuse.soci ' /proc/self/mountinfo | awk '{print $5}' | while read -r m; do
  [ -f "$m/assets/model.bin" ] && echo "$m/assets/model.bin"; done | head -1)
over=$(ls "$W"/run/ctd/root/io.containerd.snapshotter.v1.overlayfs/snapshots/*/fs/assets/model.bin | head -1)
[ -n "$lazy" ] && [ -n "$over" ] || { echo "files not found (lazy: $lazy, overlay: $over)" >&2; exit 1; }
cmp "$lazy" "$over" # fetches every span of the lazy file
t1=$(date +%s.%N)
# With passthrough: how long after that first full read the file's backing file is ready
# (named <offset>-<size> in the layer).
ready=n/a
if [ "$(metric soci_passthrough_unavailable_total)" = 0 ] && ! grep -q 'passthrough = false' "$d/soci.toml"; then
  for _ in $(seq 600); do
    ls "$d"/soci/cache/passthrough/*/*-$((160 << 20)) >/dev/null 2>&1 && { ready=$(printf '%.2f' "$(echo "$(date +%s.%N) - $t1" | bc -l)"); break; }
    sleep 0.05
  done
fi

# Wait (bounded) until the daemon is idle: nothing fetched, no backing file written for 5 s.
state() { echo "$(metric 'soci_fetched_bytes_total{priority="background"}') $(metric soci_passthrough_files_written_total)"; }
prev= ; same=0; now=
for _ in $(seq 600); do
  now=$(state)
  if [ "$now" = "$prev" ]; then same=$((same + 1)); else same=0; prev=$now; fi
  [ "$same" -ge 5 ] && break
  sleep 1
done
[ "$same" -ge 5 ] || { echo "daemon still busy after 600 s: $now" >&2; exit 1; }

# The container's view: each file also through a read-only overlay mount whose lower layer is
# the lazy FUSE mount or the overlayfs snapshot directory (an empty second lower layer: overlayfs
# wants two without an upper).
mkdir -p "$W/ov/empty" "$W/ov/lazy" "$W/ov/over"
mount -t overlay overlay -o "ro,lowerdir=${lazy%/assets/model.bin}:$W/ov/empty" "$W/ov/lazy"
mount -t overlay overlay -o "ro,lowerdir=${over%/assets/model.bin}:$W/ov/empty" "$W/ov/over"
reads0=$(metric soci_fuse_read_duration_seconds_count)
opens0=$(metric soci_passthrough_opens_total)
load0=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$lazy" "$over" "$W/ov/lazy/assets/model.bin" "$W/ov/over/assets/model.bin" "${MICRO_REPS:-5}" > "$W/reads" <<'PY'
import os, random, statistics, sys, time
paths = {"direct": (sys.argv[1], sys.argv[2]), "overlay": (sys.argv[3], sys.argv[4])}
reps = int(sys.argv[5])
def drop():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
def read_all(p):
    with open(p, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
def seq(p):
    t = time.perf_counter(); n = 0
    with open(p, "rb", buffering=0) as f:
        while True:
            b = f.read(1 << 20)
            if not b: break
            n += len(b)
    return n / (time.perf_counter() - t) / 2**20
def rnd(p, count=20000):
    size = os.path.getsize(p); rng = random.Random(7)
    offs = [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]
    t = time.perf_counter(); fd = os.open(p, os.O_RDONLY)
    for o in offs: os.pread(fd, 4096, o)
    os.close(fd)
    return count / (time.perf_counter() - t)
res = {}
for access, (lazy, over) in paths.items():
    for cache in ("cold", "hot"):
        for test, fn in (("seq", seq), ("rnd", rnd)):
            for i in range(reps):
                order = [("lazy", lazy), ("overlayfs", over)]
                if i % 2: order.reverse()
                for side, p in order:
                    if cache == "cold": drop()
                    else: read_all(p)
                    res.setdefault((access, cache, test, side), []).append(fn(p))
for (access, cache, test, side), v in res.items():
    print(access, cache, test, side, f"{statistics.median(v):.0f}", " ".join(f"{x:.0f}" for x in v))
PY
load1=$(cut -d' ' -f1-3 /proc/loadavg)
reads=$(( $(metric soci_fuse_read_duration_seconds_count) - reads0 ))
opens=$(( $(metric soci_passthrough_opens_total) - opens0 ))
med() { awk -v k="$1 $2 $3 $4" '$1" "$2" "$3" "$4 == k {print $5}' "$W/reads"; }
all() { awk -v k="$1 $2 $3 $4" '$1" "$2" "$3" "$4 == k {$1=$2=$3=$4=$5=""; sub(/^ +/, ""); print}' "$W/reads"; }
row() {
  local l o
  l=$(med "$1" "$2" "$3" lazy); o=$(med "$1" "$2" "$3" overlayfs)
  printf '| %s | %s | %s | %s | %s | %.2f | %s / %s |\n' "$1" "$2" "$4" "$l" "$o" "$(echo "$l / $o" | bc -l)" \
    "$(all "$1" "$2" "$3" lazy)" "$(all "$1" "$2" "$3" overlayfs)"
}

# 20 lazily mounted layers.
umoci init --layout "$W/l20" >/dev/null
umoci new --image "$W/l20:m" >/dev/null
mkdir -p "$W/base/bin"; cp /bin/busybox "$W/base/bin/"; ln -s busybox "$W/base/bin/true"
umoci insert --image "$W/l20:m" "$W/base" / >/dev/null
for i in $(seq 19); do
  mkdir -p "$W/d$i"; head -c $((2 << 20)) /dev/urandom > "$W/d$i/blob"
  umoci insert --image "$W/l20:m" "$W/d$i" "/data/$i" >/dev/null; rm -rf "$W/d$i"
done
skopeo copy -q --dest-tls-verify=false "oci:$W/l20:m" "docker://$REG/many:v1"
"$BIN/soci" convert --plain-http --min-layer-size 0 "docker://$REG/many:v1" "docker://$REG/many:soci" >/dev/null
"$BIN/soci" -a "$CTD" image rpull --plain-http "$REG/many:soci" >/dev/null
ctr -a "$CTD" run --rm --snapshotter soci "$REG/many:soci" m /bin/true
mounts=$(grep -c ' fuse.soci ' /proc/self/mountinfo)
rss20=$(rss)

mkdir -p bench/results
{
  echo "Warm reads of a 160 MiB file, daemon idle (every span local, background fetch done, backing files written); sides alternated, median of ${MICRO_REPS:-5}:"
  echo
  echo "| access | page cache | read | soci-rs lazy | overlayfs snapshot | lazy / overlayfs | every run (lazy / overlayfs) |"
  echo "|---|---|---|---|---|---|---|"
  for a in direct overlay; do
    for c in cold hot; do
      row $a $c seq "sequential 1 MiB (MiB/s)"
      row $a $c rnd "random 4 KiB (reads/s)"
    done
  done
  echo
  echo "direct: the file in the lazy FUSE mount vs in containerd's overlayfs snapshot directory; overlay: through a read-only overlay mount on each (what a container reads)."
  echo "cold: page cache, dentries and inodes dropped before every read (both sides); hot: the file read once just before (both sides)."
  echo "During the measurement: $reads FUSE READs reached the daemon, $opens opens were passthrough opens; backing file ready $ready s after the first full read; load average $load0 before, $load1 after."
  echo
  echo "Daemon RSS: idle $((idle_rss / 1024)) MiB; with $mounts lazily mounted layers (two images) $((rss20 / 1024)) MiB."
  echo
  echo "command: bash bench/micro.sh${SOCI_CONFIG_EXTRA:+ (daemon config extra: $(echo "$SOCI_CONFIG_EXTRA" | tr '\n' ' '))}; machine: $(nproc) cores, $(uname -m), kernel $(uname -r), $(date -u +%F)"
} | tee bench/results/micro.md
