#!/usr/bin/env bash
# The test command: sets the machine up, then runs every tier.
#
#   1 unit         pure logic (keys, registry, templates, GPU checks)
#   2 integration  the real `wg` tool; a real sshd where Fabric is tested
#   3 docker e2e   a real Docker engine: images built, VPN up, pings, restarts
#
# A tier whose tools are missing fails; nothing is skipped quietly.
# Extra arguments go to pytest (e.g. -k registry).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/setup.sh --tests

printf '\n==> lint (ruff)\n'
.venv/bin/ruff check .
.venv/bin/ruff format --check .

# Images start from a local Debian made with debootstrap unless told otherwise
# (no image registry is needed). FBM_TEST_BASE_IMAGE names another base.
if [ -z "${FBM_TEST_BASE_IMAGE:-}" ]; then
    printf '\n==> local base image\n'
    .venv/bin/invoke build.base-os
    export FBM_TEST_BASE_IMAGE=fbm-local/debian:bookworm
fi

printf '\n==> pytest\n'
exec .venv/bin/python -m pytest -ra "$@"
