"""Notify stage: the guard's own mails (hold, confirm, approval, outcome, zip password)."""

from mailguard.notify.render import (
    HEADER,
    KINDS,
    MailSender,
    Notifier,
    human_size,
    is_own_notice,
    langs_of,
    own_notice_kind,
    summary_of,
)

__all__ = [
    "HEADER",
    "KINDS",
    "MailSender",
    "Notifier",
    "human_size",
    "is_own_notice",
    "langs_of",
    "own_notice_kind",
    "summary_of",
]
