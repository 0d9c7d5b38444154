"""1,000 peers on a running vpnserver: genconf + add (target < 30 s) through
`invoke peer.batch`, then `invoke peer.list` of them (target < 1 s).

Runs in an instance of its own (bench-peers) and removes it afterwards.
"""

import sys

from common import instance_env, invoke, scratch, timed

sys.path.insert(0, str(__import__("common").ROOT))
from fbmvpn import keys  # noqa: E402

PEERS = 1000


def main():
    mounts = scratch("fbm-bench-peers.")
    env = instance_env("bench-peers", 51870, mounts)
    batch_file = mounts / "peers.txt"
    lines = []
    for n in range(PEERS):
        lines.append(f"genconf node bench{n}")
        lines.append(
            f"add node bench{n} {keys.public_key(keys.generate_private_key())}"
        )
    batch_file.write_text("\n".join(lines) + "\n")

    try:
        invoke(env, "build", "--images", "vpnserver")
        invoke(env, "vpnserver.up")
        add_s = timed(lambda: invoke(env, "peer.batch", batch_file))
        listed = {}
        list_s = timed(lambda: listed.update(out=invoke(env, "peer.list").stdout))
        json_s = timed(lambda: invoke(env, "peer.list", "--json"))
        rows = sum(1 for line in listed["out"].splitlines() if "bench" in line)
    finally:
        invoke(env, "clean", "vpnserver", "--level", "config", "--yes", check=False)

    print(f"peers listed: {rows} of {PEERS}")
    print(
        f"genconf + add of {PEERS} peers: {add_s:.2f} s (target < 30 s: "
        f"{add_s / 30:.2f} of the budget)"
    )
    print(
        f"peer.list table: {list_s:.2f} s, --json: {json_s:.2f} s (target < 1 s: "
        f"{list_s:.2f} of the budget)"
    )


if __name__ == "__main__":
    main()
