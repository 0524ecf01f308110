"""``python -m walsync_vfs``: restore a database from its replica.

Every failure ends in one line on stderr, ``walsync: error: ...``, and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime

from walsync_vfs import storage
from walsync_vfs.format import CorruptObject
from walsync_vfs.restore import RestoreError, restore


def parse_timestamp(text: str) -> int:
    """ISO 8601 with a timezone, or unix seconds -> unix nanoseconds."""
    try:
        return int(float(text) * 1_000_000_000)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid timestamp {text!r}: use ISO 8601 with a timezone or unix seconds"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"timestamp {text!r} has no timezone: add one, e.g. {text}+00:00"
        )
    return int(when.timestamp() * 1_000_000) * 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m walsync_vfs")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("restore", help="rebuild a database from its replica")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = restore(
            args.url, args.output, txid=args.txid, timestamp_ns=args.timestamp, force=args.force
        )
    except (RestoreError, storage.StorageError, CorruptObject, OSError) as exc:
        print(f"walsync: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("walsync: error: interrupted", file=sys.stderr)
        return 130
    print(
        f"restored {args.url} to {args.output} at txid {result.txid} "
        f"({result.db_size} pages of {result.page_size} bytes)"
    )
    return 0
