"""Which HTTP proxy, if any, carries requests to an endpoint: the environment's conventions.

``https_proxy`` / ``HTTPS_PROXY`` for https endpoints, ``http_proxy`` / ``HTTP_PROXY`` for
http ones, ``no_proxy`` / ``NO_PROXY`` for the hosts that go direct; the lower-case form wins
where both are set, as in curl and Python's urllib.  Under CGI (``REQUEST_METHOD`` set) the
upper-case ``HTTP_PROXY`` is ignored: a client's ``Proxy:`` request header arrives there.

A proxy is an ``http://[user:password@]host[:port]`` URL (a bare ``host:port`` too); its
credentials go into a ``Proxy-Authorization`` header and never into a message: :attr:`url`
is the URL with them masked.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from walsync_vfs.storage import StorageError, redact_url

DEFAULT_PORT = 3128  # curl's, for a proxy URL without one


@dataclass(frozen=True)
class Proxy:
    """One forward proxy: where it listens, and how to authenticate to it."""

    address: tuple[str, int]
    url: str  # credentials masked: safe in messages and logs
    authorization: str = field(default="", repr=False)  # the Proxy-Authorization value

    def headers(self) -> dict[str, str]:
        return {"proxy-authorization": self.authorization} if self.authorization else {}


def proxy_for(
    scheme: str, host: str, port: int, env: Mapping[str, str] | None = None
) -> Proxy | None:
    """The proxy for requests to ``scheme://host:port``, None to go direct."""
    env = os.environ if env is None else env
    name = f"{scheme}_proxy"
    if name not in env and not (scheme == "http" and "REQUEST_METHOD" in env):
        name = name.upper()
    value = env.get(name, "").strip()
    if not value:
        return None
    no_proxy = env.get("no_proxy", env.get("NO_PROXY", ""))
    if bypassed(host, port, no_proxy):
        return None
    return parse(value, name)


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (comma- or space-separated) names the host: ``*``, the name or a
    parent domain (``example.com`` and ``.example.com`` both cover ``s3.example.com``), an
    IP address or network (``10.0.0.0/8``), each optionally with ``:port``."""
    host = host.strip("[]").lower().rstrip(".")
    for entry in no_proxy.replace(",", " ").split():
        entry = entry.lower()
        if entry == "*":
            return True
        pattern, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if _matches(host, pattern.strip("[]").rstrip(".")):
            return True
    return False


def parse(value: str, variable: str) -> Proxy:
    """The proxy a variable names; :class:`StorageError` (naming the variable, never its
    credentials) if it is not an http proxy URL."""
    url = value if "://" in value else f"http://{value}"
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise StorageError(f"invalid proxy URL {shown!r} in ${variable}: {exc}") from None
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise StorageError(
            f"unsupported proxy URL {shown!r} in ${variable}: use http://[user:password@]host:port"
        )
    authorization = ""
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy((parts.hostname, port), shown, authorization)


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port``; an IPv6 address or network without brackets has no port."""
    name, sep, port = entry.rpartition(":")
    if sep and port.isdigit() and (entry.startswith("[") or ":" not in name):
        return name, int(port)
    return entry, None


def _matches(host: str, pattern: str) -> bool:
    if not pattern:
        return False
    try:
        network = ipaddress.ip_network(pattern, strict=False)
    except ValueError:
        domain = pattern.lstrip(".").lstrip("*").lstrip(".")
        return host == domain or host.endswith("." + domain)
    try:
        return ipaddress.ip_address(host) in network
    except ValueError:
        return False
