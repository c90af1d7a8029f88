"""Test certificates: a CA, a server certificate it signed, and bad ones.

    python -m tests.tlscerts rust/testdata     # the Rust unit tests' fixtures

Uses the ``cryptography`` package (a test extra). ECDSA P-256 keys.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NAMES = ["localhost", "ftp.example.test"]


@dataclass
class Certs:
    ca: bytes  # CA certificate, PEM
    chain: bytes  # server certificate then the CA, PEM
    key: bytes  # server key, PEM (PKCS#8)
    other_key: bytes  # a key matching nothing
    expired: bytes  # server certificate valid 2000-2001, same key
    future: bytes  # server certificate valid 2100-2101, same key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make(names: list[str] = NAMES) -> Certs:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("SwiftFTP test CA"))
        .issuer_name(_name("SwiftFTP test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365 * 100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())

    def leaf(start: dt.datetime, end: dt.datetime) -> bytes:
        san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    utc = dt.UTC
    return Certs(
        ca=ca_pem,
        chain=leaf(now - dt.timedelta(days=1), now + dt.timedelta(days=365 * 99)) + ca_pem,
        key=_key_pem(key),
        other_key=_key_pem(ec.generate_private_key(ec.SECP256R1())),
        expired=leaf(dt.datetime(2000, 1, 1, tzinfo=utc), dt.datetime(2001, 1, 1, tzinfo=utc)),
        future=leaf(dt.datetime(2100, 1, 1, tzinfo=utc), dt.datetime(2101, 1, 1, tzinfo=utc)),
    )


def write(directory: Path) -> None:
    certs = make()
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "ca.pem": certs.ca,
        "server.pem": certs.chain,
        "server.key": certs.key,
        "other.key": certs.other_key,
        "expired.pem": certs.expired,
        "future.pem": certs.future,
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)


if __name__ == "__main__":
    write(Path(sys.argv[1]))
