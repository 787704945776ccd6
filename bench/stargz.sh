#!/usr/bin/env bash
# stargz-snapshotter for side-by-side benchmarks, from Debian's packages:
#   bench/stargz.sh build                 daemon into target/stargz/ (Debian Go 1.19, GOPATH mode,
#                                         Debian's golang-github-containerd-stargz-snapshotter-dev
#                                         sources + the small launcher bench/stargz-launcher.go)
#   bench/stargz.sh convert SRC DST       eStargz copy of an image (Debian's ctr-remote)
#   bench/stargz.sh convert-opt SRC DST   the same with prioritized files recorded from a run
#   bench/stargz.sh start DIR PLAIN_HOST  daemon + containerd under DIR (sourced env: W, PIDS)
# Debian ships only ctr-remote; the daemon's CRI-only files need k8s cri-api (not in Debian)
# and are left out of a copy of the tree placed first on GOPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$PWD/target/stargz

build() {
  export DEBIAN_FRONTEND=noninteractive
  if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/containerd/stargz-snapshotter ] ||
    ! command -v ctr-remote >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends golang-go stargz-snapshotter \
      golang-github-containerd-stargz-snapshotter-dev >/dev/null
  fi
  local gp=$OUT/gopath vp=$OUT/vpath src
  src=$gp/src/github.com/containerd/stargz-snapshotter
  rm -rf "$gp" "$vp"
  mkdir -p "$src" "$gp/src/socibench/stargz"
  cp -r /usr/share/gocode/src/github.com/containerd/stargz-snapshotter/. "$src/"
  rm -rf "$src/service/resolver/cri.go" "$src/service/keychain/cri" "$src/service/keychain/kubeconfig" "$src/go.mod" "$src/go.sum"
  cp bench/stargz-launcher.go "$gp/src/socibench/stargz/main.go"
  # GOPATH mode has no modules: give /vN modules (Debian installs them without the suffix)
  # their import path, on a GOPATH entry searched last.
  find /usr/share/gocode/src -maxdepth 5 -name go.mod | while read -r m; do
    local mod dir
    mod=$(sed -n 's/^module[[:space:]]*//p' "$m" | head -1 | tr -d '"')
    dir=$(dirname "$m")
    if [[ $mod =~ /v[0-9]+$ ]] && [[ $dir != */src/$mod ]] && [ ! -e "$vp/src/$mod" ]; then
      mkdir -p "$vp/src/$(dirname "$mod")"
      ln -s "$dir" "$vp/src/$mod"
    fi
  done
  (cd "$gp/src/socibench/stargz" &&
    GO111MODULE=off GOPATH="$gp:/usr/share/gocode:$vp" GOFLAGS=-mod=mod go build -o "$OUT/stargz-snapshotter" .)
  echo "built $OUT/stargz-snapshotter"
}

convert() { # convert SRC DST [optimize flags]: default --no-optimize (no prioritized files)
  local src=$1 dst=$2 tmp
  shift 2
  local flags=("$@")
  [ ${#flags[@]} -gt 0 ] || flags=(--no-optimize)
  tmp=$(mktemp -d)
  cat > "$tmp/ctd.toml" <<TOML
version = 2
root = "$tmp/root"
state = "$tmp/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$tmp/ctd.sock"
[ttrpc]
  address = "$tmp/ctd.sock.ttrpc"
TOML
  containerd --config "$tmp/ctd.toml" > "$tmp/log" 2>&1 & local pid=$!
  for _ in $(seq 100); do ctr -a "$tmp/ctd.sock" version >/dev/null 2>&1 && break; sleep 0.1; done
  local rc=0
  { ctr -a "$tmp/ctd.sock" image pull --plain-http "$src" >/dev/null &&
    ctr-remote -a "$tmp/ctd.sock" image optimize "${flags[@]}" --oci "$src" "$dst" >/dev/null &&
    ctr -a "$tmp/ctd.sock" image push --plain-http "$dst" >/dev/null; } || rc=$?
  kill "$pid"; wait "$pid" 2>/dev/null || true
  [ $rc = 0 ] || tail -20 "$tmp/log" >&2
  { grep " $tmp/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | xargs -r -n1 umount -l
  rm -rf "$tmp"
  return $rc
}

# start DIR HOST: stargz daemon + containerd with a proxy plugin "stargz", like env.sh's pair.
start() {
  local d=$1 host=$2
  source scripts/env.sh
  mkdir -p "$d"
  "$OUT/stargz-snapshotter" -root "$d/stargz" -address "$d/stargz.sock" -insecure "$host" > "$d/stargz.log" 2>&1 &
  PIDS+=($!)
  start_containerd_with "$d" stargz "$d/stargz.sock"
}

case ${1:-} in
  build) build ;;
  convert) convert "$2" "$3" ;;
  # eStargz with prioritized files: optimize runs the image's command once and records the
  # files it opens (stargz's own "optimize"). The run needs runc and a working overlayfs here.
  convert-opt) convert "$2" "$3" --period 20 ;;
  start) start "$2" "$3" ;;
  *) echo "usage: $0 build | convert SRC DST | convert-opt SRC DST | start DIR HOST" >&2; exit 2 ;;
esac
