"""rspamd as a scorer, through a real rspamd (Debian's package), private, on loopback."""

from __future__ import annotations

from tests.kit.daemons import Rspamd
from tests.kit.mimemaker import HAM, gtube
from tests.kit.ports import free_port
from tests.kit.sink import Sink

from ..conftest import GateFactory, sample


async def test_gtube_scored_and_refused_at_threshold(
    gate_factory: GateFactory, rspamd: Rspamd, sink: Sink
) -> None:
    gate = await gate_factory(
        f'[rspamd]\nurl = "http://{rspamd.address}"\ncount_symbols = ["GTUBE"]\n'
        "[scoring]\nreject = 15\ntag = 5\n"
    )
    hits = sample("spamgate_scanner_symbols_total", check="rspamd", symbol="GTUBE")
    rejects = sample("spamgate_content_scans_total", check="rspamd", result="reject")
    replies = await gate.send(gtube())
    assert replies[-1].code == 550
    assert replies[-1].text == "5.7.1 Message refused as spam (score 15.0)"
    assert sample("spamgate_scanner_symbols_total", check="rspamd", symbol="GTUBE") == hits + 1
    assert sample("spamgate_content_scans_total", check="rspamd", result="reject") == rejects + 1
    replies = await gate.send(HAM)
    assert replies[-1].code == 250 and len(sink.messages) == 1


async def test_action_mode_and_symbols(
    gate_factory: GateFactory, rspamd: Rspamd, sink: Sink
) -> None:
    gate = await gate_factory(f'[rspamd]\nurl = "http://{rspamd.address}"\nmode = "action"\n')
    replies = await gate.send(gtube())
    assert replies[-1].code == 554
    assert replies[-1].text == "5.7.1 Message refused as spam (rspamd score 15)"
    gate = await gate_factory(
        f'[rspamd]\nurl = "http://{rspamd.address}"\nweight = 0.5\n[scoring]\ntag = 5\n'
    )
    assert (await gate.send(gtube("half")))[-1].code == 250  # 7.5: tagged only
    content = sink.messages[0].content
    assert b"X-Spam-Score: 7.5" in content
    assert b"RSPAMD_GTUBE" in content


async def test_rspamd_down(gate_factory: GateFactory, sink: Sink) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gate = await gate_factory(f'[rspamd]\nurl = "{dead}"\n')
    outages = sample("spamgate_backend_outages_total", check="rspamd")
    assert (await gate.send(gtube()))[-1].code == 250
    assert (await gate.send(gtube("again")))[-1].code == 250
    assert sample("spamgate_backend_outages_total", check="rspamd") == outages + 1
    gate = await gate_factory(f'[rspamd]\nurl = "{dead}"\non_error = "tempfail"\n')
    assert (await gate.send(gtube("t")))[-1].code == 451
    assert len(sink.messages) == 2
