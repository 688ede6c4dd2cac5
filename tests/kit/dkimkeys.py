"""DKIM keys made by the tests, messages signed with them (dkimpy), and the key
records to publish on the test DNS server.

RSA keys take a moment to make, so each size is made once per test run.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass

import dkim
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@functools.cache
def rsa_key(bits: int = 2048) -> tuple[bytes, str]:
    """(PEM private key, base64 public key) of an RSA key of `bits`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, base64.b64encode(der).decode()


@functools.cache
def ed25519_key() -> tuple[bytes, str]:
    key = nacl.signing.SigningKey.generate()
    return base64.b64encode(bytes(key)), base64.b64encode(bytes(key.verify_key)).decode()


@dataclass(frozen=True)
class Signer:
    domain: str
    selector: str
    kind: str = "rsa"  # or "ed25519"
    bits: int = 2048

    @property
    def keys(self) -> tuple[bytes, str]:
        return ed25519_key() if self.kind == "ed25519" else rsa_key(self.bits)

    @property
    def record(self) -> str:
        """The TXT record to publish at `selector._domainkey.domain`."""
        return f"v=DKIM1; k={self.kind}; p={self.keys[1]}"

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey"

    def sign(
        self,
        message: bytes,
        *,
        identity: str | None = None,
        algorithm: bytes | None = None,
        canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    ) -> bytes:
        """`message` with a DKIM-Signature on top."""
        if algorithm is None:
            algorithm = b"ed25519-sha256" if self.kind == "ed25519" else b"rsa-sha256"
        header = dkim.sign(
            message,
            self.selector.encode(),
            self.domain.encode(),
            self.keys[0],
            identity=identity.encode() if identity else None,
            canonicalize=canonicalize,
            signature_algorithm=algorithm,
            include_headers=[b"from", b"to", b"subject", b"date"],
        )
        return header + message


def message(
    sender: str = "alice@good.test", subject: str = "hello", body: bytes = b"Hello,  world \r\n"
) -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: <u@example.test>\r\nSubject: {subject}\r\n"
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
    ).encode() + body
