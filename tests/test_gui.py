"""The node GUI: the certificate folder rule, the self-signed certificate, the
nginx config, the tasks; then `invoke gui.up` for real, in containers.

The docker tests (markers docker and fedbiomed: the gui image holds
Fed-BioMed) use an instance of their own (guitest: own names, ports
18443/18484, run_mounts in a temporary folder of their own) and the `e2e`
images, built here when missing (the Fed-BioMed layer comes from the build
cache). Builds trust FBM_TEST_CA_BUNDLE (default: the host's CA bundle) and
start from FBM_TEST_BASE_IMAGE (default: fbm-local/debian:bookworm).
"""

import inspect
import os
import shutil
import socket
import ssl
import stat
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from invoke import Collection, Context

from conftest import REPO_ROOT
from fbmvpn import gui, templates
from fbmvpn.errors import BadInput
from fbmvpn.host import LocalHost
from fbmvpn.settings import DEFAULTS, Settings
from fbmvpn.stack import Stack
from stack_env import TAG, Instance, docker, isolated_env, run_invoke

# -- the certificate folder rule -----------------------------------------------------


def test_empty_folder_means_a_self_signed_certificate():
    assert gui.plan_certs([], "/certs") == gui.CertPlan(generate=True)


@pytest.mark.parametrize("names", [("a.crt", "b.key"), ("Site.CRT", "site.KEY")])
def test_one_certificate_and_one_key_are_used(names):
    plan = gui.plan_certs([(n, "file") for n in names], "/certs")

    assert plan == gui.CertPlan(False, names[0], names[1])


@pytest.mark.parametrize(
    "entries, fix",
    [
        ([("a.key", "file"), ("b.key", "file"), ("a.crt", "file")], "keep one"),
        ([("a.crt", "file"), ("b.crt", "file"), ("a.key", "file")], "keep one"),
        ([("a.crt", "file")], "no private key for a.crt"),
        ([("a.key", "file")], "no certificate for a.key"),
        (
            [("a.crt", "file"), ("a.key", "file"), ("notes.txt", "file")],
            "notes.txt is neither a .crt nor a .key file: move it out",
        ),
        (
            [("a.crt", "file"), ("a.key", "file"), ("old", "dir")],
            "old/ is neither a .crt nor a .key file",
        ),
        ([("a.crt", "link"), ("a.key", "file")], "a.crt is a symbolic link"),
        ([("a.pem", "file")], "a.pem is neither a .crt nor a .key"),
    ],
)
def test_anything_else_is_refused_naming_the_files(entries, fix):
    with pytest.raises(BadInput) as refused:
        gui.plan_certs(entries, "/srv/gui/run_mounts/certs")

    message = str(refused.value)
    assert "/srv/gui/run_mounts/certs holds " in message
    for name, kind in entries:
        assert (f"{name}/" if kind == "dir" else name) in message
    assert fix in message
    assert "exactly one certificate (.crt) and its private key (.key)" in message
    assert "Nothing was changed" in message


def local_stack(tmp_path, **gui_settings) -> Stack:
    fbm = {**DEFAULTS, "mounts": str(tmp_path)}
    fbm["gui"] = {**DEFAULTS["gui"], **gui_settings}
    return Stack(LocalHost(Context()), Settings.from_config(fbm), say=lambda _: None)


def test_host_folder_is_read_through_the_stack_host(tmp_path):
    stack = local_stack(tmp_path)
    folder = gui.certs_dir(stack)
    assert folder == tmp_path / "gui" / "run_mounts" / "certs"
    assert gui.check_certs(stack).generate  # missing folder: as if empty

    folder.mkdir(parents=True)
    (folder / "my site.crt").write_text("x")
    (folder / "my site.key").write_text("x")
    assert gui.check_certs(stack) == gui.CertPlan(False, "my site.crt", "my site.key")

    (folder / "sub").mkdir()
    (folder / "link.key").symlink_to(folder / "my site.key")
    with pytest.raises(BadInput, match=r"link\.key is a symbolic link.*sub/ is"):
        gui.check_certs(stack)
    assert sorted(p.name for p in folder.iterdir()) == [
        "link.key",
        "my site.crt",
        "my site.key",
        "sub",
    ]


# -- names, addresses, the certificate ------------------------------------------------


@pytest.mark.parametrize("name", ["localhost", "gui.hospital.example", "192.0.2.7"])
def test_server_names_accepted(name):
    assert gui.check_server_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "0.0.0.0", "a b", "x;rm -rf", "-lead.example", "10.0.0.256", "a/b"]
)
def test_server_names_refused(name):
    with pytest.raises(BadInput, match="fbm.gui.server_name"):
        gui.check_server_name(name)


