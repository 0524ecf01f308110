"""walsync reads the AWS configuration from the environment itself only where botocore would
read exactly the same: both ways must agree, and botocore must then not be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from walsync_vfs import storage
from walsync_vfs.storage import awsconfig, s3, sigv4

AWS_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_MAX_ATTEMPTS", "AWS_CA_BUNDLE", "AWS_CREDENTIAL_EXPIRATION", "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)  # fmt: skip
KEYS = {"AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "env-secret"}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A clean AWS environment: no variables, no config file, an empty credentials file; no
    S3 service resolved from another test's environment."""
    monkeypatch.setattr(s3, "_services", {})
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = AKIAFILE\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    def set_all(values: dict[str, str]) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_all


def answers(config: awsconfig.AwsConfig) -> tuple:
    creds = config.credentials()
    return (
        config.region,
        config.endpoint_url,
        config.max_attempts,
        config.ca_bundle,
        (creds.access_key, creds.secret_key, creds.token),
    )


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"AWS_SESSION_TOKEN": "tok"},
        {"AWS_SECURITY_TOKEN": "legacy-tok"},
        {"AWS_REGION": "eu-west-3", "AWS_DEFAULT_REGION": "ap-south-1"},
        {"AWS_DEFAULT_REGION": "ap-south-1"},
        {"AWS_ENDPOINT_URL": "http://all:1", "AWS_ENDPOINT_URL_S3": "http://s3:2"},
        {"AWS_ENDPOINT_URL": "http://all:1"},
        {"AWS_ENDPOINT_URL_S3": "http://s3:2", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"},
        {"AWS_MAX_ATTEMPTS": "7", "AWS_CA_BUNDLE": "/etc/ca.pem"},
    ],
)
def test_the_environment_alone_gives_botocores_answers(env, values: dict[str, str]) -> None:
    env({**KEYS, **values})
    mine = awsconfig.from_environment()
    assert mine is not None
    assert answers(mine) == answers(awsconfig.from_botocore())


@pytest.mark.parametrize(
    "values",
    [
        {"AWS_ACCESS_KEY_ID": "AKIAONLY"},  # half a key pair: botocore looks further
        {**KEYS, "AWS_PROFILE": "other"},
        {**KEYS, "AWS_DEFAULT_PROFILE": "other"},
        {**KEYS, "AWS_CREDENTIAL_EXPIRATION": "2030-01-01T00:00:00Z"},
    ],
)
def test_anything_more_goes_to_botocore(env, values: dict[str, str]) -> None:
    env(values)
    assert awsconfig.from_environment() is None


def test_both_ways_give_the_credentials_requests_are_signed_with(env) -> None:
    env({**KEYS, "AWS_SESSION_TOKEN": "session-token"})
    mine = awsconfig.from_environment()
    assert mine is not None
    for config in (mine, awsconfig.from_botocore()):
        creds = config.credentials()
        assert creds == sigv4.Credentials("AKIAENV", "env-secret", "session-token")
        assert "env-secret" not in repr(creds) and "session-token" not in repr(creds)


def test_a_config_file_goes_to_botocore(env, tmp_path: Path) -> None:
    (tmp_path / "config").write_text("[default]\nregion = eu-north-1\n")
    env({**KEYS, "AWS_CONFIG_FILE": str(tmp_path / "config")})
    assert awsconfig.from_environment() is None
    assert awsconfig.resolve().region == "eu-north-1"


def test_a_bad_number_is_named(env) -> None:
    env({**KEYS, "AWS_MAX_ATTEMPTS": "three"})
    with pytest.raises(awsconfig.ConfigError) as info:
        awsconfig.resolve()
    assert str(info.value) == "AWS_MAX_ATTEMPTS='three' is not a whole number"


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://host:notaport", "Port could not be cast to integer value as 'notaport'"),
        ("http://host:99999", "Port out of range 0-65535"),
        ("ftp://host", "use http(s)://host"),
    ],
)
def test_a_malformed_endpoint_is_named(env, endpoint: str, why: str) -> None:
    """A replica whose endpoint cannot be a URL fails at open with one line naming it (the
    CLI prints it as its error), not with a traceback or a lookup of a bogus host."""
    env({**KEYS, "AWS_ENDPOINT_URL_S3": endpoint})
    with pytest.raises(storage.StorageError) as info:
        storage.open_replica("s3://bucket/prefix")
    assert str(info.value) == f"invalid S3 endpoint URL {endpoint!r}: {why}"


def test_an_environment_configured_replica_never_imports_botocore(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """botocore's import alone is ~11 MiB of RSS in the application."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    program = (
        "import sys; from walsync_vfs.storage import open_replica\n"
        f"c = open_replica({s3_url!r}); c.put('k', b'v'); assert c.get('k') == b'v'\n"
        "print('botocore' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert (out.returncode, out.stdout, out.stderr) == (0, "False\n", "")
