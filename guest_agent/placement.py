"""Broker or fallback: where a persistent page goes, and the one retry/backoff policy.

A guest that keeps persistent pages at the broker (the Frontswap shim,
:class:`guest_agent.shims.Frontswap`; the NBD export,
:class:`guest_agent.nbd.broker_backend.BrokerBackend`; any later overlay on top of them) must
never lose a page it acknowledged, while the broker may decline a put, be unreachable, restart
or ask for pages back. :class:`Placement` holds the rules they share; the caller keeps its own
location map (Frontswap: a dict of swap offsets; the export: a byte per block) and its own
fallback (a :class:`~guest_agent.fallback.FallbackStore`, or the export's file) and does the
I/O, sync or async, asking :class:`Placement` at each step::

    placement = Placement(RetryPolicy())                 # one per persistent pool
    if placement.may_offer() and placement.room_for(n_new, held) ...:
        try:
            results = client.put_many(pool, pages)
        except Exception as exc:
            landed = placement.put_failed(exc)           # True: the put may have landed
            ...  # every page -> fallback; a broker copy that may exist -> placement.stale
        else:
            ...  # stored -> broker; declined -> fallback
            if declined:
                placement.note_declines(results)
    pages = retry(lambda: client.get_many(pool, handles), placement.policy)   # reads
    await aretry(lambda: client.get_many(pool, handles), placement.policy)    # the same, async

The rules (each caller's map follows them):

1. **Offer or not.** A put is offered unless the broker was found unreachable less than
   ``down_interval`` ago, or the guest is frozen (a ``freeze`` notice, until ``thaw``; a
   ``frozen`` decline, for ``recheck_interval``). A *new* page is also held back while a
   ``quota`` decline is recent (``recheck_interval``, or until a ``quota`` notice or a flush
   frees room) or when the pages held reach the cap (:meth:`Placement.room_for`). A page not
   offered goes to the fallback.
2. **Stored** puts live at the broker; the fallback copy, if any, is dropped.
3. **Declined** puts (quota, capacity, frozen, policy) go to the fallback; the broker removed
   any older copy itself (contract), so nothing is stale.
4. **Failed** puts go to the fallback. An error *answer* (4xx/5xx) changed nothing, so only an
   older broker copy is left behind; anything else (unreachable, an unreadable answer) may
   have landed. Either way the broker copy the map no longer points at is *stale*: never read,
   flushed later (a new put of the same page replaces it; a flush of the page or a sweep
   with :meth:`Placement.take_stale` removes it).
5. **Reads** of a page the map puts at the broker retry transient failures (unreachable,
   5xx, 429) along :class:`RetryPolicy` and never fall back to an older copy; a miss for such
   a page is a broker bug and fails the read.
6. **Shed** (the broker asks for ``n`` pages back): stale copies first (they count), then
   pages are fetched, written to the fallback, the fallback is synced, and only then flushed
   at the broker; the map says "fallback" once the fallback holds them. A failed flush leaves
   them stale.

Where the two callers differ, the policy says so: Frontswap keeps the defaults; the export
reads with ``attempts=None, deadline=30`` (a swap device waits out a broker restart) and
offers every write (``down_interval=0, recheck_interval=0``: it has no notice of thaw or new
quota, and a put the broker declines costs one round trip, not a lost page).

Not thread-safe: the caller serialises (Frontswap's lock; the export's dispatcher runs calls on
disjoint blocks, so stale keys are flushed only by the call that owns their block, or under
``Dispatcher.exclusive``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from guest_agent.errors import BrokerError, BrokerUnavailable, RateLimited, ServerError
from schemas.wire import Notice

__all__ = ["TRANSIENT", "Placement", "RetryPolicy", "aretry", "retry"]

TRANSIENT: tuple[type[Exception], ...] = (BrokerUnavailable, ServerError, RateLimited)
"""Failures worth waiting out: the broker is unreachable, restarting (503) or rate limiting."""

_T = TypeVar("_T")
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with exponential backoff, and how long to skip a broker that failed.

    A read of a broker-held page is tried, then retried after ``backoff``,
    ``backoff*multiplier``, ... seconds (each at most ``max_backoff``), until ``attempts``
    tries in all (``None``: no limit) or ``deadline`` seconds after the first try (``None``:
    no limit) — whichever comes first; then the last error stands. ``down_interval`` is how
    long puts skip the broker after it was found unreachable; ``recheck_interval`` how long they
    skip it after a ``quota`` or ``frozen`` decline when no notice lifts that first.

    The defaults are Frontswap's (8 tries over ~4.5 s; a second's rest after an outage; a
    5 s re-check). The backoff constants (50 ms doubling to 1 s) are the same for every caller.
    """

    attempts: int | None = 8
    backoff: float = 0.05
    multiplier: float = 2.0
    max_backoff: float = 1.0
    down_interval: float = 1.0
    recheck_interval: float = 5.0
    deadline: float | None = None

    def delays(self) -> Iterator[float]:
        """The sleeps between tries (``attempts - 1`` of them; endless when unlimited)."""
        delay = self.backoff
        n = 0
        while self.attempts is None or n < self.attempts - 1:
            yield delay
            n += 1
            delay = min(delay * self.multiplier, self.max_backoff)


