"""The finding-code catalogue policy files may name (kept in sync with mailguard.checks' docstring).

A test compares this table with the catalogue in `mailguard/checks/__init__.py`, so a code added
there without being added here (or the reverse) fails CI instead of failing a policy at start-up.
"""

from __future__ import annotations

from types import MappingProxyType

# code -> what `count` means (what a threshold in `when` compares against)
KNOWN_CODES: MappingProxyType[str, str] = MappingProxyType(
    {
        "recipient.visible_external": "addresses",
        "recipient.external_parties": "parties",
        "recipient.external": "recipients",
        "recipient.bcc_header": "addresses",
        "recipient.hidden": "recipients",
        "domain.external": "domains",
        "domain.first_time": "domains",
        "domain.lookalike": "domains",
        "domain.nonexistent": "domains",
        "domain.null_mx": "domains",
        "domain.dns_unavailable": "domains",
        "domain.history_unavailable": "domains",
        "attachment.present": "files",
        "attachment.unencrypted": "files",
        "attachment.encrypted": "files",
        "attachment.unknown": "files",
        "attachment.limit": "files",
        "attachment.inline": "files",
        "message.malformed": "defects",
        "message.limit": "1",
    }
)


def parse_catalogue(docstring: str) -> dict[str, str]:
    """Read `code   description   count = X` lines out of the checks package docstring."""
    out: dict[str, str] = {}
    for line in docstring.splitlines():
        parts = line.split()
        if len(parts) >= 3 and "." in parts[0] and parts[-2] == "=" and parts[-3] == "count":
            out[parts[0]] = parts[-1]
    return out
