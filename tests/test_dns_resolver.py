"""DomainResolver against a real DNS server on loopback (a dnspython responder the test starts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone
import pytest
import pytest_asyncio

from mailguard.dns import DomainResolver

ZONE = """\
$ORIGIN test.
$TTL 300
@            SOA   ns.test. hostmaster.test. 1 3600 600 86400 120
@            NS    ns.test.
ns           A     127.0.0.1
ok-mx        MX    10 mail.ok-mx
ok-mx        MX    20 mail2.ok-mx
mail.ok-mx   A     192.0.2.1
a-only       A     192.0.2.2
aaaa-only    AAAA  2001:db8::1
null-mx      MX    0 .
txt-only     TXT   "v=spf1 -all"
short-ttl    60    MX 10 mail.ok-mx
xn--r8jz45g  MX    10 mail.ok-mx
"""


@dataclass
class Responder(asyncio.DatagramProtocol):
    """Authoritative answers for the test zone; `timeout.*` never answers, `servfail.*` fails."""

    zone: dns.zone.Zone
    queries: list[tuple[str, str]] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = dns.message.from_wire(data)
        question = q.question[0]
        qname, rdtype = question.name, question.rdtype
        self.queries.append((qname.to_text(), dns.rdatatype.to_text(rdtype)))
        first = qname.labels[0] if qname.labels else b""
        if first == b"timeout" or (
            first.startswith(b"timeout-aaaa") and rdtype == dns.rdatatype.AAAA
        ):
            return  # silence: the client must time out
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        if first == b"servfail":
            r.set_rcode(dns.rcode.SERVFAIL)
        elif first == b"refused":
            r.set_rcode(dns.rcode.REFUSED)
        else:
            try:
                node = self.zone.get_node(qname)
            except KeyError:
                node = None
            rds = node.get_rdataset(dns.rdataclass.IN, rdtype) if node is not None else None
            if rds is not None:
                rrset = dns.rrset.RRset(qname, dns.rdataclass.IN, rdtype)
                rrset.update(rds)
                r.answer.append(rrset)
            else:
                if node is None:
                    r.set_rcode(dns.rcode.NXDOMAIN)
                soa = self.zone.get_rdataset(self.zone.origin, dns.rdatatype.SOA)
                assert soa is not None
                soa_rrset = dns.rrset.RRset(self.zone.origin, dns.rdataclass.IN, dns.rdatatype.SOA)
                soa_rrset.update(soa)
                r.authority.append(soa_rrset)
        assert self.transport is not None
        self.transport.sendto(r.to_wire(), addr)


@dataclass
class DnsServer:
    responder: Responder
    port: int

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.responder.queries if n == name)


@pytest_asyncio.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    zone = dns.zone.from_text(ZONE, origin="test.", relativize=False)
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: Responder(zone), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    yield DnsServer(proto, port)
    transport.close()


class Clock:
    """A settable monotonic clock (time is a seam, like the resolver's network)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver(server: DnsServer, **kw: object) -> DomainResolver:
    kw.setdefault("timeout", 0.5)
    return DomainResolver(["127.0.0.1"], port=server.port, **kw)  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("ok-mx.test", "ok"),
        ("OK-MX.test.", "ok"),  # case and trailing dot do not matter
        ("a-only.test", "ok"),  # no MX: implicit MX from A
        ("aaaa-only.test", "ok"),  # no MX, no A: AAAA
        ("null-mx.test", "null_mx"),
        ("txt-only.test", "nonexistent"),  # exists, but nothing to deliver to
        ("nosuch.test", "nonexistent"),  # NXDOMAIN
        ("timeout.test", "unavailable"),  # no answer at all: never "nonexistent"
        ("servfail.test", "unavailable"),
        ("refused.test", "unavailable"),
        ("xn--r8jz45g.test", "ok"),  # IDN in A-label form
        ("[192.0.2.7]", "ok"),  # domain literal: nothing to look up
        ("bad..name.test", "nonexistent"),  # not a valid name
    ],
)
async def test_status(dns_server: DnsServer, domain: str, expected: str) -> None:
    assert await resolver(dns_server).status(domain) == expected


