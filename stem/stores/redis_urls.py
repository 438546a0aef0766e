"""The parts of a Redis URL that every form shares: the authority and its address list.

``redis+sentinel://`` and ``redis+cluster://`` both name several servers in their
authority (``[user[:password]@]host[:port][,host[:port]...]``, an IPv6 host in brackets);
``split_authority`` and ``parse_addresses`` read it once for both, so the two forms accept
exactly the same addresses.  Errors come back as ``AddressError`` with the reason only:
each form wraps it in a ``ConfigurationError`` that names its own URL form.
"""

from __future__ import annotations

from urllib.parse import unquote

__all__ = ["AddressError", "split_authority", "parse_addresses"]


class AddressError(ValueError):
    """Why an address list is refused; the caller puts it in its own ``ConfigurationError``."""


def split_authority(netloc: str) -> tuple[str | None, str | None, str]:
    """``(username, password, addresses)`` of an authority; the credentials unquoted, None
    when absent (the password splits at the last ``@``, so it may hold one unquoted)."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, hosts
    user, colon, secret = userinfo.partition(":")
    return unquote(user) or None, unquote(secret) if colon else None, hosts


def _address(item: str, default_port: int) -> tuple[str, int]:
    host, port = item, str(default_port)
    if item.startswith("["):                     # [::1]:6379
        end = item.find("]")
        if end < 0:
            raise AddressError(f"unclosed '[' in {item!r}")
        host, rest = item[1:end], item[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise AddressError(f"bad address {item!r}")
            port = rest[1:]
    elif ":" in item:
        host, _, port = item.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"bad address {item!r}")
    return host, int(port)


def parse_addresses(hosts: str, default_port: int) -> list[tuple[str, int]]:
    """``[(host, port), ...]`` of a comma-separated list (empty items skipped; a missing
    port is ``default_port``); ``AddressError`` for the first bad one.  An empty list is
    the caller's to refuse: it knows what the addresses are of."""
    return [_address(item.strip(), default_port) for item in hosts.split(",") if item.strip()]
