"""``python -m walsync_vfs``: restore, list and verify replicas.

Every failure ends in one line on stderr, ``walsync: error: ...``, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

from walsync_vfs import report, storage
from walsync_vfs.format import CorruptObject
from walsync_vfs.restore import RestoreError, restore, split_url


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
    ls = sub.add_parser("list", help="show a database's generations, or every database in a root")
    ls.add_argument("url", help="replica root, or replica root + '/' + database name")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    v = sub.add_parser("verify", help="download and check every object of a database's replica")
    v.add_argument("url", help="replica root + '/' + database name")
    return parser


def run_list(url: str, as_json: bool) -> int:
    client, name = report.open_target(url)
    info = report.describe_database(client, name) if name else report.describe_root(client)
    if name is None and not info["databases"]:
        raise RestoreError(f"nothing replicated at {url}")
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        dbs = [info] if name else info["databases"]
        print("\n".join(report.format_database(d) for d in dbs))
    return 0


def run_verify(url: str) -> int:
    root, name = split_url(url)
    problems = report.verify(storage.open_replica(root), name)
    for line in problems:
        print(f"walsync: problem: {line}", file=sys.stderr)
    if problems:
        print(f"walsync: error: {url}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{url}: every object, txid chain and database checksum verified")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            return run_list(args.url, args.json)
        if args.command == "verify":
            return run_verify(args.url)
        result = restore(
            args.url,
            args.output,
            txid=args.txid,
            timestamp_ns=args.timestamp,
            force=args.force,
            progress=sys.stderr.isatty(),
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
