"""The rule tools an admin runs by hand: check, query, explain; and the shipped rules/."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import shutil
import subprocess
import sys
from dataclasses import dataclass

from spamgate.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = str(ROOT / "rules" / "spamgate.toml")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(*args: str, cwd: pathlib.Path = ROOT) -> Result:
    """The CLI in this process (fast); test_shipped_rules_are_valid runs the real command."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:
                code = int(exc.code or 0)
    finally:
        os.chdir(old)
    return Result(code, out.getvalue(), err.getvalue())


def test_shipped_rules_are_valid() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "spamgate", "check", "-c", SHIPPED],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert (r.returncode, r.stdout.strip()) == (0, f"{SHIPPED}: ok"), r.stderr


def test_check_lists_every_problem_in_every_table(tmp_path) -> None:
    (tmp_path / "helo.regexp").write_text("/ok/ OK\n/bad( REJECT\n/x/ REJCT\n")
    (tmp_path / "sender").write_text("a@b.test OK\na@b.test REJECT\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[rules]\n"
        'helo = ["regexp:helo.regexp"]\n'
        'sender = ["hash:sender"]\n'
        'recipient = ["hash:missing"]\n'
    )
    r = run("check", "-c", str(cfg))
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f"{tmp_path}/helo.regexp:2: no closing '/' for the pattern",
        f"{tmp_path}/helo.regexp:3: unknown action 'REJCT' (expected OK, DUNNO, REJECT, "
        "DEFER, 4NN/5NN text, DISCARD, HOLD, PREPEND, WARN or SCORE)",
        f"{tmp_path}/sender:2: duplicate key 'a@b.test' (first given on line 1)",
        f"{cfg}:4: [rules] recipient: {tmp_path}/missing: no such file",
    ]


def test_check_refuses_bad_table_names_in_the_config(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[rules]\nclient = ["pcre:x"]\nbody = ["hash:body"]\n')
    r = run("check", "-c", str(cfg))
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f'{cfg}:2: [rules] client: "pcre:x": unknown table type "pcre" (use cidr:, regexp:, hash:)',
        f'{cfg}:3: [rules] body: "hash:body": header and body tables must be regexp: tables',
    ]
    cfg.write_text('[rules]\nhelo = ["regexp:a/helo"]\nsender = ["hash:b/helo"]\n')
    r = run("check", "-c", str(cfg))
    assert r.stdout.strip() == (
        f"{cfg}:1: [rules]: tables a/helo and b/helo share the name 'helo'; rename one"
    )


def test_query_prints_the_rule_that_answers() -> None:
    r = run("query", "-c", SHIPPED, "regexp:rules/helo.regexp", "MX.example.com")
    assert (r.returncode, r.stdout) == (0, "helo.regexp:14: REJECT You are not me\n")
    r = run("query", "regexp:rules/helo.regexp", "192.0.2.1", "--as", "helo")
    assert r.stdout == "helo.regexp:17: REJECT Bare IP address in HELO; use [192.0.2.1]\n"
    r = run("query", "regexp:rules/helo.regexp", "mail.example.org", "--as", "helo")
    assert (r.returncode, r.stdout) == (1, "")
    assert "not found" in r.stderr


def test_query_follows_the_search_order(tmp_path) -> None:
    (tmp_path / "sender").write_text(
        "# senders\n.example.test   SCORE 2 SUB\nbob@ WARN REJECT maybe\nbob@ DUNNO\n"
    )
    r = run("query", "hash:sender", "Bob@Mail.Example.test", cwd=tmp_path)
    assert r.returncode == 2  # the duplicate key is an error
    assert "sender:4: duplicate key 'bob@'" in r.stderr
    (tmp_path / "sender").write_text("# senders\n.example.test   SCORE 2 SUB\nbob@ REJECT\n")
    r = run("query", "hash:sender", "Bob@Mail.Example.test", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "sender:2: SCORE 2 SUB   (key .example.test)\n")
    (tmp_path / "client.cidr").write_text("192.0.2.0/24 WARN REJECT trial\n0.0.0.0/0 DUNNO\n")
    r = run("query", "cidr:client.cidr", "192.0.2.1", cwd=tmp_path)
    assert r.stdout.splitlines() == [
        "client.cidr:1: WARN REJECT trial   (monitor only: the lookup goes on)",
        "client.cidr:2: DUNNO",
    ]
    r = run("query", "cidr:nope", "192.0.2.1", cwd=tmp_path)
    assert (r.returncode, r.stderr.strip()) == (2, "spamgate: nope: no such file")


