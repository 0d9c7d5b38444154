"""The node GUI: its certificate folder, its start on a host, and its processes.

Fed-BioMed's GUI (`fedbiomed node -p /fbm/node gui start`, a gunicorn server)
runs in the gui container on 127.0.0.1:8000, behind Debian's nginx, which
serves it over HTTPS on 8443 and plain HTTP on 8484. The container shares the
node's /data and /fbm, and reads its certificate from /certs
(gui/run_mounts/certs on the host):

- nothing there: a self-signed certificate is made at the first start and
  kept (the key 0600);
- exactly one .crt and one .key: they are used;
- anything else is refused, before the container starts and again in it;
  nothing is deleted or overwritten.

Host side (`up`, `check_certs`): runs through a Stack's host, so it works on
this machine and over SSH. Container side (`Service`): started by the
entrypoint (fbmvpn.container) when FBM_VPN_ROLE is `gui`; it uses Debian's
python3 only, except for the certificate, made by the Fed-BioMed venv's
`cryptography` (`python -m fbmvpn.gui self-signed DIR NAME...`).
"""

import argparse
import ipaddress
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput, EngineError, StateError
from .files import write_atomic

CERTS = "/certs"
DATA = "/data"
NODE_ROOT = "/fbm/node"
VENV_PYTHON = "/opt/fbm-venv/bin/python"
FEDBIOMED = "/opt/fbm-venv/bin/fedbiomed"
RUN_DIR = Path("/run/fbm-gui")
HTTPS_PORT = 8443  # inside the container; compose publishes them
HTTP_PORT = 8484
BACKEND_PORT = 8000  # gunicorn, reached by nginx only
SELF_SIGNED = "fbm-gui-selfsigned"  # .crt and .key made when the folder is empty
CERT_DAYS = 825

_NAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)


def log(message: str) -> None:
    print(f"[fbm-gui] {message}", flush=True)


# -- the certificate folder rule (pure) ------------------------------------------


@dataclass(frozen=True)
class CertPlan:
    """What the GUI does with its certificate folder."""

    generate: bool
    cert: str | None = None
    key: str | None = None


def plan_certs(entries, folder) -> CertPlan:
    """Decide from the folder's entries, given as (name, kind) pairs, where
    kind is `file`, `dir`, `link` or `other`.

    Empty: generate. Exactly one .crt and one .key file (any case): use them.
    Anything else raises BadInput naming every entry found and the fix.
    """
    entries = sorted(entries)
    if not entries:
        return CertPlan(generate=True)
    files = [name for name, kind in entries if kind == "file"]
    crts = [name for name in files if name.lower().endswith(".crt")]
    keys = [name for name in files if name.lower().endswith(".key")]
    links = [name for name, kind in entries if kind == "link"]
    stray = [
        f"{name}/" if kind == "dir" else name
        for name, kind in entries
        if kind in ("dir", "other") or (kind == "file" and name not in crts + keys)
    ]
    if len(crts) == 1 and len(keys) == 1 and not links and not stray:
        return CertPlan(generate=False, cert=crts[0], key=keys[0])

    problems = []
    if links:
        problems.append(
            f"{_names(links)} {_is(links)} a symbolic link (the container sees only "
            f"this folder): copy the file itself there"
        )
    if stray:
        problems.append(
            f"{_names(stray)} {_is(stray)} neither a .crt nor a .key file: move "
            f"{'it' if len(stray) == 1 else 'them'} out"
        )
    if len(crts) > 1:
        problems.append(f"{len(crts)} certificates ({_names(crts)}): keep one")
    if len(keys) > 1:
        problems.append(f"{len(keys)} private keys ({_names(keys)}): keep one")
    if crts and not keys:
        problems.append(
            f"no private key for {_names(crts)}: add it beside, named *.key"
        )
    if keys and not crts:
        problems.append(
            f"no certificate for {_names(keys)}: add it beside, named *.crt"
        )
    found = ", ".join(f"{n}/" if k == "dir" else n for n, k in entries)
    raise BadInput(
        f"the GUI certificate folder {folder} holds {found}; "
        f"{'; '.join(problems)}. It must hold exactly one certificate (.crt) and "
        f"its private key (.key), or nothing at all for a self-signed "
        f"certificate made at start. Nothing was changed"
    )


