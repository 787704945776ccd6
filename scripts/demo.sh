#!/usr/bin/env bash
# Demo of what soci-rs does today. The lazy container run (registry + containerd + daemon)
# is not built yet; until then this shows the core: a zTOC built from a real layer and a file
# read from the compressed layer by random access, touching only the spans it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
SOCI=target/release/soci
work=$(mktemp -d /tmp/soci-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT

echo "== building a ~300 MiB sample layer from local files under /usr"
find /usr -xdev -type f -size -64M -printf '%s %p\n' 2>/dev/null | sort -k2 |
  awk -v lim=$((300 << 20)) '{ s += $1; print substr($0, index($0, " ") + 2); if (s > lim) exit }' > "$work/list" || true
tar -C / -cf "$work/layer.tar" -T "$work/list" 2>/dev/null || true
gzip -1 -c "$work/layer.tar" > "$work/layer.tar.gz"
echo "layer: $(du -h "$work/layer.tar.gz" | cut -f1) compressed, $(du -h "$work/layer.tar" | cut -f1) uncompressed"

echo "== soci ztoc build"
"$SOCI" ztoc build "$work/layer.tar.gz" -o "$work/layer.ztoc"
"$SOCI" ztoc info "$work/layer.ztoc" > "$work/info"
head -7 "$work/info"

f=$(tar -tf "$work/layer.tar" | grep -v '/$' | awk 'NR % 997 == 0' | tail -1)
echo "== soci ztoc get-file $f"
"$SOCI" ztoc get-file --layer "$work/layer.tar.gz" "$work/layer.ztoc" "$f" -o "$work/out"
if cmp -s "$work/out" <(tar -xOf "$work/layer.tar" "$f"); then
  echo "extracted $(stat -c %s "$work/out") bytes; identical to tar's copy"
else
  echo "MISMATCH" >&2; exit 1
fi
echo
echo "snapshotter: not yet (the lazy-loading daemon is not built yet; this demo stops here)"
