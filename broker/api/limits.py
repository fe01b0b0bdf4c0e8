"""Per-guest limits: token-bucket rate limits and bounded notice waiters.

Every limit is kept **per guest**, so a guest that runs into its own limit is answered 429
(with ``Retry-After``) while every other guest goes on as before: one guest cannot spend
another's budget. Use::

    limits = GuestLimits.from_settings(settings)          # rate limits off when both rates are 0
    limits.charge(guest_id, pages=1)                      # raises RateLimited when over
    with limits.waiter(guest_id):                         # raises TooManyWaiters when over
        ...                                               # a long-poll or a WebSocket

A bucket holds ``rate * burst`` tokens, refills at ``rate`` per second and starts full, so a
guest may burst for ``burst`` seconds at any moment after an idle spell.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from broker.api.errors import RateLimited, TooManyWaiters
from broker.settings import Settings


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` banked; ``take`` returns the seconds to
    wait before ``n`` tokens would be there (0.0 when they were taken)."""

    rate: float
    capacity: float
    tokens: float
    stamp: float

    def take(self, n: float, now: float) -> float:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self.stamp = now
        if n <= self.tokens:
            self.tokens -= n
            return 0.0
        # A request larger than the whole bucket (a big batch under a small page rate) is let
        # through once the bucket is full, and leaves it in debt: it is slowed, never refused
        # for good.
        needed = min(n, self.capacity) - self.tokens
        if needed <= 0:
            self.tokens -= n
            return 0.0
        return needed / self.rate


@dataclass
class GuestLimits:
    """The per-guest limits of one broker (see the module docstring)."""

    requests_per_s: float = 0.0
    pages_per_s: float = 0.0
    burst_s: float = 2.0
    max_waiters: int = 16
    clock: Callable[[], float] = time.monotonic
    _requests: dict[int, TokenBucket] = field(default_factory=dict)
    _pages: dict[int, TokenBucket] = field(default_factory=dict)
    _waiters: dict[int, int] = field(default_factory=dict)
    refused: int = 0  # requests answered 429 since start (rate or waiters)

    @classmethod
    def from_settings(cls, settings: Settings) -> GuestLimits:
        return cls(
            requests_per_s=settings.rate_limit_requests,
            pages_per_s=settings.rate_limit_pages,
            burst_s=settings.rate_limit_burst,
            max_waiters=settings.max_waiters_per_guest,
        )

    @property
    def enabled(self) -> bool:
        """Whether any rate limit is on (the hot path skips :meth:`charge` when not)."""
        return self.requests_per_s > 0 or self.pages_per_s > 0

    def _bucket(self, table: dict[int, TokenBucket], guest_id: int, rate: float) -> TokenBucket:
        bucket = table.get(guest_id)
        if bucket is None:
            capacity = max(1.0, rate * self.burst_s)
            bucket = table[guest_id] = TokenBucket(rate, capacity, capacity, self.clock())
        return bucket

    def charge(self, guest_id: int, *, requests: int = 1, pages: int = 0) -> None:
        """Take one request (and ``pages`` pages) from the guest's buckets, or raise
        :class:`RateLimited` with the seconds after which a retry would pass."""
        now = self.clock()
        wait = 0.0
        if self.requests_per_s > 0 and requests:
            bucket = self._bucket(self._requests, guest_id, self.requests_per_s)
            wait = bucket.take(requests, now)
        if wait == 0.0 and self.pages_per_s > 0 and pages:
            bucket = self._bucket(self._pages, guest_id, self.pages_per_s)
            wait = bucket.take(pages, now)
        if wait > 0.0:
            self.refused += 1
            raise RateLimited(
                f"rate limit of this guest reached; retry in {wait:.3f} s",
                retry_after=max(1, math.ceil(wait)),
            )

    @contextmanager
    def waiter(self, guest_id: int) -> Iterator[None]:
        """Count a long-poll or WebSocket of the guest while it runs; raise
        :class:`TooManyWaiters` when the guest already has ``max_waiters``."""
        count = self._waiters.get(guest_id, 0)
        if count >= self.max_waiters:
            self.refused += 1
            raise TooManyWaiters(
                f"this guest already has {count} notice waiters (long-polls and WebSockets); "
                f"at most {self.max_waiters} are allowed",
                retry_after=1,
            )
        self._waiters[guest_id] = count + 1
        try:
            yield
        finally:
            left = self._waiters[guest_id] - 1
            if left:
                self._waiters[guest_id] = left
            else:
                del self._waiters[guest_id]

    def waiters(self, guest_id: int) -> int:
        return self._waiters.get(guest_id, 0)

    def forget(self, guest_id: int) -> None:
        """Drop a deleted guest's buckets."""
        self._requests.pop(guest_id, None)
        self._pages.pop(guest_id, None)
