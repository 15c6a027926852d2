"""Enums whose members travel between ranks as small integers (their position)."""

from __future__ import annotations

import enum


class CodedEnum(enum.Enum):
    @property
    def code(self) -> int:
        """A small integer for a numpy message (a broadcast, a gather)."""
        return list(type(self)).index(self)

    @classmethod
    def from_code(cls, code: int):
        return list(cls)[int(code)]
