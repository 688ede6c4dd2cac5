"""DNS list site syntax (postscreen's) and query names (RFC 5782), as pure functions."""

from __future__ import annotations

import ipaddress

import pytest

from spamgate.app import loads
from spamgate.checks.engines.dnslist import Site, domain_query, ip_query
from spamgate.config.settings import ConfigError

V4 = ipaddress.IPv4Address


def test_site_syntax() -> None:
    s = Site.parse("Zen.Example.=127.0.0.[2..11]*3")
    assert (s.zone, s.weight, s.filter.text) == ("zen.example", 3.0, "127.0.0.[2..11]")
    assert s.matches(V4("127.0.0.2")) and s.matches(V4("127.0.0.11"))
    assert not s.matches(V4("127.0.0.1")) and not s.matches(V4("127.0.0.12"))
    allow = Site.parse("list.dnswl.test=127.0.[0..255].[1;3]*-5")
    assert allow.weight == -5
    assert allow.matches(V4("127.0.9.1")) and allow.matches(V4("127.0.9.3"))
    assert not allow.matches(V4("127.0.9.2"))
    plain = Site.parse("bl.test")
    assert plain.weight == 1 and plain.filter is None
    assert plain.matches(V4("127.0.0.2")) and not plain.matches(V4("10.0.0.2"))
    assert Site.parse("bl.test*0.5").weight == 0.5


@pytest.mark.parametrize(
    "text",
    [
        "",
        "bl",  # one label
        "bl..test",
        "bl.test=127.0.0",
        "bl.test=127.0.0.[2..]",
        "bl.test=127.0.0.[9..2]",
        "bl.test=127.0.0.256",
        "bl.test=127.0.0.[2-11]",
        "bl.test*x",
        "bl test",
    ],
)
def test_bad_sites_are_config_errors(text: str) -> None:
    with pytest.raises(ValueError):
        Site.parse(text)
    with pytest.raises(ConfigError) as err:
        loads(f'[dnsbl]\nthreshold = 2\nsites = ["{text}"]\n', "gate.toml")
    assert err.value.problems[0].startswith("gate.toml:3: [dnsbl] sites:")


def test_bad_symbol_names_are_config_errors() -> None:
    with pytest.raises(ConfigError) as err:
        loads('[rhsbl]\nsymbols = {"9x" = "dbl.test"}\n', "gate.toml")
    assert "is not a symbol name" in err.value.problems[0]
    cfg = loads('[rhsbl]\nsymbols = {DBL = "dbl.test=127.0.1.[2..99]*4"}\n')
    assert cfg.section("rhsbl").symbols == {"DBL": "dbl.test=127.0.1.[2..99]*4"}


def test_query_names() -> None:
    assert ip_query(ipaddress.ip_address("192.0.2.99"), "bl.test") == "99.2.0.192.bl.test"
    v6 = ip_query(ipaddress.ip_address("2001:db8::1:2"), "bl.test")
    assert v6 == "2.0.0.0.1.0.0.0" + ".0" * 16 + ".8.b.d.0.1.0.0.2.bl.test"
    assert len(v6.split(".")) == 32 + 2
    assert domain_query("Spammer.TEST.", "dbl.test") == "spammer.test.dbl.test"
    assert domain_query("bücher.test", "dbl.test") == "xn--bcher-kva.test.dbl.test"
    for not_a_domain in ("[127.0.0.1]", "localhost", "", "a..b", "x_" + "y" * 70 + ".test"):
        assert domain_query(not_a_domain, "dbl.test") is None
