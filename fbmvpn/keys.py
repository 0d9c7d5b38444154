"""WireGuard keys: generation, derivation and validation with PyNaCl.

WireGuard keys are Curve25519 keys written as 44 characters of standard base64.
"""

import base64
import binascii

from nacl.bindings import crypto_scalarmult_base
from nacl.utils import random

from .errors import BadInput

KEY_BYTES = 32


def _encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


COPY_AGAIN = "copy it again from `wg show wg0 public-key`"


def decode_key(text: str, what: str = "key", fix: str = COPY_AGAIN) -> bytes:
    """Return the 32 raw bytes of a base64 WireGuard key, or raise BadInput."""
    text = text.strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES or len(text) != 44 or raw == bytes(KEY_BYTES):
        # The value itself is never echoed: it may be a mistyped private key.
        raise BadInput(
            f"{what} is not a WireGuard key (44 characters of standard base64 "
            f"encoding 32 bytes, not all zero; got {len(text)} characters); {fix}"
        )
    return raw


def check_key(text: str, what: str = "key", fix: str = COPY_AGAIN) -> str:
    """Return the key in canonical form after checking it, or raise BadInput."""
    return _encode(decode_key(text, what, fix))


def generate_private_key() -> str:
    """A new private key, clamped as `wg genkey` clamps it."""
    raw = bytearray(random(KEY_BYTES))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return _encode(bytes(raw))


def public_key(private_key: str) -> str:
    """The public key of a private key (what `wg pubkey` prints)."""
    raw = decode_key(private_key, "private key", "the wg0.conf holding it is damaged")
    return _encode(crypto_scalarmult_base(raw))


def generate_psk() -> str:
    """A new preshared key (what `wg genpsk` prints)."""
    return _encode(random(KEY_BYTES))
