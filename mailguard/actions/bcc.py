"""Bcc rewrite: move visible external recipients out of To/Cc; the envelope is not touched.

Everybody still gets the message (delivery follows the SMTP envelope, not the headers); only
what recipients can see of each other changes. Only the To and Cc lines are rewritten; every
other byte of the message stays as it came. Kept addresses are re-emitted from their original
raw text, so their Japanese display names (encoded words, raw UTF-8, even raw JIS) are intact.

Options:
  is_internal            Callable[[str], bool] on a lowercase A-label domain (or `internal`: a
                         list of patterns as in the policy, "*.x" = subdomains); neither = no
                         domain is internal, so every recipient is moved.
  keep_internal_visible  bool, default True: internal recipients stay in To/Cc.
  to_placeholder         "undisclosed" (default: `To: undisclosed-recipients:;`, an empty RFC 5322
                         group) or "sender" (To shows the From mailbox), used when To ends empty.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailguard.actions.base import Rewritten
from mailguard.actions.headers import (
    RawField,
    field_value,
    fold_list,
    header_end,
    line_ending,
    split_fields,
)
from mailguard.message.addresses import parse_addresses

if TYPE_CHECKING:
    from mailguard.message import MessageView

TRACE_HEADER = "X-MailGuard-Bcc"
UNDISCLOSED = b"undisclosed-recipients:;"
_WS = b" \t\r\n"


@dataclass(slots=True)
class _Group:
    name: bytes
    members: list[bytes] = field(default_factory=list)


_Entry = bytes | _Group


def split_address_list(value: bytes) -> list[_Entry]:
    """Top-level items of an address-list value, as raw byte slices (groups keep their members).

    Commas inside quoted strings, comments, angle brackets (source routes) and raw ISO-2022-JP
    kanji runs (whose bytes include `"`, `(` and `,`) do not split.
    """
    entries: list[_Entry] = []
    group: _Group | None = None
    start = 0
    depth = 0  # comment nesting
    quoted = angle = kanji = False
    i, n = 0, len(value)

    def add(item: bytes) -> None:
        if item.strip(_WS):
            (group.members if group is not None else entries).append(item)

    while i < n:
        c = value[i]
        if c == 0x1B:  # ISO-2022-JP escape: ESC $ B / ESC $ @ start kanji, ESC ( B|J end it
            seq = value[i + 1 : i + 3]
            if seq[:1] == b"$":
                kanji = True
            elif seq[:1] == b"(":
                kanji = False
            i += 3
            continue
        if kanji:
            i += 1
            continue
        if c == 0x5C and (quoted or depth):  # backslash escape
            i += 2
            continue
        if quoted:
            quoted = c != 0x22
        elif c == 0x22:
            quoted = True
        elif c == 0x28:
            depth += 1
        elif c == 0x29 and depth:
            depth -= 1
        elif depth:
            pass
        elif c == 0x3C:
            angle = True
        elif c == 0x3E:
            angle = False
        elif angle:
            pass
        elif c == 0x2C:  # ,
            add(value[start:i])
            start = i + 1
        elif c == 0x3A and group is None:  # : opens a group
            group = _Group(value[start:i])
            start = i + 1
        elif c == 0x3B and group is not None:  # ; closes it
            add(value[start:i])
            entries.append(group)
            group = None
            start = i + 1
        i += 1
    add(value[start:])
    if group is not None:
        entries.append(group)
    return entries


def _internal_predicate(options: Mapping[str, Any]) -> Callable[[str], bool]:
    pred = options.get("is_internal")
    if callable(pred):
        return pred  # type: ignore[no-any-return]
    patterns: Sequence[str] = tuple(options.get("internal") or ())

    def match(domain: str) -> bool:
        for p in patterns:
            p = p.lower()
            if (p.startswith("*.") and domain.endswith(p[1:])) or domain == p:
                return True
        return False

    return match


@dataclass(slots=True)
class _Plan:
    kept: list[bytes] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # addresses, for the log


def _sort_item(item: bytes, header: str, move: Callable[[str], bool], plan: _Plan) -> None:
    addrs = parse_addresses(header, [item.decode("ascii", "surrogateescape")])
    if addrs and any(move(a.domain) for a in addrs):
        plan.moved.extend(a.addr for a in addrs)
    else:
        plan.kept.append(item.strip(_WS))


def _plan(value: bytes, header: str, move: Callable[[str], bool], plan: _Plan) -> None:
    for entry in split_address_list(value):
        if isinstance(entry, _Group):
            sub = _Plan()
            for m in entry.members:
                _sort_item(m, header, move, sub)
            plan.moved.extend(sub.moved)
            if sub.kept or not sub.moved:  # keep named groups, drop ones we emptied
                plan.kept.append(entry.name.strip(_WS) + b": " + b", ".join(sub.kept) + b";")
        else:
            _sort_item(entry, header, move, plan)


def _is_placeholder(items: list[bytes]) -> bool:
    """True when To has no mailbox left (only empty groups such as undisclosed-recipients:;)."""
    return all(not parse_addresses("to", [i.decode("ascii", "surrogateescape")]) for i in items)


class BccRewrite:
    """The "bcc" transform (see module docstring for options)."""

    name = "bcc"

    def apply(self, raw: bytes, view: MessageView, options: Mapping[str, Any]) -> Rewritten:
        internal = _internal_predicate(options)
        keep_internal = bool(options.get("keep_internal_visible", True))

        def move(domain: str) -> bool:
            return not (keep_internal and internal(domain))

        end = view.header_end or header_end(raw)
        fields = split_fields(raw, end)
        nl = line_ending(raw)
        to_f = [f for f in fields if f.key() == "to"]
        cc_f = [f for f in fields if f.key() == "cc"]
        to_plan, cc_plan = _Plan(), _Plan()
        for f in to_f:
            _plan(field_value(raw, f), "to", move, to_plan)
        for f in cc_f:
            _plan(field_value(raw, f), "cc", move, cc_plan)
        moved = to_plan.moved + cc_plan.moved
        if not moved:
            return Rewritten(raw)

        placeholder = ""
        to_items = to_plan.kept
        if not to_items or _is_placeholder(to_items):
            to_items, placeholder = self._placeholder(raw, fields, options)
        to_name = to_f[0].name if to_f else "To"
        new_to = fold_list(to_name, to_items, nl)
        new_cc = fold_list(cc_f[0].name, cc_plan.kept, nl) if cc_f and cc_plan.kept else b""

        # replacements: first To/Cc field gets the new line, later duplicates are dropped
        edits: list[tuple[RawField, bytes]] = []
        if to_f:
            if to_plan.moved or placeholder or len(to_f) > 1:  # an untouched To keeps its bytes
                edits.append((to_f[0], new_to))
                edits += [(f, b"") for f in to_f[1:]]
            if cc_plan.moved or len(cc_f) > 1:
                edits += [(f, new_cc if i == 0 else b"") for i, f in enumerate(cc_f)]
        else:  # no To at all: it takes the place of the first Cc
            edits += [(f, (new_to + new_cc) if i == 0 else b"") for i, f in enumerate(cc_f)]
        edits.sort(key=lambda e: e[0].start)

        n = len(moved)
        trace_line = f"{TRACE_HEADER}: moved {n} external recipient{'s' if n != 1 else ''} to Bcc"
        out = [trace_line.encode("ascii") + nl]
        pos = 0
        for f, new in edits:
            out += [raw[pos : f.start], new]
            pos = f.end
        out.append(raw[pos:])
        shown = placeholder or "kept"
        trace = f"bcc: moved {n} to Bcc ({', '.join(moved)}); To: {shown}"
        return Rewritten(b"".join(out), trace=trace)

    @staticmethod
    def _placeholder(
        raw: bytes, fields: list[RawField], options: Mapping[str, Any]
    ) -> tuple[list[bytes], str]:
        if options.get("to_placeholder", "undisclosed") == "sender":
            from_f = next((f for f in fields if f.key() == "from"), None)
            if from_f is not None:
                value = field_value(raw, from_f).strip(_WS)
                if value:
                    return [value], "sender"
        return [UNDISCLOSED], "undisclosed-recipients"
