"""Which URLs the load tools may hit: loopback only (127.0.0.0/8, ::1, localhost) unless the
caller opts in with allow_remote, so a stray flag never load-tests someone else's server."""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


class RemoteTargetRefused(ValueError):
    pass


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # any other host name: we do not resolve it
        return False


def check_target(url: str, allow_remote: bool = False) -> None:
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    if not allow_remote and not is_loopback_url(url):
        raise RemoteTargetRefused(f"{url} is not a loopback address; pass allow_remote=True (--allow-remote) "
                                  "to load-test a remote server")
