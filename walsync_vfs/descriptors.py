"""File descriptors: replication holds several per open database, beside the application's.

The engine's own connection (its database file and WAL), the capture's read handle on the
WAL, the wal-index lock handle, the leader's lock on ``<db>-walsync`` and a file of recent
segment copies come to about PER_DATABASE descriptors per database, where plain SQLite holds
about three.  Under the usual soft limit of 1,024 an application that fit with a few hundred
databases would then fail to open the next one.  So, as Go's runtime does for every Go
program, the engine raises the soft limit to the hard one when it starts; where that is not
enough it says so once, before the opens start failing.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("walsync_vfs")

PER_DATABASE = 8
# Past this share of the limit the warning comes: the application holds descriptors too.
WARN_SHARE = 0.75
# Linux refuses a soft limit over fs.nr_open (1,048,576 by default), even when the hard
# limit is unlimited.
CEILING = 1 << 20

_warned = False


def raise_soft_limit() -> None:
    """Raise the soft limit on open files to the hard limit (at most CEILING)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = CEILING if hard == resource.RLIM_INFINITY else min(hard, CEILING)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.info("walsync: could not raise the open-file limit from %d: %s", soft, exc)
        return
    log.info(
        "walsync: raised the open-file limit from %d to %d (replication holds about %d "
        "descriptors per database)", soft, target, PER_DATABASE,
    )  # fmt: skip


def check(databases: int) -> None:
    """Warn once if ``databases`` open databases come near the open-file limit."""
    global _warned
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _warned or soft == resource.RLIM_INFINITY or databases * PER_DATABASE <= soft * WARN_SHARE:
        return
    _warned = True
    log.warning(
        "walsync: %d databases open, and replication holds about %d file descriptors for "
        "each: this process may open %d (hard limit %s); raise the limit (ulimit -n, or "
        "ulimit -Hn as root) before opening more", databases, PER_DATABASE, soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
    )  # fmt: skip