@pytest.mark.asyncio
async def test_aaaa_timeout_after_no_mx_no_a_is_unavailable(dns_server: DnsServer) -> None:
    # NXDOMAIN would be "nonexistent", but here the name is unknown only because AAAA timed out.
    zone_name = "timeout-aaaa.test"
    dns_server.responder.zone.replace_rdataset(
        "timeout-aaaa.test.", dns.rdataset.from_text("IN", "TXT", 300, '"x"')
    )
    assert await resolver(dns_server).status(zone_name) == "unavailable"


@pytest.mark.asyncio
async def test_statuses_concurrent_and_bounded(dns_server: DnsServer) -> None:
    r = resolver(dns_server, concurrency=2)
    t0 = time.monotonic()
    got = await r.statuses(
        ["ok-mx.test", "null-mx.test", "nosuch.test", "timeout.test", "servfail.test", "ok-mx.test"]
    )
    assert got == {
        "ok-mx.test": "ok",
        "null-mx.test": "null_mx",
        "nosuch.test": "nonexistent",
        "timeout.test": "unavailable",
        "servfail.test": "unavailable",
    }
    assert time.monotonic() - t0 < 3.0  # the timeout is bounded by the resolver's lifetime


@pytest.mark.asyncio
async def test_cache_respects_ttl_and_negative_ttl(dns_server: DnsServer) -> None:
    clock = Clock()
    r = resolver(dns_server, clock=clock, min_ttl=1)
    assert await r.status("short-ttl.test") == "ok"
    assert await r.status("nosuch.test") == "nonexistent"
    assert dns_server.count("short-ttl.test.") == 1
    assert await r.status("short-ttl.test") == "ok"
    assert await r.status("nosuch.test") == "nonexistent"
    assert dns_server.count("short-ttl.test.") == 1  # served from cache
    assert dns_server.count("nosuch.test.") == 1  # negative answers are cached too
    clock.now += 61  # past the MX TTL (60), within the SOA minimum (120)
    await r.status("short-ttl.test")
    await r.status("nosuch.test")
    assert dns_server.count("short-ttl.test.") == 2
    assert dns_server.count("nosuch.test.") == 1
    clock.now += 60
    await r.status("nosuch.test")
    assert dns_server.count("nosuch.test.") == 2


@pytest.mark.asyncio
async def test_unavailable_is_cached_briefly(dns_server: DnsServer) -> None:
    clock = Clock()
    r = resolver(dns_server, clock=clock, unavailable_ttl=30)
    assert await r.status("servfail.test") == "unavailable"
    n = dns_server.count("servfail.test.")
    assert await r.status("servfail.test") == "unavailable"
    assert dns_server.count("servfail.test.") == n
    clock.now += 31
    await r.status("servfail.test")
    assert dns_server.count("servfail.test.") > n


@pytest.mark.asyncio
async def test_cache_max_size_evicts_oldest(dns_server: DnsServer) -> None:
    r = resolver(dns_server, cache_size=2)
    for d in ("ok-mx.test", "a-only.test", "null-mx.test"):
        await r.status(d)
    assert r.cached("ok-mx.test") is None
    assert r.cached("a-only.test") == "ok"
    assert r.cached("null-mx.test") == "null_mx"


@pytest.mark.asyncio
async def test_concurrent_lookups_of_one_domain_share_a_query(dns_server: DnsServer) -> None:
    r = resolver(dns_server)
    got = await asyncio.gather(*(r.status("ok-mx.test") for _ in range(10)))
    assert got == ["ok"] * 10
    assert dns_server.count("ok-mx.test.") == 1


@pytest.mark.asyncio
async def test_dead_nameserver_is_unavailable() -> None:
    # Nothing listens on this port: the query times out or is refused — "could not check".
    sock_probe = await asyncio.get_running_loop().create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    port = sock_probe[0].get_extra_info("sockname")[1]
    sock_probe[0].close()
    r = DomainResolver(["127.0.0.1"], port=port, timeout=0.3)
    assert await r.status("example.test") == "unavailable"


