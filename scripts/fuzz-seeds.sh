#!/usr/bin/env bash
# Builds small seed corpora for the fuzz targets from local files (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
c=fuzz/corpus
mkdir -p $c/ztoc_parse $c/checkpoints $c/tar_walk $c/ztoc_build $c/oci_json $c/fuse_request $c/unpack
[ -n "$(ls -A $c/tar_walk)" ] && [ -n "$(ls -A $c/oci_json)" ] && [ -n "$(ls -A $c/fuse_request)" ] && [ -n "$(ls -A $c/unpack)" ] && exit 0
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/t/d"; echo hello > "$tmp/t/d/f"; ln -s d/f "$tmp/t/l"; ln "$tmp/t/d/f" "$tmp/t/h"
for fmt in gnu pax ustar; do
  tar --format=$fmt -C "$tmp/t" -cf "$c/tar_walk/$fmt.tar" .
  gzip -c "$c/tar_walk/$fmt.tar" > "$c/ztoc_build/$fmt.tar.gz"
  cp "$c/tar_walk/$fmt.tar" "$c/ztoc_build/"
  target/release/soci ztoc build --span-size 1024 "$c/ztoc_build/$fmt.tar.gz" -o "$c/ztoc_parse/$fmt.ztoc" 2>/dev/null
done
python3 - "$c" <<'PY'
import struct, sys
c = sys.argv[1]
w = bytes(32768)
blob = struct.pack('<iq', 2, 1 << 22) + struct.pack('<qqB', 10, 0, 0) + w + struct.pack('<qqB', 5000, 4300000, 3) + w
open(f"{c}/checkpoints/v2.bin", "wb").write(blob)
d = "sha256:" + "a" * 64
open(f"{c}/oci_json/soci.json", "w").write('{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.amazon.soci.index.v2+json","digest":"%s","size":2},"layers":[{"mediaType":"application/octet-stream","digest":"%s","size":5,"annotations":{"com.amazon.soci.image-layer-digest":"%s"}}]}' % (d, d, d))
open(f"{c}/oci_json/index.json", "w").write('{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":1,"platform":{"architecture":"amd64","os":"linux"},"artifactType":"x","annotations":{"a":"b"}}]}' % d)
# FUSE requests: LOOKUP "etc", READ 4096@0, GETXATTR, INIT 7.38.
def req(op, args):
    return struct.pack('<IIQQIIIHH', 40 + len(args), op, 1, 1, 0, 0, 0, 0, 0) + args
open(f"{c}/fuse_request/lookup", "wb").write(req(1, b"etc\0"))
open(f"{c}/fuse_request/read", "wb").write(req(15, struct.pack('<QQIIQII', 0, 0, 4096, 0, 0, 0, 0)))
open(f"{c}/fuse_request/getxattr", "wb").write(req(22, struct.pack('<II', 64, 0) + b"user.a\0"))
open(f"{c}/fuse_request/init", "wb").write(req(26, struct.pack('<IIII', 7, 38, 131072, 0) + bytes(48)))
# unpack: first byte even = raw tar (the tar_walk seeds), odd = structured ops of 5 bytes
# (kind, name parts, name parts, link target, mode): hardlink to a symlink at the canary,
# a directory replaced by a symlink, `.wh..` whiteouts, `..` names.
import glob, os
for t in glob.glob(f"{c}/tar_walk/*.tar"):
    open(f"{c}/unpack/raw-" + os.path.basename(t), "wb").write(b"\x00" + open(t, "rb").read())
ops = {
    "hardlink-to-symlink": [(4, 3, 0, 0, 0), (6, 3, 1, 8, 0)],
    "dir-then-symlink": [(2, 2, 2, 0, 1), (4, 2, 2, 1, 0), (2, 2, 0, 0, 1), (0, 0x42, 0, 0, 0)],
    "whiteouts": [(2, 0, 0, 0, 2), (0, 8, 8, 0, 2), (0, 7, 7, 0, 2), (0, 0x49, 0, 0, 2)],
    "dotdot": [(0, 0x44, 0x44, 0, 0), (0x80, 0x84, 0x44, 0, 0), (13, 2, 2, 4, 0)],
}
for name, seq in ops.items():
    open(f"{c}/unpack/{name}", "wb").write(b"\x01" + bytes(b for op in seq for b in op))
PY