def test_explain_accepts_legitimate_mail_with_the_shipped_rules() -> None:
    r = run(
        "explain",
        "-c",
        SHIPPED,
        "--client",
        "192.0.2.10",
        "--name",
        "mail.example.org",
        "--helo",
        "mail.example.org",
        "--sender",
        "alice@example.org",
        "--rcpt",
        "bob@example.com",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "connect from mail.example.org[192.0.2.10]"
    for label in (
        "client.cidr",
        "client",
        "helo.regexp",
        "sender",
        "recipient",
        "header.regexp",
        "body.regexp",
    ):
        assert f"  {label:<24} no match" in lines, label
    assert lines[-1] == "decision: accepted, would be relayed"


def test_explain_shows_delayed_reject_scores_and_content_rules(tmp_path) -> None:
    (tmp_path / "helo.regexp").write_text("/^localhost$/ SCORE 3 HELO_LOCALHOST\n")
    (tmp_path / "body.regexp").write_text("/^buy now$/ SCORE 4 BUY_NOW\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[server]\nrelay_domains = ["example.test"]\n'
        '[rules]\nhelo = ["regexp:helo.regexp"]\nbody = ["regexp:body.regexp"]\n'
        "[scoring]\ntag = 5\nreject = 15\n"
    )
    eml = tmp_path / "m.eml"
    eml.write_text("Subject: offer\n\nbuy now\n")
    r = run(
        "explain",
        "-c",
        str(cfg),
        "--client",
        "192.0.2.10",
        "--name",
        "x.example.net",
        "--helo",
        "localhost",
        "--rcpt",
        "u@example.test",
        "--eml",
        str(eml),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "helo.regexp              HELO_LOCALHOST=3  [helo.regexp:1]" in out
    assert "body.regexp              BUY_NOW=4  [body.regexp:1]" in out
    assert "added header: X-Spam-Flag: YES" in out
    assert "score 7 (HELO_LOCALHOST=3, BUY_NOW=4)" in out

    (tmp_path / "helo.regexp").write_text("/^localhost$/ REJECT Not a name\n")
    r = run(
        "explain",
        "-c",
        str(cfg),
        "--client",
        "192.0.2.10",
        "--name",
        "x.example.net",
        "--helo",
        "localhost",
        "--rcpt",
        "u@example.test",
    )
    assert r.returncode == 1
    assert "(refusal held until RCPT: delayed reject" in r.stdout
    assert r.stdout.splitlines()[-1] == (
        "decision: refused at RCPT: <u@example.test> 554 5.7.1 <localhost>: "
        "Helo command rejected: Not a name (helo.regexp:1)"
    )


def readme_toml_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return [block.split("```", 1)[0] for block in readme.split("```toml\n")[1:]]


def test_readme_examples_check_clean_with_the_shipped_rules(tmp_path) -> None:
    """Each configuration example of the README, added to rules/spamgate.toml as it
    says, passes `spamgate check`: every table it names ships in rules/."""
    blocks = readme_toml_blocks()
    assert any("[ratelimit.overrides]" in b and "[greylist]" in b for b in blocks)
    for n, block in enumerate(blocks):
        rules = tmp_path / str(n)
        shutil.copytree(ROOT / "rules", rules)
        cfg = rules / "spamgate.toml"
        cfg.write_text(cfg.read_text() + "\n" + block)
        r = run("check", "-c", str(cfg))
        assert (r.returncode, r.stdout) == (0, f"{cfg}: ok\n"), block
