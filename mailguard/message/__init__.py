"""Message stage: a parsed, read-only view of one message (see view.py)."""

from mailguard.message.types import Address, Part, PartRole
from mailguard.message.view import Limits, MessageView

__all__ = ["Address", "Limits", "MessageView", "Part", "PartRole"]
