"""The VPN server's peer registry: configs, address assignment, keys, bad input."""

import ipaddress
import multiprocessing
import stat
import subprocess
from pathlib import Path

import pytest

from fbmvpn import envfile, keys
from fbmvpn.errors import BadInput, StateError
from fbmvpn.registry import SERVER_KEYS, Registry, ServerConf

WG = Path("/usr/bin/wg")
WG_QUICK = Path("/usr/bin/wg-quick")


def new_public_key() -> str:
    return keys.public_key(keys.generate_private_key())


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its content, by relative path."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def peer_values(registry: Registry, peer_type: str, peer_id: str) -> dict[str, str]:
    return envfile.parse(registry.peer_env(peer_type, peer_id).read_text())


def wg_peers(registry: Registry) -> list[tuple[str, str, str]]:
    conf = ServerConf.parse(registry.wg_conf.read_text(), "wg0.conf")
    return [(p.peer_type, p.peer_id, p.public_key) for p in conf.peers]


@pytest.fixture
def applied():
    """Paths passed to the registry's apply callback, one per call."""
    return []


@pytest.fixture
def registry(server_root, applied):
    return Registry(server_root, apply=applied.append)


# -- address assignment ----------------------------------------------------


def test_first_peers_get_network_plus_two_then_the_next_address(registry):
    registry.genconf("node", "n1")
    registry.genconf("node", "n2")
    registry.genconf("researcher", "r1")
    registry.genconf("management", "m1")

    assert peer_values(registry, "node", "n1")["VPN_IP"] == "10.221.0.2"
    assert peer_values(registry, "node", "n2")["VPN_IP"] == "10.221.0.3"
    assert peer_values(registry, "researcher", "r1")["VPN_IP"] == "10.222.0.2"
    assert peer_values(registry, "management", "m1")["VPN_IP"] == "10.220.0.2"
    assign = registry.root / "ip_assign"
    assert (assign / "last_ip_assign_node").read_text() == "10.221.0.3\n"
    assert (assign / "last_ip_assign_researcher").read_text() == "10.222.0.2\n"


def test_genconf_returns_the_peer_config_path(registry):
    path = registry.genconf("node", "n1")
    assert path == registry.root / "config_peers" / "node" / "n1" / "config.env"


def test_addresses_are_not_reused_after_removeconf(registry):
    registry.genconf("node", "n1")
    registry.genconf("node", "n2")
    registry.removeconf("node", "n2")

    registry.genconf("node", "n3")

    assert peer_values(registry, "node", "n3")["VPN_IP"] == "10.221.0.4"


def test_missing_last_ip_file_resumes_after_the_highest_assigned(registry):
    for name in ("n1", "n2", "n3"):
        registry.genconf("node", name)
    registry.removeconf("node", "n2")
    (registry.root / "ip_assign" / "last_ip_assign_node").unlink()

    registry.genconf("node", "n4")

    assert peer_values(registry, "node", "n4")["VPN_IP"] == "10.221.0.5"


def test_stale_last_ip_file_never_hands_out_an_assigned_address(registry):
    """A last_ip_assign_TYPE file behind the configs (a restored backup, a hand
    edit) must not make genconf reuse an address."""
    registry.genconf("node", "n1")
    registry.genconf("node", "n2")
    (registry.root / "ip_assign" / "last_ip_assign_node").write_text("10.221.0.2\n")

    registry.genconf("node", "n3")

    assert peer_values(registry, "node", "n3")["VPN_IP"] not in (
        "10.221.0.2",
        "10.221.0.3",
    )


@pytest.mark.parametrize(
    "content",
    ["garbage\n", "", "10.221.0\n", "10.222.0.9\n", "10.221.0.2/32\n"],
    ids=["garbage", "empty", "truncated", "other range", "network"],
)
def test_corrupted_last_ip_file_is_refused_naming_it(registry, content):
    registry.genconf("node", "n1")
    last_file = registry.root / "ip_assign" / "last_ip_assign_node"
    last_file.write_text(content)
    before = snapshot(registry.root)

    with pytest.raises(StateError) as caught:
        registry.genconf("node", "n2")

    assert str(last_file) in str(caught.value)
    assert "delete it" in str(caught.value)
    assert snapshot(registry.root) == before


