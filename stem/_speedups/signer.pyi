"""HMAC-SHA256 signer in C (``_speedups/signer.pyx``); the same API as the pure twin
``stem._signer_py``.  ``tests/test_build.py`` checks these names against the twin's."""

from collections.abc import Mapping
from typing import ClassVar, Final, final

__all__ = ["HmacSigner", "SHA256_BACKEND", "SHA256_BACKENDS", "SIGNATURE_SIZE", "constant_time_equal",
           "hmac_sha256", "sha256"]

_Buffer = bytes | bytearray | memoryview

SHA256_BACKEND: Final[str]
SHA256_BACKENDS: Final[tuple[str, ...]]
SIGNATURE_SIZE: Final[int]

@final
class HmacSigner:
    algorithm: ClassVar[str]
    signature_size: ClassVar[int]
    @property
    def active_key(self) -> bytes | None: ...
    def __init__(self, keys: Mapping[bytes, bytes], active_key: bytes | None = None) -> None: ...
    @property
    def key_ids(self) -> tuple[bytes, ...]: ...
    @property
    def can_sign(self) -> bool: ...
    def sign(self, body: _Buffer) -> tuple[bytes, bytes]: ...
    def verify(self, key_id: bytes, signature: bytes, body: _Buffer) -> None: ...

def sha256(data: _Buffer) -> bytes: ...
def hmac_sha256(key: bytes, data: _Buffer) -> bytes: ...
def constant_time_equal(a: _Buffer, b: _Buffer) -> bool: ...

# compiled only: the capsule the compiled codec reads (signer_capi.h), and the block
# function switch the tests and benchmarks use
_C_API: object
def _sha256_with(backend: str, data: _Buffer) -> bytes: ...
def _use_sha256_backend(backend: str) -> str: ...
