"""Payload signing: HMAC-SHA256 (default) or Ed25519, with key ids for rotation.

A producer signs each frame body with its *active* key and puts the key id in
the frame; a worker accepts every key it is configured with, so keys rotate
without downtime: add the new key everywhere, switch the producers' active
key, then drop the old key once no frame signed with it remains queued.

    HMAC-SHA256   keys are shared secrets (at least 16 bytes); whoever can
                  verify can also sign.  The hot path: compiled in
                  ``stem._speedups.signer`` (pure twin ``stem._signer_py``);
                  ``IMPLEMENTATION`` says which one runs.
    Ed25519       keys are 32-byte private seeds; ``public_keys`` (32-byte raw
                  public keys) let a worker verify without being able to sign.
                  Needs ``pip install 'stem-queue[ed25519]'`` (cryptography).

Configuration (``stem.config``): ``STEM_SIGNING_ALGORITHM``,
``STEM_SIGNING_KEYS`` (``id:base64,id2:base64``, parsed by :func:`parse_keys`),
``STEM_SIGNING_ACTIVE_KEY``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from stem import _native
from stem.errors import ConfigurationError, SignatureError

__all__ = ["ALGORITHMS", "IMPLEMENTATION", "MIN_HMAC_KEY_SIZE", "PayloadSigner", "parse_keys"]

ALGORITHMS = ("hmac-sha256", "ed25519")
MIN_HMAC_KEY_SIZE = 16
ED25519_KEY_SIZE = 32
MAX_KEY_ID_LENGTH = 64

_hmac = _native.load("signer")
#: "cython" or "python": which HMAC signer build this process runs (``stem._native`` decides)
IMPLEMENTATION = _native.implementation("signer")


def _check_key_id(key_id: Any) -> str:
    if not isinstance(key_id, str):
        raise ConfigurationError(f"signing key ids are str, got {type(key_id).__name__} {key_id!r}")
    if not (1 <= len(key_id) <= MAX_KEY_ID_LENGTH and key_id.isascii() and key_id.isprintable()
            and not any(c in " ,:" for c in key_id)):
        raise ConfigurationError(
            f"bad signing key id {key_id!r}: use 1..{MAX_KEY_ID_LENGTH} printable ASCII characters "
            "without spaces, ':' or ',' (e.g. '2024-06')")
    return key_id


def _check_secret(key_id: str, secret: Any, what: str) -> bytes:
    if isinstance(secret, str):
        raise ConfigurationError(
            f"{what} {key_id!r} is a str; pass bytes (decode base64 text with stem.signing.parse_keys)")
    try:
        return bytes(memoryview(secret))
    except TypeError:
        raise ConfigurationError(f"{what} {key_id!r} must be bytes, got {type(secret).__name__}") from None


def _load_ed25519():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise ConfigurationError(
            "ed25519 signing needs the cryptography package: pip install 'stem-queue[ed25519]' "
            f"({exc})") from exc
    return ed25519, InvalidSignature


class _Ed25519Signer:
    """Ed25519 backend with the same sign/verify protocol as ``HmacSigner``."""

    __slots__ = ("_private", "_public", "_invalid", "active_key")
    algorithm = "ed25519"
    signature_size = 64

    def __init__(self, private: Mapping[bytes, bytes], public: Mapping[bytes, bytes],
                 active_key: bytes | None):
        ed25519, self._invalid = _load_ed25519()
        self._private = {kid: ed25519.Ed25519PrivateKey.from_private_bytes(seed)
                         for kid, seed in private.items()}
        self._public = {kid: key.public_key() for kid, key in self._private.items()}
        for kid, raw in public.items():
            try:
                self._public[kid] = ed25519.Ed25519PublicKey.from_public_bytes(raw)
            except ValueError as exc:
                raise ConfigurationError(f"ed25519 public key {kid.decode()!r} is invalid: {exc}") from None
        self.active_key = active_key

    @property
    def can_sign(self) -> bool:
        return self.active_key is not None

    def sign(self, body) -> tuple[bytes, bytes]:
        if self.active_key is None:
            raise SignatureError("this ed25519 signer holds only public keys, so it can verify but not "
                                 "sign; give it a private key (signing_keys) to sign")
        return self.active_key, self._private[self.active_key].sign(bytes(body))

    def verify(self, key_id, signature, body) -> None:
        key = self._public.get(bytes(key_id))
        if key is None:
            raise SignatureError(
                f"frame signed with unknown key id {bytes(key_id)!r}; accepted: {sorted(self._public)!r} "
                "(add the key to the worker's signing keys)")
        if len(signature) != 64:
            raise SignatureError(f"signature is {len(signature)} bytes; ed25519 signatures are 64")
        try:
            key.verify(bytes(signature), bytes(body))
        except self._invalid:
            raise SignatureError(
                f"signature does not match the frame body (key id {bytes(key_id)!r}): "
                "the frame was altered or signed with another key") from None


def _mapping(value: Any, what: str) -> dict:
    """``value`` (a mapping, or pairs) as a dict of key id to secret: a bare secret in its
    place is the usual slip, and says so."""
    if value is None:
        return {}
    try:
        if isinstance(value, (bytes, bytearray, memoryview, str)):
            raise TypeError
        return dict(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} must map key ids to secret bytes, e.g. {{'k1': secret}}; "
                                 f"got {type(value).__name__}") from None


class PayloadSigner:
    """Signs and verifies frame bodies with a set of keys identified by id.

    ``keys`` maps key id (1..64 printable ASCII, no spaces, ':' or ',') to
    secret bytes: HMAC secrets of at least 16 bytes, or 32-byte Ed25519
    private seeds.  ``active_key`` is the id :meth:`sign` uses; it defaults to
    the only key, and must be named when there are several.  ``public_keys``
    (Ed25519 only) adds verify-only keys; a signer with public keys only
    cannot sign (``can_sign`` is False).
    """

    __slots__ = ("_backend", "algorithm", "active_key", "key_ids", "_recipe")

    def __init__(self, keys: Mapping[str, bytes], active_key: str | None = None,
                 algorithm: str = "hmac-sha256", public_keys: Mapping[str, bytes] | None = None):
        algorithm = algorithm.strip().lower() if isinstance(algorithm, str) else algorithm
        if algorithm not in ALGORITHMS:
            raise ConfigurationError(f"unknown signing algorithm {algorithm!r}; choose one of {ALGORITHMS}")
        keys = {_check_key_id(k): _check_secret(k, v, "signing key") for k, v in _mapping(keys, "keys").items()}
        public = {_check_key_id(k): _check_secret(k, v, "public key")
                  for k, v in _mapping(public_keys, "public_keys").items()}
        if not keys and not public:
            raise ConfigurationError("PayloadSigner needs at least one key "
                                     "(STEM_SIGNING_KEYS=id:base64[,id2:base64])")
        if active_key is not None:
            _check_key_id(active_key)
            if active_key not in keys:
                raise ConfigurationError(
                    f"active signing key {active_key!r} is not among the signing keys {sorted(keys)}")
        elif len(keys) == 1:
            active_key = next(iter(keys))
        elif len(keys) > 1:
            raise ConfigurationError(
                f"several signing keys {sorted(keys)} and no active key: name the one to sign with "
                "(active_key=..., STEM_SIGNING_ACTIVE_KEY)")
        if algorithm == "hmac-sha256":
            if public:
                raise ConfigurationError("public_keys are for ed25519; hmac-sha256 keys are shared "
                                         "secrets: put them in keys")
            for kid, secret in keys.items():
                if len(secret) < MIN_HMAC_KEY_SIZE:
                    raise ConfigurationError(
                        f"hmac-sha256 key {kid!r} is {len(secret)} bytes; use at least "
                        f"{MIN_HMAC_KEY_SIZE} random bytes (e.g. base64 of os.urandom(32))")
            self._backend = _hmac.HmacSigner({k.encode(): v for k, v in keys.items()},
                                             None if active_key is None else active_key.encode())
        else:
            for what, table in (("ed25519 private seed", keys), ("ed25519 public key", public)):
                for kid, secret in table.items():
                    if len(secret) != ED25519_KEY_SIZE:
                        raise ConfigurationError(f"{what} {kid!r} is {len(secret)} bytes; it must be "
                                                 f"{ED25519_KEY_SIZE} (raw, not PEM)")
            both = sorted(set(keys) & set(public))
            if both:
                raise ConfigurationError(f"key ids {both} are in both keys and public_keys; "
                                         "a private seed already implies its public key")
            self._backend = _Ed25519Signer({k.encode(): v for k, v in keys.items()},
                                           {k.encode(): v for k, v in public.items()},
                                           None if active_key is None else active_key.encode())
        self.algorithm = algorithm
        self.active_key = active_key
        self.key_ids = tuple(keys) + tuple(public)
        # what pickling rebuilds it from (a worker hands its signer to its children this way)
        self._recipe = (keys, active_key, algorithm, public)

    def __reduce__(self) -> tuple:
        return (PayloadSigner, self._recipe)

    @classmethod
    def from_config(cls, config: Any) -> PayloadSigner:
        """A signer from a config's ``signing_*`` attributes (ConfigurationError without keys)."""
        keys = getattr(config, "signing_keys", None) or {}
        public = getattr(config, "signing_public_keys", None) or {}
        if not keys and not public:
            raise ConfigurationError("no signing keys configured: set STEM_SIGNING_KEYS=id:base64[,...] "
                                     "(or leave signing off with no keys at all)")
        return cls(keys, getattr(config, "signing_active_key", None) or None,
                   getattr(config, "signing_algorithm", None) or "hmac-sha256", public)

    @classmethod
    def maybe(cls, config: Any) -> PayloadSigner | None:
        """:meth:`from_config`, or None when the config has no signing keys at all."""
        if not (getattr(config, "signing_keys", None) or getattr(config, "signing_public_keys", None)):
            return None
        return cls.from_config(config)

    @property
    def can_sign(self) -> bool:
        return self._backend.can_sign

    def sign(self, body: bytes | memoryview) -> tuple[bytes, bytes]:
        """``(key_id, signature)`` of ``body`` with the active key (SignatureError if verify-only)."""
        return self._backend.sign(body)

    def verify(self, key_id: bytes, signature: bytes, body: bytes | memoryview) -> None:
        """Return None if ``signature`` signs ``body`` under ``key_id``; else raise SignatureError.

        Unknown key ids, wrong signature sizes and mismatches all raise; the
        comparison takes the same time wherever the bytes differ.
        """
        self._backend.verify(key_id, signature, body)

    def __repr__(self) -> str:
        return (f"PayloadSigner(algorithm={self.algorithm!r}, key_ids={list(self.key_ids)!r}, "
                f"active_key={self.active_key!r})")


