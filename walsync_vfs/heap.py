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

import ctypes

from walsync_vfs import _shim

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAPPED_BLOCK = 1 << 20


def release() -> None:
    """Return free memory to the OS: the blocks kept for the next runs of commits, and free
    heap memory where the C library can."""
    _shim.lib.ws_blocks_release()
    _shim.lib.ws_release_heap()


def map_big_blocks() -> None:
    """Give every allocation of MAPPED_BLOCK or more a mapping of its own, unmapped when it
    is freed, where the C library can (glibc).  For a command that streams big objects
    (restore, follow): by default glibc keeps freed download buffers in its heap once one
    has been freed, so the process holds them until it exits.  Process-wide, so not for a
    library call inside someone else's application."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MAPPED_BLOCK)
