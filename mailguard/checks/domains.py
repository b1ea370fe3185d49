"""Checks stage: classify each recipient domain (internal/trusted/known/first-time/look-alike/DNS).

Pure: history counts and DNS verdicts arrive in the CheckContext. Classes, most specific first:

  internal     the organisation's own (exact or `*.` wildcard)
  trusted      a partner named in the policy
  known        mail has gone there before (history count > 0, for the domain or its registrable
               domain)
  lookalike    resembles an internal, trusted, frequently used or big free-mail domain
               (swapped public suffix, homoglyph/confusable skeleton, small edit distance on the
               registrable label, the protected name used as a subdomain or a label of another
               one, or extended: my-NAME, NAME-osaka, NAME-co.jp, NAMEgroup — internal, trusted
               and frequent names only, 4+ letters as whole hyphen tokens, 6+ letters anywhere)
  nonexistent  DNS says the domain cannot receive mail (NXDOMAIN, no MX/A/AAAA, or null MX)
  first_time   history is available and has never seen it
  unchecked    no history to tell (with `ctx.history_unavailable`: domain.history_unavailable)

Comparison is on lowercase A-labels; labels are compared in U-label form (so homoglyphs in IDNs
are visible to the skeleton) and shown as U-labels.
"""

from __future__ import annotations

import functools
import importlib.resources
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import idna
from rapidfuzz.distance import OSA

from mailguard.checks.context import CheckContext, DnsStatus, HistorySnapshot, Org
from mailguard.checks.finding import Finding
from mailguard.message.types import Address

if TYPE_CHECKING:
    from mailguard.message import MessageView

__all__ = [
    "FREQUENT_MIN",
    "DomainInfo",
    "DomainReport",
    "LookalikeIndex",
    "analyze",
    "freemail_domains",
    "is_freemail",
    "recipient_addresses",
    "registrable",
    "skeleton",
    "split_registrable",
]

DomainClass = Literal[
    "internal", "trusted", "known", "first_time", "lookalike", "nonexistent", "unchecked"
]
LookalikeKind = Literal["swapped_suffix", "homoglyph", "edit_distance", "subdomain", "extended"]

FREQUENT_MIN = 3  # history count from which a domain is protected against look-alikes

# Suffixes people swap for one another by mistake (or that squatters register).
_SWAP_FAMILY = frozenset(
    {"com", "net", "org", "jp", "co.jp", "ne.jp", "or.jp", "co", "cm", "biz", "info", "asia"}
)

# ---------------------------------------------------------------------------------------------
# Public Suffix List and free-mail list (offline, bundled)
# ---------------------------------------------------------------------------------------------


@functools.cache
def _psl() -> Any:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()  # the list bundled with the package: no network


@functools.lru_cache(maxsize=4096)
def split_registrable(domain: str) -> tuple[str, str, str]:
    """(registrable domain, its label, public suffix) for an A-label domain.

    `mail.example.co.jp` → ("example.co.jp", "example", "co.jp"). A bare suffix or an unknown
    single label gives ("co.jp", "", "co.jp") / ("localhost", "localhost", "").
    """
    if not domain or domain.startswith("["):
        return domain, "", ""
    psl = _psl()
    suffix = psl.publicsuffix(domain) or ""
    reg = psl.privatesuffix(domain)
    if reg is None:
        return domain, "" if suffix == domain else domain, suffix
    label = reg[: -len(suffix) - 1] if suffix and reg.endswith("." + suffix) else reg
    return reg, label, suffix


def registrable(domain: str) -> str:
    """The registrable domain ("organisational domain") of an A-label domain."""
    return split_registrable(domain)[0]


@functools.cache
def freemail_domains() -> frozenset[str]:
    """The shipped free-mail list (mailguard/data/freemail.txt)."""
    text = importlib.resources.files("mailguard").joinpath("data/freemail.txt").read_text("utf-8")
    return frozenset(
        ln.split("#", 1)[0].strip().lower()
        for ln in text.splitlines()
        if ln.split("#", 1)[0].strip()
    )


