r"""A small authoritative DNS server on loopback for tests, built on dnspython.

Tests publish records from Python dicts and watch what reaches the server, so that
DNS behaviour (caching, in-flight de-duplication, timeouts, truncation) is proved on
the wire rather than assumed:

    dns_server.zone("bl.test", {"2.0.0.127": {"A": "127.0.0.2", "TXT": "listed"}})
    dns_server.count("2.0.0.127.bl.test", "A")   # queries received for that name
    dns_server.down = True                       # drop every query: a dead resolver
    dns_server.delay = 0.5                       # answer every query late
    dns_server.fail("x.test")                    # SERVFAIL for one name
    dns_server.zone("z.test", {"@": {"TXT": r"\# 0"}})  # RFC 3597 raw rdata: no strings

It stands in for the resolver spamgate talks to, so "the world" is the published
zones: a name outside every zone gets NXDOMAIN (with an SOA, so negative caching is
exercised too). It answers over UDP and TCP on one port; a UDP answer too large for
the client's buffer is truncated (TC) so the client retries over TCP, as with a real
server. `python -m tests.kit.dnsserver --port P ZONES.json` serves zones from a file
(the benchmark runs it as a separate process).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import signal
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

# A record value: zone-file rdata text ("127.0.0.2", "10 mx.test.", '"quoted txt"'),
# or a list of them. TXT values are quoted for you unless they start with a quote.
# RFC 3597's generic form ("\# 2 abcd") is sent as those bytes, unparsed: data
# that dnspython would refuse to build, such as a TXT record of zero strings ("\# 0").
Value = str | list[str]
Records = Mapping[str, Mapping[str, Value]]

log = logging.getLogger("tests.kit.dnsserver")

_ROOT_SOA = "a.root.test. hostmaster.root.test. 1 3600 600 86400 300"


def _txt_rdata(text: str) -> str:
    """Unquoted text → quoted TXT rdata in 255-byte strings (other bytes as \\DDD)."""
    if text.startswith('"'):
        return text
    raw = text.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join('"' + "".join(map(_txt_char, chunk)) + '"' for chunk in chunks)


def _txt_char(byte: int) -> str:
    if 0x20 <= byte < 0x7F and byte not in b'"\\':
        return chr(byte)
    return f"\\{byte:03d}"


class Zone:
    """One zone: rdatasets by (owner name, type)."""

    def __init__(self, origin: str, records: Records, ttl: int, negative_ttl: int) -> None:
        self.origin = dns.name.from_text(origin)
        self.ttl = ttl
        self.rrsets: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        self.names: set[dns.name.Name] = set()
        soa = f"ns.{self.origin} hostmaster.{self.origin} 1 3600 600 86400 {negative_ttl}"
        self.add("@", "SOA", soa)
        self.add("@", "NS", f"ns.{self.origin}")
        for owner, types in records.items():
            for rdtype, value in types.items():
                for item in [value] if isinstance(value, str) else value:
                    self.add(owner, rdtype, item)

    def _owner(self, owner: str) -> dns.name.Name:
        if owner == "@":
            return self.origin
        return dns.name.from_text(owner, origin=self.origin)

    def add(self, owner: str, rdtype: str, value: str, ttl: int | None = None) -> None:
        name = self._owner(owner)
        kind = dns.rdatatype.from_text(rdtype)
        rdata: dns.rdata.Rdata
        if value.startswith("\\#"):
            _, length, *data = value.split()
            raw = bytes.fromhex("".join(data))
            assert len(raw) == int(length), value
            rdata = dns.rdata.GenericRdata(dns.rdataclass.IN, kind, raw)
        else:
            text = _txt_rdata(value) if kind == dns.rdatatype.TXT else value
            rdata = dns.rdata.from_text(
                dns.rdataclass.IN, kind, text, origin=self.origin, relativize=False
            )
        key = (name, kind)
        if key not in self.rrsets:
            self.rrsets[key] = dns.rrset.RRset(name, dns.rdataclass.IN, kind)
        self.rrsets[key].add(rdata, self.ttl if ttl is None else ttl)
        self.names.add(name)

    def soa(self) -> dns.rrset.RRset:
        return self.rrsets[(self.origin, dns.rdatatype.SOA)]

    def exists(self, name: dns.name.Name) -> bool:
        """The name owns records, or is an empty non-terminal above one that does."""
        return name in self.names or any(n.is_subdomain(name) for n in self.names)

    def wildcard(self, name: dns.name.Name) -> dns.name.Name | None:
        """The wildcard owner covering `name`, if any (RFC 4592, simplified)."""
        parent = name.parent()
        while parent.is_subdomain(self.origin):
            if self.exists(parent):
                star = dns.name.Name((b"*", *parent.labels))
                return star if star in self.names else None
            if parent == self.origin:
                break
            parent = parent.parent()
        return None


class DnsServer:
    """An authoritative server for test zones on 127.0.0.1 (UDP and TCP, one port)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.zones: dict[dns.name.Name, Zone] = {}
        # Queries received, by (lower-case name without the final dot, type), even
        # when `down` drops them.
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.down = False
        self.delay = 0.0
        self.delays: dict[str, float] = {}  # per name (lower case, no final dot)
        self.failing: set[str] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- publishing --------------------------------------------------------------------

    def zone(
        self,
        origin: str,
        records: Records | None = None,
        *,
        ttl: int = 300,
        negative_ttl: int = 300,
    ) -> Zone:
        """Publish (or replace) a zone; `records` maps owner → {type: value(s)}."""
        z = Zone(origin, records or {}, ttl, negative_ttl)
        self.zones[z.origin] = z
        return z

    def fail(self, *names: str) -> None:
        """Answer SERVFAIL for these names, as a broken authoritative server would."""
        self.failing.update(_key(n) for n in names)

    def count(self, name: str, rdtype: str | None = None) -> int:
        key = _key(name)
        return sum(n for (q, t), n in self.queries.items() if q == key and rdtype in (None, t))

    @property
    def total(self) -> int:
        return sum(self.queries.values())

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- answering ---------------------------------------------------------------------

    def _find_zone(self, name: dns.name.Name) -> Zone | None:
        best: Zone | None = None
        for origin, zone in self.zones.items():
            if name.is_subdomain(origin) and (best is None or len(origin) > len(best.origin)):
                best = zone
        return best

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        q = query.question[0]
        if _key(q.name.to_text()) in self.failing:
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        name = q.name
        seen: set[dns.name.Name] = set()
        for _ in range(8):  # CNAME chain within our zones
            if name in seen:  # a CNAME loop: the chain so far, as BIND answers it
                return response
            seen.add(name)
            zone = self._find_zone(name)
            if zone is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(_root_soa())
                return response
            owner = name
            if not zone.exists(name):
                star = zone.wildcard(name)
                if star is None:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                    response.authority.append(zone.soa())
                    return response
                owner = star
            rrset = zone.rrsets.get((owner, q.rdtype))
            if rrset is not None:
                response.answer.append(_renamed(rrset, name))
                return response
            cname = zone.rrsets.get((owner, dns.rdatatype.CNAME))
            if cname is None or q.rdtype == dns.rdatatype.CNAME:
                response.authority.append(zone.soa())  # NOERROR, no data
                return response
            response.answer.append(_renamed(cname, name))
            name = cname[0].target
        return response

    def _respond(self, query: dns.message.Message, udp: bool) -> bytes | None:
        if self.down:
            return None
        response = self.answer(query)
        if not udp:
            return response.to_wire(max_size=65535)
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    async def _later(self, wire: bytes, send, udp: bool) -> None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return
        name = ""
        if query.question:
            q = query.question[0]
            name = _key(q.name.to_text())
            self.queries[(name, dns.rdatatype.to_text(q.rdtype))] += 1
        delay = self.delays.get(name, self.delay)
        if delay:
            await asyncio.sleep(delay)
        try:
            out = self._respond(query, udp)
        except Exception:  # a bug here must show, not look like a dead server
            log.exception("test DNS server failed to answer")
            return
        if out is not None:
            send(out)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- transports --------------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        """Listen on `port`, or on a free port shared by UDP and TCP."""
        for _ in range(20):
            udp = await self._bind_udp(port)
            bound = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._tcp_client, self.host, bound)
            except OSError:
                udp.close()
                if port:
                    raise
                continue
            self._udp, self.port = udp, bound
            return
        raise RuntimeError("no free port for the test DNS server")

    async def _bind_udp(self, port: int) -> asyncio.DatagramTransport:
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr) -> None:
                def send(out: bytes) -> None:
                    if not self.transport.is_closing():
                        self.transport.sendto(out, addr)

                server._spawn(server._later(data, send, udp=True))

        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, port))
        return udp

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(out: bytes) -> None:
            if not writer.is_closing():
                writer.write(struct.pack("!H", len(out)) + out)

        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                wire = await reader.readexactly(length)
                self._spawn(self._later(wire, send, udp=False))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 1)


