"""Which ephemeral page of an eviction account goes: LRU, or a frequency-aware TinyLFU.

The victim *account* is chosen by :mod:`broker.core.eviction` (weight-fair, unchanged); this
module decides which of its pages leaves. Two policies, chosen broker-wide by
``ephemeral_policy`` (:class:`broker.core.pressure.PressureSettings`, ``TMEM_EPHEMERAL_POLICY``):

``lru`` (the default)
    The account's least recently put (or, in shared pools, got) page goes: Xen tmem's
    ephemeral LRU. A scan (``find /`` through cleancache) puts pages that are never got
    back, and each of them pushes out a page of the working set.

``tinylfu`` (W-TinyLFU, after Einziger, Friedman and Manes, and Caffeine's write-up)
    An account's pages live in two LRU lists: a *window* (``Account.lru``, where every put
    lands, a quarter of the account's pages: :data:`WINDOW_PERCENT`) and the *main* list
    (``Account.main``). A :class:`FrequencySketch` per account counts how often each handle
    was put or asked for (a get, hit or miss) lately, including handles whose page has left:
    cleancache gets are exclusive, so a hot page leaves on every hit and its history must
    outlive it. When the account must give up a page and its window is over its target, the
    window's oldest page (the *candidate*) meets the main list's oldest (the *victim*): the
    candidate enters the main list and the victim goes when the candidate was seen more
    often per byte it is charged (size-aware: :data:`MIN_CHARGE`), else the candidate goes.
    A scan's pages are seen once, a working set's pages again and again: the scan passes
    through the window without flushing the working set.
    A tie admits the candidate only when both were seen at most once (:data:`ONCE`), so a
    workload of pages each used once behaves as LRU does, and a loop larger than the
    account keeps a stable part of itself instead of none.
    Frequencies age: after ``10`` recorded events per page the sketch is sized for, every
    counter is halved and the doorkeeper cleared, so a working set that moved is picked up
    within that many events (its pages then outweigh the old set's halved counts).

Cost. Every operation is O(1): a put records one event (one keyed 64-bit hash, four
counters) and moves at most one page from the window to the main list; an eviction compares
two estimates. The LRU default's hot path pays one attribute test (``account.tinylfu is
None``). Memory: a page sits in exactly one of the two lists, as in LRU, so TinyLFU adds only
the sketch: ``DEPTH`` one-byte counters and one doorkeeper byte (8 bits) per slot of its
width, the width being the power of two at or above ``SLOTS_PER_PAGE`` (2) times the
account's largest page count (at least :data:`MIN_WIDTH`): 10 to 20 bytes per page
(``tests/core/test_policy.py`` measures it with tracemalloc). One slot per page saturated
the doorkeeper and the counters under a scan (10 events per page between agings) and
delayed the hot set's return; four slots bought little more than two.

Privacy. Each account has its own sketch, keyed with its own secret salt: a guest's private
pages are judged only by that guest's operations, never by another guest's puts. A shared
pool is one account: its members' operations all count there, but they all read the pool's
pages already; the salt keeps a member from aiming hash collisions at chosen handles.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from xxhash import xxh3_64_intdigest

LRU: Final = "lru"
TINYLFU: Final = "tinylfu"
EPHEMERAL_POLICIES: Final = (LRU, TINYLFU)

DEPTH: Final = 4  # rows of the count-min sketch
MIN_WIDTH: Final = 64
COUNTER_MAX: Final = 15  # 4-bit counters, as Caffeine's (kept a byte each: no bit fiddling)
SAMPLE_FACTOR: Final = 10  # events per page (of the sized-for count) before counts halve
SLOTS_PER_PAGE: Final = 2  # sketch slots (each: DEPTH counters, 8 doorkeeper bits) per page
# The window's share of the account's pages. Caffeine starts at 1 % and adapts it by hill
# climbing; on these exclusive (cleancache) loads a fixed share did as well as a climber
# (bench/policy-history.md): 1 % lost to LRU on a shifting working set, 50 %
# left too little of the account to protect a working set from a scan.
WINDOW_PERCENT: Final = 25
# a tie between two pages seen at most this often (once: put, never got) admits the
# newcomer: pages used once are kept as LRU keeps them; a tie between pages seen more often
# keeps the incumbent (a loop larger than the account keeps a stable part of it)
ONCE: Final = 1
# Size-aware (as GDSF and size-aware W-TinyLFU): the candidate and the victim are compared by
# frequency per byte charged, so a raw page must be seen about twice as often as an lz4 page
# of half its size to displace it. Scoreboard, one seed, faults per MiB (scan-heavy / shifting
# / mix): 2195 / 1796 / 2718 by frequency alone, 2221 / 1804 / 2730 per byte; with the
# admission rules of broker/core/admission.py 2807 / 2060 / 3240 by frequency alone, 3122 /
# 2060 / 3240 per byte.
# A zero page (charge 0) counts as MIN_CHARGE bytes: it is held in no page storage, but its
# handle costs the lists and the sketch.
MIN_CHARGE: Final = 64

# an object whose pages were evicted unread this often lately (an estimate: the doorkeeper
# counts 1), none read, is predicted useless (TinyLfu.useless)
USELESS_EVICTIONS: Final = 4
# the object sketches are sized for this fraction of the pages (objects hold several pages)
OBJECT_SLOTS_DIVISOR: Final = 4
_OBJECT_SALT: Final = 0x5BD1E9955BD1E995
_READ_SALT: Final = 0x27D4EB2F165667C5

_M32: Final = (1 << 32) - 1
# bytes.translate tables: halving a whole row costs one C call, not a Python loop
_HALVE: Final = bytes(i >> 1 for i in range(256))


def check_policy(name: str) -> str:
    """``name`` when it is a known ephemeral policy, else ValueError."""
    if name not in EPHEMERAL_POLICIES:
        raise ValueError(f"ephemeral_policy must be one of {', '.join(EPHEMERAL_POLICIES)}")
    return name


class FrequencySketch:
    """How often each key was seen lately: a count-min sketch behind a doorkeeper.

    ``record(key)`` counts an event, ``estimate(key)`` is an upper bound of the events
    counted for ``key`` since the last aging (0..``COUNTER_MAX + 1``). The first event of a
    key only sets its doorkeeper bits (a Bloom filter), so keys seen once cost no counter.
    ``salt`` keys the hash (a secret per account). ``grow(n)`` widens the sketch for ``n``
    keys (and forgets the counts, as Caffeine's ``ensureCapacity`` does).
    """

    __slots__ = ("counts", "door", "events", "mask", "salt", "sample", "width")

    def __init__(self, salt: int, expected: int = 0) -> None:
        self.salt = salt & ((1 << 64) - 1)
        self.width = 0
        self.mask = 0
        self.sample = 0
        self.events = 0
        self.counts = bytearray()
        self.door = bytearray()
        self.grow(expected)

    def grow(self, expected: int) -> None:
        """Size for ``expected`` keys: width = the power of two >= ``SLOTS_PER_PAGE *
        expected`` (at least MIN_WIDTH); counts halve every ``SAMPLE_FACTOR * width /
        SLOTS_PER_PAGE`` events."""
        width = MIN_WIDTH
        while width < SLOTS_PER_PAGE * expected:
            width <<= 1
        if width <= self.width:
            return
        self.width = width
        self.mask = width - 1
        self.sample = SAMPLE_FACTOR * width // SLOTS_PER_PAGE
        self.events = 0
        self.counts = bytearray(DEPTH * width)
        self.door = bytearray(width)  # 8 * width bits

    @property
    def nbytes(self) -> int:
        """Bytes of counters and doorkeeper bits held."""
        return len(self.counts) + len(self.door)

    def _hash(self, key: int) -> int:
        # handles are up to 232 bits (oid 192 + index 32 + the pool's ref): hash them whole
        return xxh3_64_intdigest(key.to_bytes((key.bit_length() + 8) >> 3, "little"), self.salt)

    def record(self, key: int) -> None:
        """Count one event (a put or a get) of ``key``."""
        h = self._hash(key)
        h1 = h & _M32
        h2 = (h >> 32) | 1
        door = self.door
        bits = (self.width << 3) - 1
        b1 = h1 & bits
        b2 = h2 & bits
        m1 = 1 << (b1 & 7)
        m2 = 1 << (b2 & 7)
        if not (door[b1 >> 3] & m1 and door[b2 >> 3] & m2):
            door[b1 >> 3] |= m1
            door[b2 >> 3] |= m2
        else:
            counts = self.counts
            mask = self.mask
            width = self.width
            i0 = h1 & mask
            i1 = width + ((h1 + h2) & mask)
            i2 = 2 * width + ((h1 + 2 * h2) & mask)
            i3 = 3 * width + ((h1 + 3 * h2) & mask)
            low = min(counts[i0], counts[i1], counts[i2], counts[i3])
            if low < COUNTER_MAX:
                # conservative update: only the counters at the minimum grow (fewer
                # overestimates from collisions, the same bound)
                for i in (i0, i1, i2, i3):
                    if counts[i] == low:
                        counts[i] = low + 1
        self.events += 1
        if self.events >= self.sample:
            self.age()

    def estimate(self, key: int) -> int:
        """Events counted for ``key`` lately (an overestimate only through collisions)."""
        h = self._hash(key)
        h1 = h & _M32
        h2 = (h >> 32) | 1
        bits = (self.width << 3) - 1
        b1 = h1 & bits
        b2 = h2 & bits
        door = self.door
        # the counters survive an aging that cleared the doorkeeper: read them either way
        seen = 1 if door[b1 >> 3] & (1 << (b1 & 7)) and door[b2 >> 3] & (1 << (b2 & 7)) else 0
        counts = self.counts
        mask = self.mask
        width = self.width
        return seen + min(
            counts[h1 & mask],
            counts[width + ((h1 + h2) & mask)],
            counts[2 * width + ((h1 + 2 * h2) & mask)],
            counts[3 * width + ((h1 + 3 * h2) & mask)],
        )

    def age(self) -> None:
        """Halve every counter and clear the doorkeeper (O(width), once per ``sample``
        events: O(1) per event)."""
        self.counts = bytearray(self.counts.translate(_HALVE))
        self.door = bytearray(self.width)
        self.events = 0


class TinyLfu:
    """An account's TinyLFU state: its sketches. The window is ``Account.lru`` and the main
    list ``Account.main`` (both ``OrderedDict[lru key, None]``, oldest first), so that the
    put path appends to the window exactly as it appends to the LRU.

    Besides the pages' frequencies it keeps two per *object* (the lru key's ``oid`` and pool
    ref: ``key >> 32``): ``unread``, pages of the object evicted without a hit, and ``read``,
    gets of the object's pages that hit. :meth:`useless` predicts that a put of an object
    whose pages keep being evicted unread, and none was read lately, would be evicted unread
    again (a file streamed once, a scan): the admission declines it while memory is tight
    (:mod:`broker.core.admission`, ``policy_declines.predicted_useless``)."""

    __slots__ = ("read", "sketch", "unread")

    def __init__(self, salt: int, pages: int) -> None:
        self.sketch = FrequencySketch(salt, pages)
        # keyed apart from the pages' sketch (another salt): objects are fewer than pages
        self.unread = FrequencySketch(salt ^ _OBJECT_SALT, pages // OBJECT_SLOTS_DIVISOR)
        self.read = FrequencySketch(salt ^ _READ_SALT, pages // OBJECT_SLOTS_DIVISOR)

    @property
    def nbytes(self) -> int:
        """Bytes of the three sketches."""
        return self.sketch.nbytes + self.unread.nbytes + self.read.nbytes

    def on_evicted(self, key: int) -> None:
        """The page at ``key`` was evicted (it was not got since its put: a hit in a private
        pool takes it out, and a shared pool's hits count in ``read``)."""
        self.unread.record(key >> 32)

    def on_hit(self, key: int) -> None:
        """A get found the page at ``key``: demand for the page (:meth:`on_get`) and a read
        of its object."""
        self.sketch.record(key)
        self.read.record(key >> 32)

    def useless(self, object_key: int) -> bool:
        """Whether a put to the object ``oid << 24 | ref`` is predicted to be evicted unread:
        at least :data:`USELESS_EVICTIONS` of its pages were lately, and none was read."""
        return (
            self.unread.estimate(object_key) >= USELESS_EVICTIONS
            and self.read.estimate(object_key) == 0
        )

    def on_put(
        self, window: OrderedDict[int, None], main: OrderedDict[int, None], key: int
    ) -> None:
        """A page was put at ``key`` (already the window's newest): count it, and keep the
        window near its target by moving its oldest page to the main list. Room is made
        elsewhere (eviction): while the account is not giving up pages, every page gets in."""
        sketch = self.sketch
        sketch.record(key)
        pages = len(window) + len(main)
        if pages * SLOTS_PER_PAGE > sketch.width:
            sketch.grow(pages)
            self.unread.grow(pages // OBJECT_SLOTS_DIVISOR)
            self.read.grow(pages // OBJECT_SLOTS_DIVISOR)
        if len(window) > pages * WINDOW_PERCENT // 100 + 2:
            old = next(iter(window))
            del window[old]
            main[old] = None

    def on_get(self, key: int) -> None:
        """A get asked for the page at ``key`` (found or not: both are demand)."""
        self.sketch.record(key)

    def victim(
        self,
        window: OrderedDict[int, None],
        main: OrderedDict[int, None],
        size: Callable[[int], int],
    ) -> int:
        """Remove the page the account gives up from its list and return its key (the
        account has at least one page). ``size(key)``: the bytes a page is charged."""
        if main:
            if len(window) > (len(window) + len(main)) * WINDOW_PERCENT // 100 + 1:
                candidate = next(iter(window))
                victim = next(iter(main))
                sketch = self.sketch
                seen = sketch.estimate(candidate)
                rival = sketch.estimate(victim)
                # value per byte held: frequency / charge, by cross-multiplication
                cs = max(size(candidate), MIN_CHARGE)
                vs = max(size(victim), MIN_CHARGE)
                if seen * vs > rival * cs or (seen == rival and rival <= ONCE):
                    del window[candidate]
                    main[candidate] = None
                    del main[victim]
                    return victim
                del window[candidate]
                return candidate
            return main.popitem(last=False)[0]
        return window.popitem(last=False)[0]
