"""Device proof of identity, without I/O: keys, challenges, signatures, session tokens.

A device may present an Ed25519 public key in its login (``"key"``, base64 of the
32 raw bytes). The first login of a device id that proves it holds the key binds
the key to the id (trust on first use); every later login of that id must prove
it again, either by signing a challenge of the node's, or, on the connections a
command session makes (rendezvous, data), by showing the session token the node
gave that command session. docs/protocol.md, "Device proof of identity".

What is signed is domain-separated, so that a signature made for a login can
never be taken for anything else (another protocol, another device id)::

    b"swiftftp-device-login-v1\\0" + android_id + b"\\0" + challenge
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: What every signed login message starts with (versioned: a new scheme gets a new name).
DOMAIN = b"swiftftp-device-login-v1\0"
#: Random bytes in a challenge, and in a session token.
CHALLENGE_BYTES = 32
TOKEN_BYTES = 32
#: The agent's private key, in its state directory (PKCS#8 PEM, mode 0600).
KEY_FILE = "agent-device-key"


def b64(data: bytes) -> str:
    """Standard base64 with padding (what the wire carries)."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, size: int | None = None) -> bytes:
    """Decode strict base64 (``ValueError`` for anything else, or the wrong ``size``)."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not base64") from None
    if size is not None and len(data) != size:
        raise ValueError(f"expected {size} bytes, got {len(data)}")
    return data


def parse_public_key(text: str) -> str:
    """A login's ``key``, checked (32 bytes of base64 that make an Ed25519 key) and
    normalised; ``ValueError`` otherwise."""
    raw = unb64(text, 32)
    Ed25519PublicKey.from_public_bytes(raw)
    return b64(raw)


def fingerprint(key: str) -> str:
    """``SHA256:<base64 without padding>`` of the raw key, the way OpenSSH shows keys."""
    digest = hashlib.sha256(unb64(key)).digest()
    return "SHA256:" + b64(digest).rstrip("=")


def signed_message(android_id: str, challenge: bytes) -> bytes:
    """The bytes a device signs to answer ``challenge`` for ``android_id``."""
    return DOMAIN + android_id.encode("utf-8") + b"\0" + challenge


def new_challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_BYTES)


def new_token() -> str:
    """A command session's token: what its rendezvous and data connections show."""
    return b64(secrets.token_bytes(TOKEN_BYTES))


def same_token(given: str, expected: str | None) -> bool:
    """Constant-time comparison; never equal to no token."""
    return expected is not None and secrets.compare_digest(given.encode(), expected.encode())


def verify(key: str, android_id: str, challenge: bytes, signature: str) -> bool:
    """Does ``signature`` (base64) prove that the holder of ``key`` answered ``challenge``?"""
    try:
        raw = unb64(signature, 64)
        Ed25519PublicKey.from_public_bytes(unb64(key, 32)).verify(raw, signed_message(android_id, challenge))
    except (ValueError, InvalidSignature):
        return False
    return True


class DeviceKey:
    """A device's own key pair (the agent's): it signs challenges."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        #: The public key as the login carries it.
        self.public = b64(raw)

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, android_id: str, challenge: bytes) -> str:
        """The answer to ``challenge`` (base64 signature)."""
        return b64(self._private.sign(signed_message(android_id, challenge)))

    def pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


class KeyFileError(ValueError):
    """The key file exists but cannot be used; the message is one line for the operator."""


def load_or_create_key(state_dir: Path) -> tuple[DeviceKey, bool]:
    """The key kept in ``state_dir`` (made, mode 0600, if there is none): the key and
    whether it was made now. A key file that does not read is :class:`KeyFileError`:
    never replaced silently, since a device id bound to the lost key could not log in."""
    path = state_dir / KEY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        state_dir.mkdir(parents=True, exist_ok=True)
        key = DeviceKey.generate()
        temporary = path.with_name(f".{KEY_FILE}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, key.pem())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)  # whole or not at all
        return key, True
    except OSError as exc:
        raise KeyFileError(f"cannot read the device key {path}: {exc.strerror or exc}") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"the device key {path} does not read ({exc}); restore it from a backup, "
                           "or move it away and have the node's operator unbind this device") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"the device key {path} is not an Ed25519 key")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        path.chmod(0o600)
    return DeviceKey(private), False