def _next_delay(delays: Iterator[float], deadline: float | None, now: float) -> float | None:
    delay = next(delays, None)
    if delay is None or deadline is None:
        return delay
    left = deadline - now
    return None if left <= 0 else min(delay, left)


def retry(
    call: Callable[[], _T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[Exception], None] | None = None,
    failed: Exception | None = None,
    started: float | None = None,
) -> _T:
    """``call()``, retried along ``policy`` while it raises a :data:`TRANSIENT` error; the
    last error propagates once the policy gives up. ``on_retry(exc)`` runs before each sleep.

    A caller that made the first try itself (a hot path that should cost no wrapper when the
    broker answers) passes its error as ``failed`` and the ``clock()`` before it as
    ``started``: the schedule goes on as if that try had been made here."""
    deadline = None
    if policy.deadline is not None:
        deadline = (clock() if started is None else started) + policy.deadline
    delays: Iterator[float] | None = None  # made at the first failure: none on the fast path
    error = failed
    while True:
        if error is None:
            try:
                return call()
            except TRANSIENT as exc:
                error = exc
        delays = delays or policy.delays()
        delay = _next_delay(delays, deadline, clock())
        if delay is None:
            raise error
        if on_retry is not None:
            on_retry(error)
        sleep(delay)
        error = None


async def aretry(
    call: Callable[[], Awaitable[_T]],
    policy: RetryPolicy,
    *,
    on_retry: Callable[[Exception], None] | None = None,
    failed: Exception | None = None,
    started: float | None = None,
) -> _T:
    """:func:`retry` for coroutines: sleeps with ``asyncio.sleep``; ``started`` is on the
    running loop's clock (``loop.time()``)."""
    clock = asyncio.get_running_loop().time
    deadline = None
    if policy.deadline is not None:
        deadline = (clock() if started is None else started) + policy.deadline
    delays: Iterator[float] | None = None
    error = failed
    while True:
        if error is None:
            try:
                return await call()
            except TRANSIENT as exc:
                error = exc
        delays = delays or policy.delays()
        delay = _next_delay(delays, deadline, clock())
        if delay is None:
            raise error
        if on_retry is not None:
            on_retry(error)
        await asyncio.sleep(delay)
        error = None


