"""Shared fixtures: a real SeaweedFS S3 server for the session, and fresh replica roots.

The server itself comes from tests/seaweedfs.py (importable here: pytest puts tests/ on
sys.path), which the benchmarks use too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from seaweedfs import FOREIGN_ENV, SeaweedFS, SeaweedFSError, running


@pytest.fixture(scope="session", autouse=True)
def own_default_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A test that opens a database without configuring a replica replicates to the default
    root: the session's own, never the user's (``$XDG_DATA_HOME``, ``$WALSYNC_*``), which
    child processes inherit too."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("WALSYNC_")]:
            mp.delenv(name)
        mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """SeaweedFS (master, volume, filer, S3) on loopback, with the AWS env pointing at it."""
    try:
        with (
            running(tmp_path_factory.mktemp("seaweedfs")) as server,
            pytest.MonkeyPatch.context() as mp,
        ):
            for name in FOREIGN_ENV:
                mp.delenv(name, raising=False)
            for name, value in server.env({}).items():
                mp.setenv(name, value)
            yield server
    except (SeaweedFSError, FileNotFoundError) as exc:  # no weed binary, or it failed
        pytest.fail(str(exc))


@pytest.fixture
def s3_url(s3_server: SeaweedFS) -> str:
    return f"s3://{s3_server.new_bucket()}/some/prefix"


@pytest.fixture
def file_url(tmp_path: Path) -> str:
    return (tmp_path / "replica").as_uri()


@pytest.fixture(params=["file", "s3"])
def replica_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty replica root on each backend."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def file_replica(file_url: str) -> Iterator[str]:
    """Replicate databases opened in the test to a fresh local root, restoring the default
    root afterwards (uploads finished first, so none runs into the next test)."""
    import walsync_vfs

    walsync_vfs.configure(replica=file_url)
    yield file_url
    walsync_vfs.flush(timeout=60)
    walsync_vfs.configure(replica="")
