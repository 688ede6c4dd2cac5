"""DKIM verification of one message with dkimpy, from key records fetched beforehand.

This is the part of the DKIM check that computes: canonicalisation, hashing and
the signature arithmetic. It does no DNS of its own (the check looks the keys up
on the event loop, through the shared resolver, and passes the answers in), so
it can run anywhere: inline for a small message, or in a worker process for a
large one, where its pure-Python canonicalisation cannot hold the event loop's
GIL (see checks/dkim.py). It imports nothing of spamgate's, so a worker process
starts with little more than dkimpy.

Every signature is verified (up to a limit), not only the first, and each gets an
RFC 8601 result: pass, fail (the signature or body hash did not verify), neutral
(a signature that cannot be processed: bad syntax, expired), policy (one we do
not accept: rsa-sha1 per RFC 8301, a key under the minimum size), temperror (its
key could not be fetched), permerror (no key, a revoked key, a key that does not
parse, or one whose h= or t=s does not allow the signature). dkimpy alone
reports most of these as a bare False, so the key record is judged here first.

Three parts of dkimpy are replaced: see `compress_whitespace`, `parse_public_key`
and `rsa_verify`.
"""

from __future__ import annotations

import binascii
import functools
import logging
import re
from dataclasses import dataclass

import dkim
import dkim.canonicalization
import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.util import InvalidTagValueList, parse_tag_value

# A key record: its text, None when there is none (NXDOMAIN, no TXT), or a str
# saying why it could not be fetched (the DNS error: temperror).
KeyAnswer = bytes | str | None

_WSP = re.compile(rb"[\t ]{2,}|\t")


def compress_whitespace(content: bytes) -> bytes:
    """dkimpy's relaxed canonicalisation step "reduce each run of WSP to one space"
    (RFC 6376 §3.4.2, §3.4.4), with the same output but a pattern that matches only
    what changes. dkimpy's own, re.sub(b"[\t ]+", b" "), matches every single space
    between two words, and re.sub builds a list of every piece: a 10 MB text body
    took 340 MB and three times as long (bench/dkim.py). Installed over dkimpy's
    when this module is imported (a worker process imports it first)."""
    return _WSP.sub(b" ", content)


dkim.canonicalization.compress_whitespace = compress_whitespace

# The largest field value, key record or key kept in the caches below. Real ones
# are well under it (a 4096-bit key's b= is 684 characters, its p= 736), but a
# DKIM-Signature field may be as large as [limits] header_size and a key record as
# a DNS answer: larger ones are parsed each time, as dkimpy does, so that no
# sender fills the caches with megabytes of its own fields.
CACHED_SIZE = 4096

_parse_public_key = dkim.parse_public_key


@functools.lru_cache(maxsize=512)
def _cached_public_key(data: bytes) -> dict:
    return _parse_public_key(data)


def parse_public_key(data: bytes) -> dict:
    """dkimpy's RSA key parser (ASN.1 in Python, the key's integers from bytes),
    once per key rather than once per message: a busy domain signs thousands of
    messages with one key. dkimpy only reads what it returns."""
    if len(data) > CACHED_SIZE:
        return _parse_public_key(data)
    return _cached_public_key(data)


dkim.parse_public_key = parse_public_key

_dkimpy_rsa_verify = dkim.RSASSA_PKCS1_v1_5_verify
# The DigestInfo of a SHA-256 digest is 51 bytes, and PKCS #1 v1.5 padding 11 more
# (RFC 8017 §9.2): dkimpy refuses a smaller modulus with an error of its own.
_SHA256_MIN_MODULUS = 62
_PKCS1V15 = padding.PKCS1v15()
_PREHASHED_SHA256 = utils.Prehashed(hashes.SHA256())


def _openssl_key(modulus: int, exponent: int) -> rsa.RSAPublicKey | None:
    """The key as OpenSSL holds it, made once per key; None if OpenSSL will not
    take it (an even modulus, an exponent of 1; past its limits of 16,384 bits for
    a modulus and 64 for an exponent), which dkimpy then judges itself."""
    if modulus.bit_length() > 16384 or exponent.bit_length() > 64:
        return None  # (not cached: a key record may hold integers of any size)
    return _cached_openssl_key(modulus, exponent)


@functools.lru_cache(maxsize=512)
def _cached_openssl_key(modulus: int, exponent: int) -> rsa.RSAPublicKey | None:
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError:
        return None


