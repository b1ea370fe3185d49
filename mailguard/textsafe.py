"""Values from a message shown in the guard's own notices and pages: data, never instructions.

A subject, a display name, a file name or a finding's evidence comes from whoever wrote the
message. Shown by the guard (a trusted sender, a trusted page) it must not be able to pose as the
guard's own text: `data_text` turns it into one harmless line — CR, LF and every other control
character become a space, Unicode bidi and invisible format controls (U+202A–U+202E,
U+2066–U+2069, U+200B–U+200F, U+061C, U+2028/U+2029, U+FEFF …) are removed, URL schemes are
defanged (`https://x` → `https[:]//x`, `www.` → `www[.]`) so no mail client turns them into
links, runs of spaces collapse, and the length is capped (with "…"). `quoted` adds visible
quotes (「…」 in Japanese, “…” in English) so a reader sees where the data begins and ends.

Leaf module (standard library only): used by mailguard.notify and mailguard.web alike.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

DEFAULT_LIMIT: Final = 200
NAME_LIMIT: Final = 120  # display names, file names
# Bidi embeddings/overrides/isolates, marks, zero-width and other invisible format characters.
_INVISIBLE = re.compile(
    "[\u061c\u115f\u1160\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f"
    "\ufeff\uffa0\ufff9-\ufffb]"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u0085]")
_SCHEME = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]{1,15}):(/{1,2}|\\{1,2})")
_WWW = re.compile(r"\b(www)\.", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\u00a0\u3000]{2,}")
_QUOTES: Final = {"ja": ("「", "」"), "en": ("“", "”")}


def data_text(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """One safe line of display text for a value from a message (see the module text)."""
    s = value if isinstance(value, str) else str(value)
    if not s:
        return ""
    s = _INVISIBLE.sub("", s)
    s = "".join(
        " " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in _CONTROL.sub(" ", s)
    )
    s = _SCHEME.sub(lambda m: f"{m[1]}[:]{m[2]}", s)
    s = _WWW.sub(lambda m: f"{m[1]}[.]", s)
    s = _SPACES.sub(" ", s).strip()
    if limit > 0 and len(s) > limit:
        s = s[: limit - 1].rstrip() + "…"
    return s


def quoted(value: object, lang: str = "ja", limit: int = DEFAULT_LIMIT) -> str:
    """`data_text(value)` in visible quotes: 「…」 (ja) or “…” (en); "" stays ""."""
    s = data_text(value, limit)
    if not s:
        return ""
    open_q, close_q = _QUOTES.get(lang[:2], _QUOTES["ja"])
    return f"{open_q}{s}{close_q}"


def is_clean(value: str) -> bool:
    """True when `value` has no control, bidi or invisible format character (for tests)."""
    return not (_INVISIBLE.search(value) or _CONTROL.search(value))
