"""File formats from their bytes: what a file really is and whether it is encrypted.

A leaf package (it imports nothing else from mailguard): the checks stage reports on attached
files with `sniff`, the zip transform asks `is_encrypted` which files to leave alone. One sniffer
per family in its own module (zipfmt, cfb, pdf, sevenz, rar, tnef, cryptmsg, simple); `detect`
dispatches on the magic bytes.
"""

from mailguard.formats.base import Budget, FileInfo, SniffLimits
from mailguard.formats.detect import DEFAULT_LIMITS, is_encrypted, sniff, sniff_unguarded

__all__ = [
    "DEFAULT_LIMITS",
    "Budget",
    "FileInfo",
    "SniffLimits",
    "is_encrypted",
    "sniff",
    "sniff_unguarded",
]
