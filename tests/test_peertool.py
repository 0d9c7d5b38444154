"""The in-container peer tool `configure_peer`, run as a real subprocess."""

import fcntl
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fbmvpn import envfile, keys
from fbmvpn.registry import Registry, ServerConf

REPO_ROOT = Path(__file__).resolve().parent.parent

FAKE_WG = """#!/bin/sh
# Stands for `wg` with a wg0 interface up: logs its arguments.
echo "$*" >> "$WG_LOG"
case "$1 $3" in
  "show public-key") echo "$FAKE_WG_PUBKEY"; exit 0 ;;
  "show latest-handshakes") printf '%s' "$FAKE_WG_HANDSHAKES"; exit 0 ;;
esac
[ "$1" = syncconf ] && exit "${FAKE_WG_SYNC_RC:-0}"
exit 0
"""


def peertool(root: Path, *args: str, stdin: str = "", env=None):
    return subprocess.run(
        [sys.executable, "-m", "fbmvpn.peertool", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "FBM_VPN_CONFIG": str(root), **(env or {})},
        timeout=60,
    )


def ok(root: Path, *args: str, stdin: str = "", env=None) -> str:
    result = peertool(root, *args, stdin=stdin, env=env)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return result.stdout


def refused(result) -> str:
    """Check a refusal: exit 1, one line on stderr, nothing on stdout."""
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("configure_peer: ")
    return lines[0]


def new_public_key() -> str:
    return keys.public_key(keys.generate_private_key())


def peer_files(root: Path) -> list[str]:
    folder = root / "config_peers"
    return sorted(str(p.relative_to(folder)) for p in folder.glob("*/*/config.env"))


def registered(root: Path) -> list[tuple[str, str, str]]:
    text = (root / "wireguard" / "wg0.conf").read_text()
    return [
        (p.peer_type, p.peer_id, p.public_key)
        for p in ServerConf.parse(text, "wg0.conf").peers
    ]


@pytest.fixture
def fake_wg(tmp_path):
    """Environment putting a logging fake `wg` first on PATH; log at env['WG_LOG']."""
    folder = tmp_path / "fakebin"
    folder.mkdir()
    script = folder / "wg"
    script.write_text(FAKE_WG)
    script.chmod(0o755)
    return {
        "PATH": f"{folder}:{os.environ['PATH']}",
        "WG_LOG": str(tmp_path / "wg.log"),
        "FAKE_WG_PUBKEY": new_public_key(),
        "FAKE_WG_HANDSHAKES": "",
    }


def wg_calls(env) -> list[str]:
    log = Path(env["WG_LOG"])
    return log.read_text().splitlines() if log.exists() else []


# -- help and good requests ------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_verb(server_root, flag):
    out = ok(server_root, flag)
    assert out.startswith("usage: configure_peer")
    for verb in ("genconf", "add", "remove", "removeconf", "list", "show", "batch"):
        assert verb in out


def test_verb_help_works(server_root):
    out = ok(server_root, "add", "--help")
    assert out.startswith("usage: configure_peer add")
    assert "pubkey" in out


def test_genconf_add_show_remove_removeconf(server_root):
    path = server_root / "config_peers" / "node" / "n1" / "config.env"
    key = new_public_key()

    assert ok(server_root, "genconf", "node", "n1") == f"generated node n1: {path}\n"
    assert ok(server_root, "add", "node", "n1", key) == ("key registered for node n1\n")
    assert ok(server_root, "add", "node", "n1", key) == (
        "key was already registered for node n1\n"
    )
    assert ok(server_root, "show", "node", "n1") == path.read_text()
    assert ok(server_root, "remove", "node", "n1") == (
        "removed 1 key(s) of node n1; config kept\n"
    )
    assert path.is_file()
    assert ok(server_root, "removeconf", "node", "n1") == (
        "removed node n1 and its config\n"
    )
    assert not path.exists()


def test_genconf_and_add_print_no_secret(server_root):
    out = ok(server_root, "genconf", "node", "n1")
    out += ok(server_root, "add", "node", "n1", new_public_key())

    psk = envfile.load(server_root / "config_peers/node/n1/config.env")
    private = ServerConf.parse(
        (server_root / "wireguard" / "wg0.conf").read_text(), "wg0.conf"
    ).private_key
    assert psk["VPN_SERVER_PSK"] not in out
    assert private not in out


def test_pubkey_prints_the_server_public_key(server_root):
    out = ok(server_root, "pubkey")
    assert out == Registry(server_root).server_public_key() + "\n"
    assert keys.check_key(out.strip()) == out.strip()


def test_list_json_joins_configs_and_keys(server_root):
    first, second = new_public_key(), new_public_key()
    ok(server_root, "genconf", "node", "n1")
    ok(server_root, "add", "node", "n1", first)
    ok(server_root, "add", "node", "n1", second)
    ok(server_root, "genconf", "researcher", "r1")

    rows = json.loads(ok(server_root, "list", "--json"))

    assert rows == [
        {
            "type": "node",
            "id": "n1",
            "prefix": "10.221.0.2/32",
            "keys": [first, second],
            "handshakes": {first: 0, second: 0},
        },
        {
            "type": "researcher",
            "id": "r1",
            "prefix": "10.222.0.2/32",
            "keys": [],
            "handshakes": {},
        },
    ]


