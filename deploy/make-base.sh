#!/usr/bin/env bash
# Build the local base image fedtl-base:bookworm (Debian 12 minbase + Python 3.11 + venv + CA
# certificates) from Debian's package archive, for machines that reach a Debian mirror but not
# Docker Hub. Where Docker Hub is reachable, skip this: deploy/Dockerfile's default base is
# python:3.11-slim-bookworm, the same Debian release and Python minor version.
#
#   sudo deploy/make-base.sh [TAG] [MIRROR]      (root: debootstrap needs it)
#
# Measured on 2 shared cores: about 2 minutes, 146 MB image (see README, "Containers").
set -euo pipefail
tag=${1:-fedtl-base:bookworm}
mirror=${2:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || { echo "needs debootstrap (Debian: apt-get install -y debootstrap)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run as root: debootstrap creates device nodes and chroots" >&2; exit 2; }
root=$(mktemp -d -t fedtl-base.XXXXXX)  # under $TMPDIR (default /tmp)
trap 'rm -rf --one-file-system "$root"' EXIT
start=$(date +%s)
nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -30 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# An image holds no package lists, caches or logs.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* "$root"/tmp/*
tar --numeric-owner -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  - "$tag" >/dev/null
echo "built $tag in $(( $(date +%s) - start )) s: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