def _key(name: str) -> str:
    return name.lower().rstrip(".")


def _root_soa() -> dns.rrset.RRset:
    return dns.rrset.from_text(".", 300, "IN", "SOA", _ROOT_SOA)


def _renamed(rrset: dns.rrset.RRset, name: dns.name.Name) -> dns.rrset.RRset:
    """The rrset under `name` (wildcard synthesis; a no-op otherwise)."""
    if rrset.name == name:
        return rrset
    out = dns.rrset.RRset(name, rrset.rdclass, rrset.rdtype)
    out.update(rrset)
    return out


def load_zones(server: DnsServer, spec: Mapping[str, Any]) -> None:
    """{"origin": {"ttl": 300, "records": {owner: {type: value}}}} → zones."""
    for origin, zone in spec.items():
        server.zone(origin, zone.get("records", {}), ttl=zone.get("ttl", 300))


async def _serve(port: int, files: Iterable[str]) -> None:
    server = DnsServer()
    for path in files:
        with open(path, encoding="utf-8") as fh:
            load_zones(server, json.load(fh))
    await server.start(port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # SIGUSR1 prints the number of queries received so far (the benchmark reads it).
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(f"queries {server.total}", flush=True))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"serving {len(server.zones)} zones on {server.address}", flush=True)
    await stop.wait()
    await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve test zones from JSON files.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("zones", nargs="+", help='JSON: {"origin": {"records": {...}}}')
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.zones))


if __name__ == "__main__":
    main()
