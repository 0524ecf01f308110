"""Local-directory replica backend: one file per object under a root directory.

Useful on its own (a replica on another disk or a network mount) and as the reference the S3
backend is tested against.  Objects must be all-or-nothing even across a crash, so every put
goes through a temp file, fsync and rename, like SQLite's own journal handling.  A create-only
put links the temp file to its name instead of renaming it, which fails if the name exists;
compare-and-swap (the writer lease) holds a POSIX record lock on a side file while it compares.
A streaming put writes its temp file as the data comes; a crash leaves the temp file, which
:meth:`FileReplicaClient.abort_stale_uploads` removes once it is old.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from walsync_vfs import _shim
from walsync_vfs.storage import (
    Conflict,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    check_key,
    check_prefix,
)
from walsync_vfs.storage.transfer import Source, chunks

TMP_SUFFIX = ".walsync-tmp"  # in-flight puts; never listed, never a valid key
# An in-flight put's temp file (not a swap's lock file, which must never be removed).
_PUT_TMP = re.compile(r"^\..+\.[0-9a-f]{12}" + re.escape(TMP_SUFFIX) + "$")
# Temp files of this process's puts in progress: never stale, whatever their age, and their
# directories are not pruned (the lock is held across the check and the rmdir).
_writing: set[Path] = set()
_writing_lock = threading.Lock()
_PUT_ATTEMPTS = 3  # another process's delete may prune the directory between mkdir and create
T = TypeVar("T")
# Temp names from a generator of our own (the application's random module stays its own),
# drawn again in a forked child: a temp name costs no system call.
_TMP_NAMES = random.Random()
os.register_at_fork(after_in_child=_TMP_NAMES.seed)


def check_root(root: str) -> None:
    """StorageError unless ``root`` is a directory or one can be made there (no file is in
    the way, at it or above it)."""
    path = Path(root)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise StorageError(f"replica root {root} is not a directory; name a directory")


class FileReplicaClient:
    """Objects are files under ``root``; key segments are directories."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.url = self.root.as_uri()
        check_root(root)
        self.requests = 0
        self.create_only = False
        # Create-only puts and swaps are this module's own (link, record locks): nothing for
        # lease.check_conditional to probe, whose random key would leave a lock file behind.
        self.conditional_checked = True
        self._lock = threading.Lock()
        # Swaps lock the object's lock file with a POSIX record lock, which a child forked
        # meanwhile does not inherit (a flock() it would hold until it exits).
        self._swapping = threading.Lock()

    def put(self, key: str, data: bytes | memoryview) -> None:
        self._write(key, data, self.create_only)

    def put_stream(self, key: str, source: Source, size_hint: int | None = None) -> int:
        """See :meth:`ReplicaClient.put_stream`: the temp file is written chunk by chunk."""
        return self._write(key, chunks(source), self.create_only)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        with self._reading(key) as path:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                parts = []
                while length > 0 and (data := os.pread(fd, length, start)):
                    parts.append(data)
                    start += len(data)
                    length -= len(data)
                return b"".join(parts)
            finally:
                os.close(fd)

    def head(self, key: str) -> ObjectInfo:
        with self._reading(key) as path:
            st = path.stat()
            if not path.is_file():
                raise IsADirectoryError(key)
        return ObjectInfo(key, st.st_size, st.st_mtime)

    @contextlib.contextmanager
    def _reading(self, key: str) -> Iterator[Path]:
        """The object's path, with what reading it raises as ObjectNotFound/StorageError."""
        path = self._path(key)
        self._count()
        try:
            yield path
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(f"object {self._at(key)} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self._at(key)}: {_why(exc)}") from exc

    def abort_stale_uploads(self, prefix: str, older_than: float) -> int:
        """Remove temp files of puts under ``prefix`` that a crash left, once older than
        ``older_than`` seconds (not this process's puts in progress)."""
        check_prefix(prefix)
        self._count()
        cutoff = time.time() - older_than
        top = self.root.joinpath(*prefix.split("/")[:-1])
        removed = 0
        for directory, _, files in os.walk(top):
            rel = Path(directory).relative_to(self.root).as_posix()
            rel = "" if rel == "." else rel + "/"
            for name in files:
                if not _PUT_TMP.match(name) or not (rel + name[1:]).startswith(prefix):
                    continue
                path = Path(directory, name)
                with _writing_lock:
                    if path in _writing:
                        continue
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue  # its put just finished
        return removed

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, _tag(data)

    def swap(self, key: str, data: bytes, tag: str | None) -> str:
        path = self._path(key)
        lock = path.with_name(f".{path.name}.lock{TMP_SUFFIX}")
        # Closing any descriptor of the file drops this process's record lock: one at a time.
        with self._swapping:
            try:
                try:
                    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                except FileNotFoundError:
                    _makedirs(path.parent)
                    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise StorageError(f"cannot write {self._at(key)}: {_why(exc)}") from exc
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                if tag is not None:
                    try:
                        current = _tag(path.read_bytes())
                    except FileNotFoundError:
                        current = None
                    if current != tag:
                        raise Conflict(f"{self._at(key)} changed since it was read")
                self._write(key, data, create_only=tag is None)
            finally:
                os.close(fd)
        return _tag(data)

    def _write(
        self, key: str, data: bytes | memoryview | Iterable[bytes], create_only: bool
    ) -> int:
        """Write ``data`` (an object, or a stream of its chunks) to a temp file, then give it
        its name; returns its size."""
        path = self._path(key)
        self._count()
        tmp = path.with_name(f".{path.name}.{_TMP_NAMES.getrandbits(48):012x}{TMP_SUFFIX}")
        with _writing_lock:
            _writing.add(tmp)
        try:
            return self._install(tmp, path, data, create_only)
        except FileExistsError:
            raise Conflict(f"cannot create {self._at(key)}: it already exists") from None
        except OSError as exc:
            raise StorageError(f"cannot write {self._at(key)}: {_why(exc)}") from exc
        finally:
            with _writing_lock:
                _writing.discard(tmp)

    def _install(
        self, tmp: Path, path: Path, data: bytes | memoryview | Iterable[bytes], create_only: bool
    ) -> int:
        """Fill and fsync ``tmp``, then link (create-only) or rename it to ``path``."""
        if isinstance(data, bytes | memoryview):
            return _put_whole(tmp, path, data, create_only)
        size = 0
        fd = self._create(tmp)
        try:
            try:
                for chunk in data:  # a stream: each chunk as it comes
                    size += _write_all(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            if create_only:
                os.link(tmp, path)
                tmp.unlink()
            else:
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)  # the rename itself must survive a crash too
        return size

    def _at(self, key: str) -> str:
        """The URL of ``key``, for messages (the root "/" has its slash already)."""
        return self.url + key if self.url.endswith("/") else f"{self.url}/{key}"

    def get(self, key: str) -> bytes:
        with self._reading(key) as path:
            return path.read_bytes()

    def list(self, prefix: str) -> list[ObjectInfo]:
        check_prefix(prefix)
        self._count()
        found: list[ObjectInfo] = []
        try:
            self._walk(self.root, "", prefix, found)
        except OSError as exc:
            raise StorageError(f"cannot list {self._at(prefix)}: {_why(exc)}") from exc
        found.sort(key=lambda info: info.key)
        return found

    def delete(self, keys: Iterable[str]) -> None:
        paths = {key: self._path(key) for key in keys}  # validate all before removing any
        if not paths:
            return
        self._count()
        # Not fsynced: a delete lost in a crash only brings back an object retention deletes
        # again, whereas a lost put would lose data.
        emptied: set[Path] = set()
        for key, path in paths.items():
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except OSError as exc:
                raise StorageError(f"cannot delete {self._at(key)}: {_why(exc)}") from exc
            emptied.add(path.parent)
        for directory in sorted(emptied, key=lambda d: len(d.parts), reverse=True):
            self._prune(directory)

    def _path(self, key: str) -> Path:
        if check_key(key).endswith(TMP_SUFFIX):
            raise ValueError(f"invalid object key {key!r}: '{TMP_SUFFIX}' is reserved")
        return self.root.joinpath(*key.split("/"))

    def _count(self) -> None:
        with self._lock:
            self.requests += 1

    def _create(self, tmp: Path) -> int:
        """Create ``tmp`` exclusively, making (and fsyncing) its missing directories."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        return _making_dirs(tmp.parent, lambda: os.open(tmp, flags, 0o666))

    def _walk(
        self, directory: Path, rel: str, prefix: str, found: builtins.list[ObjectInfo]
    ) -> None:
        try:
            entries = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        with entries:
            for entry in entries:
                key = rel + entry.name
                if entry.is_dir(follow_symlinks=False):
                    sub = key + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        self._walk(Path(entry.path), sub, prefix, found)
                elif key.startswith(prefix) and not entry.name.endswith(TMP_SUFFIX):
                    try:
                        st = entry.stat()
                        found.append(ObjectInfo(key, st.st_size, st.st_mtime))
                    except FileNotFoundError:  # deleted while we listed
                        continue

    def _prune(self, directory: Path) -> None:
        """Remove ``directory`` and its parents while empty, stopping at the root."""
        while directory != self.root and self.root in directory.parents:
            try:
                with _writing_lock:
                    if any(directory in tmp.parents for tmp in _writing):
                        return  # a put of this process is making a file in it
                    directory.rmdir()
            except FileNotFoundError:
                pass  # a concurrent delete pruned it; its parents may still be empty
            except OSError:
                return  # not empty (or not ours to remove): a leftover directory costs nothing
            directory = directory.parent


def _making_dirs(directory: Path, create: Callable[[], T]) -> T:
    """``create()``, making ``directory`` (and its parents) while it raises FileNotFoundError:
    a concurrent delete may prune the directory again between the two."""
    for _ in range(_PUT_ATTEMPTS - 1):
        try:
            return create()
        except FileNotFoundError:
            _makedirs(directory)
    return create()


def _makedirs(directory: Path) -> None:
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


def _write_all(fd: int, chunk: bytes | memoryview) -> int:
    """Write ``chunk``, however many write() calls the kernel takes it in; returns its size."""
    view = memoryview(chunk).cast("B")
    size = len(view)
    while view:
        view = view[os.write(fd, view) :]
    return size


def _put_whole(tmp: Path, path: Path, data: bytes | memoryview, create_only: bool) -> int:
    """:meth:`FileReplicaClient._install` of a whole object, in one C call with the GIL
    released once (csrc/objectfile.c): each system call made from here would take it back,
    and every take can make an application thread wait for it."""
    stage = _shim.ffi.new("int *")
    # The export ends with the block: a buffer still exported from a memoryview that an
    # exception's traceback keeps in a reference cycle crashes CPython's collector.
    with _shim.ffi.from_buffer("unsigned char[]", data) as buffer:

        def put() -> int:
            err = _shim.lib.ws_put_file(
                bytes(tmp), bytes(path), bytes(path.parent), buffer, len(data), create_only, stage
            )
            if err == errno.ENOENT and stage[0] == _shim.lib.WS_PUT_CREATE:
                raise FileNotFoundError(err, os.strerror(err), str(tmp))
            return int(err)

        err = _making_dirs(tmp.parent, put)
    if err:
        failed = {_shim.lib.WS_PUT_NAME: path, _shim.lib.WS_PUT_DIR: path.parent}
        raise OSError(err, os.strerror(err), str(failed.get(stage[0], tmp)))
    return len(data)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tag(data: bytes) -> str:
    """A version tag: the content's hash (a lease's content is never written twice)."""
    return hashlib.sha256(data).hexdigest()


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)
