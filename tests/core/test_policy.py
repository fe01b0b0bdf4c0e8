"""The ephemeral policies (broker/core/policy.py) on recorded traces, with fixed salts.

A trace is what cleancache makes of a guest's page cache: a page the guest drops is put, a
page it reads again is got (and leaves the broker: gets are exclusive). The traces here are
written out as loops, so every run makes the same operations and the same decisions.
"""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import CoreConfig, Tmem
from broker.core.errors import BadRequest
from broker.core.policy import (
    LRU,
    MIN_WIDTH,
    SAMPLE_FACTOR,
    SLOTS_PER_PAGE,
    TINYLFU,
    FrequencySketch,
)
from schemas.batch import STATUS_DONE
from tests.core.conftest import PAGE, page

pytestmark = pytest.mark.timeout(60)

SALT = 0x5EED


def _core(policy: str, capacity_pages: int, guests: int = 1) -> tuple[Tmem, list[int]]:
    t = Tmem(CoreConfig(capacity_bytes=capacity_pages * PAGE, ephemeral_policy=policy), salt=SALT)
    pids = []
    for gid in range(1, guests + 1):
        t.add_guest(gid, name=f"g{gid}")
        pids.append(t.create_pool(gid, "ephemeral"))
    return t, pids


def _round(t: Tmem, pid: int, handles: range, gid: int = 1) -> int:
    """The guest reads ``handles`` again (gets: hits counted) and drops them (puts)."""
    hits = 0
    for h in handles:
        if t.get(gid, pid, 0, h) is not None:
            hits += 1
        assert t.put(gid, pid, 0, h, page(h)) == STATUS_DONE
    return hits


# ---------------------------------------------------------------------- the sketch


def test_sketch_counts_after_the_doorkeeper_and_caps() -> None:
    sk = FrequencySketch(SALT, 1000)
    assert sk.estimate(7) == 0
    sk.record(7)
    assert sk.estimate(7) == 1  # the doorkeeper alone
    assert sum(sk.counts) == 0
    for _ in range(5):
        sk.record(7)
    assert sk.estimate(7) == 6
    for _ in range(40):
        sk.record(7)
    assert sk.estimate(7) == 16  # 15 in the counters, 1 in the doorkeeper


def test_sketch_ages_every_sample_events() -> None:
    sk = FrequencySketch(SALT, 0)
    assert sk.width == MIN_WIDTH and sk.sample == SAMPLE_FACTOR * MIN_WIDTH // SLOTS_PER_PAGE
    for _ in range(9):
        sk.record(1)
    assert sk.estimate(1) == 9
    for _ in range(sk.sample - 9 - 1):
        sk.record(2)  # one other key: no collision can blur key 1's counts
    assert sk.estimate(1) == 9
    sk.record(2)  # the sample-th event: every count halves, the doorkeeper clears
    assert sk.events == 0
    assert sk.estimate(1) == 4  # its counters kept half of 8, the doorkeeper forgot it
    sk.record(1)
    assert sk.estimate(1) == 1 + 4


def test_sketch_salt_changes_where_keys_land() -> None:
    a, b = FrequencySketch(1, 4096), FrequencySketch(2, 4096)
    for k in range(100):
        a.record(k)
        a.record(k)
        b.record(k)
        b.record(k)
    assert a.counts != b.counts


# ---------------------------------------------------------------------- scans and shifts


@pytest.mark.parametrize("policy", [LRU, TINYLFU])
def test_a_scan_does_not_flush_the_hot_set_under_tinylfu(policy: str) -> None:
    """256 hot pages read every round, a ``find /`` of 1024 pages through cleancache between
    rounds, a broker of 512 pages: LRU loses the hot set to each scan, TinyLFU keeps it."""
    t, (pid,) = _core(policy, 512)
    hot = range(256)
    scan_handle = 1 << 20
    hits = []
    for _ in range(12):
        hits.append(_round(t, pid, hot))
        for _ in range(1024):  # pages read once, dropped, never read again
            assert t.put(1, pid, 1, scan_handle, page(scan_handle)) == STATUS_DONE
            scan_handle += 1
    steady = sum(hits[3:]) / (len(hits[3:]) * len(hot))
    if policy == TINYLFU:
        assert steady >= 0.9, hits
    else:
        assert steady == 0.0, hits