def _names(names) -> str:
    return ", ".join(names)


def _is(names) -> str:
    return "is" if len(names) == 1 else "are each"


def check_server_name(name: str) -> str:
    """A DNS name or an IP address, as the certificate and nginx need it."""
    text = str(name).strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        if _NAME.match(text) and not text.rsplit(".", 1)[-1].isdigit():
            return text
    else:
        if not address.is_unspecified:
            return text
    raise BadInput(
        f"GUI server name {name!r} is neither a host name nor an IP address; set "
        f"fbm.gui.server_name (or --server-name) to the name users type in their "
        f"browser, e.g. gui.hospital.example or 192.0.2.7"
    )


def check_bind(host: str) -> str:
    """The address the GUI's ports are published on (GUI_SERVER_IP)."""
    try:
        ipaddress.ip_address(str(host))
    except ValueError:
        raise BadInput(
            f"GUI address {host!r} is not an IP address; set fbm.gui.host (or "
            f"--host) to 127.0.0.1 (this machine only), 0.0.0.0 (every interface) "
            f"or one of this machine's addresses"
        ) from None
    return str(host)


def cert_names(server_name: str, bind: str = "") -> list[str]:
    """Names the self-signed certificate is valid for: the server name first."""
    names = [server_name, "localhost", "127.0.0.1"]
    if bind and not ipaddress.ip_address(bind).is_unspecified:
        names.append(bind)
    return list(dict.fromkeys(names))


def url(settings, server_name: str | None = None) -> str:
    """The address users open: the server name, or the bind address."""
    gui = settings["gui"]
    name = server_name or gui.get("server_name") or "localhost"
    if name == "localhost":
        name = gui["host"]
        if ipaddress.ip_address(name).is_unspecified:
            name = "127.0.0.1"
    if ":" in name:  # IPv6
        name = f"[{name}]"
    return f"https://{name}:{gui['https_port']}"


# -- the self-signed certificate ----------------------------------------------------


def self_signed_pem(names, days: int = CERT_DAYS) -> tuple[str, str]:
    """A new RSA key and a certificate valid for `names` (PEM texts).

    Needs `cryptography` (the Fed-BioMed venv has it; Debian's python3 here
    does not).
    """
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alternatives = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fed-BioMed node GUI"),
        ]
    )
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def write_self_signed(folder, names) -> tuple[Path, Path]:
    """Write SELF_SIGNED.crt (0644) and SELF_SIGNED.key (0600) in `folder`."""
    folder = Path(folder)
    cert_pem, key_pem = self_signed_pem(names)
    key, cert = folder / f"{SELF_SIGNED}.key", folder / f"{SELF_SIGNED}.crt"
    write_atomic(key, key_pem, 0o600)
    write_atomic(cert, cert_pem, 0o644)
    return cert, key


# -- host side: checks and start ------------------------------------------------------


def certs_dir(stack) -> Path:
    return stack.run_mounts("gui") / "certs"


def list_folder(stack, folder) -> list[tuple[str, str]]:
    """(name, kind) of each entry of a folder on the stack's host."""
    if not stack.host.exists(folder):
        return []
    argv = ["find", folder, "-mindepth", "1", "-maxdepth", "1", "-printf", r"%y %f\0"]
    listing = stack.host.probe(argv)
    if not listing.ok:
        raise StateError(
            f"cannot list {folder} on {stack.host.name}: "
            f"{(listing.stderr or '').strip()}; check its permissions"
        )
    kinds = {"f": "file", "d": "dir", "l": "link"}
    entries = []
    for item in (listing.stdout or "").split("\0"):
        if item:
            kind, _, name = item.partition(" ")
            entries.append((name, kinds.get(kind, "other")))
    return entries


def check_certs(stack) -> CertPlan:
    """Apply the certificate folder rule to the host's folder (no change)."""
    folder = certs_dir(stack)
    return plan_certs(list_folder(stack, folder), folder)


