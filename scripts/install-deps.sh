#!/usr/bin/env bash
# Installs every system package soci-rs needs to build and test on Debian 12 (run as root).
# Idempotent: packages already present are skipped by apt; the flatc compiler (only needed to
# regenerate checked-in flatbuffers code) is not installed here, see `make flatc-gen`.
set -euo pipefail

PKGS=(
  containerd runc docker-registry skopeo umoci busybox-static fuse3 zstd iproute2
  protobuf-compiler pigz ca-certificates bc apache2-utils curl
)

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: must run as root (apt-get)" >&2
  exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all system packages present"
fi


if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
