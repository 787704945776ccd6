#!/usr/bin/env bash
# Micro benchmarks, side by side in one run (results in bench/results/micro.md):
#  - warm reads: a 160 MiB file read through the lazy FUSE mount (spans already fetched and on
#    local disk) vs the same file in containerd's overlayfs snapshot; page cache dropped before
#    each measurement. Sequential (1 MiB reads) and random 4 KiB reads.
#  - daemon RSS idle, and with one image of 20 lazily mounted layers.
# Usage: bench/micro.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/target/release
W=$(mktemp -d /tmp/soci-micro.XXXXXX)
source scripts/env.sh
trap env_cleanup EXIT
trap 'exit 130' INT TERM

REG=127.0.0.1:$(free_port)
start_registry "$REG"
build_sample_image "$W/layout"
skopeo copy -q --dest-tls-verify=false "oci:$W/layout:demo" "docker://$REG/demo:v1"
"$BIN/soci" convert --plain-http "docker://$REG/demo:v1" "docker://$REG/demo:soci" >/dev/null
start_soci_containerd run "$REG"
CTD=$W/run/ctd.sock
rss() { awk '/VmRSS/ {print $2}' "/proc/$(pgrep -f "soci-snapshotter-grpc --root $W/run/soci" | head -1)/status"; }
idle_rss=$(rss)

"$BIN/soci" -a "$CTD" image rpull --plain-http "$REG/demo:soci" >/dev/null
ctr -a "$CTD" image pull --plain-http "$REG/demo:v1" >/dev/null
lazy=$(grep ' fuse.soci ' /proc/self/mountinfo | awk '{print $5}' | while read -r m; do
  [ -f "$m/assets/model.bin" ] && echo "$m/assets/model.bin"; done | head -1)
over=$(ls "$W"/run/ctd/root/io.containerd.snapshotter.v1.overlayfs/snapshots/*/fs/assets/model.bin | head -1)
[ -n "$lazy" ] && [ -n "$over" ] || { echo "files not found (lazy: $lazy, overlay: $over)" >&2; exit 1; }
cmp "$lazy" "$over" # also fetches every span of the lazy file: the reads below are warm

python3 - "$lazy" "$over" > "$W/reads" <<'PY'
import os, random, sys, time
def drop():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
def seq(p):
    drop(); t = time.perf_counter(); n = 0
    with open(p, "rb", buffering=0) as f:
        while True:
            b = f.read(1 << 20)
            if not b: break
            n += len(b)
    return n / (time.perf_counter() - t) / 2**20
def rnd(p, count=20000):
    size = os.path.getsize(p); rng = random.Random(7)
    offs = [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]
    drop(); fd = os.open(p, os.O_RDONLY); t = time.perf_counter()
    for o in offs: os.pread(fd, 4096, o)
    dt = time.perf_counter() - t; os.close(fd)
    return count / dt
for name, p in (("lazy", sys.argv[1]), ("overlayfs", sys.argv[2])):
    s = sorted(seq(p) for _ in range(3))[1]
    r = sorted(rnd(p) for _ in range(3))[1]
    print(name, f"{s:.0f}", f"{r:.0f}")
PY
read -r _ l_seq l_rnd < <(grep '^lazy' "$W/reads")
read -r _ o_seq o_rnd < <(grep '^overlayfs' "$W/reads")

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
  echo "Warm reads of a 160 MiB file (spans cached on local disk; page cache dropped first), median of 3:"
  echo
  echo "| path | sequential (MiB/s) | random 4 KiB (reads/s) |"
  echo "|---|---|---|"
  echo "| soci-rs lazy FUSE mount | $l_seq | $l_rnd |"
  echo "| overlayfs snapshot (same file) | $o_seq | $o_rnd |"
  printf '| lazy / overlayfs | %.2f | %.2f |\n' "$(echo "$l_seq / $o_seq" | bc -l)" "$(echo "$l_rnd / $o_rnd" | bc -l)"
  echo
  echo "Daemon RSS: idle $((idle_rss / 1024)) MiB; with $mounts lazily mounted layers (two images) $((rss20 / 1024)) MiB."
  echo
  echo "command: bash bench/micro.sh; machine: $(nproc) cores, $(uname -m), kernel $(uname -r), $(date -u +%F)"
} | tee bench/results/micro.md