# ------------------------------------------------------------------ on_lookup (the metrics hook)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("domain", "result"),
    [
        ("ok-mx.test", "ok"),
        ("a-only.test", "ok"),
        ("null-mx.test", "null_mx"),
        ("nosuch.test", "nonexistent"),
        ("txt-only.test", "nonexistent"),
        ("timeout.test", "timeout"),
        ("servfail.test", "servfail"),
        ("refused.test", "error"),
    ],
)
async def test_on_lookup_reports_each_real_lookup(
    dns_server: DnsServer, domain: str, result: str
) -> None:
    from mailguard.metrics import DNS_RESULTS

    seen: list[tuple[str, float]] = []
    r = resolver(dns_server, timeout=0.4, on_lookup=lambda res, secs: seen.append((res, secs)))
    await r.status(domain)
    await r.status(domain)  # a cache hit: not a lookup
    assert [res for res, _ in seen] == [result]
    assert result in DNS_RESULTS
    secs = seen[0][1]
    assert 0 <= secs < 5
    if result == "timeout":
        assert secs >= 0.3  # the time really spent waiting


@pytest.mark.asyncio
async def test_on_lookup_skips_cache_shared_and_unsent(dns_server: DnsServer) -> None:
    seen: list[str] = []
    r = resolver(dns_server, on_lookup=lambda res, secs: seen.append(res))
    await asyncio.gather(*(r.status("ok-mx.test") for _ in range(5)))  # one shared query
    await r.status("[192.0.2.7]")  # a literal: nothing asked
    await r.status("bad..name.test")  # invalid: nothing asked
    await r.status("OK-MX.test.")  # cached
    assert seen == ["ok"]


@pytest.mark.asyncio
async def test_on_lookup_first_failure_decides_after_no_mx(dns_server: DnsServer) -> None:
    # MX: no data; A: no data; AAAA: times out -> unavailable because of a timeout
    dns_server.responder.zone.replace_rdataset(
        "timeout-aaaa.test.", dns.rdataset.from_text("IN", "TXT", 300, '"x"')
    )
    seen: list[str] = []
    r = resolver(dns_server, timeout=0.4, on_lookup=lambda res, secs: seen.append(res))
    assert await r.status("timeout-aaaa.test") == "unavailable"
    assert seen == ["timeout"]


@pytest.mark.asyncio
async def test_on_lookup_dead_nameserver(unused_udp_port: int) -> None:
    seen: list[str] = []
    r = DomainResolver(
        ["127.0.0.1"], port=unused_udp_port, timeout=0.3, on_lookup=lambda res, s: seen.append(res)
    )
    assert await r.status("example.test") == "unavailable"
    assert seen in (["timeout"], ["error"])


@pytest.mark.asyncio
async def test_on_lookup_feeds_the_metrics(dns_server: DnsServer) -> None:
    """Through the real Metrics helper: every label the hook gives is a pre-created one."""
    from prometheus_client.parser import text_string_to_metric_families

    from mailguard.metrics import Metrics

    mx = Metrics()
    r = resolver(dns_server, timeout=0.4, on_lookup=mx.dns_lookup)
    await r.statuses(["ok-mx.test", "servfail.test", "nosuch.test", "null-mx.test", "timeout.test"])
    body, _ = mx.render()
    got = {
        (s.name, s.labels.get("result", "")): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
        if s.name.startswith("mailguard_dns_lookup")
    }
    for res in ("ok", "servfail", "nonexistent", "null_mx", "timeout"):
        assert got[("mailguard_dns_lookups_total", res)] == 1, res
    assert ("mailguard_dns_lookups_total", "other") not in got
    assert got[("mailguard_dns_lookup_seconds_count", "")] == 5


@pytest.mark.asyncio
async def test_on_lookup_hook_failure_does_not_fail_the_check(dns_server: DnsServer) -> None:
    def broken(result: str, seconds: float) -> None:
        raise RuntimeError("metrics down")

    r = resolver(dns_server, on_lookup=broken)
    assert await r.status("ok-mx.test") == "ok"