def check_exposure(host: str, expose: bool) -> None:
    """Refuse a GUI address other machines can reach unless confirmed."""
    if expose or ipaddress.ip_address(host).is_loopback:
        return
    where = "every address of this machine" if host in ("0.0.0.0", "::") else host
    raise BadInput(
        f"fbm.gui.host {host} would publish the node GUI on {where}, open to "
        f"attacks from the network (its first account has a default password). "
        f"Nothing was changed. Do it only behind a web proxy or firewall with a "
        f"certificate from a known authority, and confirm with --expose (or "
        f"fbm.gui.expose: true); otherwise keep 127.0.0.1 and use an SSH tunnel "
        f"(ssh -L 8443:127.0.0.1:8443 THIS-MACHINE)"
    )


def gui_settings(stack) -> tuple[str, str]:
    """The checked server name and bind address of the GUI."""
    gui = stack.settings["gui"]
    name = check_server_name(gui.get("server_name", "localhost"))
    bind = check_bind(gui["host"])
    check_exposure(bind, bool(gui.get("expose")))
    return name, bind


def ensure_component(stack) -> bool:
    """Create the node's Fed-BioMed component unless it exists; True if created.

    Made in the gui container as the run-time account, the way node.up makes
    it (same name, researcher address and security settings), so whichever
    of node and gui starts first, the other finds the same component.
    """
    from . import fedbiomed

    if fedbiomed.has_node_component(stack, "gui"):
        return False
    alias = stack.settings["peers"].get("node", "node")
    argv = [fedbiomed.FEDBIOMED, "component", "create", "--component", "NODE"]
    argv += ["--path", NODE_ROOT, "--name", alias, "--exist-ok"]
    command = fedbiomed.exec_argv(stack, "gui", argv, env=fedbiomed.node_env(stack))
    result = stack.host.run(command, hide="both", warn=True)
    if stack.host.dry:
        return True
    if not result.ok:
        raise EngineError(
            f"creating the node's Fed-BioMed component in the gui container "
            f"failed:\n{_tail(result)}\nrun `invoke node.up` (it creates it too), "
            f"then `invoke gui.up` again"
        )
    stack.say(f"gui: Fed-BioMed node component {alias} created in {NODE_ROOT}")
    return True


def _tail(result, lines: int = 8) -> str:
    text = (result.stdout or "") + "\n" + (result.stderr or "")
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:]) or f"exit code {result.exited}"


# Runs in the gui container (Debian's python3): once Fed-BioMed's GUI listens
# (asked first, so nginx logs no error while it starts), one HTTPS request to
# nginx, which passes it on; exit 0 when the GUI answered.
_PROBE = f"""
import http.client, socket, ssl, sys
socket.create_connection(("127.0.0.1", {BACKEND_PORT}), timeout=2).close()
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
connection = http.client.HTTPSConnection("127.0.0.1", {HTTPS_PORT},
                                         context=context, timeout=5)
connection.request("GET", "/")
status = connection.getresponse().status
print(status)
sys.exit(0 if status < 500 else 1)
"""


def wait_https(stack, timeout: float | None = None) -> None:
    """Wait until the GUI answers over HTTPS (bounded); fail with its log."""
    if stack.host.dry:
        return
    timeout = float(timeout or stack.settings["wait_timeout"])
    container = stack.container("gui")
    deadline = time.monotonic() + timeout
    state = stack.state("gui")
    while time.monotonic() < deadline:
        state = stack.state("gui")
        if state in ("exited", "dead", "absent"):
            break
        probe = ["docker", "exec", container, "python3", "-c", _PROBE]
        if state == "running" and stack.host.probe(probe).ok:
            return
        time.sleep(1)
    logs = stack.host.probe(["docker", "logs", "--tail", "20", container])
    tail = ((logs.stdout or "") + (logs.stderr or "")).strip()
    what = (
        f"does not answer on HTTPS after {timeout:.0f} s"
        if state == "running"
        else f"is not running (container {state})"
    )
    raise EngineError(
        f"the GUI {what}; last log lines:\n{tail}\nfix the cause named above, "
        f"then run `invoke gui.up` again"
    )