def test_exhausted_range_is_refused_and_nothing_written(tmp_path, server_config):
    server_config(tmp_path, assign={"node": "10.221.0.0/30"})
    registry = Registry(tmp_path)
    registry.genconf("node", "n1")
    assert peer_values(registry, "node", "n1")["VPN_IP"] == "10.221.0.2"
    before = snapshot(tmp_path)

    with pytest.raises(StateError) as caught:
        registry.genconf("node", "n2")

    assert "no address left for node peers in 10.221.0.0/30" in str(caught.value)
    assert snapshot(tmp_path) == before
    # Another range is not affected.
    registry.genconf("researcher", "r1")
    assert peer_values(registry, "researcher", "r1")["VPN_IP"] == "10.222.0.2"


def test_last_address_before_broadcast_is_used(tmp_path, server_config):
    server_config(tmp_path, assign={"node": "10.221.0.0/29"})
    registry = Registry(tmp_path)
    for number in range(5):
        registry.genconf("node", f"n{number}")

    with pytest.raises(StateError):
        registry.genconf("node", "n5")

    ips = [peer_values(registry, "node", f"n{n}")["VPN_IP"] for n in range(5)]
    assert ips == [f"10.221.0.{host}" for host in range(2, 7)]


def _genconf_many(root: str, prefix: str, count: int, barrier) -> None:
    registry = Registry(Path(root))
    barrier.wait(timeout=30)
    for number in range(count):
        registry.genconf("node", f"{prefix}{number}")


def test_concurrent_genconf_never_gives_the_same_address_twice(server_root):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    workers = [
        context.Process(target=_genconf_many, args=(str(server_root), p, 25, barrier))
        for p in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]

    registry = Registry(server_root)
    ips = [
        peer_values(registry, "node", f"{p}{n}")["VPN_IP"]
        for p in ("a", "b")
        for n in range(25)
    ]
    assert len(set(ips)) == 50
    assert sorted(ipaddress.ip_address(ip) for ip in ips) == [
        ipaddress.ip_address(f"10.221.0.{host}") for host in range(2, 52)
    ]
    last = server_root / "ip_assign" / "last_ip_assign_node"
    assert last.read_text() == "10.221.0.51\n"


# -- peer config.env -------------------------------------------------------


