"""Region, endpoint, retries, CA bundle and credentials for S3, by the AWS conventions.

botocore resolves them (profiles, config and credentials files, SSO, instance roles, ...),
but importing it makes up a large share of the memory of every process that replicates.
When the environment alone decides every answer -- keys in
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, no profile named, no config file -- botocore
would read exactly these variables (its environment provider comes first), so they are read
here and botocore is never imported.  Anything else goes to a botocore session.
tests/test_storage.py checks that both ways give the same answers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from walsync_vfs.storage.sigv4 import Credentials


class ConfigError(Exception):
    """The AWS configuration cannot be read; str() is one line that names what is wrong."""


class CredentialsError(Exception):
    """Credentials exist but cannot be obtained (broken profile, expired SSO token, ...)."""


@dataclass(frozen=True, slots=True)
class AwsConfig:
    region: str | None  # None: nothing names one
    endpoint_url: str | None  # None: AWS's own endpoint for the region
    max_attempts: int | None
    ca_bundle: str | None
    # The current credentials (None: none found), raising CredentialsError.  Called per
    # request: a refreshing provider (role, SSO) renews them itself.
    credentials: Callable[[], Credentials | None]


def resolve() -> AwsConfig:
    """The configuration this process's environment and AWS files define."""
    return from_environment() or from_botocore()


def from_environment() -> AwsConfig | None:
    """The configuration when environment variables alone decide it, else None."""
    env = os.environ
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    config_file = os.path.expanduser(env.get("AWS_CONFIG_FILE") or "~/.aws/config")
    if (
        not (key and secret)
        or any(env.get(name) for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"))
        or "AWS_CREDENTIAL_EXPIRATION" in env  # refreshing environment credentials
        or os.path.exists(config_file)
    ):
        return None
    endpoint = None
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true":
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    attempts = env.get("AWS_MAX_ATTEMPTS")
    try:
        max_attempts = int(attempts) if attempts else None
    except ValueError:
        raise ConfigError(f"AWS_MAX_ATTEMPTS={attempts!r} is not a whole number") from None
    creds = Credentials(key, secret, env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN"))
    return AwsConfig(
        env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        endpoint,
        max_attempts,
        env.get("AWS_CA_BUNDLE") or None,
        lambda: creds,
    )


def from_botocore() -> AwsConfig:
    """The configuration as a botocore session resolves it (credentials on first use)."""
    import botocore.session
    from botocore.configprovider import ConfiguredEndpointProvider
    from botocore.exceptions import BotoCoreError

    # The default session is not safe to share across threads; this one is only read.
    session = botocore.session.Session()
    try:
        region = os.environ.get("AWS_REGION") or session.get_config_variable("region")
        endpoint = None
        if not session.get_config_variable("ignore_configured_endpoint_urls"):
            endpoint = ConfiguredEndpointProvider(
                session.full_config, session.get_scoped_config(), "s3"
            ).provide()
        attempts = session.get_config_variable("max_attempts")
        ca_bundle = session.get_config_variable("ca_bundle")
    except BotoCoreError as exc:
        raise ConfigError(str(exc)) from None
    except ValueError as exc:  # a malformed number in the environment or a config file
        raise ConfigError(str(exc).splitlines()[0]) from None
    lock = threading.Lock()
    provider: list[Any] = []  # resolved on first use: it may ask an instance role
    # botocore's latest set and ours for it, replaced as one tuple: converted once per refresh.
    latest: tuple[Any, Credentials | None] = (None, None)

    def credentials() -> Credentials | None:
        nonlocal latest
        try:
            if not provider:
                with lock:
                    if not provider:
                        provider.append(session.get_credentials())
            frozen = provider[0].get_frozen_credentials() if provider[0] is not None else None
        except BotoCoreError as exc:
            raise CredentialsError(str(exc).splitlines()[0]) from None
        if frozen is None:
            return None
        known, creds = latest
        if frozen != known or creds is None:
            creds = Credentials(frozen.access_key, frozen.secret_key, frozen.token)
            latest = (frozen, creds)
        return creds

    return AwsConfig(
        region or None,
        endpoint or None,
        int(attempts) if attempts else None,
        ca_bundle or None,
        credentials,
    )
