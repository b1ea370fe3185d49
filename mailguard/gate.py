"""The gate a decision puts a message through: a leaf value type (policy decides, queue keeps)."""

from __future__ import annotations

import enum


class Gate(enum.IntEnum):
    """Value = precedence: the highest gate among the fired rules wins."""

    PASS = 0
    HOLD = 1
    CONFIRM = 2
    APPROVE = 3
    REJECT = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def of(cls, label: str) -> Gate:
        """ "hold" → Gate.HOLD (ValueError for anything else)."""
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown gate {label!r}") from None

    @property
    def keeps(self) -> bool:
        """Whether the message waits in the queue (hold, confirm, approve)."""
        return self in (Gate.HOLD, Gate.CONFIRM, Gate.APPROVE)
