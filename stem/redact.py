"""Credentials out of what stem prints: ``mask_url`` for one URL, ``mask_urls`` for a message.

Broker and backend URLs carry passwords (``redis://:secret@host``,
``postgresql://user:pw@host/db?password=...``); anything shown to a person or
written to a log goes through here first.  Parsing is by hand, not
``urllib.parse``: a URL malformed enough to be in an error message is still
masked (``urlsplit`` raises on some of those), and a password holding ``/``,
``?`` or ``@`` is still hidden whole.
"""

from __future__ import annotations

import re

__all__ = ["mask_url", "mask_urls", "MASK"]

MASK = "***"
# query parameters that carry a secret (libpq: password, sslpassword; redis-py: password)
_SECRET_PARAMS = re.compile(r"(?i)^(?:.*password|pass|pwd|secret|token)$")
# a URL inside free text: scheme://, then up to whitespace or a quote
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]*")


def _mask_query(query: str) -> str:
    parts = []
    for item in query.split("&"):
        name, sep, value = item.partition("=")
        parts.append(f"{name}={MASK}" if sep and value and _SECRET_PARAMS.match(name) else item)
    return "&".join(parts)


def mask_url(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` query
    parameter) replaced by ``***``; everything else as given.

    >>> mask_url("redis://:secret@localhost:6379/0")
    'redis://:***@localhost:6379/0'
    >>> mask_url("postgresql://app@db/stem?password=pw&sslmode=require")
    'postgresql://app@db/stem?password=***&sslmode=require'
    """
    if not isinstance(url, str):
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:   # not a URL (a typo such as 'redis:/:pw@host'): still no password shown
        scheme, rest = "", url
    # the userinfo ends at the last '@' before the query; a password holding '?'
    # puts its '@' after that '?', with no '=' or '&' in between
    q = rest.find("?")
    at = rest.rfind("@", 0, len(rest) if q < 0 else q)
    if q >= 0:
        later = rest.find("@", q)
        if later >= 0 and not any(c in rest[q:later] for c in "=&"):
            at = later
    if at >= 0:
        user, colon, password = rest[:at].partition(":")
        if colon and password:
            rest = f"{user}:{MASK}{rest[at:]}"
    head, qmark, query = rest.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        query = _mask_query(query) + hash_ + fragment
    return f"{scheme}{sep}{head}{qmark}{query}"


def mask_urls(text: str) -> str:
    """Every URL found in ``text`` (an error message, a log line) masked by :func:`mask_url`."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)