@pytest.mark.parametrize("host", ["localhost", "", "1.2.3", "0.0.0.0;x"])
def test_bind_address_must_be_an_ip(host):
    with pytest.raises(BadInput, match="fbm.gui.host"):
        gui.check_bind(host)


@pytest.mark.parametrize(
    "host, name, expected",
    [
        ("127.0.0.1", "localhost", "https://127.0.0.1:8443"),
        ("0.0.0.0", "localhost", "https://127.0.0.1:8443"),
        ("192.0.2.7", "localhost", "https://192.0.2.7:8443"),
        ("0.0.0.0", "gui.example.org", "https://gui.example.org:8443"),
        ("::", "localhost", "https://127.0.0.1:8443"),
        ("0.0.0.0", "2001:db8::7", "https://[2001:db8::7]:8443"),
    ],
)
def test_url_names_what_users_open(host, name, expected):
    settings = {"gui": {**DEFAULTS["gui"], "host": host, "server_name": name}}
    assert gui.url(settings) == expected


def test_certificate_names_cover_local_access_and_the_bind_address():
    assert gui.cert_names("gui.example.org", "0.0.0.0") == [
        "gui.example.org",
        "localhost",
        "127.0.0.1",
    ]
    assert gui.cert_names("localhost", "192.0.2.7") == [
        "localhost",
        "127.0.0.1",
        "192.0.2.7",
    ]


def test_self_signed_pair_is_valid_for_its_names(tmp_path):
    cert_path, key_path = gui.write_self_signed(
        tmp_path, ["gui.example.org", "127.0.0.1"]
    )

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["gui.example.org"]
    assert [str(a) for a in names.value.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1"
    ]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
    assert {cert_path.name, key_path.name} == {
        "fbm-gui-selfsigned.crt",
        "fbm-gui-selfsigned.key",
    }
    # the pair matches, as nginx will check
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)


def test_self_signed_command_refuses_bad_names_and_writes_nothing(tmp_path, capsys):
    assert gui.main(["self-signed", str(tmp_path), "bad name"]) == 1
    assert "neither a host name nor an IP address" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_nginx_config_serves_both_ports_through_fixed_link_names():
    text = templates.render(
        "gui-nginx.conf.j2",
        run_dir="/run/fbm-gui",
        server_name="gui.example.org",
        https_port=8443,
        http_port=8484,
        backend_port=8000,
    )
    assert "listen 8443 ssl;" in text
    assert "listen 8484;" in text
    assert text.count("server_name gui.example.org;") == 2
    assert text.count("proxy_pass http://fedbiomed_gui;") == 2
    assert "ssl_certificate /run/fbm-gui/server.crt;" in text
    assert "ssl_certificate_key /run/fbm-gui/server.key;" in text
    assert "daemon off;" in text


# -- the container side, without a container ------------------------------------------


@pytest.fixture
def service(tmp_path, monkeypatch):
    """A Service on a temporary /certs, making certificates with this Python."""
    monkeypatch.setattr(gui, "CERTS", str(tmp_path / "certs"))
    monkeypatch.setattr(gui, "VENV_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    env = {
        "CONTAINER_UID": str(os.getuid()),
        "CONTAINER_GID": str(os.getgid()),
        "CONTAINER_USER": "someone",
        "GUI_SERVER_NAME": "gui.example.org",
        "GUI_SERVER_IP": "0.0.0.0",
    }
    return gui.Service(env)


def test_entrypoint_makes_the_certificate_once_and_keeps_it(service, tmp_path):
    cert, key = service.prepare_certs()
    first = cert.read_bytes(), key.read_bytes()

    again = service.prepare_certs()

    assert again == (cert, key)
    assert (cert.read_bytes(), key.read_bytes()) == first
    parsed = x509.load_pem_x509_certificate(first[0])
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "gui.example.org" in names.value.get_values_for_type(x509.DNSName)


def test_entrypoint_refuses_a_bad_folder_and_changes_nothing(service, tmp_path):
    folder = tmp_path / "certs"
    folder.mkdir()
    (folder / "a.crt").write_text("cert")
    (folder / "a.key").write_text("key")
    (folder / "b.key").write_text("other key")

    with pytest.raises(BadInput, match=r"/certs \(gui/run_mounts/certs on the host\)"):
        service.prepare_certs()

    assert {p.name: p.read_text() for p in folder.iterdir()} == {
        "a.crt": "cert",
        "a.key": "key",
        "b.key": "other key",
    }


# -- the tasks ----------------------------------------------------------------------


