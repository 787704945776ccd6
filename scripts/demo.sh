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
for c in docker-registry containerd ctr runc skopeo umoci busybox curl bc; do
  command -v "$c" >/dev/null || { echo "demo: $c missing (scripts/install-deps.sh)" >&2; exit 1; }
done
W=$(mktemp -d /tmp/soci-demo.XXXXXX)
source scripts/env.sh
trap env_cleanup EXIT

REG=127.0.0.1:$(free_port)
echo "== starting registry ($REG), soci-snapshotter-grpc and containerd in $W"
start_registry "$REG"
start_soci_containerd demo "$REG"
CTD=$W/demo/ctd.sock

echo "== building a sample image from local files (busybox, /usr files, a 160 MiB asset)"
build_sample_image "$W/layout"
skopeo copy -q --dest-tls-verify=false "oci:$W/layout:demo" "docker://$REG/demo:v1"
size=$(du -cb "$W/layout"/blobs/sha256/* | tail -1 | cut -f1)
echo "image: $((size >> 20)) MiB in the registry"

echo "== soci convert docker://$REG/demo:v1 docker://$REG/demo:soci"
"$BIN/soci" convert --plain-http "docker://$REG/demo:v1" "docker://$REG/demo:soci" >/dev/null

before=$(served)
start=$(date +%s.%N)
echo "== soci image rpull + ctr run --snapshotter soci"
"$BIN/soci" -a "$CTD" image rpull --plain-http "$REG/demo:soci"
echo "-- container output:"
ctr -a "$CTD" run --rm --snapshotter soci "$REG/demo:soci" demo
end=$(date +%s.%N)
after=$(served)
echo "--"
fetched=$((after - before))
printf 'pull + run took %.2f s; registry served %d bytes (%.1f MiB) of a %d MiB image: %.1f%%\n' \
  "$(echo "$end - $start" | bc -l)" "$fetched" "$(echo "$fetched / 1048576" | bc -l)" $((size >> 20)) \
  "$(echo "100 * $fetched / $size" | bc -l)"
"$BIN/soci" -a "$CTD" image mode "$REG/demo:soci" | tail -1
