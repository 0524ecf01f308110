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

import apsw

from walsync_vfs import format, storage
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


def _keys(client: storage.ReplicaClient, name: str) -> list[format.ParsedKey]:
    keys = [k for k in (format.parse_key(o.key) for o in client.list(name + "/")) if k]
    return [k for k in keys if k.name == name]


def plan(
    client: storage.ReplicaClient,
    name: str,
    txid: int | None = None,
    timestamp_ns: int | None = None,
) -> Plan:
    """Choose the snapshot and segments that rebuild ``name`` as of ``txid`` (or the end)."""
    keys = _keys(client, name)
    if not keys:
        raise RestoreError(f"no replica of {name!r} found at {client.url}")
    gens = sorted({k.generation for k in keys}, reverse=True)
    first = (
        min(k.first_txid for k in keys if k.kind == "snapshot")
        if any(k.kind == "snapshot" for k in keys)
        else None
    )
    last = max(k.last_txid for k in keys)
    for gen in gens:
        snaps = sorted(
            (k for k in keys if k.generation == gen and k.kind == "snapshot"),
            key=lambda k: k.last_txid,
        )
        if txid is not None:
            snaps = [s for s in snaps if s.last_txid <= txid]
        if not snaps:
            continue
        snap = snaps[-1]
        segs = sorted(
            (
                k
                for k in keys
                if k.generation == gen and k.kind == "segment" and k.last_txid > snap.last_txid
            ),
            key=lambda k: k.first_txid,
        )
        chain, expected = [], snap.last_txid + 1
        for seg in segs:
            if txid is not None and expected > txid:
                break
            if seg.last_txid < expected:
                continue  # covered already (e.g. by a compacted segment)
            if seg.first_txid > expected:
                break  # a hole: history in this generation ends before it
            chain.append(seg)
            expected = seg.last_txid + 1
        end = expected - 1
        if txid is not None and end < txid:
            gen_last = max(k.last_txid for k in keys if k.generation == gen)
            if gen_last >= txid:
                missing = min(k.first_txid for k in segs if k.first_txid > end)
                raise RestoreError(
                    f"{name}: segments for txids {end + 1}..{missing - 1} are missing in "
                    f"generation {gen}; cannot restore txid {txid}"
                )
            if gen != gens[0]:
                raise RestoreError(
                    f"{name}: txid {txid} is not in the retained history "
                    f"(available: {first}..{last})"
                )
        if txid is not None and txid > last:
            raise RestoreError(
                f"{name}: txid {txid} is not in the retained history (available: {first}..{last})"
            )
        return Plan(name, gen, snap, chain, txid)
    raise RestoreError(
        f"{name}: txid {txid} is not in the retained history (available: {first}..{last})"
    )


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
) -> Result:
    """Write the planned state into ``out_path`` (created or truncated), verifying as it goes."""
    snap_key = format.snapshot_key(p.name, p.generation, p.snapshot.last_txid)
    try:
        data = client.get(snap_key)
    except storage.ObjectNotFound as exc:
        raise RestoreError(f"{snap_key}: object listed but missing") from exc
    header, pages = format.read_snapshot(data, snap_key)
    if timestamp_ns is not None and header.time_ns > timestamp_ns:
        raise RestoreError(f"{p.name}: the snapshot {snap_key} is newer than the timestamp")
    page_size = header.page_size
    with open(out_path, "wb") as out:  # read_snapshot verifies SHA-256 and checksum as it goes
        checksum = format.DbChecksum.from_pages(tee(pages, out.write))
    result = Result(header.txid, header.time_ns, header.db_size, page_size)
    keys = [format.segment_key(p.name, p.generation, s.first_txid, s.last_txid) for s in p.segments]
    with open(out_path, "r+b") as out:
        for key, blob in _fetch(client, keys):
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
        result = replay(client, p, tmp, timestamp_ns)
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