def test_gui_tasks_replace_the_generic_up_and_document_every_flag():
    from tasks import _components

    collection = _components.component_collection("gui")

    up = collection["up"]
    assert set(up.help) == {"host", "server_name", "restart", "expose"}
    for name in ("up", "certs"):
        item = collection[name]
        assert item.__doc__ and item.__doc__.strip()
        parameters = list(inspect.signature(item.body).parameters)[1:]
        assert sorted(parameters) == sorted(item.help), name
    assert isinstance(collection, Collection)


def test_compose_passes_the_server_name(tmp_path):
    """Stack.compose_env carries fbm.gui.server_name to the gui service."""
    stack = local_stack(tmp_path, server_name="gui.example.org")
    stack._base = "debian:bookworm-slim"  # no engine probe

    assert stack.compose_env()["GUI_SERVER_NAME"] == "gui.example.org"


# -- docker end-to-end -------------------------------------------------------------

INSTANCE = "guitest"
HTTPS_PORT = 18443
HTTP_PORT = 18484


class GuiDeployment(Instance):
    def __init__(self, mounts: Path):
        ports = dict(
            vpn=51897,
            jupyter=18897,
            tensorboard=16897,
            gui_https=HTTPS_PORT,
            gui_http=HTTP_PORT,
        )
        super().__init__(INSTANCE, mounts, ports, INVOKE_FBM_WAIT_TIMEOUT="240")

    @property
    def gui(self):
        return self.container("gui")

    @property
    def certs(self) -> Path:
        return self.mounts / "gui" / "run_mounts" / "certs"

    def files(self) -> dict:
        return {p.name: p.read_bytes() for p in sorted(self.certs.iterdir())}

    def state(self) -> str:
        found = docker("inspect", "-f", "{{.State.Status}}", self.gui, check=False)
        return found.stdout.strip() if found.returncode == 0 else "absent"


