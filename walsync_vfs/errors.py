"""What the engine reports when a replica cannot be written, in one line each."""

from __future__ import annotations

from walsync_vfs import storage


class ReplicationError(RuntimeError):
    """A database's replica cannot be written (the message says why and what to do)."""


class NameTaken(ReplicationError):
    """Another open database replicates under the same name and root: a setting to fix,
    not a store outage, so flush() reports it at once."""


class FlushTimeoutError(TimeoutError):
    """``flush()`` ran out of time (a ``TimeoutError``); the message says what to look at."""


def describe(exc: BaseException) -> str:
    """One line for logs and errors; storage errors already are one clear line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        text
        if isinstance(exc, storage.StorageError | ReplicationError)
        else (f"{type(exc).__name__}: {text}")
    )
