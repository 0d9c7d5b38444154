#!/usr/bin/env bash
# Prepare this machine for the suite; safe to run again.
#
#   scripts/setup.sh            Python venv (.venv), Docker engine, Compose v2
#   scripts/setup.sh --tests    the same, plus what the tests use (wg, sshd, debootstrap)
#   scripts/setup.sh --base-os  the same, plus debootstrap (to make a local base image)
#
# It installs system packages only where it must and can (root with apt-get);
# elsewhere it stops and says what to install.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
for_tests=false
base_os=false
for arg in "$@"; do
    case "$arg" in
        --tests) for_tests=true ;;
        --base-os) base_os=true ;;
        *) echo "usage: scripts/setup.sh [--tests] [--base-os]" >&2; exit 2 ;;
    esac
done

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'setup failed: %s\n' "$*" >&2; exit 1; }

apt_install() {
    # Install Debian packages that are missing (root and apt-get only).
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        fail "missing packages: ${missing[*]}; install them (as root) and run again"
    fi
    echo "installing ${missing[*]}"
    if [ -z "${FBM_APT_UPDATED:-}" ]; then
        apt-get update -qq
        export FBM_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

step "Python environment in $venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || fail "python3 -m venv failed; install python3-venv"
fi
reqs="$root/requirements.txt"
$for_tests && reqs="$root/requirements-test.txt"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$reqs"

step "Docker engine"
if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
    apt_install docker.io iptables
    if ! docker info >/dev/null 2>&1; then
        if command -v systemctl >/dev/null && systemctl start docker 2>/dev/null; then
            :
        else
            echo "starting dockerd (log: /var/log/fbm-dockerd.log)"
            setsid nohup dockerd >/var/log/fbm-dockerd.log 2>&1 </dev/null &
        fi
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    fi
fi
docker info >/dev/null 2>&1 || fail "no Docker engine answers; see /var/log/fbm-dockerd.log"
echo "engine $(docker version --format '{{.Server.Version}}')"

step "Docker Compose v2"
if ! docker compose version >/dev/null 2>&1; then
    plugin_dir="$HOME/.docker/cli-plugins"
    [ "$(id -u)" = 0 ] && plugin_dir=/usr/local/lib/docker/cli-plugins
    binary=$("$venv/bin/python" -c \
        'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
    mkdir -p "$plugin_dir"
    ln -sf "$binary" "$plugin_dir/docker-compose"
fi
docker compose version

if $base_os && ! $for_tests; then
    step "debootstrap"
    apt_install debootstrap
fi

if $for_tests; then
    step "Test tools: wg, sshd, debootstrap"
    apt_install wireguard-tools openssh-server debootstrap iproute2
fi
echo
echo "setup done"
