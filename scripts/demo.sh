#!/usr/bin/env bash
# make demo: a SOCI-converted image runs lazily under a private containerd.
#
# Starts, in a temp dir on 127.0.0.1: a registry (Debian docker-registry), soci-snapshotter-grpc
# and containerd with it as the `soci` proxy snapshotter. Builds a sample image from local files
# (busybox, ~300 MiB of /usr, a 160 MiB asset), pushes it, converts it with `soci convert`, pulls
# it with `soci image rpull` and runs it with `ctr run --snapshotter soci`, then prints the
# output, the snapshotter mode and the bytes the registry served against the image size.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/target/release
for b in soci soci-snapshotter-grpc; do [ -x "$BIN/$b" ] || { echo "demo: $BIN/$b missing (run make build)" >&2; exit 1; }; done
for c in docker-registry containerd ctr runc skopeo umoci busybox; do
  command -v "$c" >/dev/null || { echo "demo: $c missing (scripts/install-deps.sh)" >&2; exit 1; }
done

W=$(mktemp -d /tmp/soci-demo.XXXXXX)
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for p in $(grep -l "$W" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do [ "$p" != $$ ] && kill -9 "$p" 2>/dev/null; done
  grep " $W" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
  rm -rf "$W"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$port
echo "== starting registry ($REG), soci-snapshotter-grpc and containerd in $W"
mkdir -p "$W/registry"
cat > "$W/registry.yml" <<YML
version: 0.1
log: {level: info, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: $W/registry}, delete: {enabled: true}}
http: {addr: $REG}
YML
docker-registry serve "$W/registry.yml" > "$W/registry.log" 2>&1 & PIDS+=($!)

cat > "$W/soci.toml" <<TOML
metrics_address = "127.0.0.1:0"
[resolver]
plain_http_hosts = ["$REG"]
TOML
sed -i '/metrics_address/d' "$W/soci.toml"
"$BIN/soci-snapshotter-grpc" --root "$W/soci" --address "$W/soci.sock" --config "$W/soci.toml" > "$W/soci.log" 2>&1 & PIDS+=($!)

cat > "$W/containerd.toml" <<TOML
version = 2
root = "$W/ctd/root"
state = "$W/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$W/ctd.sock"
[ttrpc]
  address = "$W/ctd.sock.ttrpc"
[debug]
  address = "$W/ctd-debug.sock"
[proxy_plugins]
  [proxy_plugins.soci]
    type = "snapshot"
    address = "$W/soci.sock"
TOML
for i in $(seq 100); do [ -S "$W/soci.sock" ] && break; sleep 0.1; done
containerd --config "$W/containerd.toml" > "$W/containerd.log" 2>&1 & PIDS+=($!)
for i in $(seq 100); do ctr -a "$W/ctd.sock" version >/dev/null 2>&1 && break; sleep 0.1; done
for i in $(seq 100); do curl -fs "http://$REG/v2/" >/dev/null && break; sleep 0.1; done

echo "== building a sample image from local files (busybox, /usr files, a 160 MiB asset)"
L=$W/layout
umoci init --layout "$L" >/dev/null
umoci new --image "$L:demo" >/dev/null
mkdir -p "$W/rootfs/bin" "$W/rootfs/etc" "$W/assets"
cp /bin/busybox "$W/rootfs/bin/"
for a in sh cat head wc ls echo; do ln -s busybox "$W/rootfs/bin/$a"; done
echo "hello from a lazily loaded container" > "$W/rootfs/etc/demo-message"
umoci insert --image "$L:demo" "$W/rootfs" / >/dev/null
find /usr/lib /usr/share -xdev -type f -size -32M -printf '%s %p\n' 2>/dev/null | sort -k2 |
  awk -v lim=$((300 << 20)) '{ s += $1; print substr($0, index($0, " ") + 1); if (s > lim) exit }' > "$W/files" || true
mkdir -p "$W/usrcopy"
tar -C / -cf - $(sed 's|^/||' "$W/files") 2>/dev/null | tar -C "$W/usrcopy" -xf -
umoci insert --image "$L:demo" "$W/usrcopy/usr" /usr >/dev/null
rm -rf "$W/usrcopy"
head -c $((160 << 20)) /dev/urandom > "$W/assets/model.bin"
umoci insert --image "$L:demo" "$W/assets" /assets >/dev/null
umoci config --image "$L:demo" --config.cmd /bin/sh --config.cmd -c \
  --config.cmd 'cat /etc/demo-message; head -c 1000 /assets/model.bin | wc -c' >/dev/null
skopeo copy -q --dest-tls-verify=false "oci:$L:demo" "docker://$REG/demo:v1"
size=$(du -cb "$L"/blobs/sha256/* | tail -1 | cut -f1)
echo "image: $((size >> 20)) MiB in the registry"

echo "== soci convert $REG/demo:v1 $REG/demo:soci"
"$BIN/soci" convert --plain-http "$REG/demo:v1" "$REG/demo:soci" >/dev/null

served() { sed -n 's/.*"GET \/v2\/[^ ]*\/blobs\/sha256:[^ ]* HTTP\/1.1" 20[06] \([0-9]*\).*/\1/p' "$W/registry.log" | awk '{s+=$1} END {print s+0}'; }
before=$(served)
start=$(date +%s.%N)
echo "== soci image rpull + ctr run --snapshotter soci"
"$BIN/soci" -a "$W/ctd.sock" image rpull --plain-http "$REG/demo:soci"
echo "-- container output:"
ctr -a "$W/ctd.sock" run --rm --snapshotter soci "$REG/demo:soci" demo
end=$(date +%s.%N)
after=$(served)
echo "--"
fetched=$((after - before))
printf 'pull + run took %.2f s; registry served %d bytes (%.1f MiB) of a %d MiB image: %.1f%%\n' \
  "$(echo "$end - $start" | bc -l)" "$fetched" "$(echo "$fetched / 1048576" | bc -l)" $((size >> 20)) \
  "$(echo "100 * $fetched / $size" | bc -l)"
"$BIN/soci" -a "$W/ctd.sock" image mode "$REG/demo:soci" | tail -1
