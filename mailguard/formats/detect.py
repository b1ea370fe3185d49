"""File sniffing: what a file really is, from its bytes, and whether it is encrypted.

`sniff(data, filename)` is pure, never raises and does bounded work (see `SniffLimits`). The
filename is only a hint for naming (e.g. which Office application an encrypted container holds);
the verdict comes from the bytes. `encrypted` is True (protected), False (readable by anyone who
gets the file, including a partly protected archive or a PDF with only an owner password) or
None (cannot tell); `detail` says why in one sentence.
"""

from __future__ import annotations

import logging

from mailguard.formats import cfb, cryptmsg, pdf, rar, sevenz, simple, tnef, zipfmt
from mailguard.formats.base import Budget, FileInfo, SniffLimits

__all__ = ["DEFAULT_LIMITS", "is_encrypted", "sniff", "sniff_unguarded"]

log = logging.getLogger(__name__)

DEFAULT_LIMITS = SniffLimits()


def sniff(
    data: bytes,
    filename: str = "",
    limits: SniffLimits = DEFAULT_LIMITS,
    *,
    budget: Budget | None = None,
) -> FileInfo:
    """What `data` is and whether it is encrypted. Never raises.

    `budget` shares one decompression budget across several files (the files of one message);
    without it each call gets a fresh one from `limits`.
    """
    try:
        return sniff_unguarded(data, filename, budget if budget is not None else Budget(limits), 0)
    except Exception as e:  # a parser bug must cost a verdict, never the message
        log.warning("sniff %r: %s: %s", filename, type(e).__name__, e)
        return FileInfo(
            "other",
            "application/octet-stream",
            None,
            f"could not analyse ({type(e).__name__})",
            limited=True,
        )


def is_encrypted(data: bytes, filename: str = "") -> bool:
    """True only when the bytes show the file is protected; "cannot tell" (None) counts as clear.

    The one encryption verdict for actions (the zip transform skips files already encrypted):
    encrypting twice costs less than a leak.
    """
    return sniff(data, filename).encrypted is True


def sniff_unguarded(data: bytes, filename: str, budget: Budget, depth: int) -> FileInfo:
    """`sniff` without the safety net (the fuzz tests call this to find parser bugs)."""
    data = bytes(data)

    def inner(sub: bytes, name: str) -> FileInfo:
        return sniff_unguarded(sub, name, budget, depth + 1)

    if not data:
        return FileInfo("empty", "application/x-empty", False, "empty file")
    # At the depth limit containers are judged by their own headers only.
    nested = inner if depth < budget.limits.max_depth else None
    head = data[:8]
    if head.startswith((zipfmt.LOCAL_SIG, zipfmt.EOCD_SIG)):
        return zipfmt.sniff_zip(data, budget, nested)
    if head.startswith(b"MZ") and zipfmt.find_eocd(data) > 0:  # self-extracting zip?
        sfx = zipfmt.sniff_zip(data, budget, nested)
        if sfx.encrypted is not None:
            return sfx
    if head == cfb.MAGIC:
        return cfb.sniff_cfb(data, filename)
    if head.startswith(sevenz.MAGIC):
        return sevenz.sniff_7z(data)
    if head.startswith(rar.RAR4[:6]):
        return rar.sniff_rar(data, budget.limits.max_entries)
    if head.startswith(tnef.MAGIC):
        return tnef.sniff_tnef(data, budget, nested)
    if data.find(b"%PDF-", 0, 1024) >= 0:  # viewers accept junk before the header
        return pdf.sniff_pdf(data)
    found = cryptmsg.sniff_cms(data)
    if found:
        return found
    found = simple.sniff_magic(data)
    if found:
        return found
    found = cryptmsg.sniff_armor(data) or cryptmsg.sniff_pem_cms(data)
    if found:
        return found
    got = cryptmsg.pgp_packets(data[: 1 << 16])
    # A plain (signed/compressed/literal) packet header is 1-2 bytes any random file can start
    # with: trust it only by file name; encrypted packets are checked much more strictly.
    if got is not None and (got[0] or filename.lower().endswith((".gpg", ".pgp", ".sig"))):
        enc, what = got
        return FileInfo("pgp", cryptmsg.PGP, enc, what)
    return simple.sniff_text(data, filename) or simple.sniff_unknown(data)
