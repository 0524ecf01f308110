"""The one error a decoder raises, whatever is wrong with an object read from the store."""

from __future__ import annotations


class CorruptObject(ValueError):
    """An object is not a valid object of this format; str() is one line, `<key>: <reason>`."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
