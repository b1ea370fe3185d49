"""What checks need to know besides the message: the organisation, delivery history, DNS answers.

Checks do no I/O: everything here is looked up before the checks run and passed in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

DnsStatus = Literal["ok", "nonexistent", "null_mx", "unavailable"]


def _match(domain: str, patterns: tuple[str, ...]) -> bool:
    for p in patterns:
        if p.startswith("*."):
            if domain.endswith(p[1:]):
                return True
        elif domain == p:
            return True
    return False


@dataclass(frozen=True, slots=True)
class Org:
    """The organisation from the policy file. Domains are lowercase A-labels; `*.x` = subdomains."""

    internal: tuple[str, ...] = ()
    trusted: tuple[str, ...] = ()
    freemail: tuple[str, ...] = ()  # domains where each mailbox is its own party

    def is_internal(self, domain: str) -> bool:
        return _match(domain, self.internal)

    def is_trusted(self, domain: str) -> bool:
        return _match(domain, self.trusted)

    def is_freemail(self, domain: str) -> bool:
        return _match(domain, self.freemail)


@dataclass(frozen=True, slots=True)
class CheckContext:
    org: Org = field(default_factory=Org)
    # domain (A-label) -> number of past messages the organisation sent there; None = no history
    history: Mapping[str, int] | None = None
    # domain (A-label) -> DNS verdict; None = DNS not consulted (offline): no DNS findings
    dns: Mapping[str, DnsStatus] | None = None
    # history is None because the history store could not be read (not because there is none)
    history_unavailable: bool = False


class HistorySnapshot(Mapping[str, int]):
    """Counts for one message's domains plus the frequently used set (CheckContext.history).

    `frequent` is the same frozenset object between refreshes, so the domain check can reuse its
    look-alike index instead of rebuilding it per message.
    """

    __slots__ = ("_counts", "frequent")

    def __init__(self, counts: Mapping[str, int], frequent: frozenset[str]) -> None:
        self._counts = dict(counts)
        self.frequent = frequent

    def __getitem__(self, key: str) -> int:
        return self._counts[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return f"HistorySnapshot({self._counts!r}, frequent={len(self.frequent)})"
