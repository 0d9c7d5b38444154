#!/usr/bin/env bash
# The test command: sets the machine up, then runs every tier.
#
#   1 unit         pure logic (keys, registry, templates, GPU checks)
#   2 integration  the real `wg` tool; a real sshd where Fabric is tested
#   3 docker e2e   a real Docker engine: images built, VPN up, pings, restarts
#   4 Fed-BioMed   real Fed-BioMed in node, node2 and researcher: `invoke demo`
#                  trains over the VPN; dataset, plan and researcher tasks
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

# The e2e tiers share the images of tag e2e: build them once here, in sight.
# The first build of the Fed-BioMed layer downloads several GB from PyPI
# (torch); pip trusts FBM_TEST_CA_BUNDLE, default the host's CA bundle (HTTPS
# proxies). Rebuilt only when their sources change.
export FBM_TEST_CA_BUNDLE=${FBM_TEST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
printf '\n==> images (tag e2e)\n'
SECONDS=0
INVOKE_FBM_TAG=e2e INVOKE_FBM_INSTANCE=e2e \
    INVOKE_FBM_BUILD_BASE_IMAGE="$FBM_TEST_BASE_IMAGE" \
    INVOKE_FBM_BUILD_CA_BUNDLE="$FBM_TEST_CA_BUNDLE" \
    .venv/bin/invoke build
printf 'images ready in %d s\n' "$SECONDS"

printf '\n==> pytest\n'
exec .venv/bin/python -m pytest -ra "$@"