def is_freemail(domain: str, org: Org | None = None) -> bool:
    """A free-mail / ISP / carrier domain (or a subdomain of one, e.g. xx.auone-net.jp)."""
    if org is not None and org.is_freemail(domain):
        return True
    fm = freemail_domains()
    d = domain
    while d:
        if d in fm:
            return True
        _, _, d = d.partition(".")
    return False


# ---------------------------------------------------------------------------------------------
# Skeletons (confusables) and the look-alike index
# ---------------------------------------------------------------------------------------------


@functools.cache
def _prototypes() -> dict[str, str]:
    """Non-ASCII character → the ASCII (or lowest code point) character it is confused with.

    Built once from confusable-homoglyphs' Unicode confusables table. Deliberately not
    transitive: closing over the table merges r/t/u/y/z into one class.
    """
    from confusable_homoglyphs.confusables import (  # type: ignore[import-untyped]
        confusables_data,
    )

    out: dict[str, str] = {}
    for ch, entries in confusables_data.items():
        if len(ch) != 1 or ch.isascii():
            continue
        glyphs = [e["c"].replace("\u200e", "").replace("\u200f", "") for e in entries]
        single = [g.lower() for g in glyphs if len(g) == 1]
        ascii_ = [g for g in single if g.isascii() and (g.isalnum() or g == "-")]
        if ascii_:
            out[ch] = ascii_[0]
        elif single:
            out[ch] = min([ch, *single])
    return out


_ASCII_FOLD = str.maketrans({"0": "o", "1": "l", "-": None, "_": None, ".": None})
_MULTI = (("rn", "m"), ("vv", "w"), ("cl", "d"))


@functools.lru_cache(maxsize=4096)
def skeleton(label: str) -> str:
    """What a label looks like: confusables folded (а→a, ρ→p, ニ/二), 0→o, 1→l, rn→m, no hyphens."""
    s = unicodedata.normalize("NFKC", label).lower()
    if not s.isascii():
        proto = _prototypes()
        s = "".join(proto.get(c, c) for c in s)
    s = s.translate(_ASCII_FOLD)
    for a, b in _MULTI:
        if a in s:
            s = s.replace(a, b)
    return s


def _ulabel(label: str) -> str:
    if "xn--" not in label:
        return label
    try:
        return idna.decode(label)
    except (idna.IDNAError, UnicodeError, ValueError):
        return label


def _max_distance(length: int) -> int:
    # Short names differ by one letter all the time (nec/nhk): edit distance only from 5 letters.
    # One edit (OSA: a swapped pair is one edit) is the typo; two edits are mostly other names.
    return 0 if length < 5 else 1


# Free-mail brands whose name under another suffix is a typo, not a company of the same name
# (rakuten.co.jp and nifty.co.jp are real companies; gmail.co.jp is a mistake).
_SWAP_BRANDS = frozenset({"gmail", "googlemail", "hotmail", "outlook", "icloud", "yahoo", "ymail"})


def _swap_protected(p: _Protected) -> bool:
    if p.why == "freemail":
        return p.label in _SWAP_BRANDS
    return len(p.label) >= (2 if p.why in ("internal", "trusted") else 4)


def _deletes(label: str, k: int) -> set[str]:
    """The label with up to k characters deleted (itself included)."""
    out = {label}
    frontier = {label}
    for _ in range(k):
        frontier = {w[:i] + w[i + 1 :] for w in frontier for i in range(len(w))}
        out |= frontier
    return out


_CONTAIN_MIN = 4  # a protected name extended by whole hyphen tokens: from 4 letters
_COMPACT_MIN = 6  # a protected name anywhere inside another (no hyphens): from 6 letters


def _tokens(label: str) -> tuple[str, ...]:
    return tuple(t for t in label.replace("_", "-").split("-") if t)


@dataclass(frozen=True, slots=True)
class _Protected:
    domain: str  # registrable, A-label
    label: str  # registrable label, U-label
    suffix: str
    why: str  # "internal", "trusted", "frequent", "freemail"


@dataclass(frozen=True, slots=True)
class Lookalike:
    of: str  # the protected domain it resembles (A-label)
    kind: LookalikeKind
    why: str  # what the protected domain is: internal, trusted, frequent, freemail