def parse_keys(text: str) -> dict[str, bytes]:
    """Parse ``"id:base64,id2:base64"`` (STEM_SIGNING_KEYS) into ``{id: secret}``.

    Whitespace around items and empty items are ignored; standard and
    URL-safe base64 are accepted, with or without padding.  Errors name the
    item by position and never echo secret material.
    """
    if not isinstance(text, str):
        raise ConfigurationError(f"signing keys must be a str 'id:base64,...', got {type(text).__name__}")
    keys: dict[str, bytes] = {}
    for position, item in enumerate(text.split(","), start=1):
        item = item.strip()
        if not item:
            continue
        key_id, sep, encoded = item.partition(":")
        if not sep:
            raise ConfigurationError(f"signing key #{position} has no ':'; write id:base64 "
                                     "(e.g. STEM_SIGNING_KEYS=2024-06:<base64 of 32 random bytes>)")
        key_id = _check_key_id(key_id.strip())
        encoded = encoded.strip()
        if key_id in keys:
            raise ConfigurationError(f"signing key id {key_id!r} appears twice")
        try:
            padded = encoded + "=" * (-len(encoded) % 4)
            altchars = b"-_" if ("-" in encoded or "_" in encoded) else None
            secret = base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"signing key {key_id!r} is not valid base64") from None
        if not secret:
            raise ConfigurationError(f"signing key {key_id!r} is empty")
        keys[key_id] = secret
    return keys
