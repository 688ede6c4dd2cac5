"""Rule tables without sockets: file syntax, each table type, search orders, actions."""

from __future__ import annotations

import ipaddress
import time

import pytest

from spamgate.checks.engines.ruleverdict import ReplyContext, to_verdict
from spamgate.config.settings import ConfigError
from spamgate.pipeline.verdict import Action, Symbol
from spamgate.reply import Reply
from spamgate.tables import Query, TableLimits, TableTimeout, load_table
from spamgate.tables.actions import parse_action
from spamgate.tables.keys import email_keys, ip_keys


def table(tmp_path, kind: str, text: str, name: str | None = None, **kw):
    path = tmp_path / (name or f"t.{kind}")
    path.write_text(text)
    return load_table(f"{kind}:{path.name}", base_dir=str(tmp_path), **kw)


def errors(tmp_path, kind: str, text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        table(tmp_path, kind, text)
    return err.value.problems


def ip(text: str):
    return ipaddress.ip_address(text)


def rules(t, query: Query) -> list[str]:
    return [m.rule for m in t.matches(query)]


# ---- the file format ------------------------------------------------------------------


def test_comments_blank_lines_and_continuation(tmp_path) -> None:
    t = table(
        tmp_path,
        "hash",
        "# a comment\n\n   # an indented comment\nexample.test  REJECT go\n"
        "   away now\n\t\nother.test OK\n",
    )
    m = t.first(Query("domain", "example.test"))
    assert m is not None and m.line == 4  # a continued rule keeps its first line number
    assert m.action.text == "go   away now"
    assert t.first(Query("domain", "other.test")).line == 7


def test_every_bad_line_is_reported_with_its_number(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # errors name the files relative to it
    problems = errors(
        tmp_path,
        "hash",
        "  starts with a continuation\nok.test OK\nnoaction.test\nbad.test REJCT\n"
        "filter.test FILTER smtp:[127.0.0.1]\ncode.test 250 fine\nok2.test OK thanks\n"
        "score.test SCORE lots SYM\nsym.test SCORE 1 bad-name\nhdr.test PREPEND no header\n"
        "net.test/24 OK\nok.test DUNNO\n",
    )
    assert problems == [
        "t.hash:1: continuation line (it starts with whitespace) without a line to continue"
    ]  # the file-level problem comes first and stops the parse
    (tmp_path / "t.hash").write_text(
        "ok.test OK\nnoaction.test\nbad.test REJCT\n"
        "filter.test FILTER smtp:[127.0.0.1]\ncode.test 250 fine\nok2.test OK thanks\n"
        "score.test SCORE lots SYM\nsym.test SCORE 1 bad-name\nhdr.test PREPEND no header\n"
        "10.0.0.0/24 OK\nok.test DUNNO\n"
    )
    with pytest.raises(ConfigError) as err:
        load_table("hash:t.hash", base_dir=str(tmp_path))
    assert err.value.problems == [
        "t.hash:2: 'noaction.test' has no action (expected 'pattern action [text]')",
        "t.hash:3: unknown action 'REJCT' (expected OK, DUNNO, REJECT, DEFER, 4NN/5NN text, "
        "DISCARD, HOLD, PREPEND, WARN or SCORE)",
        "t.hash:4: FILTER is a Postfix action that spamgate does not support",
        "t.hash:5: reply code 250 is not 4NN or 5NN",
        "t.hash:6: OK takes no text (found 'thanks')",
        "t.hash:7: SCORE: 'lots' is not a number",
        "t.hash:8: SCORE: 'bad-name' is not a symbol name (letters, digits and _, starting "
        "with a letter)",
        "t.hash:9: PREPEND needs a header: PREPEND X-Header-Name: value",
        "t.hash:10: '10.0.0.0/24' looks like a network: put networks in a cidr: table",
        "t.hash:11: duplicate key 'ok.test' (first given on line 1)",
    ]


def test_unreadable_files(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # errors name the files relative to it
    with pytest.raises(ConfigError) as err:
        load_table("regexp:missing.regexp", base_dir=str(tmp_path))
    assert err.value.problems == ["missing.regexp: no such file"]
    (tmp_path / "latin1").write_bytes(b"ok.test OK\nm\xfcller.test REJECT\n")
    with pytest.raises(ConfigError) as err:
        load_table("hash:latin1", base_dir=str(tmp_path))
    assert err.value.problems == ["latin1:2: not UTF-8 text"]
    with pytest.raises(ValueError, match="unknown table type"):
        load_table("pcre:x", base_dir=str(tmp_path))


# ---- actions ----------------------------------------------------------------------------

CLIENT = ReplyContext("unknown[192.0.2.1]", "Client host")


@pytest.mark.parametrize(
    ("text", "action", "code", "enhanced", "line"),
    [
        ("REJECT", Action.REJECT, 554, "5.7.1", "Access denied"),
        ("REJECT Go away", Action.REJECT, 554, "5.7.1", "Go away"),
        ("reject 5.7.0 Go away", Action.REJECT, 554, "5.7.0", "Go away"),
        ("DEFER", Action.DEFER, 450, "4.7.1", "Access denied"),
        ("DEFER 5.7.1 Later", Action.DEFER, 450, "4.7.1", "Later"),  # class follows the code
        ("550 No", Action.REJECT, 550, "5.7.1", "No"),
        ("551 5.1.6 Moved", Action.REJECT, 551, "5.1.6", "Moved"),
        ("450 Busy", Action.DEFER, 450, "4.7.1", "Busy"),
        ("421 Closing", Action.DISCONNECT, 421, "4.7.1", "Closing"),
        ("521 5.7.1 Never", Action.DISCONNECT, 521, "5.7.1", "Never"),
    ],
)
def test_refusing_actions(text, action, code, enhanced, line) -> None:
    v = to_verdict(parse_action(text), "client:3", CLIENT)
    assert v.action is action and v.rule == "client:3"
    assert v.reply == Reply(
        code, enhanced, (f"<unknown[192.0.2.1]>: Client host rejected: {line} (client:3)",)
    )


def test_other_actions() -> None:
    def verdict(text: str):
        return to_verdict(parse_action(text), "t:1", CLIENT)

    assert verdict("OK").action is Action.OK
    assert verdict("1").action is Action.OK  # access(5): all-numerical means OK
    assert verdict("DUNNO").action is Action.DUNNO and not verdict("DUNNO").is_final
    assert verdict("DISCARD spam trap").action is Action.DISCARD
    assert verdict("DISCARD spam trap").warn == "spam trap"
    assert verdict("HOLD").action is Action.HOLD
    assert verdict("PREPEND X-Seen:  yes").headers == (("X-Seen", "yes"),)
    assert verdict("WARN look at this").warn == "look at this"
    assert verdict("WARN look at this").action is Action.DUNNO
    assert verdict("SCORE -2.5 ALLOW_PARTNER").symbols == (Symbol("ALLOW_PARTNER", -2.5),)
    monitored = verdict("WARN REJECT not yet")
    assert monitored.action is Action.REJECT and monitored.monitor
    assert verdict("WARN 550 5.7.1 not yet").monitor
    assert verdict("WARN discard").monitor and verdict("WARN discard").action is Action.DISCARD


def test_content_reply_has_no_angle_brackets() -> None:
    ctx = ReplyContext(reject_code=550, reject_text="Message content rejected")
    v = to_verdict(parse_action("REJECT"), "body.regexp:7", ctx)
    assert str(v.reply) == "550 5.7.1 Message content rejected (body.regexp:7)"


# ---- cidr: --------------------------------------------------------------------------


def test_cidr_first_match_and_negation(tmp_path) -> None:
    t = table(
        tmp_path,
        "cidr",
        "192.0.2.0/25 DUNNO\n192.0.2.0/24 REJECT net\n[2001:db8::1] OK\n2001:db8::/32 DEFER\n"
        "!198.51.100.0/24 SCORE 1 OUTSIDE\n",
    )

    def first(addr: str):
        m = t.first(Query("client", ip=ip(addr)))
        return m and m.line

    assert first("192.0.2.1") == 1  # the first match wins, even DUNNO
    assert first("192.0.2.200") == 2
    assert first("2001:db8::1") == 3
    assert first("2001:db8::2") == 4
    assert first("198.51.100.7") is None
    assert first("203.0.113.1") == 5  # outside 198.51.100.0/24
    assert rules(t, Query("client", name="host.test")) == []  # names never match a cidr table
    assert rules(t, Query("domain", "[192.0.2.3]")) == ["t.cidr:1", "t.cidr:2", "t.cidr:5"]


def test_cidr_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # errors name the files relative to it
    assert errors(tmp_path, "cidr", "192.0.2.1/24 REJECT\n10.0.0.0/33 OK\nfoo OK\n") == [
        "t.cidr:1: '192.0.2.1/24' has host bits set (did you mean 192.0.2.0/24?)",
        "t.cidr:2: '10.0.0.0/33' is not an IP network",
        "t.cidr:3: 'foo' is not an IP address or network",
    ]


# ---- regexp: -------------------------------------------------------------------------


def test_regexp_syntax(tmp_path) -> None:
    t = table(
        tmp_path,
        "regexp",
        "/^mail\\.(example)\\.test$/ REJECT go away $1 ${1} $$1\n"
        "/^Case$/i OK\n"
        "!/\\./ SCORE 1 NO_DOT\n"
        "/^${myhostname}$/ REJECT You are not me\n"
        "/^a \\. b$/x DUNNO\n",
        hostname="gate.example.test",
    )
    m = t.first(Query("domain", "MAIL.example.test"))  # case-insensitive by default
    assert m.line == 1 and m.action.text == "go away example example $1"
    assert m.action.source == "REJECT go away example example $1"
    assert t.first(Query("domain", "Case")).line == 2
    assert t.first(Query("domain", "case")).line == 3  # i toggles to case-sensitive
    assert t.first(Query("domain", "gate.example.test")).line == 4
    assert t.first(Query("domain", "gateXexample.test")) is None  # the name is escaped
    assert t.first(Query("domain", "a.b")).line == 5


def test_regexp_client_query_tries_name_then_address(tmp_path) -> None:
    t = table(tmp_path, "regexp", "/^192\\.0\\.2\\./ REJECT by address\n/example/ OK\n")
    q = Query("client", name="mx.example.test", ip=ip("192.0.2.9"))
    assert rules(t, q) == ["t.regexp:2", "t.regexp:1"]


def test_regexp_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # errors name the files relative to it
    problems = errors(
        tmp_path,
        "regexp",
        "/unterminated REJECT\n/a(b/ REJECT\n/x/q REJECT\nno-slash REJECT\n/(a)/ REJECT $2\n"
        "!/a/ REJECT $1\nif /x/\n/ok/\n",
    )
    assert problems == [
        "t.regexp:1: no closing '/' for the pattern",
        "t.regexp:2: bad regular expression /a(b/: missing ) at position 3",
        "t.regexp:3: unknown flag 'q' after the pattern (use i, m, s or x)",
        "t.regexp:4: a pattern starts with '/' (found 'no-slash')",
        "t.regexp:5: $2 refers to a group the pattern does not have (it has 1)",
        "t.regexp:6: $n references cannot be used with a !/pattern/ (nothing matched)",
        "t.regexp:7: if/endif blocks are not supported; write one pattern per line",
        "t.regexp:8: /ok/ has no action (expected '/pattern/flags action [text]')",
    ]


def test_regexp_catastrophic_backtracking_is_stopped(tmp_path) -> None:
    t = table(
        tmp_path,
        "regexp",
        "/^(a|aa)+$/ REJECT\n",
        limits=TableLimits(regexp_timeout=0.05, match_length=100000),
    )
    started = time.monotonic()
    with pytest.raises(TableTimeout, match=r"t\.regexp:1: regexp ran longer than"):
        t.first(Query("text", "a" * 5000 + "!"))
    assert time.monotonic() - started < 1


def test_regexp_sees_only_match_length_characters(tmp_path) -> None:
    t = table(tmp_path, "regexp", "/tail$/ REJECT\n", limits=TableLimits(match_length=10))
    assert t.first(Query("text", "12345tail")) is not None
    assert t.first(Query("text", "1234567890tail")) is None


# ---- hash: and Postfix's search order ---------------------------------------------------


def test_email_search_order() -> None:
    assert email_keys("Bob@Mail.Example.TEST") == [
        "bob@mail.example.test",
        "mail.example.test",
        ".example.test",
        ".test",
        "bob@",
    ]
    assert email_keys("") == ["<>"]
    assert email_keys("postmaster") == ["postmaster", "postmaster@"]


def test_ip_search_order() -> None:
    assert ip_keys(ip("192.0.2.10")) == ["192.0.2.10", "192.0.2", "192.0", "192"]
    assert ip_keys(ip("2001:DB8:0:1::5")) == [
        "2001:db8:0:1::5",
        "2001:db8:0:1:",
        "2001:db8:0:1",
        "2001:db8:0",
        "2001:db8",
        "2001",
    ]


@pytest.mark.parametrize(
    ("sender", "line"),
    [
        ("bob@mail.example.test", 1),
        ("alice@mail.example.test", 2),
        ("alice@x.mail.example.test", 3),
        ("alice@other.example.test", 4),
        ("bob@elsewhere.test", 5),
        ("carol@elsewhere.test", None),
        ("", 6),
    ],
)
def test_hash_sender_search_order(tmp_path, sender: str, line: int | None) -> None:
    t = table(
        tmp_path,
        "hash",
        "Bob@mail.example.test REJECT 1\nmail.example.test REJECT 2\n.mail.example.test REJECT 3\n"
        ".example.test REJECT 4\nbob@ REJECT 5\n<> REJECT 6\n",
    )
    m = t.first(Query("address", sender or "<>"))
    assert (m and m.line) == line


def test_hash_client_name_then_address(tmp_path) -> None:
    t = table(tmp_path, "hash", "192.0.2 REJECT net\n.example.test OK\n2001:db8 DEFER\n")
    both = Query("client", name="mx.example.test", ip=ip("192.0.2.7"))
    assert [(m.line, m.key) for m in t.matches(both)] == [(2, ".example.test"), (1, "192.0.2")]
    assert t.first(Query("client", ip=ip("2001:db8::7"))).key == "2001:db8"
    assert t.first(Query("client", ip=ip("198.51.100.1"))) is None


def test_regexp_prefilter_finds_what_each_pattern_finds(tmp_path) -> None:
    patterns = [
        r"/\bword(\d)\b.*\1/ SCORE 1 A",  # a back-reference: own group numbers
        r"/^Subject: (a|b)\1/i SCORE 1 B",  # case-sensitive
        r"/(?x) c \s d/ SCORE 1 C",  # a global inline flag: kept out of the merge
        r"/c d/ SCORE 1 D",
        r"/foo(?P<n>x)(?P=n)/ SCORE 1 E",  # named group: kept out
        r"/^x$/m SCORE 1 F",
        r"!/zzz/ SCORE 1 G",
        r"/a.b/s SCORE 1 H",
    ]
    t = table(tmp_path, "regexp", "\n".join(patterns) + "\n")
    assert t._prefilter is not None
    assert [e.mergeable for e in t.entries] == [True, True, False, True, False, True, False, True]
    texts = [
        "word3 x 3",
        "WORD3 x 4",
        "Subject: aa",
        "subject: aa",
        "c d",
        "cd",
        "fooxx",
        "q\nx\nr",
        "a\nb",
        "zzz",
        "nothing at all",
    ]
    for text in texts:
        naive = [e.line for e in t.entries if (e.pattern.search(text) is None) == e.negate]
        assert [m.line for m in t.matches(Query("text", text))] == naive, text