def up(stack, restart: bool = False) -> str:
    """Check, start and wait for the GUI; return its URL.

    The certificate folder is checked first: when it breaks the rule, nothing
    is started, restarted or changed.
    """
    server_name, _ = gui_settings(stack)
    folder = certs_dir(stack)
    plan = check_certs(stack)

    # Docker would create missing mount folders as root: make them ours.
    for sub in ("data", "fbm"):
        stack.host.mkdir(stack.run_mounts("node") / sub)
    was_running = stack.state("gui") == "running"
    stack.up("gui")
    if restart and was_running:
        stack.say("restarting gui (certificate or settings changed)")
        stack.compose("restart", "gui")
        stack.wait_ready("gui")

    ensure_component(stack)
    wait_https(stack)
    if plan.generate and not stack.host.dry:
        stack.say(
            f"gui: self-signed certificate for {server_name} in {folder} (browsers "
            f"warn until it is trusted; put your own .crt and .key there instead)"
        )
    elif plan.cert == f"{SELF_SIGNED}.crt":
        stack.say(
            f"gui: self-signed certificate {folder / plan.cert}, kept from the "
            f"first start (for a new one, e.g. with another server name: delete "
            f"both {SELF_SIGNED} files, then `invoke gui.up --restart`)"
        )
    elif not plan.generate:
        stack.say(f"gui: certificate {folder / plan.cert} with key {plan.key}")
    return url(stack.settings, server_name)


# -- container side: nginx and the GUI process -------------------------------------


def folder_entries(folder) -> list[tuple[str, str]]:
    """(name, kind) of each entry of a local folder, for `plan_certs`."""
    entries = []
    for entry in os.scandir(folder):
        if entry.is_symlink():
            kind = "link"
        elif entry.is_dir():
            kind = "dir"
        elif entry.is_file():
            kind = "file"
        else:
            kind = "other"
        entries.append((entry.name, kind))
    return entries


