"""DNS look-ups for the domain check: can this domain receive mail? (async, cached, bounded).

Verdicts (mailguard.checks.context.DnsStatus):

  ok           an MX other than the null MX, or (no MX) an A/AAAA record: mail can be delivered
  null_mx      the domain publishes MX 0 "." (RFC 7505): it accepts no mail
  nonexistent  NXDOMAIN, or the name exists but has no MX, A or AAAA, or is not a valid name
  unavailable  timeout, SERVFAIL, REFUSED, no usable nameserver: we could not tell —
               never reported as "nonexistent"; the policy decides what it means

Answers are cached for their TTL (negative answers for the SOA minimum, RFC 2308), clamped to
[min_ttl, max_ttl]; "unavailable" is cached briefly so a dead resolver does not stall every
message for a full timeout. Concurrent look-ups of the same domain share one query.

`on_lookup(result, seconds)` (optional) is told about every real look-up — not cache hits, not
look-ups shared with one already in flight, not names that are invalid before any query — once
per domain, with how long it took and its result in the metrics' vocabulary:

  ok, null_mx, nonexistent   the verdict of the same name
  timeout                    unavailable: no answer in time
  servfail                   unavailable: a nameserver answered SERVFAIL
  error                      unavailable: anything else (REFUSED, FORMERR, network error)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from mailguard.checks.context import DnsStatus

__all__ = ["DomainResolver"]

log = logging.getLogger(__name__)

LookupHook = Callable[[str, float], None]
# Why a query could not be answered, in mailguard.metrics.DNS_RESULTS' words.
TIMEOUT: Final = "timeout"
SERVFAIL: Final = "servfail"
ERROR: Final = "error"


class DomainResolver:
    """Mail-deliverability verdicts for domains, via dnspython's asyncio resolver."""

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        port: int = 53,
        timeout: float = 5.0,
        cache_size: int = 10_000,
        min_ttl: float = 60.0,
        max_ttl: float = 86_400.0,
        negative_ttl: float = 900.0,  # when a negative answer carries no SOA
        unavailable_ttl: float = 30.0,  # 0 = do not cache failures
        concurrency: int = 16,
        clock: Callable[[], float] = time.monotonic,
        on_lookup: LookupHook | None = None,
    ) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
        else:
            self._resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
        self._resolver.port = port
        # One try per server is bounded by `timeout`; the whole look-up (MX then A/AAAA) too.
        self._resolver.timeout = min(timeout, 2.0)
        self._resolver.lifetime = timeout
        self._resolver.search = []
        self._cache: OrderedDict[str, tuple[DnsStatus, float]] = OrderedDict()
        self._cache_size = cache_size
        self._min_ttl, self._max_ttl = min_ttl, max_ttl
        self._negative_ttl, self._unavailable_ttl = negative_ttl, unavailable_ttl
        self._sem = asyncio.Semaphore(concurrency)
        self._inflight: dict[str, asyncio.Future[DnsStatus]] = {}
        self._clock = clock
        self.on_lookup = on_lookup

    # -- cache ------------------------------------------------------------------------------

    def cached(self, domain: str) -> DnsStatus | None:
        """The cached verdict, if still fresh."""
        hit = self._cache.get(domain)
        if hit is None:
            return None
        status, expires = hit
        if expires <= self._clock():
            del self._cache[domain]
            return None
        self._cache.move_to_end(domain)
        return status

    def _store(self, domain: str, status: DnsStatus, ttl: float) -> None:
        if status == "unavailable":
            ttl = self._unavailable_ttl
        else:
            ttl = max(self._min_ttl, min(self._max_ttl, ttl))
        if ttl <= 0:
            return
        self._cache[domain] = (status, self._clock() + ttl)
        self._cache.move_to_end(domain)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    # -- look-ups ---------------------------------------------------------------------------

    async def status(self, domain: str) -> DnsStatus:
        """The verdict for one domain (lowercase A-label; a trailing dot is ignored)."""
        domain = domain.strip().rstrip(".").lower()
        if not domain:
            return "nonexistent"
        if domain.startswith("["):
            return "ok"  # a domain literal names a host address: nothing to look up
        hit = self.cached(domain)
        if hit is not None:
            return hit
        fut = self._inflight.get(domain)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[domain] = fut
        try:
            async with self._sem:
                started = time.perf_counter()
                status, ttl, why = await self._lookup(domain)
                if why is not None:  # a query was really sent
                    self._report(why, time.perf_counter() - started)
            self._store(domain, status, ttl)
            fut.set_result(status)
            return status
        except BaseException as e:  # cancelled: the waiters must not hang
            fut.set_exception(e)
            fut.exception()  # mark retrieved: no "never retrieved" warning if nobody waits
            raise
        finally:
            del self._inflight[domain]

    async def statuses(self, domains: Iterable[str]) -> dict[str, DnsStatus]:
        """Verdicts for several domains, concurrently (bounded by `concurrency`)."""
        uniq = list(dict.fromkeys(d for d in domains if d))
        results = await asyncio.gather(*(self.status(d) for d in uniq))
        return dict(zip(uniq, results, strict=True))

    def _report(self, result: str, seconds: float) -> None:
        if self.on_lookup is None:
            return
        try:
            self.on_lookup(result, seconds)
        except Exception:  # a broken metrics hook must not fail the domain check
            log.exception("dns: on_lookup hook failed")

    async def _lookup(self, domain: str) -> tuple[DnsStatus, float, str | None]:
        """(verdict, ttl, result for on_lookup, None when no query was sent)."""
        try:
            qname = dns.name.from_text(domain)
        except (dns.exception.DNSException, ValueError) as e:
            log.info("dns: %s: not a valid domain name (%s)", domain, e)
            return "nonexistent", self._negative_ttl, None
        mx = await self._query(qname, dns.rdatatype.MX)
        if mx[0] == "answer":
            answer = mx[1]
            exchanges = [r.exchange for r in answer.rrset] if answer.rrset else []
            ttl = float(answer.rrset.ttl) if answer.rrset else self._negative_ttl
            if exchanges and all(x == dns.name.root for x in exchanges):
                return "null_mx", ttl, "null_mx"
            if exchanges:
                return "ok", ttl, "ok"
        if mx[0] == "nxdomain":
            return "nonexistent", mx[2], "nonexistent"
        if mx[0] == "unavailable":
            return "unavailable", mx[2], mx[1]
        # No MX: RFC 5321 §5.1 implicit MX — the domain's own address records.
        worst_ttl = mx[2]
        failed: str | None = None  # why the first failed query failed
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            got = await self._query(qname, rdtype)
            if got[0] == "answer" and got[1].rrset:
                return "ok", float(got[1].rrset.ttl), "ok"
            if got[0] == "nxdomain":
                return "nonexistent", got[2], "nonexistent"
            if got[0] == "unavailable":
                failed = failed or got[1]
            worst_ttl = min(worst_ttl, got[2])
        if failed:
            return "unavailable", 0.0, failed
        return "nonexistent", worst_ttl, "nonexistent"

    async def _query(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> tuple[str, Any, float]:
        """(kind, Answer or None, ttl); kind is answer, nodata, nxdomain or unavailable.

        For unavailable, the second item says why: timeout, servfail or error.
        """
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as e:
            responses = e.kwargs.get("responses") or {}
            resp = next(iter(responses.values()), None)
            return "nxdomain", None, self._soa_ttl(resp)
        except dns.resolver.NoAnswer as e:  # pragma: no cover - raise_on_no_answer=False
            return "nodata", None, self._soa_ttl(e.kwargs.get("response"))
        except dns.resolver.YXDOMAIN:
            return "nxdomain", None, self._negative_ttl
        except dns.exception.Timeout as e:
            log.info("dns: %s %s: %s", qname, dns.rdatatype.to_text(rdtype), e)
            return "unavailable", TIMEOUT, 0.0
        except dns.resolver.NoNameservers as e:
            log.info("dns: %s %s: %s", qname, dns.rdatatype.to_text(rdtype), e)
            return "unavailable", _why_no_nameservers(e), 0.0
        except dns.exception.DNSException as e:
            log.warning("dns: %s %s: %s", qname, dns.rdatatype.to_text(rdtype), e)
            return "unavailable", ERROR, 0.0
        except OSError as e:  # network unreachable, no route: we could not ask
            log.warning("dns: %s %s: %s", qname, dns.rdatatype.to_text(rdtype), e)
            return "unavailable", ERROR, 0.0
        if answer.rrset is None:
            return "nodata", None, self._soa_ttl(answer.response)
        return "answer", answer, float(answer.rrset.ttl)

    def _soa_ttl(self, response: dns.message.Message | None) -> float:
        """RFC 2308: a negative answer lives min(SOA TTL, SOA MINIMUM)."""
        if response is not None:
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    return float(min(rrset.ttl, *(r.minimum for r in rrset)))
        return self._negative_ttl


def _why_no_nameservers(e: dns.resolver.NoNameservers) -> str:
    """servfail if a nameserver answered SERVFAIL, timeout if every try timed out, else error.

    dnspython lists each try as (server, tcp, port, exception or rcode text, answer).
    """
    errors = e.kwargs.get("errors") or []
    problems = [err[3] for err in errors if len(err) > 3]
    if any(p == "SERVFAIL" for p in problems):
        return SERVFAIL
    if problems and all(isinstance(p, dns.exception.Timeout) for p in problems):
        return TIMEOUT
    return ERROR
