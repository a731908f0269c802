#!/usr/bin/env bash
# Build the three fedtl images from deploy/Dockerfile and print their sizes and the build time.
#
#   deploy/build-images.sh [--base IMAGE] [--tag TAG] [--host-pip] [--torch-index URL] [--label K=V]
#
#   --base IMAGE        default python:3.11-slim-bookworm; offline: fedtl-base:bookworm (deploy/make-base.sh)
#   --tag TAG           default 1.42.0 (the flwr pin): fedtl-superlink:TAG, fedtl-superexec:TAG, fedtl-site:TAG
#   --host-pip          give the build this machine's pip settings (CA bundle, local indexes and wheel
#                       folders, served on 127.0.0.1 for the build only; see deploy/host_pip.py)
#   --torch-index URL   e.g. https://download.pytorch.org/whl/cpu for the CPU build of the pinned torch
#   --label K=V         label every image (the tests label theirs fedtl.test=1)
#   --no-cache          rebuild every layer (otherwise BuildKit reuses the dependency layer until
#                       pyproject's dependency list changes: a code change rebuilds in seconds)
#
# The build runs with --network host (no bridge network needed) and BuildKit: the Docker client must
# have it built in (Docker 20.10-22.x, e.g. Debian's docker.io) or carry the buildx plugin.
set -euo pipefail
cd "$(dirname "$0")/.."
base=python:3.11-slim-bookworm tag=1.42.0 host_pip=0 torch_index="" labels=() cache=()
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --host-pip) host_pip=1; shift ;;
    --torch-index) torch_index=$2; shift 2 ;;
    --label) labels+=(--label "$2"); shift 2 ;;
    --no-cache) cache=(--no-cache); shift ;;
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
  esac
done

# A client that can drive BuildKit: buildx if present, else a pre-23 client with BuildKit built in.
docker_cli=""
for candidate in $(which -a docker | awk '!seen[$0]++'); do
  if "$candidate" buildx version >/dev/null 2>&1; then docker_cli=$candidate; break; fi
  major=$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
  if [ -n "$major" ] && [ "$major" -lt 23 ]; then docker_cli=$candidate; break; fi
done
[ -n "$docker_cli" ] || { echo "no docker client with BuildKit: install buildx, or Debian's docker.io" >&2; exit 2; }

secrets=()
server_pid=""
settings=$(mktemp -d "${TMPDIR:-/tmp}/fedtl-pip.XXXXXX")
logs=${TMPDIR:-/tmp}/fedtl-build-$tag
mkdir -p "$logs"
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$settings"
}
trap cleanup EXIT
if [ "$host_pip" = 1 ]; then
  python3 deploy/host_pip.py "$settings" &
  server_pid=$!
  for _ in $(seq 100); do [ -e "$settings/ready" ] && break; sleep 0.1; done
  [ -e "$settings/ready" ] || { echo "deploy/host_pip.py did not start" >&2; exit 1; }
  secrets+=(--secret "id=pip-conf,src=$settings/pip.conf")
  [ -e "$settings/pip-cert" ] && secrets+=(--secret "id=pip-cert,src=$settings/pip-cert")
fi

start=$(date +%s)
for role in superlink superexec site; do
  DOCKER_BUILDKIT=1 nice -n 10 "$docker_cli" build --network host --progress plain \
    -f deploy/Dockerfile --target "$role" -t "fedtl-$role:$tag" \
    --build-arg "BASE=$base" --build-arg "TORCH_INDEX=$torch_index" \
    ${secrets[@]+"${secrets[@]}"} ${labels[@]+"${labels[@]}"} ${cache[@]+"${cache[@]}"} . \
    >"$logs/$role.log" 2>&1 || { tail -40 "$logs/$role.log" >&2; exit 1; }
  cache=()  # the first build refreshed the shared layers; the other targets reuse them
done
echo "built in $(( $(date +%s) - start )) s (base $base; logs in $logs):"
for role in superlink superexec site; do
  "$docker_cli" image inspect -f "fedtl-$role:$tag {{.Size}}" "fedtl-$role:$tag" \
    | awk '{printf "  %s %.2f GB\n", $1, $2/1e9}'
done
echo "  (the three share every layer but their last few kB: the disk holds one copy)"
