"""Rebuilding a database from its replica: plan from one LIST, replay, verify everything.

A restore picks the generation holding the target, downloads its snapshot and the segments
after it (a few in parallel, applied strictly in txid order), writes pages in place, checks
every object's SHA-256 and the whole-database checksum after every commit, runs
``PRAGMA integrity_check`` and only then moves the result to its final name.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import apsw
from tqdm import tqdm

from walsync_vfs import catalog, format, storage
from walsync_vfs.config import check_name
from walsync_vfs.dbfile import apply_pages, tee

PREFETCH = 4  # segments downloaded ahead of the one being applied


class RestoreError(Exception):
    """A restore cannot produce a correct database; the message is one line saying why."""


@dataclass(frozen=True)
class Plan:
    """What to download: one snapshot, then segments that chain txid by txid."""

    name: str
    generation: str
    snapshot: format.ParsedKey
    segments: list[format.ParsedKey]
    target_txid: int | None  # None: replay to the end (or to the timestamp)
    snapshot_data: bytes | None = None  # already downloaded while planning


@dataclass(frozen=True)
class Result:
    txid: int
    time_ns: int
    db_size: int
    page_size: int


def split_url(url: str) -> tuple[str, str]:
    """``<replica root>/<name>`` -> (root, name)."""
    root, sep, name = url.rstrip("/").rpartition("/")
    if not sep or not root or root.endswith(":/") or root.endswith(":"):
        raise RestoreError(f"{url}: expected <replica root>/<database name>")
    try:
        check_name(name)
    except ValueError as exc:
        raise RestoreError(str(exc)) from exc
    return root, name


def iso_time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


def _range_text(gens: list[catalog.Generation]) -> str:
    restorable = [g for g in gens if g.snapshots]
    if not restorable:
        return "none"
    return f"{min(g.snapshots[0].last_txid for g in restorable)}..{gens[-1].last_txid}"


def _snapshot_at(
    client: storage.ReplicaClient, snaps: list[format.ParsedKey], timestamp_ns: int
) -> tuple[format.ParsedKey, bytes] | None:
    """The newest snapshot taken at or before the timestamp, with its bytes (reused later)."""
    for snap in reversed(snaps):
        key = catalog.object_key(snap)
        data = client.get(key)
        if format.read_snapshot(data, key)[0].time_ns <= timestamp_ns:
            return snap, data
    return None


def plan(
    client: storage.ReplicaClient,
    name: str,
    txid: int | None = None,
    timestamp_ns: int | None = None,
) -> Plan:
    """Choose the snapshot and the chain of segments that rebuild ``name`` as of ``txid`` or
    ``timestamp_ns`` (default: the newest commit).  A hole in the chain before the target is
    an error, never a silently older database."""
    gens = catalog.generations(client, name)
    if not gens:
        raise RestoreError(f"no replica of {name!r} found at {client.url}")
    what = f"txid {txid}" if timestamp_ns is None else f"timestamp {iso_time(timestamp_ns)}"
    outside = f"{name}: {what} is not in the retained history (available: "
    for g in reversed(gens):
        snaps = [s for s in g.snapshots if txid is None or s.last_txid <= txid]
        data = None
        if timestamp_ns is not None:
            found = _snapshot_at(client, snaps, timestamp_ns)
            snaps = [found[0]] if found else []
            data = found[1] if found else None
        if not snaps:
            continue
        snap = snaps[-1]
        chain, expected = [], snap.last_txid + 1
        for seg in g.segments:
            if txid is not None and expected > txid:
                break
            if seg.last_txid < expected:
                continue  # already covered (a compacted segment overlaps smaller ones)
            if seg.first_txid > expected:
                raise RestoreError(
                    f"{name}: segments for txids {expected}..{seg.first_txid - 1} are missing "
                    f"in generation {g.id}"
                )
            chain.append(seg)
            expected = seg.last_txid + 1
        if txid is not None and expected <= txid:
            raise RestoreError(outside + _range_text(gens) + ")")
        return Plan(name, g.id, snap, chain, txid, data)
    raise RestoreError(outside + _range_text(gens) + ")")


def _fetch(client: storage.ReplicaClient, keys: list[str]) -> Iterator[tuple[str, bytes]]:
    """Download keys a few ahead, yielding them in order."""
    with ThreadPoolExecutor(PREFETCH) as pool:
        window: deque[tuple[str, Future[bytes]]] = deque()
        todo = iter(keys)
        for key in todo:
            window.append((key, pool.submit(client.get, key)))
            if len(window) >= PREFETCH:
                break
        while window:
            key, fut = window.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                window.append((nxt, pool.submit(client.get, nxt)))
            yield key, fut.result()


def replay(
    client: storage.ReplicaClient,
    p: Plan,
    out_path: str,
    timestamp_ns: int | None = None,
    progress: bool = False,
) -> Result:
    """Write the planned state into ``out_path`` (created or truncated), verifying as it goes."""
    snap_key = catalog.object_key(p.snapshot)
    data = p.snapshot_data
    if data is None:
        try:
            data = client.get(snap_key)
        except storage.ObjectNotFound as exc:
            raise RestoreError(f"{snap_key}: object listed but missing") from exc
    header, pages = format.read_snapshot(data, snap_key)
    page_size = header.page_size
    with open(out_path, "wb") as out:  # read_snapshot verifies SHA-256 and checksum as it goes
        checksum = format.DbChecksum.from_pages(tee(pages, out.write))
    result = Result(header.txid, header.time_ns, header.db_size, page_size)
    keys = [format.segment_key(p.name, p.generation, s.first_txid, s.last_txid) for s in p.segments]
    bar = tqdm(total=len(keys) + 1, unit="obj", desc=p.name, disable=not progress, initial=1)
    with open(out_path, "r+b") as out, bar:
        for key, blob in _fetch(client, keys):
            bar.update(1)
            seg = format.read_segment_header(blob, key)
            if seg.page_size != page_size:
                raise RestoreError(f"{key}: page size {seg.page_size}, snapshot has {page_size}")
            for commit in format.iter_segment_commits(blob, key, p.target_txid):
                if commit.txid <= result.txid:
                    continue
                if commit.txid != result.txid + 1:
                    raise RestoreError(f"{key}: expected txid {result.txid + 1}, got {commit.txid}")
                if timestamp_ns is not None and commit.time_ns > timestamp_ns:
                    return result
                apply_pages(out, page_size, commit.db_size, commit.pages)
                checksum.apply(commit.db_size, commit.pages)
                if checksum.value != commit.checksum:
                    raise RestoreError(
                        f"{key}: whole-database checksum mismatch after txid {commit.txid}"
                    )
                result = Result(commit.txid, commit.time_ns, commit.db_size, page_size)
                if p.target_txid is not None and commit.txid >= p.target_txid:
                    return result
    return result


def restore(
    url: str,
    out: str,
    txid: int | None = None,
    timestamp_ns: int | None = None,
    force: bool = False,
    client_options: dict | None = None,
    progress: bool = False,
) -> Result:
    """Restore ``url`` (replica root + '/' + name) into the file ``out``; see module docstring."""
    root, name = split_url(url)
    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise RestoreError(f"{out} already exists; pass --force to overwrite it")
    client = storage.open_replica(root, **(client_options or {}))
    p = plan(client, name, txid, timestamp_ns)
    tmp = f"{out}.walsync-tmp"
    try:
        result = replay(client, p, tmp, timestamp_ns, progress)
        if txid is not None and result.txid != txid:
            raise RestoreError(f"{name}: replay ended at txid {result.txid}, wanted {txid}")
        check = apsw.Connection(tmp, flags=apsw.SQLITE_OPEN_READONLY, vfs="unix")
        try:
            problems = [r[0] for r in check.execute("PRAGMA integrity_check")]
        finally:
            check.close()
        if problems != ["ok"]:
            raise RestoreError(f"restored database fails integrity_check: {problems[0]}")
        for suffix in ("-wal", "-shm", "-journal"):  # a stale WAL would be applied on open
            if os.path.exists(out + suffix):
                os.remove(out + suffix)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except format.CorruptObject as exc:
        raise RestoreError(str(exc)) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return result
