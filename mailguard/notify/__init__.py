"""Notify stage: the guard's own mails (hold, confirm, approval, outcome, zip password)."""

from mailguard.notify.render import HEADER, KINDS, Notifier, is_own_notice, own_notice_kind

__all__ = ["HEADER", "KINDS", "Notifier", "is_own_notice", "own_notice_kind"]