@pytest.mark.parametrize("policy", [LRU, TINYLFU])
def test_a_shifting_working_set_is_picked_up_within_a_bounded_number_of_rounds(
    policy: str,
) -> None:
    """Working set A (300 pages) for 20 rounds, then B (300 other pages): B must be served
    within 12 rounds (7200 operations, under one aging period of the account's sketch) of
    the switch, though A's counts are at their cap."""
    t, (pid,) = _core(policy, 400)
    a, b = range(300), range(1000, 1300)
    for _ in range(20):
        _round(t, pid, a)
    rounds = 0
    while _round(t, pid, b) < 0.9 * len(b):
        rounds += 1
        assert rounds <= 12, f"{policy}: B not served after {rounds} rounds"
    if policy == LRU:
        assert rounds <= 1
    sketch = t._reg.guest(1).account.tinylfu
    if sketch is not None:
        assert rounds * 2 * len(b) < sketch.sketch.sample


def test_pages_used_once_are_kept_as_lru_keeps_them() -> None:
    """Ties admit the newcomer: a stream of pages each read once, after a reuse distance the
    broker can hold, is served by TinyLFU as by LRU."""
    served = {}
    for policy in (LRU, TINYLFU):
        t, (pid,) = _core(policy, 256)
        hits = 0
        for h in range(4000):
            t.put(1, pid, 0, h, page(h))
            if h >= 200 and t.get(1, pid, 0, h - 200) is not None:
                hits += 1
        served[policy] = hits
    assert served[TINYLFU] >= 0.95 * served[LRU] > 0


# ---------------------------------------------------------------------- memory per page


def _eph_bytes(policy: str, n: int) -> int:
    """Bytes tracemalloc sees a broker take for ``n`` ephemeral pages (all the same zero
    page, so that page contents do not count)."""
    gc.collect()
    tracemalloc.start()
    try:
        t, (pid,) = _core(policy, 2 * n)
        for i in range(n):
            # distinct incompressible contents would dominate; a zero page costs no bytes
            t.put(1, pid, i & 0xF, i >> 4, bytes(PAGE))
        size, _peak = tracemalloc.get_traced_memory()
        assert t.stats().guests[0].ephemeral_pages == n
    finally:
        tracemalloc.stop()
    return size


@pytest.mark.timeout(120)
def test_tinylfu_costs_a_bounded_number_of_bytes_per_page() -> None:
    n = 50_000
    lru, tiny = _eph_bytes(LRU, n), _eph_bytes(TINYLFU, n)
    # the sketch: 4 one-byte counters and 8 doorkeeper bits per slot, 2n <= width < 4n:
    # 10-20 bytes per page; the two lists hold each page once, as the LRU does (their dict
    # tables round to powers of two apart, which can make TinyLFU's total the smaller)
    assert tiny - lru <= 20 * n, (tiny - lru) / n
    t, (pid,) = _core(TINYLFU, 2 * n)
    for i in range(n):
        t.put(1, pid, i & 0xF, i >> 4, bytes(PAGE))
    account = t._reg.guest(1).account
    assert account.tinylfu is not None
    assert 10 <= account.tinylfu.sketch.nbytes / n <= 20
    assert len(account.lru) + len(account.main) == n


def test_the_sketch_tracks_the_account_size() -> None:
    t, (pid,) = _core(TINYLFU, 1 << 14)
    for h in range(5000):
        t.put(1, pid, 0, h, page(h))
    sketch = t._reg.guest(1).account.tinylfu
    assert sketch is not None
    assert sketch.sketch.width == 16384  # the power of two at or above 2 slots per page
    assert sketch.sketch.nbytes == 5 * 16384


# ---------------------------------------------------------------------- privacy


def test_another_guests_operations_never_move_this_guests_counts() -> None:
    """Guest 1 makes the same operations in two brokers; in one, guest 2 also puts and gets
    the very same handles in its own pool. Guest 1's sketch ends byte for byte the same."""
    sketches = []
    for noisy in (False, True):
        t, (p1, p2) = _core(TINYLFU, 1 << 12, guests=2)
        for r in range(3):
            _round(t, p1, range(100 * r, 100 * r + 300))
            if noisy:
                _round(t, p2, range(0, 600), gid=2)
        tl = t._reg.guest(1).account.tinylfu
        assert tl is not None
        sketches.append((bytes(tl.sketch.counts), bytes(tl.sketch.door)))
    assert sketches[0] == sketches[1]


