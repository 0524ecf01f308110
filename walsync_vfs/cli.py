"""``python -m walsync_vfs``: restore, list and verify replicas.

Every failure ends in one line on stderr, ``walsync: error: ...``, and exit status 1, or 2
for a bad command line (a follower reports errors that happen after its first update and
carries on).
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from types import FrameType
from typing import Any, NoReturn

from walsync_vfs import catalog, heap, inplace, report, storage
from walsync_vfs.errors import one_line
from walsync_vfs.format import CorruptObject
from walsync_vfs.restore import (
    EPOCH,
    Follower,
    RestoreError,
    defer,
    iso_time,
    restore,
    split_url,
)


class StdoutError(Exception):
    """Standard output cannot be written (a full disk, an I/O error)."""


ERRORS = (
    RestoreError,
    storage.StorageError,
    CorruptObject,
    inplace.LiveDatabaseError,
    OSError,
    StdoutError,
)
FOLLOW_HELP = """\
--follow keeps OUTPUT up to date as new commits reach the replica, polling it every
--interval seconds, until Ctrl-C or SIGTERM (exit status 0 at once, even while the store
hangs; an update being written to OUTPUT is finished first).  OUTPUT is a
rollback-journal-mode database: read it with SQLite (read-only is fine) and a busy
timeout.  The first state is built aside, checked with PRAGMA integrity_check and renamed
to OUTPUT; after that each update is written in place as one SQLite transaction (locks,
hot journal), so readers see whole commits only and wait a moment while one is written.  A
follower killed mid-update leaves OUTPUT-journal, which the next read-write opener of
OUTPUT (or the next follower) rolls back; until then read-only openers get "attempt to
write a readonly database".  A new generation (the source was rewritten outside walsync) is
followed from its snapshot, as a new file: connections opened before it keep the old one.
SIGUSR1 runs PRAGMA integrity_check on OUTPUT and prints one line with the result.  Errors
before OUTPUT is first written end the command (exit status 1); later ones (store
unreachable, an object missing or failing its checks) are reported on stderr, once while
they repeat, and retried at every poll; OUTPUT keeps its last verified state.
"""


def fail(message: str) -> None:
    """The one line on stderr a failure ends in."""
    print(f"walsync: error: {one_line(message)}", file=sys.stderr, flush=True)


def say(text: str) -> None:
    """Write ``text`` and a newline to standard output, at once.  A reader that went away
    (``| head``) is no failure of the command: what it has left to say goes nowhere, and its
    work and exit status stay what they are.  Any other write error is the command's
    failure, named as standard output's rather than as a file the command writes."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush too goes there
        os.close(devnull)
    except OSError as exc:
        raise StdoutError(f"standard output: {exc.strerror}") from None


class Parser(argparse.ArgumentParser):
    """argparse with this tool's one-line errors: the usage block would bury the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"walsync: error: {one_line(message)} (see {self.prog} --help)\n")


_FRACTION = re.compile(r"(?<=:\d\d)[.,](\d+)")  # of the seconds


def parse_timestamp(text: str) -> int:
    """ISO 8601 with a timezone, or unix seconds -> unix nanoseconds.  Times a datetime cannot
    show (before year 1, after 9999, inf) are refused here, not in a later error message."""
    invalid = argparse.ArgumentTypeError(
        f"invalid timestamp {text!r}: use ISO 8601 with a timezone or unix seconds"
    )
    try:
        ns = int(Decimal(text.strip()) * 1_000_000_000)  # exact to the nanosecond: no float
    except OverflowError:
        raise invalid from None
    except (InvalidOperation, ValueError):
        # datetime keeps microseconds: the fraction is read here, to the nanosecond.
        fraction = _FRACTION.search(text)
        whole = text if fraction is None else text[: fraction.start()] + text[fraction.end() :]
        try:
            when = datetime.fromisoformat(whole.upper())  # RFC 3339 allows "t" and "z"
        except ValueError:
            raise invalid from None
        if when.tzinfo is None:
            example = when.replace(tzinfo=UTC).isoformat()
            raise argparse.ArgumentTypeError(
                f"timestamp {text!r} has no timezone: add one, e.g. {example}"
            ) from None
        ns = (when - EPOCH) // timedelta(seconds=1) * 1_000_000_000  # exact: no float
        if fraction is not None:
            ns += int(fraction.group(1)[:9].ljust(9, "0"))
    try:
        iso_time(ns)
    except (ValueError, OverflowError, OSError):
        raise invalid from None
    return ns


def positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid interval {text!r}: use seconds > 0")
    return seconds


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The command line, and its subcommands by name (for errors about a command's options)."""
    parser = Parser(prog="python -m walsync_vfs")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "restore",
        help="rebuild a database from its replica",
        epilog=FOLLOW_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("url", help="replica root + '/' + database name, e.g. file:///backups/app.db")
    r.add_argument("-o", "--output", required=True, help="database file to create")
    target = r.add_mutually_exclusive_group()
    target.add_argument("--txid", type=int, help="restore as of this transaction id")
    target.add_argument(
        "--timestamp",
        type=parse_timestamp,
        help="restore as of this time (ISO 8601 with timezone, or unix seconds)",
    )
    r.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    r.add_argument(
        "--follow",
        action="store_true",
        help="keep OUTPUT up to date with the newest commit, as a read replica (see below)",
    )
    r.add_argument(
        "--interval",
        type=positive_seconds,
        metavar="SECONDS",
        help="with --follow: seconds between polls of the replica (default 1)",
    )
    ls = sub.add_parser("list", help="show a database's generations, or every database in a root")
    ls.add_argument("url", help="replica root, or replica root + '/' + database name")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    v = sub.add_parser("verify", help="download and check every object of a database's replica")
    v.add_argument("url", help="replica root + '/' + database name")
    return parser, sub.choices


