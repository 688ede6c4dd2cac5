"""dkimpy's RSA verification through OpenSSL (`dkimverify.rsa_verify`): the same
answer as dkimpy's own arithmetic for every signature, lenient readings included."""

from __future__ import annotations

import hashlib

import dkim
import dkim.crypto
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from spamgate.checks.engines import dkimverify
from tests.kit.dkimkeys import rsa_key

KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
NUMBERS = KEY.public_key().public_numbers()
PUBLIC = {"modulus": NUMBERS.n, "publicExponent": NUMBERS.e}
SIZE = (NUMBERS.n.bit_length() + 7) // 8


def digest(data: bytes, name: str = "sha256") -> dkim.HashThrough:
    h = dkim.HashThrough(hashlib.new(name))
    h.update(data)
    return h


def sign(data: bytes) -> bytes:
    return KEY.sign(data, padding.PKCS1v15(), hashes.SHA256())


def both(data: bytes, signature: bytes, public: dict = PUBLIC) -> tuple[bool, bool]:
    ours = dkimverify.rsa_verify(digest(data), signature, public)
    theirs = dkim.crypto.RSASSA_PKCS1_v1_5_verify(digest(data), signature, public)
    return ours, theirs


def test_dkimpy_calls_ours() -> None:
    assert dkim.RSASSA_PKCS1_v1_5_verify is dkimverify.rsa_verify


def test_a_good_signature_verifies_through_openssl() -> None:
    before = dkimverify._openssl_key.cache_info()
    assert both(b"message", sign(b"message")) == (True, True)
    after = dkimverify._openssl_key.cache_info()
    assert after.hits + after.misses == before.hits + before.misses + 1


def test_a_wrong_signature_or_digest_fails() -> None:
    good = sign(b"message")
    flipped = bytes([good[0] ^ 1]) + good[1:]
    assert both(b"message", flipped) == (False, False)
    assert both(b"other", good) == (False, False)


def test_dkimpys_lenient_readings_are_kept() -> None:
    """A signature with a leading zero byte dropped, or with the modulus added (a
    value RFC 8017 calls out of range): dkimpy accepts both, and so do we."""
    data = next(d for d in (b"m%d" % n for n in range(5000)) if sign(d)[0] == 0)
    good = sign(data)
    assert both(data, good) == (True, True)
    assert both(data, good[1:]) == (True, True)
    over = (int.from_bytes(good, "big") + NUMBERS.n).to_bytes(SIZE, "big")
    assert both(data, over) == (True, True)


def test_sha1_and_keys_openssl_refuses_go_to_dkimpy() -> None:
    signature = KEY.sign(b"message", padding.PKCS1v15(), hashes.SHA1())
    h = digest(b"message", "sha1")
    assert dkimverify.rsa_verify(h, signature, PUBLIC) is True
    even = {"modulus": NUMBERS.n + 1, "publicExponent": NUMBERS.e}
    assert both(b"message", sign(b"message"), even) == (False, False)


def test_the_test_kits_2048_bit_keys() -> None:
    pem, _ = rsa_key(2048)
    pk = dkim.crypto.parse_pem_private_key(pem)
    public = {"modulus": pk["modulus"], "publicExponent": pk["publicExponent"]}
    signature = dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest(b"x"), pk)
    assert both(b"x", bytes(signature), public) == (True, True)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=SIZE + 2), st.binary(max_size=8))
def test_any_signature_bytes_get_dkimpys_answer(signature: bytes, data: bytes) -> None:
    ours, theirs = both(data, signature)
    assert ours == theirs
