"""Property-based fuzzing of whole SMTP sessions over a real socket (hypothesis).

A short run is part of the normal suite; `FUZZ_EXAMPLES=10000 python -m pytest
tests/test_fuzz.py` is the long run. Every failure hypothesis finds is shrunk to a
small session: add it to tests/corpus/ so it is replayed forever after.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fuzzkit import Harness, check_commands, check_upstream, run_session

CORPUS = pathlib.Path(__file__).parent / "corpus"
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def harness():
    h = Harness().start()
    yield h
    h.stop()


# -- strategies ---------------------------------------------------------------------

ENDINGS = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b""])
JUNK = st.binary(min_size=0, max_size=40)
TEXT = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF), min_size=0, max_size=40
).map(lambda s: s.encode("utf-8", "surrogatepass"))
LONG = st.integers(min_value=500, max_value=5000).map(lambda n: b"A" * n)
ADDRS = st.sampled_from(
    [
        b"<a@example.org>",
        b"<>",
        b"<u@example.test>",
        b"<x@elsewhere.test>",
        b"<postmaster>",
        b"<\xc3\xbc@example.test>",
        b'<"a b"@example.test>',
        b"<@r1,@r2:u@example.test>",
        b"a@example.org",
        b"<a@example.org",
        b"<a@>",
        b"<<a@b>>",
        b"<a@[127.0.0.1]>",
    ]
)
PARAMS = st.lists(
    st.sampled_from(
        [
            b"SIZE=100",
            b"SIZE=999999999",
            b"SIZE=x",
            b"BODY=8BITMIME",
            b"BODY=BINARYMIME",
            b"SMTPUTF8",
            b"RET=HDRS",
            b"ENVID=a+2Bb",
            b"NOTIFY=NEVER",
            b"NOTIFY=SUCCESS,DELAY",
            b"ORCPT=rfc822;u@example.test",
            b"AUTH=<>",
            b"X=Y=Z",
            b"=",
            b"FOO",
        ]
    ),
    max_size=3,
).map(lambda ps: b"".join(b" " + p for p in ps))
HELOS = st.sampled_from(
    [
        b"client.test",
        b"x ADDR=10.0.0.1",
        b"a=b",
        b"[127.0.0.1]",
        b"gate.test",
        b"",
        b"a+b",
        b"\xff\xfe",
        b"x\tNAME=evil",
    ]
)


@st.composite
def command(draw) -> bytes:
    kind = draw(
        st.sampled_from(["helo", "mail", "rcpt", "simple", "junk", "long", "auth", "xclient"])
    )
    end = draw(ENDINGS)
    if kind == "helo":
        line = draw(st.sampled_from([b"EHLO ", b"HELO ", b"ehlo ", b"EHLO"])) + draw(HELOS)
    elif kind == "mail":
        line = draw(st.sampled_from([b"MAIL FROM:", b"mail from: ", b"MAIL FROM "])) + draw(ADDRS)
        line += draw(PARAMS)
    elif kind == "rcpt":
        line = draw(st.sampled_from([b"RCPT TO:", b"rcpt to: "])) + draw(ADDRS) + draw(PARAMS)
    elif kind == "simple":
        line = draw(
            st.sampled_from(
                [
                    b"RSET",
                    b"NOOP",
                    b"DATA",
                    b"VRFY root",
                    b"HELP",
                    b"STARTTLS",
                    b"BDAT 10 LAST",
                    b"ETRN x",
                    b"EXPN all",
                    b"GET / HTTP/1.0",
                    b"",
                    b"RSET extra",
                    b"QUIT",
                ]
            )
        )
    elif kind == "junk":
        line = draw(st.one_of(JUNK, TEXT))
    elif kind == "long":
        line = b"MAIL FROM:<" + draw(LONG) + b"@example.org>"
    elif kind == "auth":
        line = b"AUTH PLAIN " + draw(JUNK).hex().encode()
    else:
        line = b"XCLIENT ADDR=10.1.2.3 NAME=evil"
    return line + end


BODY_PIECES = st.sampled_from(
    [
        b"hello\r\n",
        b".leading dot\r\n",
        b"..\r\n",
        b"bare\nLF\r\n",
        b"bare\rCR\r\n",
        b"x\n.\nMAIL FROM:<evil@x.test>\r\n",
        b"y\r\n.\rRCPT TO:<evil@x.test>\r\n",
        b"z\r.\r\nDATA\r\n",
        b"\r\n.\r\r\n",
        b"Subject: =?utf-8?b?w7w=?=\r\n",
        b"Content-Transfer-Encoding: base64\r\n\r\n!!notbase64!!\r\n",
        b"A" * 1200 + b"\r\n",
        b"\xff\xfe\x00binary\r\n",
        b"MAIL FROM:<smuggled@x.test>\r\n",
        b"\r\n",
    ]
)


@st.composite
def message(draw) -> bytes:
    ident = next(_ids)
    body = b"".join(draw(st.lists(BODY_PIECES, max_size=8)))
    body = body.replace(b"\r\n.\r\n", b"\r\n..\r\n")  # one end of data per message
    content = b"X-Fuzz-Id: %d\r\nSubject: fuzz\r\n\r\n" % ident + body
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content + b".\r\n"


@st.composite
def session(draw) -> list[tuple[str, bytes]]:
    steps: list[tuple[str, bytes]] = []
    if draw(st.booleans()):
        steps += [
            ("send", b"EHLO client.test\r\n"),
            ("send", b"MAIL FROM:<a@example.org>\r\n"),
            ("send", b"RCPT TO:<u@example.test>\r\n"),
        ]
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        choice = draw(st.sampled_from(["cmd", "cmd", "pipeline", "data", "close"]))
        if choice == "cmd":
            steps.append(("send", draw(command())))
        elif choice == "pipeline":
            steps.append(("send", b"".join(draw(st.lists(command(), min_size=2, max_size=5)))))
        elif choice == "data":
            steps.append(("send", b"DATA\r\n"))
            steps.append(("data", draw(message())))
        else:
            steps.append(("close", b""))
            break
    if draw(st.booleans()):
        steps.append(("send", b"QUIT\r\n"))
    return steps


def play(h: Harness, steps: list[tuple[str, bytes]]) -> None:
    before_msgs = len(h.sink.messages)
    before_cmds = len(h.sink.commands)
    transcript = run_session(h.port, steps)
    # the upstream is written before the client hears 2xx; give a hang-up a moment
    deadline = time.monotonic() + 2
    while h.sessions_open() and time.monotonic() < deadline:
        time.sleep(0.01)
    check_upstream(h.sink, before_msgs, transcript)
    check_commands(h.sink.commands[before_cmds:])


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps=session())
def test_generated_sessions_keep_the_promises(harness: Harness, steps) -> None:
    play(harness, steps)


def test_server_survives_and_sessions_end(harness: Harness) -> None:
    """After all the abuse, a new client is greeted and nothing is left open."""
    deadline = time.monotonic() + 5
    while harness.sessions_open() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert harness.sessions_open() == 0
    with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as s:
        assert s.recv(100).startswith(b"220 gate.test")


def _corpus_cases() -> list[pathlib.Path]:
    return sorted(CORPUS.glob("*.smtp"))


def load_case(path: pathlib.Path) -> list[tuple[str, bytes]]:
    """A corpus file: steps separated by lines `--- send`, `--- data`, `--- close`.

    Escapes as in Python bytes literals (\\r, \\n, \\xff) keep the files readable.
    """
    steps: list[tuple[str, bytes]] = []
    kind = None
    chunk: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("--- "):
            if kind is not None:
                steps.append((kind, _unescape("".join(chunk))))
            kind, chunk = line[4:].strip(), []
        elif line.startswith("#") and kind is None:
            continue
        else:
            chunk.append(line)
    if kind is not None:
        steps.append((kind, _unescape("".join(chunk))))
    return steps


def _unescape(text: str) -> bytes:
    return text.encode("latin-1").decode("unicode_escape").encode("latin-1")


@pytest.mark.parametrize("case", _corpus_cases(), ids=lambda p: p.stem)
def test_regression_corpus(harness: Harness, case: pathlib.Path) -> None:
    steps = load_case(case)
    ids = [next(_ids) for _ in steps]
    # give every corpus message a fresh id so accounting stays per-run unique
    steps = [
        (k, d.replace(b"X-Fuzz-Id: 0", b"X-Fuzz-Id: %d" % i))
        for (k, d), i in zip(steps, ids, strict=True)
    ]
    play(harness, steps)
