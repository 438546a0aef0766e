"""Who may see the dashboard and who may act on it: authentication, CSRF, headers.

* **Authentication** (``Guard``): HTTP basic (``auth=(user, password)``) or a bearer
  token (``token=``), compared in constant time.  A browser cannot send a bearer
  header by itself, so ``/login`` takes the token in a form and keeps it in an
  HttpOnly, SameSite=Strict cookie.  ``/login`` and ``/static`` are the only paths
  served without credentials (the static files are the package's own CSS and JS).
* **CSRF**: every action is a POST carrying a token that is the HMAC of a random
  nonce held in a cookie (signed double submit): a page from elsewhere can neither
  read the token nor forge one without the app's secret, and the server stores no
  session.  A POST whose ``Origin`` names another host is refused too.
* **Headers**: a Content-Security-Policy that allows only the package's own script
  and styles (no inline script: a task result that escaped its escaping still could
  not run), no framing, no sniffing, no referrer to other sites.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Guard", "Csrf", "SECURITY_HEADERS", "TOKEN_COOKIE", "CSRF_COOKIE", "CSRF_FIELD"]

TOKEN_COOKIE = "stem_dashboard_token"
CSRF_COOKIE = "stem_dashboard_csrf"
CSRF_FIELD = "csrf_token"
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),   # no-referrer would make browsers send "Origin: null"
    (b"cache-control", b"no-store"),
]


def _cookies(scope: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in scope.get("headers") or ():
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, sep, v = part.strip().partition("=")
                if sep:
                    out.setdefault(k, v)
    return out


def _header(scope: dict[str, Any], wanted: bytes) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == wanted:
            return value.decode("latin-1")
    return None


class Guard:
    """ASGI middleware: 401 without the right credentials, and the security headers on
    every response.  ``auth``: (user, password) for HTTP basic; ``token``: a bearer token."""

    def __init__(self, app: Any, *, auth: tuple[str, str] | None, token: str | None):
        self.app = app
        self.auth = None if auth is None else (auth[0].encode(), auth[1].encode())
        self.token = None if token is None else token.encode()

    def authorized(self, scope: dict[str, Any]) -> bool:
        if self.auth is None and self.token is None:
            return True
        header = _header(scope, b"authorization") or ""
        scheme, _, value = header.partition(" ")
        if self.auth is not None and scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(value.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            # both compared, always: the time taken says nothing about which was wrong
            ok_user = hmac.compare_digest(user, self.auth[0])
            ok_password = hmac.compare_digest(password, self.auth[1])
            return bool(sep) and ok_user and ok_password
        if self.token is not None:
            if scheme.lower() == "bearer":
                return hmac.compare_digest(value.strip().encode(), self.token)
            cookie = _cookies(scope).get(TOKEN_COOKIE)
            if cookie is not None:
                return hmac.compare_digest(cookie.encode("latin-1"), self.token)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        path = scope.get("path", "")
        root = scope.get("root_path", "")
        local = path[len(root):] if root and path.startswith(root) else path
        open_path = local.startswith("/static/") or (self.token is not None and local == "/login")
        if open_path or self.authorized(scope):
            await self.app(scope, receive, send_with_headers)
            return
        if self.auth is not None:
            headers = [(b"www-authenticate", b'Basic realm="stem dashboard", charset="UTF-8"')]
            body = b"401: this dashboard needs a user name and password\n"
        else:
            headers = [(b"www-authenticate", b'Bearer realm="stem dashboard"')]
            body = (b"401: this dashboard needs a token (Authorization: Bearer TOKEN, "
                    b"or log in at " + (root or "").encode() + b"/login)\n")
        await send_with_headers({"type": "http.response.start", "status": 401,
                                 "headers": headers + [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": body})


class Csrf:
    """Signed double-submit tokens: the cookie holds a nonce, the form the nonce's HMAC."""

    def __init__(self, secret: bytes | None = None):
        self._secret = secret if secret is not None else secrets.token_bytes(32)

    def token_for(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode("latin-1"), hashlib.sha256).hexdigest()

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_hex(16)

    def check(self, cookie_nonce: str | None, submitted: Any) -> bool:
        if not cookie_nonce or not isinstance(submitted, str) or not submitted:
            return False
        return hmac.compare_digest(self.token_for(cookie_nonce).encode(), submitted.encode("latin-1", "replace"))


def same_origin(scope: dict[str, Any]) -> bool:
    """False when the request names an ``Origin`` (or, without one, a ``Referer``) whose host
    is not the one it was sent to; True when it names none (curl, old browsers)."""
    source = _header(scope, b"origin") or _header(scope, b"referer")
    if not source or source == "null":
        return source != "null"
    host = _header(scope, b"host")
    return host is not None and urlsplit(source).netloc == host
