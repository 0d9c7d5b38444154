#!/usr/bin/env bash
# The main job: VPN server, node and researcher on this machine, VPN verified.
#
# Sets the machine up (scripts/setup.sh), then runs `invoke up`. The node and
# researcher images carry Fed-BioMed: the first run downloads several GB.
# Without the official Debian image on this machine it builds on a local one
# made with debootstrap (no registry needed), which later `invoke` runs keep
# using; set FBM_PULL_BASE=1 to pull the official image instead. Extra
# arguments go to `invoke up` (e.g. --public-addr ADDR).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# The default base image (`auto`) takes debian:bookworm-slim when this engine
# has it, else the local image build.base-os makes; make that one unless told
# to pull the official image.
if [ "${FBM_PULL_BASE:-0}" != 1 ] && [ -z "${INVOKE_FBM_BUILD_BASE_IMAGE:-}" ] \
        && ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
    bash scripts/setup.sh --base-os
    .venv/bin/invoke build.base-os
else
    bash scripts/setup.sh
fi

# pip, in the build of the Fed-BioMed image, trusts what this machine trusts
# (a proxy or hospital CA added to the host's bundle); fbm.build.ca_bundle or
# INVOKE_FBM_BUILD_CA_BUNDLE choose another file.
host_ca=/etc/ssl/certs/ca-certificates.crt
if [ -z "${INVOKE_FBM_BUILD_CA_BUNDLE:-}" ] && [ -s "$host_ca" ] \
        && ! grep -q '^ *ca_bundle: *[^" ]' invoke.yaml; then
    export INVOKE_FBM_BUILD_CA_BUNDLE=$host_ca
fi

printf '\n==> invoke up %s\n' "$*"
exec .venv/bin/invoke up "$@"