class LookalikeIndex:
    """The protected domains, indexed for one message's worth of look-ups (built once per Org)."""

    def __init__(self, protected: Iterable[tuple[str, str]]):
        self.by_domain: dict[str, _Protected] = {}
        for dom, why in protected:
            reg, label, suffix = split_registrable(dom)
            if not label or reg in self.by_domain:
                continue  # first reason wins: internal before trusted before frequent
            self.by_domain[reg] = _Protected(reg, _ulabel(label), suffix, why)
        self.by_label: dict[str, list[_Protected]] = {}
        self.by_skeleton: dict[str, list[_Protected]] = {}
        for p in self.by_domain.values():
            self.by_label.setdefault(p.label, []).append(p)
            self.by_skeleton.setdefault(skeleton(p.label), []).append(p)
        # Names that must not be extended (my-NAME, NAME-osaka, NAMEco.jp) or carried as a
        # subdomain label elsewhere: ours, partners', frequent ones (not free-mail brands).
        # By first hyphen token, and by compact skeleton (hyphens gone) for 6+ letters.
        self.by_token: dict[str, list[tuple[tuple[str, ...], _Protected]]] = {}
        self.by_compact: dict[str, list[_Protected]] = {}
        for p in self.by_domain.values():
            compact = skeleton(p.label)
            if p.why == "freemail" or len(compact) < _CONTAIN_MIN:
                continue
            toks = _tokens(p.label)
            self.by_token.setdefault(toks[0], []).append((toks, p))
            if len(compact) >= _COMPACT_MIN:
                self.by_compact.setdefault(compact, []).append(p)
        self.compact_lengths = sorted({len(c) for c in self.by_compact})
        # Deletion neighbourhoods (SymSpell): two labels within edit distance 1 share a variant
        # with at most one character deleted, so a look-up costs O(len), not O(protected set).
        self.variants: dict[str, set[str]] = {}
        for lab in self.by_label:
            if len(lab) >= 4:
                for v in _deletes(lab, _max_distance(len(lab))):
                    self.variants.setdefault(v, set()).add(lab)

    def match(self, domain: str) -> Lookalike | None:
        """The protected domain `domain` could be mistaken for, or None."""
        reg, alabel, suffix = split_registrable(domain)
        if not alabel or reg in self.by_domain:
            return None  # a protected organisation itself (or its subdomain)
        # example.co.jp.evil.com: the protected name as the subdomain of something else
        if domain != reg:
            sub = domain[: -len(reg) - 1]
            for cand in (sub, registrable(sub)):
                if cand in self.by_domain:
                    return Lookalike(cand, "subdomain", self.by_domain[cand].why)
            # example.evil.com, example-co-jp.evil.com: the name as a label of another domain
            for sl in sub.split("."):
                u = _ulabel(sl)
                for p in self.by_label.get(u, ()):
                    if p.why != "freemail":
                        return Lookalike(p.domain, "subdomain", p.why)
                got = self._contains(u)
                if got is not None:
                    return Lookalike(got.domain, "subdomain", got.why)
            # example.com split at its hyphen: exam.ple.co.jp, sakura.denki.co.jp
            joined = skeleton("".join(_ulabel(x) for x in (*sub.split("."), alabel)))
            for p in self.by_compact.get(joined, ()):
                return Lookalike(p.domain, "subdomain", p.why)
        label = _ulabel(alabel)
        for p in self.by_label.get(label, ()):
            if p.suffix != suffix and _swap_protected(p):
                return Lookalike(p.domain, "swapped_suffix", p.why)
        for p in self.by_skeleton.get(skeleton(label), ()):
            if p.label != label and self._suffix_ok(p, suffix):
                return Lookalike(p.domain, "homoglyph", p.why)
        got = self._contains(label)
        if got is not None:  # my-example, example-osaka, example-co (.jp), examplegroup
            return Lookalike(got.domain, "extended", got.why)
        if len(label) < 3:
            return None
        near: set[str] = set()
        for v in _deletes(label, 1):
            near |= self.variants.get(v, set())
        best: Lookalike | None = None
        best_d = 99
        for cand in sorted(near):
            dist = OSA.distance(label, cand)
            if dist == 0 or dist >= best_d:
                continue
            for p in self.by_label[cand]:
                if dist <= _max_distance(len(p.label)) and self._suffix_ok(p, suffix):
                    best, best_d = Lookalike(p.domain, "edit_distance", p.why), dist
                    break
        return best

    def _contains(self, label: str) -> _Protected | None:
        """A protected name inside `label` but not all of it: as a run of whole hyphen tokens
        (4+ letters), or, for names of 6+ letters, anywhere in the compact skeleton."""
        toks = _tokens(label)
        for i, t in enumerate(toks):
            for ptoks, p in self.by_token.get(t, ()):
                if toks[i : i + len(ptoks)] == ptoks and len(ptoks) < len(toks):
                    return p
        if not self.compact_lengths:
            return None
        sk = skeleton(label)
        for n in self.compact_lengths:
            if n >= len(sk):
                break
            for i in range(len(sk) - n + 1):
                hit = self.by_compact.get(sk[i : i + n])
                if hit:
                    return hit[0]
        return None

    @staticmethod
    def _suffix_ok(p: _Protected, suffix: str) -> bool:
        return p.suffix == suffix or (p.suffix in _SWAP_FAMILY and suffix in _SWAP_FAMILY)