class Service:
    """nginx and Fed-BioMed's GUI in the gui container.

    `start()` checks /certs (making the self-signed certificate when it is
    empty), writes nginx's config and starts nginx; `tick()` starts the GUI
    once the node's Fed-BioMed component exists and restarts it when it
    stops; `stop()` ends both.
    """

    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.uid = int(env["CONTAINER_UID"])
        self.gid = int(env["CONTAINER_GID"])
        self.user = env["CONTAINER_USER"]
        self.server_name = check_server_name(env.get("GUI_SERVER_NAME", "localhost"))
        self.bind = check_bind(env.get("GUI_SERVER_IP") or "127.0.0.1")
        self.nginx: subprocess.Popen | None = None
        self.backend: subprocess.Popen | None = None
        self.waiting_said = False
        self.next_start = 0.0

    @classmethod
    def start(cls, env=None) -> "Service":
        service = cls(env)
        if not Path(FEDBIOMED).exists():
            raise StateError(
                f"this gui image has no Fed-BioMed ({FEDBIOMED} is missing); "
                f"rebuild it with fbm.build.fedbiomed true: `invoke build --images "
                f"gui --force`"
            )
        try:
            cert, key = service.prepare_certs()
            service.start_nginx(cert, key)
        except OSError as error:
            raise StateError(f"cannot prepare the GUI: {error}") from None
        return service

    def prepare_certs(self) -> tuple[Path, Path]:
        folder = Path(CERTS)
        folder.mkdir(exist_ok=True)
        where = f"{CERTS} (gui/run_mounts/certs on the host)"
        plan = plan_certs(folder_entries(folder), where)
        if plan.generate:
            names = cert_names(self.server_name, self.bind)
            made = subprocess.run(
                [VENV_PYTHON, "-m", "fbmvpn.gui", "self-signed", CERTS, *names],
                capture_output=True,
                text=True,
            )
            if made.returncode:
                raise StateError(
                    f"making the self-signed certificate failed: "
                    f"{made.stderr.strip()[-400:]}"
                )
            for name in (f"{SELF_SIGNED}.crt", f"{SELF_SIGNED}.key"):
                os.chown(folder / name, self.uid, self.gid)
            log(f"made a self-signed certificate for {', '.join(names)} in {CERTS}")
            plan = CertPlan(False, f"{SELF_SIGNED}.crt", f"{SELF_SIGNED}.key")
        else:
            log(f"certificate {plan.cert}, key {plan.key} (from {CERTS})")
        return folder / plan.cert, folder / plan.key

    def start_nginx(self, cert: Path, key: Path) -> None:
        from . import templates

        RUN_DIR.mkdir(parents=True, exist_ok=True)
        # Fixed link names: the files' own names never reach nginx's config.
        links = {RUN_DIR / "server.crt": cert, RUN_DIR / "server.key": key}
        for link, target in links.items():
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        config = RUN_DIR / "nginx.conf"
        text = templates.render(
            "gui-nginx.conf.j2",
            run_dir=str(RUN_DIR),
            server_name=self.server_name,
            https_port=HTTPS_PORT,
            http_port=HTTP_PORT,
            backend_port=BACKEND_PORT,
        )
        write_atomic(config, text, 0o644)
        test = subprocess.run(
            ["nginx", "-t", "-q", "-c", str(config)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if test.returncode:
            raise StateError(
                f"nginx refuses the certificate {cert.name} or its key {key.name}: "
                f"{test.stderr.strip()[-400:]}; both must be PEM files, the key "
                f"without a passphrase and matching the certificate"
            )
        self.nginx = subprocess.Popen(
            ["nginx", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log(f"nginx: HTTPS on {HTTPS_PORT}, HTTP on {HTTP_PORT}")

    def component_ready(self) -> bool:
        return Path(NODE_ROOT, "etc", "config.ini").is_file() and (
            Path(NODE_ROOT, ".fedbiomed").is_file()
        )

    def start_backend(self) -> None:
        home = pwd.getpwnam(self.user).pw_dir
        env = dict(
            os.environ,
            HOME=home,
            USER=self.user,
            FBM_NODE_COMPONENT_ROOT=NODE_ROOT,
            FBM_DEBUG="False",
            # Starting the node from the GUI would start it here, outside the VPN.
            FBM_GUI_ENABLE_NODE_MANAGEMENT="False",
        )
        argv = [FEDBIOMED, "node", "-p", NODE_ROOT, "gui", "start"]
        argv += ["--data-folder", DATA, "--host", "127.0.0.1"]
        argv += ["--port", str(BACKEND_PORT)]
        self.backend = subprocess.Popen(
            argv,
            env=env,
            cwd=NODE_ROOT,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log(f"Fed-BioMed GUI starting (component {NODE_ROOT}, data {DATA})")

    def tick(self) -> bool:
        """Keep the GUI running; False when nginx stopped (the container exits)."""
        if self.nginx is None or self.nginx.poll() is not None:
            return False
        if self.backend is not None and self.backend.poll() is not None:
            log(f"the Fed-BioMed GUI exited ({self.backend.returncode}); restarting")
            self.backend = None
            self.next_start = time.monotonic() + 5
        if self.backend is None and time.monotonic() >= self.next_start:
            if self.component_ready():
                self.start_backend()
            elif not self.waiting_said:
                log(
                    f"waiting for the node's Fed-BioMed component in {NODE_ROOT} "
                    f"(`invoke gui.up` or `invoke node.start` creates it)"
                )
                self.waiting_said = True
        return True

    def stop(self) -> None:
        for process in (self.backend, self.nginx):
            if process is None or process.poll() is not None:
                continue
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def main(argv=None) -> int:
    """`python -m fbmvpn.gui self-signed DIR NAME...` (the Fed-BioMed venv)."""
    parser = argparse.ArgumentParser(prog="python -m fbmvpn.gui")
    verbs = parser.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("self-signed", help="write a self-signed pair in DIR")
    make.add_argument("folder")
    make.add_argument("names", nargs="+", help="server name first, then others")
    args = parser.parse_args(argv)
    try:
        names = [check_server_name(name) for name in args.names]
        cert, key = write_self_signed(args.folder, names)
    except (BadInput, OSError) as error:
        print(f"fbmvpn.gui: {error}", file=sys.stderr)
        return 1
    print(f"wrote {cert} and {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
