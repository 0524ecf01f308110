"""Giving memory that replication freed back to the operating system.

Captured pages are copied into blocks of their own (a run of commits, csrc/commits.c; a page
of a commit taken the general way is a bytes object), made on the capture thread and freed on an
upload thread about a second later.  glibc keeps such freed chunks in its arenas instead of
returning them, so a process replicating many databases holds far more than it uses.
``malloc_trim`` returns them; the engine calls :func:`release` at most once a second, and only
after uploads.  The call is in the compiled shim (``ws_release_heap``); elsewhere than glibc
(musl, macOS) it does nothing.
"""

from __future__ import annotations

from walsync_vfs import _shim


def release() -> None:
    """Return free heap memory to the OS, where the C library can."""
    _shim.lib.ws_release_heap()