_INDEX_CACHE: OrderedDict[tuple[Org, frozenset[str]], LookalikeIndex] = OrderedDict()
_INDEX_CACHE_MAX = 8


def _index(org: Org, frequent: frozenset[str]) -> LookalikeIndex:
    key = (org, frequent)
    idx = _INDEX_CACHE.get(key)
    if idx is not None:
        _INDEX_CACHE.move_to_end(key)
        return idx
    protected: list[tuple[str, str]] = []
    protected += [(d.removeprefix("*."), "internal") for d in org.internal]
    protected += [(d.removeprefix("*."), "trusted") for d in org.trusted]
    protected += [(d, "frequent") for d in sorted(frequent)]
    protected += [(d, "freemail") for d in sorted(freemail_domains())]
    protected += [(d.removeprefix("*."), "freemail") for d in org.freemail]
    idx = LookalikeIndex(protected)
    _INDEX_CACHE[key] = idx
    if len(_INDEX_CACHE) > _INDEX_CACHE_MAX:
        _INDEX_CACHE.popitem(last=False)
    return idx


def _frequent(history: Mapping[str, int] | None) -> frozenset[str]:
    if history is None:
        return frozenset()
    if isinstance(history, HistorySnapshot):  # the server's lookups precompute it
        return history.frequent
    return frozenset(d for d, n in history.items() if n >= FREQUENT_MIN)


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DomainInfo:
    domain: str  # A-label
    unicode: str  # U-label, for people
    cls: DomainClass
    lookalike: Lookalike | None = None
    dns: DnsStatus | None = None
    history: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "class": self.cls,
            "unicode": self.unicode,
            "lookalike_of": self.lookalike.of if self.lookalike else None,
            "lookalike_kind": self.lookalike.kind if self.lookalike else None,
            "dns": self.dns,
            "history": self.history,
        }


@dataclass(slots=True)
class DomainReport:
    domains: dict[str, DomainInfo] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {d: info.to_json() for d, info in self.domains.items()}


def recipient_addresses(view: MessageView) -> list[Address]:
    """Every recipient the message names: envelope first, then To, Cc, Bcc headers."""
    out: list[Address] = []
    if view.envelope is not None:
        out.extend(view.rcpts)
    out.extend(view.to)
    out.extend(view.cc)
    out.extend(view.bcc)
    return out


def _history_count(history: Mapping[str, int], domain: str) -> int:
    n = history.get(domain, 0)
    reg = registrable(domain)
    return max(n, history.get(reg, 0)) if reg != domain else n


def _shown(domains: Iterable[DomainInfo]) -> str:
    return ", ".join(
        i.unicode if i.unicode == i.domain else f"{i.unicode} ({i.domain})" for i in domains
    )


