"""Giving memory that replication freed back to the operating system.

Every captured page becomes a ~4 KiB bytes object (too big for Python's own allocator), made
on the capture thread and freed on an upload thread about a second later.  glibc keeps such
freed chunks in its arenas instead of returning them, so with 1,000 databases writing, the
process held ~30 MiB more than it was using.  ``malloc_trim`` returns them in a few ms; the
engine calls :func:`release` at most once a second, and only after uploads.  Elsewhere (musl,
macOS) there is nothing to call and :func:`release` does nothing.
"""

from __future__ import annotations

import cffi

_ffi = cffi.FFI()
_ffi.cdef("int malloc_trim(size_t pad);")
try:
    _trim = _ffi.dlopen(None).malloc_trim  # the C library the process already runs on
except (OSError, AttributeError):
    _trim = None


def release() -> None:
    """Return free heap memory to the OS, where the C library can."""
    if _trim is not None:
        _trim(0)