def run_list(url: str, as_json: bool) -> int:
    client, name = report.open_target(url)
    info = report.describe_database(client, name) if name else report.describe_root(client)
    if name is None and not info["databases"]:
        raise RestoreError(f"nothing replicated at {url}")
    if as_json:
        say(json.dumps(info, indent=2))
    else:
        dbs = [info] if name else info["databases"]
        say("\n".join(report.format_database(d) for d in dbs))
    return 0


def refuse_root(url: str, command: str) -> None:
    """Raise RestoreError if ``url`` is a replica root with databases, not one of them.  A
    URL that names no database is the command's own error; so is a root that cannot be
    listed."""
    split_url(url)
    try:
        target, named = report.open_target(url)
        is_root = named is None and bool(catalog.databases(target))
    except storage.StorageError:
        return
    if is_root:
        raise RestoreError(
            f"{url} is a replica root; {command} one of its databases, "
            f"{url.rstrip('/')}/<name> (list names them)"
        )


def run_verify(url: str) -> int:
    refuse_root(url, "verify")
    root, name = split_url(url)
    client = storage.open_replica(root)
    if not catalog.generations(client, name):
        raise RestoreError(f"no replica of {name!r} found at {client.url}")
    verdict = report.verify(client, name)
    for line in report.ignored(client, name):
        print(f"walsync: ignored: {line}", file=sys.stderr)
    for line in verdict.problems:
        print(f"walsync: problem: {one_line(line)}", file=sys.stderr)
    # What can be restored, so that objects gone from the store (which no check of what is
    # there can see) show as a gap or an end short of what the application committed.
    ranges = verdict.restorable
    restorable = f"restorable: {catalog.spell_ranges(ranges) if ranges else 'nothing'}"
    if verdict.problems:
        fail(f"{url}: {len(verdict.problems)} problem(s) found; {restorable}")
        return 1
    say(f"{url}: every object, txid chain and database checksum verified; {restorable}")
    return 0


# What signal.signal() returns and takes: a function, SIG_DFL or SIG_IGN, or None.
Handler = Callable[[int, FrameType | None], Any] | int | None


class Stopped(BaseException):
    """SIGTERM, or a follower's stop request: it ends what the command is doing at once, and
    what it leaves is cleaned up on the way out (a BaseException: nothing on the way may take
    it for an error of the store and retry)."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Stopped


class StopRequest:
    """SIGINT and SIGTERM ask a follower to stop.  A poll stops at once, even one waiting on a
    store that hangs, except while OUTPUT and the commit it holds change together
    (``restore.uninterrupted``), so its last line says where OUTPUT really is.  Between
    polls the follower stops at its next look.  A second signal interrupts at once.  SIGUSR1
    asks for an integrity check, between polls."""

    def __init__(self) -> None:
        self.requested = False
        self.check_requested = False
        self._polling = False
        self._saved: dict[int, Handler] = {}

    def __enter__(self) -> StopRequest:
        self._saved = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self._saved[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._check)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    @contextmanager
    def polling(self) -> Iterator[None]:
        """A poll, which a stop request ends by raising Stopped."""
        self._polling = True
        try:
            yield
        finally:
            self._polling = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self._polling and not defer(self._stop_polling):
            raise Stopped

    def _stop_polling(self) -> None:
        if self._polling:
            raise Stopped

    def _check(self, signum: int, frame: FrameType | None) -> None:
        self.check_requested = True

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake within 0.1 s of a request."""
        deadline = time.monotonic() + seconds
        while not (self.requested or self.check_requested):
            if (left := deadline - time.monotonic()) <= 0:
                break
            time.sleep(min(left, 0.1))