def analyze(view: MessageView, ctx: CheckContext) -> DomainReport:
    """Classify each distinct recipient domain and report the findings listed in checks/__init__."""
    org = ctx.org
    unicode_of: dict[str, str] = {}
    for a in recipient_addresses(view):
        if a.domain and not a.domain.startswith("[") and a.domain not in unicode_of:
            unicode_of[a.domain] = a.domain_unicode
    report = DomainReport()
    if not unicode_of:
        return report
    index: LookalikeIndex | None = None
    for dom, uni in unicode_of.items():
        dns = ctx.dns.get(dom) if ctx.dns is not None else None
        hist = _history_count(ctx.history, dom) if ctx.history is not None else None
        look: Lookalike | None = None
        cls: DomainClass
        if org.is_internal(dom):
            cls = "internal"
        elif org.is_trusted(dom):
            cls = "trusted"
        elif hist:
            cls = "known"
        else:
            if index is None:
                index = _index(org, _frequent(ctx.history))
            look = index.match(dom)
            if look is not None:
                cls = "lookalike"
            elif dns in ("nonexistent", "null_mx"):
                cls = "nonexistent"
            elif hist is not None:
                cls = "first_time"
            else:
                cls = "unchecked"
        report.domains[dom] = DomainInfo(dom, uni, cls, look, dns, hist)
    report.findings = _findings(list(report.domains.values()), ctx.history_unavailable)
    return report


def _findings(infos: list[DomainInfo], history_unavailable: bool = False) -> list[Finding]:
    out: list[Finding] = []
    ext = [i for i in infos if i.cls not in ("internal", "trusted")]
    if ext:
        out.append(
            Finding(
                "domain.external",
                f"Mail goes to {len(ext)} external domain(s): {_shown(ext)}",
                f"社外ドメイン宛てのメールです({len(ext)}件): {_shown(ext)}",
                len(ext),
                tuple(i.domain for i in ext),
            )
        )
    first = [i for i in ext if i.history == 0]
    if first:
        out.append(
            Finding(
                "domain.first_time",
                f"First mail ever to {len(first)} domain(s): {_shown(first)}",
                f"これまで送信したことのないドメインです({len(first)}件): {_shown(first)}",
                len(first),
                tuple(i.domain for i in first),
            )
        )
    if history_unavailable and ext:
        out.append(
            Finding(
                "domain.history_unavailable",
                f"Delivery history unavailable, could not check {len(ext)} domain(s) for "
                f"first-time mail: {_shown(ext)}",
                f"送信履歴を参照できず、初めての宛先か確認できませんでした({len(ext)}件): "
                f"{_shown(ext)}",
                len(ext),
                tuple(i.domain for i in ext),
            )
        )
    look = [i for i in ext if i.lookalike is not None]
    if look:
        pairs = "; ".join(
            f"{_shown([i])} looks like {_ushow(i.lookalike.of)}" for i in look if i.lookalike
        )
        pairs_ja = "、".join(
            f"{_shown([i])} は {_ushow(i.lookalike.of)} に似ています" for i in look if i.lookalike
        )
        out.append(
            Finding(
                "domain.lookalike",
                f"Possible typo or spoofed domain: {pairs}",
                f"入力ミスまたはなりすましの可能性があるドメインです: {pairs_ja}",
                len(look),
                tuple(i.domain for i in look),
                {
                    "lookalike_of": {
                        i.domain: i.lookalike.of for i in look if i.lookalike is not None
                    },
                    "kind": {i.domain: i.lookalike.kind for i in look if i.lookalike is not None},
                },
            )
        )
    for status, code, en, ja in (
        (
            "nonexistent",
            "domain.nonexistent",
            "Domain does not exist or has no mail server",
            "存在しない(メールを受け取れない)ドメインです",
        ),
        (
            "null_mx",
            "domain.null_mx",
            "Domain declares that it accepts no mail (null MX)",
            "メールを受け付けないと宣言しているドメインです(null MX)",
        ),
        (
            "unavailable",
            "domain.dns_unavailable",
            "Could not check domain in DNS (timeout or server failure)",
            "DNSでドメインを確認できませんでした(タイムアウトまたはサーバー障害)",
        ),
    ):
        hit = [i for i in infos if i.dns == status and i.cls != "internal"]
        if hit:
            shown = _shown(hit)
            out.append(
                Finding(
                    code, f"{en}: {shown}", f"{ja}: {shown}", len(hit), tuple(i.domain for i in hit)
                )
            )
    return out


def _ushow(domain: str) -> str:
    uni = ".".join(_ulabel(p) for p in domain.split("."))
    return uni if uni == domain else f"{uni} ({domain})"
