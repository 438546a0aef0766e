"""What stem reads of a Redis URL before redis-py does: the authority of the multi-server
forms, and the query options of the plain ones.

``redis+sentinel://`` and ``redis+cluster://`` both name several servers in their
authority (``[user[:password]@]host[:port][,host[:port]...]``, an IPv6 host in brackets);
``split_authority`` and ``parse_addresses`` read it once for both, so the two forms accept
exactly the same addresses.  Errors come back as ``AddressError`` with the reason only:
each form wraps it in a ``ConfigurationError`` that names its own URL form.

``redis://``, ``rediss://`` and ``unix://`` URLs go to redis-py's ``from_url``, which
hands every query option to the connection as a keyword, and lets it win over stem's
own: an unknown name (``?namespace=x``) became a ``TypeError`` at the first command, and
``?socket_timeout=`` or ``?protocol=3`` would silently change what stem relies on.
``check_plain_options`` lets through only the options listed in ``PLAIN_OPTIONS`` (and
the TLS ones on ``rediss://``), and says for the others what to do instead.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote

from ..errors import ConfigurationError
from ..redact import mask_url

__all__ = ["AddressError", "split_authority", "parse_addresses", "PLAIN_OPTIONS", "TLS_OPTIONS",
           "check_plain_options"]

#: Query options of a plain Redis URL that stem passes on to redis-py's connections.
PLAIN_OPTIONS = ("db", "username", "password", "client_name", "health_check_interval")
#: ... and those of a ``rediss://`` URL on top (redis-py's ``SSLConnection``).
TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "ssl_certfile", "ssl_keyfile",
               "ssl_password", "ssl_check_hostname", "ssl_min_version", "ssl_ciphers")
#: Options stem refuses, with what to do instead.
_OWNED = "stem sets it: pass socket_timeout=, socket_connect_timeout= or retry_attempts= to the broker or backend"
_REFUSED = {
    **dict.fromkeys(("socket_timeout", "socket_connect_timeout", "timeout", "socket_keepalive",
                     "socket_keepalive_options", "retry", "retry_on_timeout", "retry_on_error"), _OWNED),
    **dict.fromkeys(("protocol", "decode_responses", "encoding", "encoding_errors", "legacy_responses"),
                    "stem reads raw RESP2 replies and would misread others"),
    "namespace": "a Redis namespace is not a URL option: pass namespace= to the broker or backend "
                 "(RedisBroker(url, namespace=...))",
}


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


def check_plain_options(url: str) -> None:
    """Refuse (``ConfigurationError``) a ``redis://``, ``rediss://`` or ``unix://`` URL whose
    query holds an option stem does not pass on (module docstring), before redis-py sees it."""
    scheme, _, rest = url.partition("://")
    query = rest.partition("?")[2].partition("#")[0]
    if not query:
        return
    known = PLAIN_OPTIONS + TLS_OPTIONS if scheme.lower() == "rediss" else PLAIN_OPTIONS
    for name, _value in parse_qsl(query, keep_blank_values=True):
        if name in known:
            continue
        if name in _REFUSED:
            why = _REFUSED[name]
        elif name in TLS_OPTIONS:
            why = "a TLS option needs a rediss:// URL"
        else:
            why = f"unknown option (known: {', '.join(known)})"
        raise ConfigurationError(f"bad Redis URL {mask_url(url)!r}: option {name!r}: {why}")
