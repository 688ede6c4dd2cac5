"""Capture files that are broken, cut short, from a newer spamgate or from a stranger.

Each gets one clear line naming the file and the record (`file:line: problem`) and
exit status 2, never a traceback; --skip-bad replays the others. A capture is
data: replaying one from another site opens none of the paths it names, imports
none of the types it names, and runs nothing.
"""

from __future__ import annotations

import copy
import gzip
import json
import pathlib
import sys

import pytest

from spamgate.replay import results
from spamgate.replay.command import replay
from spamgate.replay.records import Problem, check
from tests.e2e import scripted
from tests.kit.dnsserver import DnsServer

from ..conftest import GateFactory
from .capturekit import Send, body, capture_toml, cli, config_of, send, settled


@pytest.fixture
async def capture(gate_factory: GateFactory, dns_server: DnsServer, tmp_path) -> pathlib.Path:
    """Two records (a signed message, accepted; a refused one) in one plain file."""
    scripted.publish_dns(dns_server)
    directory = tmp_path / "capture"
    gate = await gate_factory(scripted.DNS_CHECKS + capture_toml(directory))
    assert (
        await send(gate, Send("127.0.0.20", "a@spf-pass.test", content=scripted.signed(body())))
    )[2] == 250
    assert (await send(gate, Send("127.0.0.2", "a@spf-pass.test")))[1] == (554,)
    await settled(directory, 2)
    (path,) = directory.glob("capture-*.jsonl")
    return path


def records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path: pathlib.Path, items: list) -> pathlib.Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


def replayed(tmp_path: pathlib.Path, *files: pathlib.Path, flags: tuple[str, ...] = ()):
    r = cli("replay", "-c", str(tmp_path / "spamgate-0.toml"), *flags, *map(str, files))
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    return r


async def test_a_good_capture_replays_cleanly(capture: pathlib.Path, tmp_path) -> None:
    r = replayed(tmp_path, capture)
    assert r.returncode == 0, r.stderr


async def test_bad_records_are_named_by_file_and_line(capture: pathlib.Path, tmp_path) -> None:
    good, refused = records(capture)
    future = {**good, "v": 2}
    bad_reply = copy.deepcopy(refused)
    bad_reply["rcpt"][0]["reply"] = [554, None, "not a list"]
    cases = {
        "future": (
            [good, future],
            "2: capture format 2 is newer than this spamgate reads (format 1)",
        ),
        "not json": ([good, "{not json"], "2: not a JSON record"),
        "shape": ([bad_reply], '1: "rcpt[0].reply" is not a reply'),
        "no version": ([{"t": 1}], '1: not a spamgate capture record (no format version "v")'),
        "deep": (["[" * 100000 + "]" * 100000], "1: not a JSON record (nested too deeply)"),
        "address": (
            [{**good, "client": {**good["client"], "address": "999.1.1.1"}}],
            "1: \"client.address\": '999.1.1.1' is not an IP address",
        ),
    }
    for name, (items, message) in cases.items():
        path = write(tmp_path / f"{name.replace(' ', '-')}.jsonl", items)
        r = replayed(tmp_path, path)
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert f"spamgate: {path}:{message}" in r.stderr, (name, r.stderr)


