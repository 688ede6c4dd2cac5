"""dkimpy's RSA verification through OpenSSL (`dkimverify.rsa_verify`): the same
answer as dkimpy's own arithmetic for every signature, lenient readings included."""

from __future__ import annotations

import base64
import functools
import hashlib
import random
import re

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from spamgate.checks.engines import dkimverify
from tests.kit.dkimkeys import ed25519_key, rsa_key

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
    before = dkimverify._cached_openssl_key.cache_info()
    assert both(b"message", sign(b"message")) == (True, True)
    after = dkimverify._cached_openssl_key.cache_info()
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


# -- signatures made with the raw RSA operation: every near miss of the encoding --------


def _probable_prime(bits: int, rng: random.Random, e: int) -> int:
    while True:
        c = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
        if all(c % p for p in _SMALL_PRIMES) and (c - 1) % e and _miller_rabin(c, rng):
            return c


_SMALL_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47)


def _miller_rabin(n: int, rng: random.Random) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(32):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@functools.cache
def raw_key(bits: int, e: int = 65537) -> rsa.RSAPrivateKey:
    """An RSA key of any size, also those OpenSSL will not make (under 1024 bits,
    made here from a fixed seed): small keys are what the minimum key size is about."""
    if bits >= 1024:
        return rsa.generate_private_key(public_exponent=e, key_size=bits)
    rng = random.Random(bits * 7 + e)
    while True:
        p = _probable_prime(bits // 2, rng, e)
        q = _probable_prime(bits - bits // 2, rng, e)
        if p != q and (p * q).bit_length() == bits:
            break
    d = pow(e, -1, (p - 1) * (q - 1))
    public = rsa.RSAPublicNumbers(e, p * q)
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public)
    return numbers.private_key()


SHA256_OID = bytes.fromhex("608648016503040201")
SHA1_OID = bytes.fromhex("2b0e03021a")


def digest_info(digest: bytes, oid: bytes = SHA256_OID, null: bool = True) -> bytes:
    algorithm = b"\x06" + bytes([len(oid)]) + oid + (b"\x05\x00" if null else b"")
    algorithm = b"\x30" + bytes([len(algorithm)]) + algorithm
    body = algorithm + b"\x04" + bytes([len(digest)]) + digest
    return b"\x30" + bytes([len(body)]) + body


def encodings(digest: bytes, k: int) -> dict[str, bytes]:
    """EMSA-PKCS1-v1_5 (RFC 8017 §9.2) for `digest` in `k` bytes, and its near misses."""
    info = digest_info(digest)

    def em(t: bytes, head: bytes = b"\x00\x01", fill: int = 0xFF, tail: bytes = b"") -> bytes:
        return head + bytes([fill]) * (k - len(t) - len(tail) - len(head) - 1) + b"\x00" + t + tail

    long_form = b"\x30\x81" + info[1:2] + info[2:]  # BER length where DER has the short one
    good = em(info)
    return {
        "good": good,
        "no NULL parameters": em(digest_info(digest, null=False)),
        "SHA-1's identifier": em(digest_info(digest, SHA1_OID)),
        "other digest": em(digest_info(bytes(32))),
        "digest cut short": em(info[:-1]),
        "block type 2": em(info, head=b"\x00\x02"),
        "no leading zero": em(info, head=b"\x01\xff"),
        "one padding byte FE": good[:5] + b"\xfe" + good[6:],
        "padding of zeros": em(info, fill=0),
        "garbage after": em(info, tail=b"\x00"),
        "BER length": em(long_form),
        "zeros only": bytes(k),
    }


@pytest.mark.parametrize(
    ("bits", "e"),
    [
        (488, 65537),
        (496, 65537),
        (504, 3),
        (512, 65537),
        (768, 3),
        (1000, 65537),
        (1031, 65537),
        (1024, 3),
        (2048, 65537),
    ],
)
def test_every_near_miss_of_the_encoding_gets_dkimpys_answer(bits: int, e: int) -> None:
    """Signatures made by the raw RSA operation on the right encoding and on each
    near miss of it, with keys of every size around the limits (496 bits is the
    smallest modulus that holds a SHA-256 encoding with its 8 bytes of padding;
    dkimpy refuses a smaller one itself): only the right one verifies, through
    OpenSSL as through dkimpy, and OpenSSL is asked wherever the modulus holds one."""
    key = raw_key(bits, e)
    numbers = key.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    public = {"modulus": n, "publicExponent": e}
    k = (bits + 7) // 8
    data = b"a message"
    for name, em in encodings(hashlib.sha256(data).digest(), k).items():
        signature = pow(int.from_bytes(em, "big") % n, d, n).to_bytes(k, "big")
        before = dkimverify._cached_openssl_key.cache_info()
        if k < dkimverify._SHA256_MIN_MODULUS:
            with pytest.raises(dkim.crypto.DigestTooLargeError):
                dkimverify.rsa_verify(digest(data), signature, public)
            continue
        assert both(data, signature, public) == (name == "good",) * 2, name
        after = dkimverify._cached_openssl_key.cache_info()
        assert after.hits + after.misses == before.hits + before.misses + 1, name


# -- whole messages: spamgate's verification against dkimpy's own, unpatched -----------


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _record(key: rsa.RSAPrivateKey, extra: str = "") -> bytes:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa;{extra} p={base64.b64encode(der).decode()}".encode()


BODY = b"Hello,  world \r\n\r\nsecond  line\t\r\n\r\n"
HEADER = (
    b"From: Alice <alice@sig.test>\r\nTo: <u@example.test>\r\nSubject: hello  there\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
)
CANONS = [(h, b) for h in (b"simple", b"relaxed") for b in (b"simple", b"relaxed")]


def _sign(
    message: bytes, selector: str, private: bytes, canon: tuple[bytes, bytes], length: bool
) -> bytes:
    algorithm = b"rsa-sha256" if private.startswith(b"-----") else b"ed25519-sha256"
    return (
        dkim.sign(
            message,
            selector.encode(),
            b"sig.test",
            private,
            canonicalize=canon,
            signature_algorithm=algorithm,
            include_headers=[b"from", b"to", b"subject", b"date"],
            length=length,
        )
        + message
    )


def _tamper_b(signed: bytes, how: str, modulus: int = 0) -> bytes:
    """The first signature's b= (its last tag, as dkimpy writes it) changed: a bit
    flipped, its first byte dropped, the key's modulus added (a value RFC 8017
    refuses and dkimpy reads modulo the key), or made "A===", which dkimpy's syntax
    check lets through and base64 refuses; or its bh= made "A===" likewise."""
    field, _, rest = signed.partition(b"\r\nFrom:")
    if how == "bh A===":
        field = re.sub(rb"bh=[^;]*;", b"bh=A===;", field, count=1)
        return field + b"\r\nFrom:" + rest
    head, _, b64 = field.rpartition(b"b=")
    raw = base64.b64decode(b"".join(b64.split()))
    if how == "flip":
        raw = bytes([raw[0] ^ 0x40]) + raw[1:]
    elif how == "short":
        raw = raw[1:]
    elif how == "over":
        raw = (int.from_bytes(raw, "big") + modulus).to_bytes(len(raw) + 1, "big")
    value = b"A===" if how == "b A===" else base64.b64encode(raw)
    return head + b"b=" + value + b"\r\nFrom:" + rest


def _corpus() -> list[tuple[str, bytes, dict[str, dkimverify.KeyAnswer]]]:
    """(what, message, key answers): signatures of every canonicalisation, with and
    without l=, by keys of several sizes and both algorithms, then broken in the
    ways a message, a signature or a key record breaks."""
    ed_private, ed_public = ed25519_key()
    keys = {
        "k512": raw_key(512),
        "k768": raw_key(768, 3),
        "k1031": raw_key(1031),
        "k1024": KEY,
        "k2048": raw_key(2048),
    }
    good = {f"{s}._domainkey.sig.test": _record(k) for s, k in keys.items()}
    good["ed._domainkey.sig.test"] = f"v=DKIM1; k=ed25519; p={ed_public}".encode()
    other = _record(raw_key(1024, 3))
    signers = [(s, _pem(k)) for s, k in keys.items()] + [("ed", ed_private)]
    corpus = []
    for selector, private in signers:
        name = f"{selector}._domainkey.sig.test"
        for canon in CANONS:
            for length in (False, True):
                what = f"{selector} {b'/'.join(canon).decode()}{' l=' if length else ''}"
                signed = _sign(HEADER + BODY, selector, private, canon, length)
                corpus += [
                    (what, signed, good),
                    (what + " more text", signed + b"appended\r\n", good),
                    (what + " spaces", signed.replace(b"second  line", b"second line"), good),
                    (what + " subject", signed.replace(b"hello  there", b"hello there"), good),
                ]
        signed = _sign(HEADER + BODY, selector, private, (b"relaxed", b"relaxed"), False)
        broken_records = {
            "other key": other,
            "garbage key": b"v=DKIM1; k=rsa; p=AAAA",
            "not base64": b"v=DKIM1; p=!!!",
            "unknown k=": b"v=DKIM1; k=foo; p=AAAA",
            "v=DKIM2": b"v=DKIM2; " + good[name],
            "s=tlsrpt": _record(keys["k1024"], " s=tlsrpt;"),
            "no tags": b"not a key record",
            "rsa key for ed25519": good["k2048._domainkey.sig.test"],
            "ed25519 key for rsa": good["ed._domainkey.sig.test"],
        }
        for what, record in broken_records.items():
            corpus.append((f"{selector} {what}", signed, {**good, name: record}))
        corpus.append((f"{selector} no key", signed, {**good, name: None}))
        for how in ("b A===", "bh A===", "flip", "short"):
            corpus.append((f"{selector} {how}", _tamper_b(signed, how), good))
        if selector != "ed":
            modulus = keys[selector].public_key().public_numbers().n
            corpus.append((f"{selector} over", _tamper_b(signed, "over", modulus), good))
    return corpus


def _dkimpys_reading(
    message: bytes, idx: int, answers: dict, minkey: int, monkeypatch: pytest.MonkeyPatch
) -> str:
    """What dkimpy says of signature `idx`, with its own RSA code and key parser."""
    with monkeypatch.context() as m:
        m.setattr(dkim, "RSASSA_PKCS1_v1_5_verify", dkim.crypto.RSASSA_PKCS1_v1_5_verify)
        m.setattr(dkim, "parse_public_key", dkim.crypto.parse_public_key)
        d = dkim.DKIM(message, logger=dkimverify._quiet, minkey=minkey)

        def dns(name: bytes, timeout: int = 5) -> bytes | None:
            return answers.get(name.decode().rstrip(".").lower())

        try:
            return "True" if d.verify(idx, dnsfunc=dns) else "False"
        except (dkim.DKIMException, ValueError) as exc:
            kind = type(exc).__name__
            return f"{kind}: body hash" if "body hash" in str(exc) else kind


# spamgate's result for each of dkimpy's readings (the check judges keys first, and
# says why: dkimpy's bare False covers a wrong signature and a key it cannot use)
AGREES = {
    "True": {("pass", "")},
    "False": {("fail", "signature"), ("permerror", "bad key"), ("permerror", "no key")},
    "ValidationError: body hash": {("fail", "body hash")},
    "KeyFormatError": {("policy", "public key too small"), ("permerror", "digest too large")},
    "UnknownKeyTypeError": {("permerror", "None")},
    "ValidationError": {("neutral", "Message is not tlsrpt")},
    # dkimpy raises what it does not expect: a b= or bh= that its syntax check
    # passed and base64 refuses, an ed25519 key given a signature not of 64 bytes
    "Error": {("neutral", "bad base64")},
    "ValueError": {("fail", "signature did not verify")},
}


@pytest.mark.parametrize("minkey", [1024, 512])
def test_every_signature_gets_dkimpys_answer(minkey: int, monkeypatch) -> None:
    """Whatever dkimpy makes of a signature (pass, a wrong signature, a body that
    changed, a key too small or unusable), spamgate's verification, with OpenSSL
    and its caches, makes the same of it: relaxed and simple, l=, ed25519, keys of
    512 to 2048 bits, broken signatures and broken key records."""
    seen = set()
    for what, message, answers in _corpus():
        ours = dkimverify.verify(message, answers, 5, minkey)
        assert len(ours) == 1, what
        theirs = _dkimpys_reading(message, 0, answers, minkey, monkeypatch)
        reason = ours[0].reason
        assert any(
            (ours[0].result == result and reason.startswith(start)) or start in reason
            for result, start in AGREES[theirs]
        ), (what, theirs, ours[0])
        seen.add((theirs, ours[0].result))
    # the corpus reaches every reading that matters
    assert {("True", "pass"), ("False", "fail"), ("ValidationError: body hash", "fail")} <= seen
    assert ("KeyFormatError", "policy") in seen if minkey == 1024 else True


def test_only_fields_and_keys_of_a_real_size_are_kept() -> None:
    """A DKIM-Signature field may be as large as the header section allows, and a
    sender's key record as a DNS answer: the caches keep only values of a size real
    ones have, so no sender fills memory with its own (1,024 fields of a megabyte)."""
    caches = [
        dkimverify._cached_tags,
        dkimverify._cached_evaluate_pk,
        dkimverify._cached_public_key,
        dkimverify._cached_openssl_key,
    ]
    for cache in caches:
        cache.cache_clear()
    big = b"v=1; a=rsa-sha256; d=sig.test; s=x; h=from; bh=AAAA; z=" + b"z" * 100_000 + b"; b=AA"
    assert dkimverify.describe(big).domain == "sig.test"
    assert dkimverify.signature_key(big) == "x._domainkey.sig.test"
    der = KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; n=" + b"n" * 5000 + b"; p=" + base64.b64encode(der)
    assert dkimverify._evaluate_pk("x", record)[1] == 1024
    huge = {"modulus": NUMBERS.n, "publicExponent": 2**100 + 1}
    assert dkimverify.rsa_verify(digest(b"m"), sign(b"m"), huge) is False
    # (the key in that record is of a real size, and kept)
    assert [c.cache_info().currsize for c in caches] == [0, 0, 1, 0]
    # values of the usual sizes are kept
    small = b"v=1; a=rsa-sha256; d=sig.test; s=x; h=from; bh=AAAA; b=AA"
    assert dkimverify.signature_key(small) == dkimverify.signature_key(small)
    assert dkimverify._evaluate_pk("x", _record(KEY))[1] == 1024
    assert both(b"m", sign(b"m")) == (True, True)
    assert [c.cache_info().currsize for c in caches] == [1, 1, 1, 1]
