#!/usr/bin/env bash
# Builds memdec's CPU image with podman where no registry is reachable: FROM a local base image (made by
# ../shared/tools/container-setup.sh) and torch from a local wheel folder. Layers are reused between builds.
#
#   scripts/container-build-cpu.sh [TAG]          # default TAG: localhost/memdec:cpu
#   BASE_IMAGE=... WHEELS=/opt/wheels TORCH_SPEC=torch==2.13.0 scripts/container-build-cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/memdec:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
WHEELS=${WHEELS:-/opt/wheels}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# --format docker: the OCI image format has no HEALTHCHECK.
exec podman build --format docker --layers --network host \
  -v "$WHEELS:$WHEELS:ro" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg TORCH_SPEC="$TORCH_SPEC" \
  --build-arg TORCH_FIND_LINKS="$WHEELS" \
  -t "$TAG" .