def rsa_verify(digest: object, signature: bytes, public_key: dict) -> bool:
    """dkimpy's RSASSA-PKCS1-v1_5 verification (RFC 8017 §8.2.2) through OpenSSL
    (the `cryptography` package), for rsa-sha256. dkimpy does the arithmetic on
    Python integers and converts them a byte at a time in Python: about a tenth
    of a small message's CPU in milter mode. OpenSSL's check is the same strict
    one (the padding and DigestInfo rebuilt and compared whole), so the answer is
    dkimpy's; the cases where dkimpy reads the signature more leniently than
    RFC 8017 (a signature shorter or longer than the modulus, a signature value
    not below the modulus) and keys OpenSSL refuses still go to dkimpy, so
    nothing a signer sends is judged differently. dkimpy keeps everything else:
    canonicalisation, hashing, the key's size against min_key_bits."""
    modulus = public_key["modulus"]
    size = (modulus.bit_length() + 7) // 8
    key = None
    if (
        getattr(digest, "name", "") == "sha256"
        and size >= _SHA256_MIN_MODULUS
        and len(signature) == size
        and int.from_bytes(signature, "big") < modulus
    ):
        key = _openssl_key(modulus, public_key["publicExponent"])
    if key is None:
        return _dkimpy_rsa_verify(digest, signature, public_key)
    try:
        key.verify(bytes(signature), digest.digest(), _PKCS1V15, _PREHASHED_SHA256)  # type: ignore[attr-defined]
    except InvalidSignature:
        return False
    return True


dkim.RSASSA_PKCS1_v1_5_verify = rsa_verify

