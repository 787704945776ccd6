# Shared by scripts/demo.sh and bench/*.sh (source it): a registry, soci-snapshotter-grpc and a
# private containerd in a temp dir on 127.0.0.1, and a sample image built from local files.
# Expects: BIN (release binaries), W (work dir). Functions set PIDS and print nothing on success.

PIDS=()
env_cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for p in $(grep -l "$W" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do [ "$p" != $$ ] && kill -9 "$p" 2>/dev/null; done
  grep " $W" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
  rm -rf "$W"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_registry ADDR: Debian docker-registry with its access log in $W/registry.log.
start_registry() {
  mkdir -p "$W/registry"
  cat > "$W/registry.yml" <<YML
version: 0.1
log: {level: info, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: $W/registry}, delete: {enabled: true}}
http: {addr: $1}
YML
  # REG_WRAP: an optional command prefix, e.g. nsenter into a network namespace.
  ${REG_WRAP:-} docker-registry serve "$W/registry.yml" >> "$W/registry.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 100); do curl -fs "http://$1/v2/" >/dev/null && return; sleep 0.1; done
  echo "registry did not start" >&2; return 1
}

# start_soci_containerd NAME PLAIN_HTTP_HOST: daemon + containerd with their own roots under $W/NAME.
start_soci_containerd() {
  local d=$W/$1
  mkdir -p "$d"
  # SOCI_CONFIG_EXTRA: more TOML for the daemon's config, e.g. a [prefetch] section, or
  # $'[fuse]\npassthrough = false' for A/B runs.
  printf '[resolver]\nplain_http_hosts = ["%s"]\n%s\n' "$2" "${SOCI_CONFIG_EXTRA:-}" > "$d/soci.toml"
  "$BIN/soci-snapshotter-grpc" --root "$d/soci" --address "$d/soci.sock" --config "$d/soci.toml" > "$d/soci.log" 2>&1 & PIDS+=($!)
  start_containerd_with "$d" soci "$d/soci.sock"
}

# start_containerd_with DIR PLUGIN SOCKET: containerd under DIR with the snapshotter proxy
# plugin PLUGIN at SOCKET (waits for the socket, then for containerd).
start_containerd_with() {
  local d=$1
  cat > "$d/containerd.toml" <<TOML
version = 2
root = "$d/ctd/root"
state = "$d/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/ctd.sock"
[ttrpc]
  address = "$d/ctd.sock.ttrpc"
[debug]
  address = "$d/ctd-debug.sock"
[proxy_plugins]
  [proxy_plugins.$2]
    type = "snapshot"
    address = "$3"
TOML
  for _ in $(seq 100); do [ -S "$3" ] && break; sleep 0.1; done
  containerd --config "$d/containerd.toml" > "$d/containerd.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 100); do ctr -a "$d/ctd.sock" version >/dev/null 2>&1 && return; sleep 0.1; done
  echo "containerd did not start" >&2; return 1
}

# stop_soci_containerd NAME: stops that pair and removes its state.
stop_soci_containerd() {
  local d=$W/$1 p
  for p in $(grep -l "$d/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in $(grep -l "$d/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do kill -9 "$p" 2>/dev/null || true; done
  { grep " $d/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
  rm -rf "$d"
}

# build_sample_image LAYOUT_DIR: busybox, ~300 MiB of /usr files, a 160 MiB asset; tag "demo".
build_sample_image() {
  local L=$1
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
  rm -rf "$W/usrcopy" "$W/rootfs"
  head -c $((160 << 20)) /dev/urandom > "$W/assets/model.bin"
  umoci insert --image "$L:demo" "$W/assets" /assets >/dev/null
  rm -rf "$W/assets"
  umoci config --image "$L:demo" --config.cmd /bin/sh --config.cmd -c \
    --config.cmd 'cat /etc/demo-message; head -c 1000 /assets/model.bin | wc -c' >/dev/null
}

# served: blob bytes the registry served so far (200/206 GETs in its access log).
served() { sed -n 's/.*"GET \/v2\/[^ ]*\/blobs\/sha256:[^ ]* HTTP\/1.1" 20[06] \([0-9]*\).*/\1/p' "$W/registry.log" | awk '{s+=$1} END {printf "%.0f\n", s}'; }
