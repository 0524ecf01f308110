"""What the engine reports when a replica cannot be written, in one line each."""

from __future__ import annotations

import re

from walsync_vfs import storage

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ReplicationError(RuntimeError):
    """A database's replica cannot be written (the message says why and what to do, in one
    line: control characters of a path in it are escaped)."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class NameTaken(ReplicationError):
    """Another open database replicates under the same name and root: a setting to fix,
    not a store outage, so flush() reports it at once."""


class FlushTimeoutError(TimeoutError):
    """``flush()`` ran out of time (a ``TimeoutError``); the message says what to look at."""


def one_line(text: str) -> str:
    """``text`` with its control characters escaped as Python writes them: a path may hold
    a newline, and an error stays one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def describe(exc: BaseException) -> str:
    """One line for logs and errors; storage errors already are one clear line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        text
        if isinstance(exc, storage.StorageError | ReplicationError)
        else (f"{type(exc).__name__}: {text}")
    )