async def test_files_cut_short(capture: pathlib.Path, tmp_path) -> None:
    text = capture.read_bytes()
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(text[:-40])  # the second record loses its end (a full disk, a crash)
    r = replayed(tmp_path, cut)
    assert r.returncode == 2
    assert f"{cut}:2: the record is cut short (the file ends inside it)" in r.stderr

    packed = gzip.compress(text)
    short = tmp_path / "short.jsonl.gz"
    short.write_bytes(packed[: len(packed) // 2])
    r = replayed(tmp_path, short)
    assert r.returncode == 2
    assert f"{short}:" in r.stderr and "compressed data is truncated or damaged" in r.stderr

    damaged = tmp_path / "damaged.jsonl.gz"
    damaged.write_bytes(packed[:20] + bytes(b ^ 0xFF for b in packed[20:40]) + packed[40:])
    r = replayed(tmp_path, damaged)
    assert r.returncode == 2 and "truncated or damaged" in r.stderr

    missing = tmp_path / "nowhere.jsonl"
    r = replayed(tmp_path, missing)
    assert r.returncode == 2 and f"{missing}: No such file or directory" in r.stderr


async def test_skip_bad_replays_the_others(capture: pathlib.Path, tmp_path) -> None:
    good, refused = records(capture)
    path = write(tmp_path / "mixed.jsonl", [good, "garbage", {**refused, "v": 9}, refused])
    r = replayed(tmp_path, path, flags=("--skip-bad", "--format", "json"))
    assert r.returncode == 1  # records were skipped: nothing can be vouched for
    doc = json.loads(r.stdout)
    assert doc["summary"]["kept"] == 2 and doc["summary"]["skipped"] == 2
    assert doc["skipped"] == [
        f"{path}:2: not a JSON record (Expecting value)",
        f"{path}:3: capture format 9 is newer than this spamgate reads (format 1): "
        "use a spamgate at least as new as the one that wrote it",
    ]
    # a compressed capture, with a plain one, in a directory: all read
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "capture-20240101T000000-1-1.jsonl.gz").write_bytes(
        gzip.compress(capture.read_bytes())
    )
    (tmp_path / "dir" / "capture-20240101T000001-1-2.jsonl").write_bytes(capture.read_bytes())
    (tmp_path / "dir" / "notes.txt").write_text("not ours: not read")
    r = replayed(tmp_path, tmp_path / "dir", flags=("--format", "json"))
    assert r.returncode == 0 and json.loads(r.stdout)["summary"]["kept"] == 4


async def test_a_strangers_capture_runs_and_opens_nothing(capture: pathlib.Path, tmp_path) -> None:
    """Every string a record holds is only ever text: a path in it is never opened,
    a type it names is one of spamgate's or an error, and nothing is run."""
    canary = tmp_path / "canary.txt"
    canary.write_text("secret")
    good, refused = records(capture)
    hostile = copy.deepcopy(good)
    hostile["client"]["name"] = str(canary)
    hostile["client"]["helo"][0][0] = str(canary)
    hostile["mail"]["from"] = f"x@{canary}"
    hostile["message"]["headers"] = f"From: <a@spf-pass.test>\r\nX-Path: {canary}\r\n\r\n"
    hostile["message"]["path"] = str(canary)
    hostile["spool"] = str(canary)
    dkim = next(v for v in hostile["verdicts"] if v["entry"] == "dkim")
    dkim["result"]["signatures"][0]["reason"] = str(canary)
    strange = copy.deepcopy(good)
    next(v for v in strange["verdicts"] if v["entry"] == "dkim")["result"] = {
        "@type": "Popen",
        "args": ["touch", str(tmp_path / "ran")],
    }
    pickled = copy.deepcopy(good)
    next(v for v in pickled["verdicts"] if v["entry"] == "dkim")["result"] = {
        "@type": "DkimResults",
        "signatures": [{"@type": "__import__", "name": "os"}],
    }
    path = write(tmp_path / "stranger.jsonl", [hostile, strange, pickled, refused])
    config = config_of(tmp_path / "spamgate-0.toml")
    results.known_types()  # the registry is made before watching (it imports our modules)
    seen: list[tuple[str, tuple]] = []
    watched = {"open", "os.system", "subprocess.Popen", "exec", "compile", "pickle.find_class"}

    def hook(event: str, args: tuple) -> None:
        if event in watched:
            seen.append((event, args))

    sys.addaudithook(hook)  # (audit hooks cannot be removed; this one only collects)
    before = len(seen)
    diff, error = await replay(config, [str(path)], skip_bad=True)
    events = seen[before:]
    watched.clear()
    assert error is None
    # Nothing compiled, executed, unpickled or started; the only files opened are
    # the candidate configuration (its digest) and the capture itself.
    assert {e for e, _ in events} == {"open"}
    assert {str(args[0]) for _, args in events} == {str(config.path), str(path)}
    assert not (tmp_path / "ran").exists()
    # The hostile record replays (its paths are only names); the two naming types
    # spamgate does not know are refused, by name.
    assert diff.total == 2
    assert [e.split(": ", 1)[1] for e in diff.errors] == [
        "cannot be replayed: verdict of dkim: a result of unknown type 'Popen'",
        "cannot be replayed: verdict of dkim: a result of unknown type '__import__'",
    ]


def test_the_shape_check_alone() -> None:
    with pytest.raises(Problem, match="not a spamgate capture record"):
        check([1, 2])
    with pytest.raises(Problem, match='"end" is missing'):
        check(
            {
                "v": 1,
                "t": 1.0,
                "sid": "x",
                "n": 0,
                "client": {"address": "192.0.2.1", "port": 1, "name": "x", "helo": []},
            }
        )