def test_peer_config_holds_what_the_peer_needs_to_join(registry):
    path = registry.genconf("node", "n1")

    values = envfile.parse(path.read_text())
    psk = values.pop("VPN_SERVER_PSK")
    assert values == {
        "VPN_IP": "10.221.0.2",
        "VPN_SUBNET_PREFIX": "14",
        "VPN_SERVER_ENDPOINT": "192.0.2.10:51820",
        "VPN_SERVER_ALLOWED_IPS": "10.220.0.0/14",
        "VPN_SERVER_PUBLIC_KEY": registry.server_public_key(),
        "VPN_SERVER_IP": "10.220.0.1",
        "FBM_PEER_TYPE": "node",
        "FBM_PEER_ID": "n1",
    }
    assert keys.check_key(psk) == psk
    server = ServerConf.parse(registry.wg_conf.read_text(), "wg0.conf")
    assert values["VPN_SERVER_PUBLIC_KEY"] == keys.public_key(server.private_key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.integration
def test_server_public_key_matches_wg_pubkey_of_wg0_private_key(registry):
    assert WG.is_file(), f"{WG} is missing: install Debian's wireguard-tools"
    public = registry.server_public_key()
    private = ServerConf.parse(registry.wg_conf.read_text(), "wg0.conf").private_key

    result = subprocess.run(
        [str(WG), "pubkey"], input=private + "\n", capture_output=True, text=True
    )

    assert result.stdout.strip() == public
    assert stat.S_IMODE(registry.wg_conf.stat().st_mode) == 0o600


def test_each_peer_gets_its_own_psk(registry):
    registry.genconf("node", "n1")
    registry.genconf("node", "n2")
    first = peer_values(registry, "node", "n1")["VPN_SERVER_PSK"]
    assert first != peer_values(registry, "node", "n2")["VPN_SERVER_PSK"]


# -- bad peer ids and types ------------------------------------------------

BAD_IDS = ["a/b", "..", "a b", "", "../x", ".hidden", "a..b", "-x", "x" * 64, "a\tb"]


@pytest.mark.parametrize("peer_id", BAD_IDS)
@pytest.mark.parametrize("verb", ["genconf", "remove", "removeconf"])
def test_bad_peer_id_is_refused_and_creates_nothing(server_root, verb, peer_id):
    registry = Registry(server_root)
    before = snapshot(server_root)

    with pytest.raises(BadInput) as caught:
        getattr(registry, verb)("node", peer_id)

    assert "is not allowed" in str(caught.value)
    assert snapshot(server_root) == before
    assert list(server_root.iterdir()) == [server_root / "config.env"]


@pytest.mark.parametrize("peer_id", BAD_IDS)
def test_add_with_bad_peer_id_is_refused(registry, peer_id):
    registry.genconf("node", "n1")
    before = registry.wg_conf.read_bytes()

    with pytest.raises(BadInput) as caught:
        registry.add("node", peer_id, new_public_key())

    assert "is not allowed" in str(caught.value)
    assert registry.wg_conf.read_bytes() == before


def test_add_with_bad_peer_id_creates_nothing(server_root):
    """add checks the id only after its transaction has created wg0.conf."""
    registry = Registry(server_root)

    with pytest.raises(BadInput):
        registry.add("node", "../x", new_public_key())

    assert list(server_root.iterdir()) == [server_root / "config.env"]


def test_peer_id_with_a_trailing_newline_is_refused(server_root):
    """`$` in the id pattern also matches before a final newline."""
    registry = Registry(server_root)

    with pytest.raises(BadInput):
        registry.genconf("node", "n1\n")

    assert not (server_root / "config_peers").exists()


@pytest.mark.parametrize("peer_type", ["nodes", "NODE", "", "../node", "server"])
def test_unknown_peer_type_is_refused_and_creates_nothing(server_root, peer_type):
    registry = Registry(server_root)

    with pytest.raises(BadInput) as caught:
        registry.genconf(peer_type, "n1")

    assert "use one of: management, node, researcher" in str(caught.value)
    assert list(server_root.iterdir()) == [server_root / "config.env"]


def test_longest_allowed_id_is_accepted(registry):
    peer_id = "a" + "b-_." * 15 + "cd"
    assert len(peer_id) == 63
    registry.genconf("node", peer_id)
    assert peer_values(registry, "node", peer_id)["FBM_PEER_ID"] == peer_id


# -- genconf twice ---------------------------------------------------------


def test_genconf_twice_is_refused_and_keeps_the_first_config(registry):
    path = registry.genconf("node", "n1")
    before = snapshot(registry.root)

    with pytest.raises(StateError) as caught:
        registry.genconf("node", "n1")

    assert "has a configuration already" in str(caught.value)
    assert "removeconf" in str(caught.value)
    assert snapshot(registry.root) == before
    assert path.read_bytes() == before["config_peers/node/n1/config.env"]


def test_same_id_in_two_types_are_two_peers(registry):
    registry.genconf("node", "x1")
    registry.genconf("researcher", "x1")
    assert peer_values(registry, "researcher", "x1")["VPN_IP"] == "10.222.0.2"


# -- add -------------------------------------------------------------------


def test_add_for_a_peer_never_generated_is_refused(registry):
    registry.genconf("node", "n1")
    registry.add("node", "n1", new_public_key())
    before = snapshot(registry.root)

    with pytest.raises(StateError) as caught:
        registry.add("node", "ghost", new_public_key())

    assert "never generated" in str(caught.value)
    assert "genconf node ghost" in str(caught.value)
    assert snapshot(registry.root) == before


@pytest.mark.parametrize(
    "bad_key", ["", "not-a-key", "A" * 43, keys.generate_psk()[:-2] + "=="]
)
def test_add_of_an_invalid_key_is_refused_and_writes_nothing(registry, bad_key):
    registry.genconf("node", "n1")
    before = snapshot(registry.root)

    with pytest.raises(BadInput) as caught:
        registry.add("node", "n1", bad_key)

    assert "public key is not a WireGuard key" in str(caught.value)
    if bad_key:
        assert bad_key not in str(caught.value)
    assert snapshot(registry.root) == before


def test_add_of_a_key_held_by_another_peer_is_refused_naming_it(registry, applied):
    shared = new_public_key()
    for peer_type, peer_id in (("node", "n1"), ("node", "n2"), ("researcher", "r1")):
        registry.genconf(peer_type, peer_id)
    registry.add("node", "n1", shared)
    registry.add("node", "n2", new_public_key())
    before = snapshot(registry.root)
    applied.clear()

    for peer_type, peer_id in (("node", "n2"), ("researcher", "r1")):
        with pytest.raises(StateError) as caught:
            registry.add(peer_type, peer_id, shared)
        assert "registered for node n1 already" in str(caught.value)
        assert shared not in str(caught.value)

    assert snapshot(registry.root) == before
    assert applied == []


def test_add_of_the_same_key_twice_is_a_no_op(registry, applied):
    registry.genconf("node", "n1")
    key = new_public_key()

    assert registry.add("node", "n1", key) is True
    before = registry.wg_conf.read_bytes()
    assert registry.add("node", "n1", f" {key}\n") is False

    assert registry.wg_conf.read_bytes() == before
    assert wg_peers(registry) == [("node", "n1", key)]
    assert len(applied) == 1


def test_a_peer_may_hold_several_keys(registry):
    registry.genconf("node", "n1")
    registered = [new_public_key() for _ in range(3)]
    for key in registered:
        registry.add("node", "n1", key)

    conf = ServerConf.parse(registry.wg_conf.read_text(), "wg0.conf")
    psk = peer_values(registry, "node", "n1")["VPN_SERVER_PSK"]
    assert [p.public_key for p in conf.peers] == registered
    assert {p.psk for p in conf.peers} == {psk}
    assert {p.allowed_ips for p in conf.peers} == {"10.221.0.2/32"}
    [entry] = registry.entries()
    assert (entry.peer_type, entry.peer_id, entry.prefix, entry.keys) == (
        "node",
        "n1",
        "10.221.0.2/32",
        registered,
    )


# -- remove, removeconf, entries --------------------------------------------


def test_remove_drops_the_keys_and_keeps_the_config(registry):
    registry.genconf("node", "n1")
    registry.genconf("node", "n2")
    config = registry.peer_env("node", "n1").read_bytes()
    other = new_public_key()
    registry.add("node", "n1", new_public_key())
    registry.add("node", "n1", new_public_key())
    registry.add("node", "n2", other)

    assert registry.remove("node", "n1") == 2

    assert registry.peer_env("node", "n1").read_bytes() == config
    assert wg_peers(registry) == [("node", "n2", other)]
    assert [(e.peer_id, e.prefix, e.keys) for e in registry.entries()] == [
        ("n1", "10.221.0.2/32", []),
        ("n2", "10.221.0.3/32", [other]),
    ]
    assert registry.remove("node", "n1") == 0


def test_remove_of_an_unknown_peer_is_refused(registry):
    with pytest.raises(StateError) as caught:
        registry.remove("node", "ghost")
    assert "no peer node ghost" in str(caught.value)


def test_removeconf_drops_the_keys_and_the_config(registry):
    registry.genconf("node", "n1")
    registry.genconf("node", "n2")
    kept = new_public_key()
    registry.add("node", "n1", new_public_key())
    registry.add("node", "n2", kept)
    kept_config = registry.peer_env("node", "n2").read_bytes()

    registry.removeconf("node", "n1")

    assert not (registry.root / "config_peers" / "node" / "n1").exists()
    assert wg_peers(registry) == [("node", "n2", kept)]
    assert [(e.peer_id, e.keys) for e in registry.entries()] == [("n2", [kept])]
    assert registry.peer_env("node", "n2").read_bytes() == kept_config
    with pytest.raises(StateError):
        registry.removeconf("node", "n1")


def test_removeconf_then_genconf_gives_a_new_config(registry):
    registry.genconf("node", "n1")
    registry.removeconf("node", "n1")
    registry.genconf("node", "n1")
    assert peer_values(registry, "node", "n1")["VPN_IP"] == "10.221.0.3"


def test_entries_of_an_empty_registry(registry):
    assert registry.entries() == []


def test_entries_are_grouped_by_type(registry):
    registry.genconf("researcher", "r1")
    registry.genconf("node", "n2")
    registry.genconf("management", "m1")
    registry.genconf("node", "n1")
    assert [(e.peer_type, e.peer_id, e.prefix) for e in registry.entries()] == [
        ("management", "m1", "10.220.0.2/32"),
        ("node", "n1", "10.221.0.3/32"),
        ("node", "n2", "10.221.0.2/32"),
        ("researcher", "r1", "10.222.0.2/32"),
    ]


# -- server config.env -----------------------------------------------------


def test_missing_config_env_says_to_run_vpnserver_init(tmp_path):
    registry = Registry(tmp_path)

    with pytest.raises(StateError) as caught:
        registry.genconf("node", "n1")

    assert str(tmp_path / "config.env") in str(caught.value)
    assert "run `invoke vpnserver.init`" in str(caught.value)
    assert not (tmp_path / "config_peers").exists()


def test_missing_config_env_writes_nothing(tmp_path):
    """A refused genconf must not leave a new server key in an uninitialised dir."""
    root = tmp_path / "config"
    root.mkdir()

    with pytest.raises(StateError):
        Registry(root).genconf("node", "n1")

    assert snapshot(root) == {}


@pytest.mark.parametrize("missing", SERVER_KEYS)
def test_partial_config_env_names_the_key_and_says_to_run_init(server_root, missing):
    config = server_root / "config.env"
    lines = config.read_text().splitlines(keepends=True)
    config.write_text("".join(x for x in lines if not x.startswith(f"{missing}=")))

    with pytest.raises(StateError) as caught:
        Registry(server_root).genconf("node", "n1")

    assert f"incomplete: {missing} missing or empty" in str(caught.value)
    assert "run `invoke vpnserver.init`" in str(caught.value)
    assert not (server_root / "config_peers").exists()


def test_config_env_with_an_empty_value_is_partial(server_root):
    config = server_root / "config.env"
    config.write_text(config.read_text().replace("VPN_IP=10.220.0.1", "VPN_IP="))

    with pytest.raises(StateError) as caught:
        Registry(server_root).genconf("node", "n1")

    assert "VPN_IP missing or empty" in str(caught.value)


@pytest.mark.parametrize(
    ("line", "garbled"),
    [
        ("VPN_NODE_IP_ASSIGN=10.221.0.0/16", "VPN_NODE_IP_ASSIGN=nonsense"),
        ("VPN_SUBNET_PREFIX=14", "VPN_SUBNET_PREFIX=abc"),
        ("VPN_IP=10.220.0.1", "VPN_IP=vpn.example"),
        ("VPN_SERVER_PORT=51820", "VPN_SERVER_PORT=notaport"),
    ],
    ids=["assign range", "prefix", "server ip", "port"],
)
def test_garbled_config_env_value_is_a_state_error(server_root, line, garbled):
    config = server_root / "config.env"
    config.write_text(config.read_text().replace(line, garbled))

    with pytest.raises(StateError) as caught:
        Registry(server_root).genconf("node", "n1")

    assert garbled.split("=")[0] in str(caught.value)
    assert not (server_root / "config_peers").exists()


# -- wg0.conf and the apply callback ---------------------------------------


@pytest.mark.integration
def test_wg0_conf_has_the_shape_wg_setconf_reads(registry):
    for peer_id in ("n1", "n2"):
        registry.genconf("node", peer_id)
        registry.add("node", peer_id, new_public_key())
    registry.genconf("researcher", "r1")
    registry.add("researcher", "r1", new_public_key())
    registry.add("researcher", "r1", new_public_key())
    text = registry.wg_conf.read_text()

    sections = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line in ("[Interface]", "[Peer]"):
            sections.append((line, {}))
            continue
        key, value = line.split(" = ", 1)
        assert key not in sections[-1][1], f"{key} twice in a section"
        sections[-1][1][key] = value
    assert [kind for kind, _ in sections] == ["[Interface]"] + ["[Peer]"] * 4
    assert set(sections[0][1]) == {"PrivateKey", "ListenPort"}
    assert sections[0][1]["ListenPort"] == "51820"
    for _, body in sections[1:]:
        assert set(body) == {"PublicKey", "PresharedKey", "AllowedIPs"}
        assert ipaddress.ip_network(body["AllowedIPs"]).prefixlen == 32
    assert ServerConf.parse(text, "wg0.conf").render() == text

    # Every key goes through the real `wg` base64 parser.
    assert WG.is_file(), f"{WG} is missing: install Debian's wireguard-tools"
    all_keys = [v for _, body in sections for k, v in body.items() if "Key" in k]
    assert len(all_keys) == 1 + 2 * 4
    for key in all_keys:
        result = subprocess.run(
            [str(WG), "pubkey"], input=key + "\n", capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr

    # wg-quick reads it as an interface file and has nothing to strip.
    assert WG_QUICK.is_file(), f"{WG_QUICK} is missing: install wireguard-tools"
    stripped = subprocess.run(
        [str(WG_QUICK), "strip", str(registry.wg_conf)],
        capture_output=True,
        text=True,
    )
    assert stripped.returncode == 0, stripped.stderr
    assert [x for x in stripped.stdout.splitlines() if x and x[0] != "#"] == [
        x for x in text.splitlines() if x and x[0] != "#"
    ]


def test_apply_is_called_once_per_changing_transaction(registry, applied):
    registry.genconf("node", "n1")
    registry.genconf("node", "n2")
    assert applied == []

    registry.add("node", "n1", new_public_key())
    assert applied == [registry.wg_conf]

    with registry.transaction() as tx:
        tx.add("node", "n1", new_public_key())
        tx.add("node", "n2", new_public_key())
        tx.genconf("node", "n3")
    assert len(applied) == 2

    registry.remove("node", "n3")
    assert len(applied) == 2

    registry.remove("node", "n1")
    registry.removeconf("node", "n2")
    assert len(applied) == 4

    registry.removeconf("node", "n1")
    assert len(applied) == 4


def test_apply_sees_the_new_wg0_conf(server_root):
    seen = []
    registry = Registry(server_root, apply=lambda path: seen.append(path.read_text()))
    registry.genconf("node", "n1")
    key = new_public_key()

    registry.add("node", "n1", key)

    assert len(seen) == 1
    assert f"PublicKey = {key}" in seen[0]


def test_failed_transaction_writes_and_applies_nothing(registry, applied):
    registry.genconf("node", "n1")
    before = registry.wg_conf.read_bytes()

    with pytest.raises(StateError), registry.transaction() as tx:
        tx.add("node", "n1", new_public_key())
        tx.add("node", "ghost", new_public_key())

    assert registry.wg_conf.read_bytes() == before
    assert applied == []
