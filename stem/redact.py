"""Secrets out of what stem shows: URLs (``mask_url``, ``mask_urls``) and task arguments (``shown_args``).

Broker and backend URLs carry passwords (``redis://:secret@host``,
``postgresql://user:pw@host/db?password=...``); anything shown to a person or
written to a log goes through here first.  Parsing is by hand, not
``urllib.parse``: a URL malformed enough to be in an error message is still
masked (``urlsplit`` raises on some of those), and a password holding ``/``,
``?`` or ``@`` is still hidden whole.

A task's arguments are kept for display (``TaskStatus.args``, the dashboard's
task page, ``stem result``) only as ``shown_args`` makes them: the values of
secret-looking names hidden (``redact_names``; at any depth), or what the task's
own ``TaskOptions(redact=...)`` says, and cut to ``ARGS_SHOWN_BYTES`` so a task
with a large payload does not copy it into every status.  The worker calls it
once per task; when the frame it came in is already that small (``size_hint``)
nothing is measured, so a task with small arguments pays one walk of them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Collection

import msgspec

__all__ = ["mask_url", "mask_urls", "MASK", "ARGS_SHOWN_BYTES", "TRUNCATED", "is_secret_name", "redact_names",
           "shown_args"]

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


# -- task arguments -------------------------------------------------------------------------------
#: The most msgpack bytes of a task's arguments a status keeps for display; above it, values are cut.
#: 2 KiB: a task with a 1 KiB payload keeps it whole and pays no measuring (its frame is smaller),
#: while a status never grows by more than this.
ARGS_SHOWN_BYTES = 2048
#: What every cut value says (a string ending ``[truncated: N bytes]``, or a key ``"…"`` for the
#: arguments left out).
TRUNCATED = "truncated"
#: Argument names whose values are hidden unless a task's ``redact`` callable says otherwise.
_SECRET_NAME = re.compile(r"(?i)(pass(word|wd)?|secret|token|api[_-]?key|auth(orization)?|credential|"
                          r"private[_-]?key|cookie|session)")
_secret_names: dict[str, bool] = {}   # name -> secret?  (a worker sees few distinct names: cached)
_PART = 128          # a value up to this size is kept whole in cut arguments, while room is left
_KEEP_CHARS = 64     # how much of a long string cut arguments keep
_encode = msgspec.msgpack.Encoder().encode

#: ``TaskOptions.redact``: argument names to hide (besides the secret-looking ones), or a
#: callable ``args -> dict | None`` whose result is what is shown (None: nothing).
RedactRule = Collection[str] | Callable[[dict[str, Any]], Any] | None


def is_secret_name(name: str) -> bool:
    """Whether an argument or meta name looks like it holds a secret (password, token,
    secret, api_key, authorization, credential, private_key, cookie, session)."""
    hit = _secret_names.get(name)
    if hit is None:
        hit = _SECRET_NAME.search(name) is not None
        if len(_secret_names) < 4096:
            _secret_names[name] = hit
    return hit


def redact_names(value: Any, names: Collection[str] = ()) -> Any:
    """``value`` with the value of every dict key that is in ``names`` or looks like a
    secret (``is_secret_name``) replaced by ``***``, at any depth (dicts, lists, tuples).
    Returns ``value`` itself when nothing was hidden (most arguments: one pass over their
    keys, the name check cached)."""
    if isinstance(value, dict):
        out = None
        known = _secret_names.get
        for k, v in value.items():
            secret = known(k)
            if secret is None:
                secret = isinstance(k, str) and is_secret_name(k)
            if secret or k in names:
                shown: Any = MASK
            elif isinstance(v, (dict, list, tuple)):
                shown = redact_names(v, names)
                if shown is v:
                    continue
            else:
                continue
            if out is None:
                out = dict(value)
            out[k] = shown
        return value if out is None else out
    if isinstance(value, (list, tuple)):
        items = [redact_names(v, names) if isinstance(v, (dict, list, tuple)) else v for v in value]
        return items if any(a is not b for a, b in zip(items, value)) else value
    return value


def _cut(value: Any, size: int) -> str:
    if isinstance(value, str):
        return f"{value[:_KEEP_CHARS]}… [{TRUNCATED}: {size:,} bytes]"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"[{TRUNCATED}: {size:,} bytes of binary data]"
    return f"[{TRUNCATED}: {type(value).__name__} of {size:,} bytes]"


def _size(value: Any) -> int:
    """The msgpack size of ``value``; for str and bytes from their length (a large argument
    is most often one long string or blob: no second encoding of it)."""
    if isinstance(value, (bytes, bytearray)):
        n = len(value)
        return n + (2 if n < 256 else 3 if n < 65536 else 5)
    if isinstance(value, str) and value.isascii():
        n = len(value)
        return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)
    return len(_encode(value))


def _truncated(args: dict[str, Any], names: Collection[str] | None, limit: int) -> dict[str, Any]:
    """``args`` cut to about ``limit`` bytes: small values whole (and redacted, unless
    ``names`` is None: a callable's output is shown as it is), larger ones cut, and once
    the room is used up one ``"…"`` entry saying how many arguments were left out."""
    out: dict[str, Any] = {}
    room = limit
    for i, (k, v) in enumerate(args.items()):
        if room <= 0:
            out["…"] = f"[{TRUNCATED}: {len(args) - i} more arguments]"
            break
        key = k if len(k) <= _KEEP_CHARS else k[:_KEEP_CHARS] + "…"
        if names is not None and (k in names or is_secret_name(k)):
            shown: Any = MASK
            room -= len(key) + 4
        else:
            size = _size(v)
            if size <= min(_PART, room):
                shown = v if names is None else redact_names(v, names)
                room -= len(key) + size
            else:
                shown = _cut(v, size)
                room -= len(key) + len(shown) + 3
        out[key] = shown
    return out


def shown_args(args: dict[str, Any], rule: RedactRule = None, *, limit: int = ARGS_SHOWN_BYTES,
               size_hint: int | None = None) -> dict[str, Any] | None:
    """What of a task's ``args`` may be shown and kept for display: with ``rule`` None or a
    collection of names, the values of those names and of secret-looking ones hidden at
    any depth (``redact_names``: ``args`` itself when nothing is hidden, as a status's
    ``meta`` is the envelope's); with a callable, its result (a dict, or None for
    nothing), never the arguments it hid.  Either way cut to about ``limit`` msgpack
    bytes, each cut value saying so (``TRUNCATED``).  ``size_hint``: an upper bound of
    the arguments' encoded size already known (the frame's length), which spares the
    measuring when it is within ``limit``.

    A callable that raises, or returns something that is not a dict of msgpack values
    with str keys, shows one ``"…"`` entry saying so: a bad hook never leaks the
    arguments and never fails the task."""
    if callable(rule):
        try:
            shown = rule(dict(args))
        except Exception as exc:  # noqa: BLE001 - a broken hook hides the arguments, never fails the task
            return {"…": f"[hidden: the task's redact hook raised {type(exc).__name__}]"}
        if shown is None:
            return None
        if not isinstance(shown, dict) or not all(isinstance(k, str) for k in shown):
            return {"…": f"[hidden: the task's redact hook returned a {type(shown).__name__}, not a dict "
                         "with str keys]"}
        try:
            size = len(_encode(shown))
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            return {"…": "[hidden: the task's redact hook returned values msgpack cannot carry]"}
        return shown if size <= limit else _truncated(shown, None, limit)
    names: Collection[str] = rule or ()
    if size_hint is None or size_hint > limit:
        if not args:
            return args
        if len(_encode(args)) > limit:   # one copy in C: cheaper than adding up sizes in Python
            return _truncated(args, names, limit)
    return redact_names(args, names)
