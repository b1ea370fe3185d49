"""Actions stage: the transforms a decision can ask for ("bcc", "zip"), applied in order.

A transform turns bytes into new bytes and sends nothing: passwords leave as `Notice`s for the
notify stage, and a split delivery (per-domain zip passwords) comes back as `Rewritten.splits`.
A passed message never goes through here, so it stays byte-for-byte.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mailguard.actions.base import Notice, Rewritten, Transform
from mailguard.actions.bcc import BccRewrite
from mailguard.actions.scan import ClamdScanner, ScanRejected
from mailguard.actions.zip import ZipAttachments

if TYPE_CHECKING:
    from mailguard.message import MessageView

__all__ = [
    "TRANSFORMS",
    "BccRewrite",
    "ClamdScanner",
    "Notice",
    "Rewritten",
    "ScanRejected",
    "Transform",
    "ZipAttachments",
    "apply_all",
]

TRANSFORMS: dict[str, Transform] = {"bcc": BccRewrite(), "zip": ZipAttachments()}


def apply_all(
    raw: bytes,
    view: MessageView,
    names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | Mapping[str, Any],
    *,
    reparse: Callable[[bytes], MessageView],
) -> Rewritten:
    """Apply the named transforms in order; the view is re-parsed after each one that changed raw.

    `options` is either per transform (`{"zip": {...}, "bcc": {...}}`) or one flat mapping shared
    by all. Notices and traces accumulate. Splits (one delivery per recipient group) can only
    come from the last transform that splits; a later transform is applied to every split.
    Raises KeyError for an unknown name (the policy loader refuses those earlier) and lets
    scan.ScanRejected through.
    """
    notices: list[Notice] = []
    traces: list[str] = []
    splits: list[tuple[tuple[str, ...], bytes]] = []
    for name in names:
        t = TRANSFORMS[name]
        opts = options.get(name) if isinstance(options.get(name), Mapping) else options
        assert opts is not None
        if splits:  # earlier transform split the delivery: apply this one to each copy
            new_splits = []
            for rcpts, sraw in splits:
                res = t.apply(sraw, reparse(sraw), opts)
                notices += res.notices
                new_splits += list(res.splits) or [(rcpts, res.raw)]
                if res.trace:
                    traces.append(res.trace)
            splits = new_splits
            raw = splits[0][1]
            continue
        res = t.apply(raw, view, opts)
        notices += res.notices
        if res.trace:
            traces.append(res.trace)
        if res.splits:
            splits = list(res.splits)
        if res.raw is not raw:
            raw = res.raw
            view = reparse(raw)
    return Rewritten(raw, tuple(notices), "; ".join(traces), tuple(splits))