def served_certificate(port: int = HTTPS_PORT) -> bytes:
    """The DER certificate the GUI presents on the published HTTPS port."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        return tls.getpeercert(binary_form=True)


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def get(url: str) -> tuple[int, str]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, context=context, timeout=20) as answer:
        return answer.status, answer.read().decode(errors="replace")


@pytest.fixture(scope="module")
def deployment():
    info = docker("info", "--format", "{{.ServerVersion}}", check=False)
    assert info.returncode == 0, (
        f"no Docker engine: {info.stderr}; run scripts/setup.sh"
    )
    # Not under pytest's basetemp: another pytest session may prune it while
    # the containers still use it.
    root = Path(tempfile.mkdtemp(prefix="fbm-guitest-"))
    dep = GuiDeployment(root / "mounts")
    dep.scratch = root / "scratch"
    dep.scratch.mkdir()
    try:
        dep.invoke("build", "--images", "gui", timeout=2400)
        dep.first = dep.invoke("gui.up")
        yield dep
    finally:
        dep.invoke("clean", "all", "--level", "container", "--yes", check=False)
        for name in ("vpnserver", "node", "node2", "gui", "researcher"):
            docker("network", "rm", f"fbm-vpn-{name}-{INSTANCE}", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.docker
@pytest.mark.fedbiomed
def test_up_serves_https_with_the_generated_certificate(deployment):
    out = deployment.first.stdout
    files = deployment.files()

    assert f"gui up: https://127.0.0.1:{HTTPS_PORT}" in out
    assert sorted(files) == ["fbm-gui-selfsigned.crt", "fbm-gui-selfsigned.key"]
    key = deployment.certs / "fbm-gui-selfsigned.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.stat().st_uid == os.getuid()
    assert served_certificate() == der(files["fbm-gui-selfsigned.crt"])
    status, page = get(f"https://127.0.0.1:{HTTPS_PORT}/")
    assert status == 200 and "<html" in page.lower()
    assert get(f"http://127.0.0.1:{HTTP_PORT}/")[0] == 200
    assert "PRIVATE KEY" not in out + deployment.first.stderr


@pytest.mark.docker
@pytest.mark.fedbiomed
def test_up_created_the_node_component_on_the_node_mounts(deployment):
    fbm = deployment.mounts / "node" / "run_mounts" / "fbm" / "node"

    assert (fbm / ".fedbiomed").is_file()
    assert (fbm / "etc" / "config.ini").is_file()
    assert "Fed-BioMed node component node1 created" in deployment.first.stdout
    again = deployment.invoke("gui.up")
    assert "component node1 created" not in again.stdout


@pytest.mark.docker
@pytest.mark.fedbiomed
def test_certificate_survives_down_and_up(deployment):
    before = deployment.files()

    deployment.invoke("gui.down")
    assert deployment.state() == "exited"
    again = deployment.invoke("gui.up")

    assert f"gui up: https://127.0.0.1:{HTTPS_PORT}" in again.stdout
    assert deployment.files() == before
    assert served_certificate() == der(before["fbm-gui-selfsigned.crt"])


BAD_LAYOUTS = {
    "two keys": {"extra.key": b"k"},
    "two certificates": {"extra.crt": b"c"},
    "a stray file": {"README.txt": b"r"},
    "a lone certificate": {"drop": ["fbm-gui-selfsigned.key"]},
    "a lone key": {"drop": ["fbm-gui-selfsigned.crt"]},
}


@pytest.mark.docker
@pytest.mark.fedbiomed
@pytest.mark.parametrize("layout", BAD_LAYOUTS)
def test_bad_folder_is_refused_before_the_container_starts(deployment, layout):
    """With the container stopped, which it stays (the next up starts it)."""
    aside = deployment.scratch / layout.replace(" ", "-")
    aside.mkdir()
    deployment.invoke("gui.down")
    saved = deployment.files()
    container_id = docker("inspect", "-f", "{{.Id}}", deployment.gui).stdout
    change = BAD_LAYOUTS[layout]
    for name in change.get("drop", []):
        shutil.move(deployment.certs / name, aside / name)
    for name, content in change.items():
        if name != "drop":
            (deployment.certs / name).write_bytes(content)
    inside = deployment.files()
    try:
        result = deployment.invoke("gui.up", check=False)

        assert result.returncode == 1
        message = result.stderr
        assert "gui.up failed: the GUI certificate folder" in message
        assert str(deployment.certs) in message
        for name in inside:
            assert name in message
        assert "exactly one certificate (.crt)" in message
        assert deployment.files() == inside  # nothing deleted or overwritten
        assert deployment.state() == "exited"  # not started
        now = docker("inspect", "-f", "{{.Id}}", deployment.gui).stdout
        assert now == container_id  # nor recreated
    finally:
        for name in inside:
            if name not in saved:
                (deployment.certs / name).unlink()
        for name in change.get("drop", []):
            shutil.move(aside / name, deployment.certs / name)
    assert deployment.files() == saved


@pytest.mark.docker
@pytest.mark.fedbiomed
def test_entrypoint_refuses_a_bad_folder_too(deployment):
    """The safety net: the image started by hand on a folder with a lone key."""
    certs = deployment.scratch / "lone-key"
    certs.mkdir()
    (certs / "site.key").write_text("not shown")

    result = docker(
        "run", "--rm", "-v", f"{certs}:/certs", f"fedbiomed/vpn-gui:{TAG}",
        check=False,
    )  # fmt: skip

    assert result.returncode == 1
    assert "no certificate for site.key" in result.stdout
    assert [p.name for p in certs.iterdir()] == ["site.key"]
    assert (certs / "site.key").read_text() == "not shown"


@pytest.mark.docker
@pytest.mark.fedbiomed
def test_user_certificate_is_served_after_restart(deployment):
    for path in deployment.certs.iterdir():
        path.unlink()
    cert, key = gui.write_self_signed(deployment.scratch, ["gui.mine.test"])
    shutil.copy(cert, deployment.certs / "mine.crt")
    shutil.copy(key, deployment.certs / "mine.key")

    result = deployment.invoke("gui.up", "--restart")

    assert "certificate" in result.stdout and "mine.crt" in result.stdout
    assert served_certificate() == der(cert.read_bytes())
    assert sorted(deployment.files()) == ["mine.crt", "mine.key"]


@pytest.mark.docker
@pytest.mark.fedbiomed
def test_server_name_goes_into_a_new_self_signed_certificate(deployment):
    for path in deployment.certs.iterdir():
        path.unlink()

    result = deployment.invoke(
        "gui.up", "--server-name", "gui.hospital.test", "--restart"
    )

    assert "gui up: https://gui.hospital.test:18443" in result.stdout
    pem = (deployment.certs / "fbm-gui-selfsigned.crt").read_bytes()
    names = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "gui.hospital.test" in names.value.get_values_for_type(x509.DNSName)
    assert served_certificate() == der(pem)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7"])
def test_gui_on_a_reachable_address_needs_expose(host):
    with pytest.raises(BadInput, match="--expose.*SSH tunnel"):
        gui.check_exposure(host, expose=False)
    gui.check_exposure(host, expose=True)
    gui.check_exposure("127.0.0.1", expose=False)


def test_gui_up_refuses_an_unconfirmed_address_before_anything(tmp_path):
    env = isolated_env("guiexpose", tmp_path, {})
    result = run_invoke(env, "gui.up", "--host", "0.0.0.0", timeout=60)

    assert result.returncode == 1
    assert "Nothing was changed" in result.stderr and "--expose" in result.stderr
    assert "docker" not in result.stdout
    assert list(tmp_path.iterdir()) == []
