"""WireGuard keys made with PyNaCl must be interchangeable with the real `wg` tool."""

import base64
import subprocess
from pathlib import Path

import pytest

from fbmvpn import keys
from fbmvpn.errors import BadInput

WG = Path("/usr/bin/wg")
ROUNDS = 10


def wg(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    # Integration tier: a missing `wg` is a broken machine, not a reason to skip.
    assert WG.is_file(), f"{WG} is missing: install Debian's wireguard-tools"
    return subprocess.run(
        [str(WG), *args], input=stdin, capture_output=True, text=True, timeout=10
    )


def wg_out(*args: str, stdin: str = "") -> str:
    result = wg(*args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.integration
def test_our_private_key_gives_the_public_key_wg_computes():
    for _ in range(ROUNDS):
        private = keys.generate_private_key()
        assert wg_out("pubkey", stdin=private + "\n") == keys.public_key(private)


@pytest.mark.integration
def test_wg_genkey_private_key_gives_the_public_key_wg_computes():
    for _ in range(ROUNDS):
        private = wg_out("genkey")
        assert keys.public_key(private) == wg_out("pubkey", stdin=private + "\n")


@pytest.mark.integration
def test_wg_genpsk_passes_check_key_unchanged():
    for _ in range(ROUNDS):
        psk = wg_out("genpsk")
        assert keys.check_key(psk) == psk


@pytest.mark.integration
def test_wg_genkey_and_pubkey_pass_check_key_unchanged():
    private = wg_out("genkey")
    public = wg_out("pubkey", stdin=private + "\n")
    assert keys.check_key(private) == private
    assert keys.check_key(public) == public


@pytest.mark.integration
def test_generate_psk_is_32_bytes_of_base64_that_wg_reads():
    psk = keys.generate_psk()
    assert len(psk) == 44
    assert len(base64.b64decode(psk, validate=True)) == 32
    # `wg pubkey` parses its input as a key: a PSK it cannot read fails there.
    assert wg("pubkey", stdin=psk + "\n").returncode == 0
    assert keys.generate_psk() != psk


def test_generated_private_key_is_clamped_like_wg_genkey():
    raw = base64.b64decode(keys.generate_private_key())
    assert len(raw) == 32
    assert raw[0] & 7 == 0
    assert raw[31] & 128 == 0
    assert raw[31] & 64 == 64


@pytest.mark.integration
def test_surrounding_whitespace_of_a_pasted_key_is_trimmed():
    public = wg_out("pubkey", stdin=wg_out("genkey") + "\n")
    assert keys.check_key(f"  {public}\n") == public


KEY = b64(bytes(range(32)))
BAD_KEYS = {
    "31 bytes": b64(bytes(31)),
    "33 bytes": b64(bytes(range(33))),
    "not base64": "!" * 43 + "=",
    "empty": "",
    "blank": "   ",
    "space inside": KEY[:20] + " " + KEY[21:],
    "spaces between chunks": " ".join([KEY[:22], KEY[22:]]),
    "missing padding": KEY[:43],
    "hex": bytes(range(32)).hex(),
    "url-safe alphabet": b64(b"\xfb" * 32).replace("+", "-").replace("/", "_"),
}


@pytest.mark.parametrize("text", BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_bad_key_raises_bad_input_without_echoing_it(text):
    with pytest.raises(BadInput) as caught:
        keys.check_key(text, "public key")

    message = str(caught.value)
    assert message.startswith("public key is not a WireGuard key")
    if text.strip():
        assert text.strip() not in message
        for chunk in text.split():
            assert chunk not in message


@pytest.mark.integration
@pytest.mark.parametrize("text", BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_bad_key_is_refused_by_wg_too(text):
    assert wg("pubkey", stdin=text + "\n").returncode != 0


def test_bad_private_key_raises_bad_input_without_echoing_it():
    secret = b64(bytes(range(31)))
    with pytest.raises(BadInput) as caught:
        keys.public_key(secret)
    assert secret not in str(caught.value)
    assert str(caught.value).startswith("private key is not a WireGuard key")
