"""File descriptors: replication holds several per open database, beside the application's.

The engine's own connection (its database file and WAL), the capture's read handle on the
WAL, the wal-index lock handle, the leader's lock on ``<db>-walsync`` and a file of recent
segment copies come to about PER_DATABASE descriptors per database, where plain SQLite holds
about three.  Under the usual soft limit of 1,024 an application that fit with a few hundred
databases would then fail to open the next one.  So as databases open, the engine raises the
soft limit (doubling it, up to the hard limit) before walsync's share could crowd the
application out, and says so once where the hard limit is in the way.  Only as far as
needed: a child process inherits the limit, and some programs close every descriptor up to
it one by one.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("walsync_vfs")

PER_DATABASE = 8
# The share of the limit walsync's estimate may reach: the application holds descriptors too.
SHARE = 0.75
# Linux refuses a soft limit over fs.nr_open (1,048,576 by default), even when the hard
# limit is unlimited.
CEILING = 1 << 20

_warned = False


def make_room(databases: int) -> None:
    """Raise the soft limit on open files until ``databases`` open databases' descriptors
    fit in SHARE of it (at most to the hard limit); warn once if they still do not."""
    global _warned
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = databases * PER_DATABASE
    if soft == resource.RLIM_INFINITY or need <= soft * SHARE:
        return
    top = CEILING if hard == resource.RLIM_INFINITY else min(hard, CEILING)
    target = soft
    while need > target * SHARE and target < top:
        target = min(top, 2 * target)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info(
                "walsync: raised the open-file limit from %d to %d for %d databases (about %d "
                "descriptors each)", soft, target, databases, PER_DATABASE,
            )  # fmt: skip
            soft = target
        except (OSError, ValueError) as exc:
            log.info("walsync: could not raise the open-file limit from %d: %s", soft, exc)
    if need > soft * SHARE and not _warned:
        _warned = True
        log.warning(
            "walsync: %d databases open, and replication holds about %d file descriptors for "
            "each: this process may open %d (hard limit %s); raise the limit (ulimit -n, or "
            "ulimit -Hn as root) before opening more", databases, PER_DATABASE, soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
        )  # fmt: skip
