"""DMARC's author domain: the plain From shapes read once by a regular expression
give exactly what the two parsers (`getaddresses`, `email.headerregistry`) give,
and everything else still goes to both."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from spamgate.checks import dmarc
from spamgate.checks.dmarc import from_domains, two_readers

ALNUM = "abcXYZ019"
atom = st.text(ALNUM + "_+-", min_size=1, max_size=6)
label = st.text(ALNUM + "-", min_size=1, max_size=6)
domain = st.lists(label, min_size=2, max_size=3).map(".".join)
local = st.lists(atom, min_size=1, max_size=3).map(".".join)
address = st.builds(lambda lp, d: f"{lp}@{d}", local, domain)
encoded = st.builds(
    lambda cs, enc, text: f"=?{cs}?{enc}?{text}?=",
    st.sampled_from(["utf-8", "UTF-8", "iso-8859-1"]),
    st.sampled_from("BbQq"),
    st.text(ALNUM + "+/=_.-", max_size=8),
)
phrase = st.one_of(
    st.lists(st.one_of(atom, encoded), min_size=1, max_size=3).map(" ".join),
    st.text(ALNUM + " _+.,'-", max_size=10).map(lambda t: f'"{t}"'),
)
plain = st.one_of(
    address,
    address.map(lambda a: f"<{a}>"),
    st.builds(lambda p, sp, a: f"{p}{sp}<{a}>", phrase, st.sampled_from(["", " "]), address),
)


def fast(value: str) -> bool:
    return any(p.fullmatch(value) for p in dmarc._PLAIN_FROM)


@settings(max_examples=500, deadline=None)
@given(plain)
@example("Load <sender@good.test>")
@example('"Doe, John" <j.doe@example.test>')
@example("=?utf-8?q?J=C3=B6rg?= <j@example.test>")
def test_plain_shapes_are_read_once_as_both_parsers_read_them(value: str) -> None:
    assert fast(value)
    assert from_domains(value) == two_readers(value)


@settings(max_examples=1500, deadline=None)
@given(st.text("ab.@<>\"\\(),;: =?-_+'[]\tä", max_size=24))
@example("a@b.test <c@d.test>")
@example('"a@b.test" <c@d.test>')
@example("a@b.test, c@d.test")
@example("<a@b.test> c@d.test")
@example("x <a@b.test>>")
@example("a.@b.test")
def test_whatever_the_fast_path_reads_the_two_parsers_read_alike(value: str) -> None:
    # (a value the fast path does not take goes to the two parsers themselves)
    assert from_domains(value) == two_readers(value)


def test_shapes_the_parsers_read_differently_are_left_to_them() -> None:
    for value in ('"a@b.test" <c@d.test>', "a@b.test <c@d.test>", "a <b@c.test> (x)"):
        assert not fast(value)


def q_encoded(text: bytes) -> str:
    return "".join(f"={b:02X}" for b in text)


hostile_text = st.binary(max_size=12).map(q_encoded) | st.sampled_from(
    ["=3Cx=40evil.test=3E", "x=40evil.test", "=22", "=0D=0A", "=00", "a_b", ""]
)
# pieces a crafted From is made of: the fast path's own shapes next to specials,
# encoded words hiding "<", "@", quotes, NUL or CRLF, digits, routes and comments
piece = st.one_of(
    address,
    address.map(lambda a: f"<{a}>"),
    atom,
    st.builds(
        lambda cs, enc, t: f"=?{cs}?{enc}?{t}?=",
        st.sampled_from(["utf-8", "x"]),
        st.sampled_from("QqBb"),
        hostile_text,
    ),
    st.text(ALNUM + ' <>@\\",:;()[].\x00\t', max_size=8).map(lambda t: f'"{t}"'),
    st.sampled_from(
        [
            " ",
            "  ",
            "\t",
            ",",
            ";",
            ":",
            "<",
            ">",
            "@",
            ".",
            "(x)",
            "\x00",
            "\r\n ",
            "[1.2.3.4]",
            "@evil.test:",
            "\\",
            "=?",
            "?=",
            "0",
            "1.2",
            "ä",
        ]
    ),
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(piece, min_size=1, max_size=6).map("".join))
@example("=?utf-8?q?a=40evil.test_=3Cx=40evil.test=3E?= <me@good.test>")
@example("=?utf-8?b?PGFAZXZpbC50ZXN0Pg==?= <me@good.test>")
@example("=?utf-8?q?=22?= <me@good.test>")
@example("=?utf-8?q?=0D=0A?= <me@good.test>")
@example("=?utf-8?q?=00?= <me@good.test>")
@example('"<x@evil.test>" <me@good.test>')
@example("me@good.test\x00@evil.test")
@example("<@evil.test:me@good.test>")
@example("me@good.test <you@evil.test>")
@example("g: me@good.test, you@evil.test;")
def test_crafted_from_fields_are_read_as_both_parsers_read_them(value: str) -> None:
    """Hostile From values built of the fast path's shapes and of what could make
    it read another domain than the parsers (several addresses, comments, encoded
    words hiding "<" or "@", quoted strings with "<" or "@", groups, routes, NULs):
    `from_domains` is always what the two parsers give, and an encoded word's
    decoded text is never read as an address."""
    assert from_domains(value) == two_readers(value)
    if "evil" not in value.replace("=3Cx=40evil.test=3E", "").replace("x=40evil.test", ""):
        assert "evil.test" not in from_domains(value)[0]
