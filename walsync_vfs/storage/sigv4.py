"""AWS Signature Version 4 for S3 requests: what botocore's ``S3SigV4Auth`` computes, in a few
lines of plain Python.

Signing through botocore means building its request objects and firing its event hooks for
every PUT: at one PUT per database per second, most of walsync's replication CPU.
The algorithm itself is small and fixed (AWS "Signature Version 4 signing process"):

* canonical request = method, URI path (each key byte URI-encoded once; S3 does not normalise
  or double-encode paths), sorted encoded query, lower-cased signed headers, payload hash;
* string to sign = algorithm, timestamp, scope ``date/region/s3/aws4_request`` and the
  canonical request's SHA-256;
* signature = HMAC-SHA256 with a key derived from the secret, date, region and service.

tests/test_storage.py checks the result against botocore's own signer byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_UNRESERVED = "-_.~"  # RFC 3986 unreserved marks: never percent-encoded in SigV4


@dataclass(frozen=True, slots=True, repr=False)
class Credentials:
    """One consistent set (a refreshing provider may swap all three at once)."""

    access_key: str
    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:  # never show the secret or token, even in a traceback
        return f"Credentials(access_key={self.access_key!r}, secret_key=***, token=***)"


def uri_path(path: str) -> str:
    """A request path as S3 expects it on the wire and in the canonical request."""
    return quote(path, safe="/" + _UNRESERVED)


def canonical_query(params: Mapping[str, str]) -> str:
    """``k=v`` pairs, each side encoded (``/`` too), sorted by encoded key then value."""
    pairs = sorted(
        (quote(k, safe=_UNRESERVED), quote(v, safe=_UNRESERVED)) for k, v in params.items()
    )
    return "&".join(f"{k}={v}" for k, v in pairs)


class Signer:
    """Signs requests for one region; safe to share across threads.

    The derived signing key depends only on the secret, the UTC date and the region, so the
    latest one is kept (one tuple, replaced atomically) instead of four HMACs per request.
    """

    def __init__(self, region: str) -> None:
        self.region = region
        self._key: tuple[str, str, bytes] = ("", "", b"")  # (secret, date, key)

    def _signing_key(self, secret: str, date: str) -> bytes:
        cached_secret, cached_date, key = self._key
        if cached_secret != secret or cached_date != date:
            key = _hmac(("AWS4" + secret).encode(), date)
            for part in (self.region, SERVICE, "aws4_request"):
                key = _hmac(key, part)
            self._key = (secret, date, key)
        return key

    def sign(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        payload_sha256: str,
        creds: Credentials,
        amz_date: str,
    ) -> None:
        """Add the SigV4 headers to ``headers`` (which must hold ``host``; every header in it
        is signed).  ``path`` and ``query`` are already encoded (:func:`uri_path`,
        :func:`canonical_query`); ``amz_date`` is ``YYYYMMDDTHHMMSSZ`` in UTC."""
        headers["x-amz-content-sha256"] = payload_sha256
        headers["x-amz-date"] = amz_date
        if creds.token:
            headers["x-amz-security-token"] = creds.token
        names = sorted(headers)
        signed = ";".join(names)
        canonical = "\n".join(
            (
                method,
                path,
                query,
                *(f"{n}:{' '.join(headers[n].split())}" for n in names),
                "",
                signed,
                payload_sha256,
            )
        )
        date = amz_date[:8]
        scope = f"{date}/{self.region}/{SERVICE}/aws4_request"
        to_sign = "\n".join(
            (ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest())
        )
        signature = hmac.new(
            self._signing_key(creds.secret_key, date), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        headers["authorization"] = (
            f"{ALGORITHM} Credential={creds.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()