class Placement(Generic[K]):
    """The broker-or-fallback rules of one persistent pool (see the module doc).

    ``clock`` is the time source of the pauses (the simulator passes simulated time).
    ``cap_pages`` is the guest's persistent cap as last heard (``GET /v1/self``, ``quota``
    notices), ``None`` when unknown or unlimited. ``stale`` holds the caller's keys ``K`` (a
    handle, a block number) of broker copies that must be flushed and never read.
    """

    __slots__ = (
        "_clock",
        "_down_until",
        "_frozen_until",
        "_quota_full_until",
        "cap_pages",
        "policy",
        "stale",
    )

    def __init__(
        self, policy: RetryPolicy | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._clock = clock
        self.cap_pages: int | None = None
        self.stale: set[K] = set()
        # Until when puts are not offered (monotonic seconds): after an outage; after a quota
        # or frozen decline (re-checked after ``recheck_interval`` in case the notice that
        # lifts it was missed); for good after a freeze notice (until thaw).
        self._down_until = 0.0
        self._quota_full_until = 0.0
        self._frozen_until = 0.0

    # --- the broker's state as this guest last saw it
    def broker_down(self) -> bool:
        """True while puts skip a broker found unreachable (``down_interval``)."""
        return self._down_until > self._clock()

    def mark_down(self) -> None:
        """The broker was unreachable: skip it for ``down_interval``."""
        self._down_until = self._clock() + self.policy.down_interval

    def mark_up(self) -> None:
        """The broker answered: offer it puts again at once."""
        self._down_until = 0.0

    def frozen(self) -> bool:
        """True while the guest is frozen (a freeze notice, or a recent ``frozen`` decline)."""
        return self._frozen_until > self._clock()

    def may_offer(self) -> bool:
        """Whether a put may be offered at all now (rule 1, without the quota part)."""
        now = self._clock()
        return self._frozen_until <= now and self._down_until <= now

    def room_for(self, new_pages: int, held: int) -> int:
        """How many of ``new_pages`` pages not yet at the broker may be offered, given that
        ``held`` pages of this pool (stale ones included) are there already."""
        now = self._clock()
        if self._frozen_until > now or self._quota_full_until > now:
            return 0
        if self.cap_pages is None:
            return new_pages
        return max(0, min(new_pages, self.cap_pages - held))

    def note_decline(self, reason: str | None) -> None:
        """A put was declined for ``reason``: pause new pages (quota) or every put (frozen)."""
        if reason == "quota":
            self._quota_full_until = self._clock() + self.policy.recheck_interval
        elif reason == "frozen":
            self._frozen_until = self._clock() + self.policy.recheck_interval

    def note_declines(self, results: Iterable[object]) -> None:
        """:meth:`note_decline` for every falsy :class:`~guest_agent.client.PutResult`."""
        for result in results:
            if not result:
                self.note_decline(getattr(result, "reason", None))

    def freed(self) -> None:
        """Pages left the broker (a flush, a shed): a quota pause is over."""
        self._quota_full_until = 0.0

    def put_failed(self, exc: BaseException) -> bool:
        """A put (or a batch of them) raised ``exc``: True when it may have landed (rule 4),
        so its handles are stale; an unreachable broker is marked down."""
        if isinstance(exc, BrokerUnavailable):
            self.mark_down()
            return True
        return not isinstance(exc, BrokerError)  # an error answer changed nothing

    def call_failed(self, exc: BaseException) -> None:
        """Any other call (a flush) raised ``exc``: an unreachable broker is marked down."""
        if isinstance(exc, BrokerUnavailable):
            self.mark_down()

    def take_stale(self) -> list[K]:
        """The stale keys to flush now; give back the ones whose flush failed with
        ``stale.update``. Only when no other call on the pool runs (see the module doc)."""
        keys = list(self.stale)
        self.stale.clear()
        return keys

    def handle_notice(self, notice: Notice) -> None:
        """Follow a ``quota``, ``freeze`` or ``thaw`` notice (a ``shed`` is the caller's)."""
        if notice.type == "quota":
            self.cap_pages = notice.cap_pages
            self._quota_full_until = 0.0
        elif notice.type == "freeze":
            self._frozen_until = float("inf")
        elif notice.type == "thaw":
            self._frozen_until = 0.0
