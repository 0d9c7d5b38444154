#!/usr/bin/env bash
# The main job: VPN server, node and researcher on this machine, VPN verified.
#
# Sets the machine up (scripts/setup.sh), then runs `invoke up`. Without the
# official Debian image on this machine it builds on a local one made with
# debootstrap (no registry needed); set FBM_PULL_BASE=1 to pull the official
# image instead. Extra arguments go to `invoke up` (e.g. --public-addr ADDR).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

base_image=${INVOKE_FBM_BUILD_BASE_IMAGE:-debian:bookworm-slim}
if [ "${FBM_PULL_BASE:-0}" != 1 ] && ! docker image inspect "$base_image" \
        >/dev/null 2>&1 && [ "$base_image" = debian:bookworm-slim ]; then
    bash scripts/setup.sh --base-os
    .venv/bin/invoke build.base-os
    export INVOKE_FBM_BUILD_BASE_IMAGE=fbm-local/debian:bookworm
else
    bash scripts/setup.sh
fi

printf '\n==> invoke up %s\n' "$*"
exec .venv/bin/invoke up "$@"
