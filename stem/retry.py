"""How long to wait before the next attempt of a failed task."""

from __future__ import annotations

import abc
import random

from .errors import ConfigurationError

__all__ = ["RetryStrategy", "ExponentialJitterRetryStrategy", "FixedRetryStrategy"]


class RetryStrategy(abc.ABC):
    @abc.abstractmethod
    def next_delay(self, attempt: int) -> float:
        """Seconds to wait before running attempt ``attempt + 1`` (``attempt`` counts from 0)."""


class ExponentialJitterRetryStrategy(RetryStrategy):
    """min(base * 2**attempt, max), less a random jitter of up to a quarter.

    The jitter only shortens the delay, so ``max`` stays a real upper bound and
    retries of tasks that failed together spread out instead of stampeding.
    """

    def __init__(self, base: float = 0.5, max: float = 60.0, *, rng: random.Random | None = None):
        if not base >= 0 or not max >= 0:
            raise ConfigurationError(f"retry base and max must be >= 0 seconds, got base={base!r} max={max!r}")
        if max < base:
            raise ConfigurationError(f"retry max ({max}) must be >= base ({base})")
        self.base = float(base)
        self.max = float(max)
        self._random = (rng or random).random

    def next_delay(self, attempt: int) -> float:
        delay = min(self.base * 2.0 ** min(attempt, 64), self.max)
        return delay - delay * 0.25 * self._random()

    def __repr__(self) -> str:
        return f"ExponentialJitterRetryStrategy(base={self.base}, max={self.max})"


class FixedRetryStrategy(RetryStrategy):
    def __init__(self, delay: float):
        if not delay >= 0:
            raise ConfigurationError(f"retry delay must be >= 0 seconds, got {delay!r}")
        self.delay = float(delay)

    def next_delay(self, attempt: int) -> float:
        return self.delay
