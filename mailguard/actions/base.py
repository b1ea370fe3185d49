"""The transform seam: bytes in, new bytes out, plus notices for `notify` to send. No I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mailguard.message import MessageView


@dataclass(frozen=True, slots=True)
class Notice:
    """A mail the guard itself must send as a consequence of a transform (e.g. a zip password)."""

    kind: str  # "zip-password", …
    to: tuple[str, ...]  # envelope recipients of the notice
    data: Mapping[str, Any] = field(default_factory=dict)  # template variables (never logged)
    send_after: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True)
class Rewritten:
    raw: bytes
    notices: tuple[Notice, ...] = ()
    trace: str = ""  # what was changed, for the log and the trace header
    # Some transforms split one delivery into several (per-domain zip passwords):
    # each entry is (recipients, raw); empty = deliver `raw` to the original envelope.
    splits: tuple[tuple[tuple[str, ...], bytes], ...] = ()


class Transform(Protocol):
    name: str  # "bcc", "zip": the names policy files use

    def apply(self, raw: bytes, view: MessageView, options: Mapping[str, Any]) -> Rewritten: ...