def test_list_json_of_an_empty_server(server_root):
    assert json.loads(ok(server_root, "list", "--json")) == []


def test_list_table(server_root):
    ok(server_root, "genconf", "node", "n1")
    lines = ok(server_root, "list").splitlines()
    assert lines[0].split() == ["type", "id", "prefix", "keys", "handshake"]
    assert lines[2].split() == ["node", "n1", "10.221.0.2/32", "-", "-"]


def test_list_reports_live_handshakes(server_root, fake_wg):
    key = new_public_key()
    ok(server_root, "genconf", "node", "n1")
    ok(server_root, "add", "node", "n1", key)
    fake_wg["FAKE_WG_HANDSHAKES"] = f"{key}\t1700000000\n"

    rows = json.loads(ok(server_root, "list", "--json", env=fake_wg))

    assert rows[0]["handshakes"] == {key: 1700000000}


# -- the live interface ----------------------------------------------------


def test_changes_are_synced_to_a_running_interface(server_root, fake_wg):
    conf = server_root / "wireguard" / "wg0.conf"
    ok(server_root, "genconf", "node", "n1", env=fake_wg)
    assert [c for c in wg_calls(fake_wg) if c.startswith("syncconf")] == []

    key = new_public_key()
    ok(server_root, "add", "node", "n1", key, env=fake_wg)
    ok(server_root, "add", "node", "n1", key, env=fake_wg)

    assert [c for c in wg_calls(fake_wg) if c.startswith("syncconf")] == [
        f"syncconf wg0 {conf}"
    ]


def test_failed_sync_is_a_one_line_error(server_root, fake_wg):
    ok(server_root, "genconf", "node", "n1")
    fake_wg["FAKE_WG_SYNC_RC"] = "1"

    line = refused(
        peertool(server_root, "add", "node", "n1", new_public_key(), env=fake_wg)
    )

    assert "wg syncconf" in line


# -- bad input -------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["genconf", "node", "a/b"],
        ["genconf", "node", ".."],
        ["genconf", "node", "a b"],
        ["genconf", "node", ""],
        ["genconf", "node", "../x"],
        ["genconf", "node", ".hidden"],
        ["genconf", "nodes", "n1"],
        ["genconf", "node"],
        ["add", "node", "ghost", "AAAA"],
        [],
        ["frobnicate"],
        ["list", "--yaml"],
    ],
    ids=lambda args: " ".join(args) or "no args",
)
def test_bad_input_exits_1_with_one_line_and_writes_nothing(server_root, args):
    refused(peertool(server_root, *args))
    assert sorted(p.name for p in server_root.iterdir()) == ["config.env"]


def test_bad_key_is_refused_without_echoing_it(server_root):
    ok(server_root, "genconf", "node", "n1")
    bad = keys.generate_psk()[:40]

    line = refused(peertool(server_root, "add", "node", "n1", bad))

    assert "not a WireGuard key" in line
    assert bad not in line


def test_add_for_a_peer_never_generated(server_root):
    line = refused(peertool(server_root, "add", "node", "ghost", new_public_key()))
    assert "never generated" in line


def test_genconf_twice_is_refused(server_root):
    ok(server_root, "genconf", "node", "n1")
    path = server_root / "config_peers" / "node" / "n1" / "config.env"
    before = path.read_bytes()

    line = refused(peertool(server_root, "genconf", "node", "n1"))

    assert "has a configuration already" in line
    assert path.read_bytes() == before


def test_key_of_another_peer_is_refused_naming_the_owner(server_root):
    key = new_public_key()
    ok(server_root, "genconf", "node", "n1")
    ok(server_root, "genconf", "researcher", "r1")
    ok(server_root, "add", "node", "n1", key)
    conf = server_root / "wireguard" / "wg0.conf"
    before = conf.read_bytes()

    line = refused(peertool(server_root, "add", "researcher", "r1", key))

    assert "registered for node n1 already" in line
    assert conf.read_bytes() == before


def test_missing_config_env_says_to_run_vpnserver_init(tmp_path):
    line = refused(peertool(tmp_path, "genconf", "node", "n1"))
    assert "run `invoke vpnserver.init`" in line


def test_remove_of_an_unknown_peer(server_root):
    line = refused(peertool(server_root, "remove", "node", "ghost"))
    assert "no peer node ghost" in line


def test_show_of_an_unknown_peer_is_a_one_line_error(server_root):
    """show reads the file without checking it: FileNotFoundError traceback."""
    refused(peertool(server_root, "show", "node", "ghost"))


# -- batch -----------------------------------------------------------------


