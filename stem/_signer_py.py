"""HMAC-SHA256 signer in pure Python: the twin of ``stem._speedups.signer``.

Same API, byte-identical signatures.  Not a strawman: each key's ipad/opad
midstates are hashlib objects built once, so one HMAC is two ``copy()`` calls
and the message blocks (faster than ``hmac.digest`` on OpenSSL 3, whose
one-shot HMAC sets the key up on every call: benchmarks/README.md), and the comparison is
``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from stem.errors import ConfigurationError, SignatureError

__all__ = ["HmacSigner", "SHA256_BACKEND", "SHA256_BACKENDS", "SIGNATURE_SIZE", "constant_time_equal",
           "hmac_sha256", "sha256"]

SHA256_BACKEND = "hashlib"
SHA256_BACKENDS = ("hashlib",)
SIGNATURE_SIZE = 32
_sha256 = hashlib.sha256
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _midstates(secret: bytes):
    if len(secret) > 64:
        secret = _sha256(secret).digest()
    block = secret.ljust(64, b"\0")
    return _sha256(block.translate(_IPAD)), _sha256(block.translate(_OPAD))


class HmacSigner:
    """HMAC-SHA256 over a frame body with several accepted keys.

    ``keys`` maps key id (bytes, 1..255) to secret; ``active_key`` is the id
    :meth:`sign` uses (None: this signer only verifies).  The public
    ``stem.signing.PayloadSigner`` validates user input before it gets here.
    """

    __slots__ = ("_states", "_kids", "active_key")
    algorithm = "hmac-sha256"
    signature_size = 32

    def __init__(self, keys: Mapping[bytes, bytes], active_key: bytes | None = None):
        items = list(dict(keys).items())
        if not items:
            raise ConfigurationError("HmacSigner needs at least one key")
        for kid, secret in items:
            if type(kid) is not bytes or type(secret) is not bytes:
                raise ConfigurationError("HmacSigner key ids and secrets must be bytes")
            if not 1 <= len(kid) <= 255:
                raise ConfigurationError(f"key id must be 1..255 bytes, got {len(kid)}")
            if not secret:
                raise ConfigurationError(f"key {kid!r} is empty")
        self._states = {kid: _midstates(secret) for kid, secret in items}
        self._kids = tuple(kid for kid, _ in items)
        if active_key is not None:
            active_key = bytes(active_key)
            if active_key not in self._states:
                raise ConfigurationError(f"active key {active_key!r} is not one of the keys")
        self.active_key = active_key

    def __repr__(self) -> str:
        return f"HmacSigner(key_ids={list(self._kids)!r}, active_key={self.active_key!r})"

    @property
    def key_ids(self) -> tuple[bytes, ...]:
        return self._kids

    @property
    def can_sign(self) -> bool:
        return self.active_key is not None

    def sign(self, body) -> tuple[bytes, bytes]:
        """Return ``(key_id, signature)`` for ``body`` (bytes-like)."""
        kid = self.active_key
        if kid is None:
            raise SignatureError("this signer has no active key, so it can only verify; "
                                 "set the active key (STEM_SIGNING_ACTIVE_KEY) to sign")
        inner, outer = self._states[kid]
        h = inner.copy()
        h.update(body)
        o = outer.copy()
        o.update(h.digest())
        return kid, o.digest()

    def verify(self, key_id, signature, body) -> None:
        """Return None when ``signature`` signs ``body`` under ``key_id``; raise SignatureError."""
        states = self._states.get(bytes(key_id))
        if states is None:
            raise SignatureError(
                f"frame signed with unknown key id {bytes(key_id)!r}; "
                f"accepted: {list(self._kids)!r} (add the key to the worker's signing keys)")
        if len(signature) != 32:
            raise SignatureError(f"signature is {len(signature)} bytes; hmac-sha256 signatures are 32")
        h = states[0].copy()
        h.update(body)
        o = states[1].copy()
        o.update(h.digest())
        if not hmac.compare_digest(o.digest(), signature):
            raise SignatureError(
                f"signature does not match the frame body (key id {bytes(key_id)!r}): "
                "the frame was altered or signed with another secret")


def sha256(data) -> bytes:
    """SHA-256 of ``data``."""
    return _sha256(data).digest()


def hmac_sha256(key, data) -> bytes:
    """One-shot HMAC-SHA256 (RFC 2104)."""
    return hmac.digest(key, data, "sha256")


def constant_time_equal(a, b) -> bool:
    """``a == b`` for bytes-like values, in time that depends only on the length."""
    return hmac.compare_digest(a, b)
