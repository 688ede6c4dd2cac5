"""SpamAssassin as a scorer, through a real spamd (Debian's rules), private, on loopback."""

from __future__ import annotations

from tests.kit.daemons import Spamd
from tests.kit.mimemaker import HAM, gtube
from tests.kit.ports import free_port
from tests.kit.sink import Sink

from ..conftest import GateFactory, sample


async def test_gtube_scored_and_refused_at_threshold(
    gate_factory: GateFactory, spamd: Spamd, sink: Sink
) -> None:
    gate = await gate_factory(
        f'[spamassassin]\naddress = "{spamd.address}"\ncount_symbols = ["GTUBE"]\n'
        "timeout = 60\n[scoring]\nreject = 15\ntag = 5\n"
    )
    hits = sample("spamgate_scanner_symbols_total", check="spamassassin", symbol="GTUBE")
    replies = await gate.send(gtube())
    assert replies[-1].code == 550
    assert replies[-1].text == "5.7.1 Message refused as spam (score 1000.0)"
    assert (
        sample("spamgate_scanner_symbols_total", check="spamassassin", symbol="GTUBE") == hits + 1
    )
    assert sample("spamgate_verdicts_total", stage="eod", check="score", action="reject") >= 1
    replies = await gate.send(HAM)
    assert replies[-1].code == 250
    assert len(sink.messages) == 1
    assert b"X-Spam-Flag" not in sink.messages[0].content


async def test_weight_and_symbols_in_headers(
    gate_factory: GateFactory, spamd: Spamd, sink: Sink
) -> None:
    gate = await gate_factory(
        f'[spamassassin]\naddress = "{spamd.address}"\nweight = 0.01\ntimeout = 60\n'
        "[scoring]\nreject = 15\ntag = 5\n"
    )
    replies = await gate.send(gtube())
    assert replies[-1].code == 250  # 1000 x 0.01 = 10: tagged, not refused
    content = sink.messages[0].content
    assert b"X-Spam-Score: 10.0" in content
    symbols = next(ln for ln in content.split(b"\r\n") if ln.startswith(b"X-Spam-Symbols:"))
    assert b"SPAMASSASSIN" in symbols and b"SA_GTUBE" in symbols


async def test_action_mode_follows_spamd(gate_factory: GateFactory, spamd: Spamd) -> None:
    gate = await gate_factory(
        f'[spamassassin]\naddress = "{spamd.address}"\nmode = "action"\ntimeout = 60\n'
    )
    replies = await gate.send(gtube())
    assert replies[-1].code == 550
    assert replies[-1].text == "5.7.1 Message refused as spam (SpamAssassin score 1000)"


async def test_spamd_down(gate_factory: GateFactory, sink: Sink) -> None:
    dead = f"127.0.0.1:{free_port()}"
    gate = await gate_factory(f'[spamassassin]\naddress = "{dead}"\n')
    assert (await gate.send(gtube()))[-1].code == 250  # on_error = continue
    gate = await gate_factory(f'[spamassassin]\naddress = "{dead}"\non_error = "tempfail"\n')
    replies = await gate.send(gtube())
    assert replies[-1].code == 451
    assert len(sink.messages) == 1


async def test_larger_than_max_size_not_sent(
    gate_factory: GateFactory, spamd: Spamd, sink: Sink
) -> None:
    gate = await gate_factory(f'[spamassassin]\naddress = "{spamd.address}"\nmax_size = 1000\n')
    skipped = sample("spamgate_content_scans_total", check="spamassassin", result="skipped")
    replies = await gate.send(gtube() + (b"x" * 78 + b"\r\n") * 20)
    assert replies[-1].code == 250
    assert sample("spamgate_content_scans_total", check="spamassassin", result="skipped") == (
        skipped + 1
    )
