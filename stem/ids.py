"""Task ids: random UUID4s as 32 lowercase hex characters, made a batch at a time.

``uuid.uuid4().hex`` costs ~3 us (a UUID object, an int round trip, a format)
and was the largest single item of a producer's per-task cost.  The same
ids come out of one ``os.urandom`` call per batch: the version and variant
bits of every 16-byte chunk are set with two ``bytes.translate`` calls over
strided slices, the whole buffer is hex-encoded once and sliced, ~0.1 us
per id.  Every id is a valid random (version 4, RFC 4122 variant) UUID in
``.hex`` form, with the 122 random bits from the same source uuid4 uses.

No random bytes are kept between calls here, so a forked child never repeats
its parent's ids.  The compiled single-enqueue template
(``stem.envelope.xadd_template``) makes ids of the same form from a pool of
``os.urandom`` bytes (32 ids a refill, each byte used once and wiped), which a
forked child empties (``pthread_atfork``) for the same reason.
"""

from __future__ import annotations

import os

__all__ = ["new_task_id", "new_task_ids"]

# byte 6: high nibble = version 4; byte 8: top two bits = variant 0b10 (RFC 4122)
_VERSION = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))


def new_task_ids(n: int) -> list[str]:
    """``n`` fresh task ids (uuid4 hex), from one ``os.urandom`` call."""
    if n <= 0:
        return []
    buf = bytearray(os.urandom(16 * n))
    buf[6::16] = buf[6::16].translate(_VERSION)
    buf[8::16] = buf[8::16].translate(_VARIANT)
    text = buf.hex()
    return [text[i:i + 32] for i in range(0, 32 * n, 32)]


def new_task_id() -> str:
    """One fresh task id (uuid4 hex)."""
    buf = bytearray(os.urandom(16))
    buf[6] = (buf[6] & 0x0F) | 0x40
    buf[8] = (buf[8] & 0x3F) | 0x80
    return buf.hex()
