"""Signed revocations: the proof stored with a persistent revoke, and a worker's check of it.

A revoke lives in the result backend (``ResultBackend.revoke``) so that a worker
started later honours it too, and every worker re-reads the live revocations
once a second.  With signing on, a revoke needs the same authority as any other
control command, or whoever can write to the backend could cancel any task.
So whoever revokes (``Stem.revoke``, ``Control.revoke``, ``stem worker revoke``)
stores with each id a *proof*: a frame signed with its active key whose
envelope names the task (``name`` ``stem.revoke``, ``id`` the task id,
``expires_at`` the end of the revocation).  A proof cannot pass for a task or a
control command (neither has that name), and a task's or command's frame cannot
pass for a proof.

A worker with a signer honours a stored revocation only while its proof
verifies under one of its keys (public keys are enough), names that id and has
not expired; a worker without a signer honours every stored revocation.

``RevocationCheck`` keeps the verified ids (with their end), so the
once-a-second refresh reads only ``revoked()`` and fetches proofs just for ids
it has not seen; an id whose proof is missing or bad is looked at again every
``RECHECK_REFUSED_S`` seconds (a signed revoke may replace an unsigned one).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

from . import _checks as checks
from .envelope import Envelope, decode_frame, encode_frames
from .errors import ConfigurationError, DecodeError, SignatureError

__all__ = ["PROOF_NAME", "RECHECK_REFUSED_S", "RevocationCheck", "sign_proofs", "store_revocations", "revocation_args",
           "verify_proof"]

log = logging.getLogger("stem.control")

PROOF_NAME = "stem.revoke"
RECHECK_REFUSED_S = 10.0


def sign_proofs(task_ids: Sequence[str], until: float, signer: Any) -> list[bytes]:
    """One signed proof per id, each valid until ``until`` (epoch seconds)."""
    env = Envelope(id="", name=PROOF_NAME, queue="stem.revoke", enqueued_at=time.time(), expires_at=float(until))
    return encode_frames(env, list(task_ids), [{} for _ in task_ids], signer)


def verify_proof(task_id: str, proof: bytes | None, signer: Any, now: float | None = None) -> float | None:
    """The end of the revocation ``proof`` proves for ``task_id``, or None when it does not."""
    if proof is None:
        return None
    try:
        env = decode_frame(proof, signer)
    except (SignatureError, DecodeError):
        return None
    now = time.time() if now is None else now
    if env.name != PROOF_NAME or env.id != task_id or env.expires_at is None or env.expires_at <= now:
        return None
    return env.expires_at


def store_revocations(backend: Any, task_ids: Sequence[str], expires: float | None, signer: Any) -> None:
    """Store a persistent revoke of ``task_ids``: with a proof per id when ``signer`` is set."""
    args = revocation_args(backend.result_expires, task_ids, expires, signer)
    if args is not None:
        backend.revoke(*args)


def revocation_args(result_expires: float, task_ids: Sequence[str], expires: float | None,
                    signer: Any) -> tuple[list[str], float | None, list[bytes] | None] | None:
    """The checked arguments of ``ResultBackend.revoke`` (ids, expires, proofs: signed when
    ``signer`` is set), or None when there is nothing to revoke.  Shared by ``Stem.revoke``
    and ``AsyncStem.revoke``."""
    ids = list(task_ids)
    if not all(isinstance(i, str) and i for i in ids):
        raise ConfigurationError(f"task ids to revoke are non-empty str, got {task_ids!r}")
    checks.optional_seconds("expires", expires)
    if not ids:
        return None
    if signer is None:
        return ids, expires, None
    if not getattr(signer, "can_sign", True):
        raise ConfigurationError("revoking with signing on needs a signing key, and this signer holds public keys "
                                 "only: revoke from a process that has STEM_SIGNING_KEYS (workers that verify "
                                 "would ignore an unsigned revoke)")
    until = time.time() + (result_expires if expires is None else float(expires))
    return ids, expires, sign_proofs(ids, until, signer)


class RevocationCheck:
    """The stored revocations a worker with ``signer`` honours: those whose proof verifies."""

    def __init__(self, signer: Any):
        self.signer = signer
        self._proven: dict[str, float] = {}     # task id -> end of its revocation (epoch s)
        self._refused: dict[str, float] = {}    # task id -> when to look again (monotonic s)
        self._lock = threading.Lock()           # the fetcher and a settle refill may both ask

    def honoured(self, backend: Any, revoked: set[str]) -> set[str]:
        """The ids of ``revoked`` (``backend.revoked()``) whose proof verifies."""
        with self._lock:
            return self._honoured(backend, revoked)

    def _honoured(self, backend: Any, revoked: set[str]) -> set[str]:
        now, mono = time.time(), time.monotonic()
        proven, refused = self._proven, self._refused
        for i in [i for i, until in proven.items() if until <= now or i not in revoked]:
            del proven[i]
        for i in [i for i in refused if i not in revoked]:
            del refused[i]
        unknown = [i for i in revoked if i not in proven and refused.get(i, 0.0) <= mono]
        if unknown:
            proofs = backend.revocation_proofs(unknown)
            newly_refused = []
            for i in unknown:
                until = verify_proof(i, proofs.get(i), self.signer, now)
                if until is None:
                    if i not in refused:
                        newly_refused.append(i)
                    refused[i] = mono + RECHECK_REFUSED_S
                else:
                    proven[i] = until
                    refused.pop(i, None)
            if newly_refused:
                log.warning("ignoring %d stored revocation(s) without a valid signed proof (e.g. task %s): "
                            "revoke with a signing key", len(newly_refused), newly_refused[0])
        return set(proven)