def run_follow(url: str, output: str, force: bool, interval: float) -> int:
    """Poll until stopped; see FOLLOW_HELP for what is reported and when it gives up."""
    last_error = None
    with Follower(url, output, force=force) as follower, StopRequest() as stop:
        while not stop.requested:
            generation = follower.generation
            try:
                with stop.polling():
                    updated = follower.poll()
            except Stopped:
                break
            except ERRORS as exc:
                if follower.published is None:
                    raise
                line = described(exc, output)
                if line != last_error:  # one line per distinct error, not one per poll
                    fail(line)
                last_error = line
            else:
                last_error = None
                if updated and follower.generation != generation:  # the first, or a new one
                    say(f"following {url}: {output} {_where(follower)}")
            if stop.check_requested and follower.published is not None:
                stop.check_requested = False
                report_integrity(follower, output)
            else:
                stop.sleep(interval)
        say(f"stopped following {url}: {output} {_where(follower)}")
    return 0


def report_integrity(follower: Follower, output: str) -> None:
    """One line: ``PRAGMA integrity_check`` of OUTPUT as readers see it now."""
    assert follower.published is not None
    at = f"{output} at txid {follower.published.txid}"
    try:
        problem = follower.integrity_problem()
    except ERRORS as exc:
        problem = str(exc)
    if problem is None:
        say(f"integrity_check of {at}: ok")
    else:
        fail(f"integrity_check of {at}: {problem}")


def _where(follower: Follower) -> str:
    if follower.published is None:
        return "was not written"
    return f"is at txid {follower.published.txid} (generation {follower.generation})"


def main(argv: list[str] | None = None) -> int:
    """Run one command; the process exits right after."""
    try:
        return run(argv)
    finally:
        # What is alive now lives until exit: spare the interpreter's shutdown collections
        # the traversal of it (slow with botocore's service model loaded).
        gc.freeze()


# What each command writes, named by a write error that names no file.
WRITTEN: dict[str, Callable[[argparse.Namespace], str]] = {
    "restore": lambda args: args.output,
    "verify": lambda args: f"verify's replay file in {tempfile.gettempdir()}",
}
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def described(exc: Exception, written: str | None) -> str:
    """The error's line; a write error that names no file (a full disk) names ``written``,
    what the command writes (OUTPUT, or the file beside it a new OUTPUT is built in), as
    does an error about that file beside it (a directory the user cannot write)."""
    if not isinstance(exc, OSError) or not written:
        return str(exc)
    if exc.filename is None and exc.errno in WRITE_ERRORS:
        return f"{written}: {exc.strerror}"
    if isinstance(exc.filename, str) and exc.filename.startswith(written + "."):
        return f"{written}: {exc.strerror} (in {os.path.dirname(os.path.abspath(written))})"
    return str(exc)


def run(argv: list[str] | None) -> int:
    parser, commands = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the command's own help lists what it takes
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    restore_parser = commands["restore"]
    pinned = args.command == "restore" and (args.txid is not None or args.timestamp is not None)
    if pinned and args.follow:
        restore_parser.error(
            "--follow tracks the newest commit: it cannot take --txid or --timestamp"
        )
    if args.command == "restore" and args.interval is not None and not args.follow:
        restore_parser.error("--interval only applies with --follow")
    heap.map_big_blocks()  # a command's process reads objects: buffers come and go by the MiB
    signal.signal(signal.SIGTERM, _terminate)  # as Ctrl-C: a restore removes its temp file
    try:
        if args.command == "list":
            return run_list(args.url, args.json)
        if args.command == "verify":
            return run_verify(args.url)
        refuse_root(args.url, "restore")
        if args.follow:
            return run_follow(args.url, args.output, args.force, args.interval or 1.0)
        result = restore(
            args.url,
            args.output,
            txid=args.txid,
            timestamp_ns=args.timestamp,
            force=args.force,
            progress=sys.stderr.isatty(),
        )
        done = (
            f"restored {args.url} to {args.output} at txid {result.txid} "
            f"({result.db_size} pages of {result.page_size} bytes)"
        )
        try:
            say(done)
        except StdoutError as exc:  # the restore is done all the same: no failure status
            print(f"walsync: warning: {exc}; {done}", file=sys.stderr, flush=True)
        return 0
    except ERRORS as exc:
        fail(described(exc, WRITTEN[args.command](args) if args.command in WRITTEN else None))
        return 1
    except KeyboardInterrupt:
        fail("interrupted")
        return 130
    except Stopped:
        fail("terminated")
        return 128 + signal.SIGTERM
