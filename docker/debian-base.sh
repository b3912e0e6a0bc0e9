#!/usr/bin/env bash
# Make a base image from Debian packages, for machines that reach a Debian mirror but no image
# registry: debootstrap (minbase + python3, python3-venv, ca-certificates) → docker import.
# Needs root, debootstrap and a running Docker engine.  ~4 min on 2 cores; ~150 MB.
#
#   docker/debian-base.sh [NAME]        (default NAME: qlora-kit-base:bookworm)
#
# The image has Debian bookworm's Python 3.11 and nothing else; docker/build.sh --base NAME
# builds qlora-kit on it (docker/build.sh --debian-base does both steps).
set -euo pipefail
name="${1:-qlora-kit-base:bookworm}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [[ $(id -u) != 0 ]]; then
  echo "error: debootstrap needs root" >&2
  echo "fix: run with sudo, or pass an existing base image to docker/build.sh --base IMAGE" >&2
  exit 2
fi
command -v debootstrap > /dev/null || { echo "error: debootstrap is not installed" >&2;
  echo "fix: apt-get install -y debootstrap" >&2; exit 2; }

root="$(mktemp -d "${TMPDIR:-/var/tmp}/qlora-kit-base.XXXXXX")"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$root" "$mirror"
# Smaller image: no apt lists or caches, no docs.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' - "$name"
echo "base image $name: $(docker image inspect --format '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}')"