def test_batch_of_200_lines_is_applied_in_one_transaction(server_root, fake_wg):
    added = {f"b{n:03}": new_public_key() for n in range(100)}
    lines = [
        f"genconf node {peer}\nadd node {peer} {key}" for peer, key in added.items()
    ]

    out = ok(server_root, "batch", stdin="\n".join(lines) + "\n", env=fake_wg)

    assert out == "applied 200 line(s)\n"
    rows = json.loads(ok(server_root, "list", "--json"))
    assert {row["id"]: row["keys"] for row in rows} == {
        p: [k] for p, k in added.items()
    }
    assert sorted(ipaddress.ip_interface(row["prefix"]).ip for row in rows) == [
        ipaddress.ip_address(f"10.221.0.{host}") for host in range(2, 102)
    ]
    assert len(registered(server_root)) == 100
    # One transaction: wg0.conf loaded into the interface once.
    assert [c for c in wg_calls(fake_wg) if c.startswith("syncconf")] == [
        f"syncconf wg0 {server_root / 'wireguard' / 'wg0.conf'}"
    ]


def test_batch_waits_for_the_registry_lock(server_root):
    lock = server_root / ".registry.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        process = subprocess.Popen(
            [sys.executable, "-m", "fbmvpn.peertool", "batch"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "FBM_VPN_CONFIG": str(server_root)},
        )
        process.stdin.write("genconf node n1\ngenconf node n2\n")
        process.stdin.close()
        time.sleep(1.5)
        assert process.poll() is None
        assert not (server_root / "config_peers").exists()
        fcntl.flock(handle, fcntl.LOCK_UN)
    assert process.wait(timeout=30) == 0
    assert process.stdout.read() == "applied 2 line(s)\n"
    assert peer_files(server_root) == ["node/n1/config.env", "node/n2/config.env"]


def test_batch_with_a_bad_line_names_it_and_applies_nothing(server_root):
    """Lines before the failure have already written peer configs and
    last_ip_assign files; only their wg0.conf changes are dropped."""
    ok(server_root, "genconf", "node", "n1")
    before = {
        str(p.relative_to(server_root)): p.read_bytes()
        for p in server_root.rglob("*")
        if p.is_file()
    }
    script = "\n".join(
        [
            "genconf node b1",
            f"add node b1 {new_public_key()}",
            "genconf node b2",
            "genconf node ../x",
            "genconf node b3",
        ]
    )

    line = refused(peertool(server_root, "batch", stdin=script + "\n"))

    assert "batch line 4 (genconf)" in line
    assert "is not allowed" in line
    after = {
        str(p.relative_to(server_root)): p.read_bytes()
        for p in server_root.rglob("*")
        if p.is_file()
    }
    assert after == before


def test_batch_failure_after_removeconf_loses_nothing(server_root):
    key = new_public_key()
    ok(server_root, "genconf", "node", "n1")
    ok(server_root, "add", "node", "n1", key)
    config = (server_root / "config_peers/node/n1/config.env").read_bytes()

    refused(peertool(server_root, "batch", stdin="removeconf node n1\nadd node x\n"))

    assert (server_root / "config_peers/node/n1/config.env").read_bytes() == config
    assert registered(server_root) == [("node", "n1", key)]


def test_batch_reports_the_real_line_number_past_blank_lines(server_root):
    line = refused(
        peertool(server_root, "batch", stdin="genconf node b1\n\n\ngenconf node ../x\n")
    )
    assert "batch line 4 " in line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("list\n", "batch line 1 (list): unsupported verb"),
        ("show node n1\n", "batch line 1 (show): unsupported verb"),
        ('genconf node "b1\n', "batch line 1"),
        ("genconf --help\n", "batch line 1"),
    ],
    ids=["list", "show", "unclosed quote", "help"],
)
def test_batch_refuses_lines_it_cannot_run(server_root, text, expected):
    line = refused(peertool(server_root, "batch", stdin=text))
    assert expected in line
    assert not (server_root / "config_peers").exists()


def test_empty_batch_applies_nothing(server_root):
    assert ok(server_root, "batch", stdin="\n\n") == "applied 0 line(s)\n"
    assert not (server_root / "config_peers").exists()


# -- two shells at once ----------------------------------------------------


def test_genconf_from_two_shells_never_gives_the_same_address(server_root):
    loop = (
        'for i in 0 1 2 3 4 5 6 7 8 9; do "$0" -m fbmvpn.peertool genconf node '
        '"$1$i" >/dev/null || exit 1; done'
    )
    env = {**os.environ, "FBM_VPN_CONFIG": str(server_root)}
    shells = [
        subprocess.Popen(
            ["sh", "-c", loop, sys.executable, prefix], cwd=REPO_ROOT, env=env
        )
        for prefix in ("a", "b")
    ]
    assert [shell.wait(timeout=120) for shell in shells] == [0, 0]

    ips = [
        envfile.load(path)["VPN_IP"]
        for path in sorted((server_root / "config_peers" / "node").glob("*/config.env"))
    ]
    assert len(ips) == 20
    assert sorted(ips, key=lambda ip: int(ip.split(".")[3])) == [
        f"10.221.0.{host}" for host in range(2, 22)
    ]