_quiet = logging.getLogger("spamgate.dkim.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True, slots=True)
class SignatureResult:
    """One DKIM-Signature's result, with what Authentication-Results reports of it."""

    result: str  # pass, fail, neutral, policy, temperror, permerror
    domain: str  # d=, lower case
    selector: str  # s=
    identity: str  # i=, or "@" + d= when absent
    algorithm: str  # a=
    b: str  # the first 8 characters of b= (RFC 6008 header.b)
    reason: str = ""


def _tags(value: bytes) -> dict[bytes, bytes]:
    """dkimpy's tag=value parser, once per field or key record: the check, the
    result and the verification read a signature's tags, and a busy domain's key
    record is the same for thousands of messages. Read only (the cache shares it)."""
    if len(value) > CACHED_SIZE:
        return parse_tag_value(value)
    return _cached_tags(value)


_cached_tags = functools.lru_cache(maxsize=1024)(parse_tag_value)


def _evaluate_pk(name: str, record: bytes) -> tuple:
    """dkimpy's key record evaluation (its tags, the key, its size), once per
    record; a record it refuses raises each time, as dkimpy's own does."""
    if len(record) > CACHED_SIZE:
        return dkim.evaluate_pk(name, record)
    return _cached_evaluate_pk(name, record)


_cached_evaluate_pk = functools.lru_cache(maxsize=512)(dkim.evaluate_pk)


def key_name(domain: str, selector: str) -> str:
    return f"{selector}._domainkey.{domain}".lower()


def describe(value: bytes, result: str = "neutral", reason: str = "") -> SignatureResult:
    """A result for the DKIM-Signature field value `value`, from its tags alone."""
    try:
        tags = _tags(value)
    except InvalidTagValueList:
        tags = {}
    domain = _text(tags.get(b"d", b"")).lower()
    return SignatureResult(
        result=result,
        domain=domain,
        selector=_text(tags.get(b"s", b"")),
        identity=_text(tags.get(b"i", b"")) or (f"@{domain}" if domain else ""),
        algorithm=_text(tags.get(b"a", b"")).lower(),
        b=re.sub(r"\s+", "", _text(tags.get(b"b", b"")))[:8],
        reason=reason,
    )


def signature_key(value: bytes) -> str | None:
    """The key record name of a DKIM-Signature field value, or None without d= and s=."""
    try:
        tags = _tags(value)
    except InvalidTagValueList:
        return None
    d, s = tags.get(b"d"), tags.get(b"s")
    if not d or not s:
        return None
    return key_name(_text(d), _text(s))


def verify_message(
    source: bytes | str | tuple[bytes, str, int],
    answers: dict[str, KeyAnswer],
    max_signatures: int,
    minkey: int,
) -> list[SignatureResult]:
    """`verify` for what a worker process is given: the message, the name of a
    file holding it, or its header section with the name of the file it is
    spooled to and where the body starts in that file."""
    if isinstance(source, str):
        source = (b"", source, 0)
    if isinstance(source, tuple):
        header, path, offset = source
        with open(path, "rb") as fh:
            fh.seek(offset)
            source = header + fh.read()
    return verify(source, answers, max_signatures, minkey)


def verify(
    message: bytes, answers: dict[str, KeyAnswer], max_signatures: int, minkey: int
) -> list[SignatureResult]:
    """Verify the first `max_signatures` DKIM signatures of `message`, top first."""
    try:
        d = dkim.DKIM(message, logger=_quiet, minkey=minkey)
    except dkim.DKIMException as exc:
        return [describe(b"", "permerror", f"message format: {exc}")]
    values = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    return [_one(d, idx, value, answers) for idx, value in enumerate(values[:max_signatures])]


def _one(d: dkim.DKIM, idx: int, value: bytes, answers: dict[str, KeyAnswer]) -> SignatureResult:
    meta = describe(value)

    def result(kind: str, reason: str = "") -> SignatureResult:
        return SignatureResult(
            kind, meta.domain, meta.selector, meta.identity, meta.algorithm, meta.b, reason
        )

    try:
        prep = d.verify_headerprep(idx)
    except dkim.DKIMException as exc:
        return result("neutral", _short(exc))
    if not prep:
        return result("neutral", "no signature")
    sig, include_headers, fields = prep
    if sig.get(b"a", b"").lower() == b"rsa-sha1":
        return result("policy", "rsa-sha1 is not accepted (RFC 8301)")
    name = key_name(_text(sig[b"d"]), _text(sig[b"s"]))
    if name not in answers:
        return result("temperror", "key not looked up")
    answer = answers[name]
    if isinstance(answer, str):
        return result("temperror", f"key lookup failed: {answer}")
    if answer is None:
        return result("permerror", "no key for signature")
    try:
        key = _tags(answer)
        if key.get(b"p", None) == b"":
            return result("permerror", "key revoked")
        evaluated = _evaluate_pk(name, answer)
    except (InvalidTagValueList, dkim.DKIMException, ValueError) as exc:
        return result("permerror", f"bad key: {_short(exc)}")
    refused = _key_refuses(key, sig)
    if refused:
        return result("permerror", refused)
    # What dkimpy's verify() does after verify_headerprep() and fetching the key
    # (verify_sig), with the signature's tags and the key evaluated above: a key
    # verify_sig would refuse has been refused above already.
    d.pk, d.keysize, d.ktag, d.seqtlsrpt = evaluated
    try:
        ok = d.verify_sig_process(sig, include_headers, fields[idx], None)
    except dkim.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return result("fail", "body hash did not verify")
        return result("neutral", _short(exc))
    except dkim.KeyFormatError as exc:
        if "too small" in str(exc):
            return result("policy", _short(exc))
        return result("permerror", _short(exc))
    except dkim.DKIMException as exc:
        return result("permerror", _short(exc))
    except binascii.Error as exc:
        # b= or bh= with padding dkimpy's syntax check lets through ("A===")
        return result("neutral", f"bad base64: {_short(exc)}")
    except nacl.exceptions.ValueError:
        # an ed25519 key and a signature not of 64 bytes (an RSA signature, say)
        return result("fail", "signature did not verify")
    return result("pass") if ok else result("fail", "signature did not verify")


def _key_refuses(key: dict[bytes, bytes], sig: dict[bytes, bytes]) -> str:
    """Why the key record does not allow this signature (RFC 6376 §3.6.1), or "".

    dkimpy ignores both restrictions: `h=` lists the hash algorithms the key may be
    used with (§6.1.2: otherwise PERMFAIL, "inappropriate hash algorithm"; names
    we do not know are ignored), and the `s` flag of `t=` requires the i= domain
    to be the d= domain itself, not a subdomain of it.
    """
    hashes = key.get(b"h")
    if hashes is not None:
        wanted = sig.get(b"a", b"").lower().rpartition(b"-")[2]
        if wanted not in {h.strip().lower() for h in hashes.split(b":")}:
            return f"key h= does not allow {_text(wanted)}"
    flags = {f.strip().lower() for f in key.get(b"t", b"").split(b":")}
    identity = sig.get(b"i")
    if b"s" in flags and identity is not None:
        domain = identity.rpartition(b"@")[2].strip().lower().rstrip(b".")
        if domain != sig.get(b"d", b"").strip().lower().rstrip(b"."):
            return "key t=s: the i= domain must be the d= domain"
    return ""


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").strip()


def _short(exc: BaseException) -> str:
    """An exception's text, one line, bounded (it may quote the message)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 120 else text[:117] + "..."