def test_each_account_has_its_own_salt() -> None:
    t, _ = _core(TINYLFU, 64, guests=2)
    a, b = (t._reg.guest(g).account.tinylfu for g in (1, 2))
    assert a is not None and b is not None and a.sketch.salt != b.sketch.salt


# ---------------------------------------------------------------------- switching


def test_switching_policies_keeps_every_page_and_gauge() -> None:
    t, (pid,) = _core(LRU, 100)
    for h in range(150):
        t.put(1, pid, 0, h, page(h))
    before = t.stats().guests[0]
    t.ephemeral_policy = TINYLFU
    account = t._reg.guest(1).account
    assert len(account.main) + len(account.lru) == account.eph_pages == 100
    for h in range(150, 170):  # the window fills, the main list gives pages up
        t.put(1, pid, 0, h, page(h))
    assert t.flush_page(1, pid, 0, 120)  # a page in the main list
    assert t.get(1, pid, 0, 169) == page(169)  # a page in the window
    t.ephemeral_policy = LRU
    assert account.tinylfu is None and not account.main
    assert len(account.lru) == account.eph_pages == 98
    assert t.stats().guests[0].ephemeral_pages == before.ephemeral_pages - 2
    with pytest.raises(BadRequest):
        t.ephemeral_policy = "arc"


def test_a_shared_pool_keeps_a_page_got_often() -> None:
    uuid = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
    t = Tmem(CoreConfig(capacity_bytes=64 * PAGE, ephemeral_policy=TINYLFU), salt=SALT)
    for gid in (1, 2):
        t.add_guest(gid, name=f"g{gid}")
        t.authorise_shared(uuid, gid, True)
    p1 = t.create_pool(1, "ephemeral", shared=True, uuid=uuid)
    p2 = t.create_pool(2, "ephemeral", shared=True, uuid=uuid)
    for h in range(1, 100):  # the account at its size (a growing sketch starts afresh)
        t.put(1, p1, 0, h, page(h))
    t.put(1, p1, 0, 0, page(0))
    for _ in range(6):  # a shared get leaves the page in place
        assert t.get(2, p2, 0, 0) == page(0)
    for h in range(1, 400):
        t.put(1, p1, 0, h, page(h))
    assert t.get(2, p2, 0, 0) == page(0)


# ---------------------------------------------------------------------- persistent pages

ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "get", "flush", "flush_object", "switch"]),
        st.booleans(),  # persistent pool?
        st.integers(0, 2),  # oid
        st.integers(0, 7),  # index
    ),
    max_size=120,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, start=st.sampled_from([LRU, TINYLFU]))
def test_no_policy_ever_drops_a_persistent_page(
    ops: list[tuple[str, bool, int, int]], start: str
) -> None:
    """Random puts, gets, flushes and policy switches into a persistent and an ephemeral
    pool of a broker of 12 pages: every acknowledged persistent page stays readable, and the
    accounts' lists hold exactly the ephemeral pages."""
    t, (eph,) = _core(start, 12)
    pers = t.create_pool(1, "persistent")
    held: dict[tuple[int, int], bytes] = {}
    tag = 0
    for op, persistent, oid, index in ops:
        pid = pers if persistent else eph
        if op == "put":
            tag += 1
            status = t.put(1, pid, oid, index, page(tag))
            if persistent:
                if status == STATUS_DONE:
                    held[(oid, index)] = page(tag)
                else:
                    held.pop((oid, index), None)
        elif op == "get":
            got = t.get(1, pid, oid, index)
            if persistent:
                assert got == held.get((oid, index))
        elif op == "flush":
            t.flush_page(1, pid, oid, index)
            if persistent:
                held.pop((oid, index), None)
        elif op == "flush_object":
            t.flush_object(1, pid, oid)
            if persistent:
                for key in [k for k in held if k[0] == oid]:
                    del held[key]
        else:
            t.ephemeral_policy = TINYLFU if t.ephemeral_policy == LRU else LRU
        account = t._reg.guest(1).account
        assert len(account.lru) + len(account.main) == account.eph_pages
        assert t.counted_bytes <= t.capacity_bytes
    stored = {(oid, index): data for oid, index, data in t.pool_pages(1, pers)}
    assert stored == held
