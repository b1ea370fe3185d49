"""Shared values of the byte sniffers: what a file is (FileInfo) and how much work we allow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SniffLimits:
    """Bounds on the work one `sniff()` may do; hitting one sets `FileInfo.limited`."""

    max_entries: int = 4096  # zip/7z/rar/tnef entries read; more = limited (zip bomb by count)
    max_declared_member: int = 1 << 30  # one entry declaring more than 1 GiB = bomb-like
    max_declared_total: int = 4 << 30  # all entries together
    max_depth: int = 4  # containers inside containers
    max_inner_bytes: int = 64 << 20  # total bytes decompressed to look inside members
    max_inspect_members: int = 200  # members whose content we sniff (the rest: flags only)
    max_members_listed: int = 100  # FileInfo.members kept for the report
    max_scan: int = 64 << 20  # bytes of one file we scan at all (larger: head and tail only)


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What a file is, from its bytes. `encrypted` None means we cannot tell."""

    kind: str  # "zip", "pdf", "ooxml", "ole", "7z", "rar", "smime", "pgp", "tnef", "image", ...
    mime: str  # the real type from the bytes
    encrypted: bool | None
    detail: str = ""  # one plain sentence: "3 of 5 entries encrypted (AES-256)"
    members: tuple[FileInfo, ...] = ()  # entries of a container, when useful (bounded)
    limited: bool = False  # a bound was hit (bomb, entry count, nesting): verdict may be partial
    name: str = ""  # the entry's name inside its container ("" at top level)
    size: int = 0  # bytes (declared uncompressed size for container members)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "mime": self.mime,
            "encrypted": self.encrypted,
            "detail": self.detail,
        }
        if self.name:
            out["name"] = self.name
        if self.limited:
            out["limited"] = True
        if self.members:
            out["members"] = [m.to_json() for m in self.members]
        return out


class Budget:
    """Mutable work counter shared by one top-level sniff and everything nested in it."""

    __slots__ = ("inner_bytes", "limits")

    def __init__(self, limits: SniffLimits) -> None:
        self.limits = limits
        self.inner_bytes = limits.max_inner_bytes

    def take(self, n: int) -> bool:
        """Reserve n decompressed bytes; False when the budget cannot cover them."""
        if n > self.inner_bytes:
            return False
        self.inner_bytes -= n
        return True


# A nested sniff: (bytes, name) -> FileInfo, with depth and budget already bound.
Inner = Callable[[bytes, str], FileInfo]


def combine(statuses: list[bool | None]) -> bool | None:
    """All protected → True; any clear → False (a partly protected container is not protected)."""
    if not statuses:
        return False
    if any(s is False for s in statuses):
        return False
    if all(s is True for s in statuses):
        return True
    return None


def u16(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 2], "little")


def u32(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 4], "little")


def u64(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 8], "little")


def decode_name(raw: bytes, utf8: bool = False) -> str:
    """Entry names: UTF-8 when flagged; else UTF-8 if valid, CP932 (Japanese Windows), CP437."""
    if utf8:
        return raw.decode("utf-8", "replace")
    for enc in ("utf-8", "cp932"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("cp437", "replace")
