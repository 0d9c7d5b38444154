#!/usr/bin/env bash
# The docker and compose commands `invoke up` runs once the images exist, as a
# plain script: the yardstick of bench/up.py. Needs INSTANCE, MOUNTS, PORT,
# PUBLIC_ADDR and the compose env file that `invoke` wrote for that instance.
set -euo pipefail
dir=$(cd "$(dirname "$0")/../envs/vpn/docker" && pwd)
compose=(docker compose --project-name "fbm-vpn-$INSTANCE" --project-directory "$dir"
         --env-file "$MOUNTS/compose-$INSTANCE.env" -f "$dir/docker-compose.yml")
server=fedbiomed-vpn-vpnserver-$INSTANCE

ping_until() {  # container, address: WireGuard retries a handshake every 5 s
    for _ in $(seq 15); do
        docker exec "$1" ping -c 1 -W 2 -q "$2" >/dev/null && return 0
    done
    echo "no answer from $2 in $1" >&2; return 1
}

ready() {
    until docker exec "$1" test -f /run/fbm-vpn/ready 2>/dev/null; do sleep 0.5; done
}

mkdir -p "$MOUNTS/vpnserver/run_mounts/config"
cat >"$MOUNTS/vpnserver/run_mounts/config/config.env" <<CONF
VPN_SERVER_PUBLIC_ADDR=$PUBLIC_ADDR
VPN_SERVER_PORT=$PORT
VPN_IP=10.220.0.1
VPN_SUBNET_PREFIX=14
VPN_MANAGEMENT_IP_ASSIGN=10.220.0.0/16
VPN_NODE_IP_ASSIGN=10.221.0.0/16
VPN_RESEARCHER_IP_ASSIGN=10.222.0.0/16
USE_WG_KERNEL_MOD=true
CONF
"${compose[@]}" up -d --no-build vpnserver
ready "$server"

join() {  # component, peer type, peer id
    local container=fedbiomed-vpn-$1-$INSTANCE
    docker exec "$server" configure_peer genconf "$2" "$3"
    mkdir -p "$MOUNTS/$1/run_mounts/config" "$MOUNTS/$1/run_mounts/data" \
        "$MOUNTS/$1/run_mounts/fbm"
    docker exec "$server" configure_peer show "$2" "$3" \
        >"$MOUNTS/$1/run_mounts/config/config.env"
    "${compose[@]}" up -d --no-build "$1"
    ready "$container"
    docker exec "$server" configure_peer add "$2" "$3" \
        "$(docker exec "$container" wg show wg0 public-key)"
    ping_until "$container" 10.220.0.1
}
join researcher researcher researcher1
join node node node1

ping_until "fedbiomed-vpn-node-$INSTANCE" 10.220.0.1
ping_until "fedbiomed-vpn-researcher-$INSTANCE" 10.220.0.1
ping_until "fedbiomed-vpn-node-$INSTANCE" 10.222.0.2
