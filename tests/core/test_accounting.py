"""Counters, the privacy of per-guest figures and of capacity decisions, and the journal."""

from __future__ import annotations

import pytest

from broker.core import Status, Tmem
from broker.core.figures import Declines, as_json
from tests.core.conftest import PAGE, ZERO, MakeTmem, RecordingJournal, page, soft_page


def test_counters_are_kept_per_pool_guest_and_globally(make_tmem: MakeTmem) -> None:
    tmem = make_tmem(capacity_pages=3)
    tmem.update_guest(1, compress=True)
    per = tmem.create_pool(1, "persistent")
    eph = tmem.create_pool(1, "ephemeral")
    tmem.put(1, per, 0, 0, page(1))  # compress_poor
    tmem.put(1, per, 0, 1, soft_page(2))
    tmem.put(1, per, 0, 2, ZERO)
    tmem.put(1, eph, 0, 0, page(1))  # dedup hit
    tmem.put(2, tmem.create_pool(2, "persistent"), 0, 0, page(3))
    # 4123 + 4096 bytes held of 12288: page(4) needs 4096 more; evicting (eph, 0, 0) frees
    # nothing (its content is shared with (per, 0, 0)), so the put is declined
    assert tmem.put(1, eph, 0, 1, page(4)) == Status.CAPACITY
    tmem.get(1, per, 0, 0)
    tmem.get(1, per, 7, 7)
    tmem.flush_page(1, per, 0, 1)
    tmem.flush_page(1, per, 0, 1)
    tmem.flush_object(1, per, 0)
    tmem.freeze(1)
    tmem.put(1, per, 0, 0, page(5))
    pool = tmem.pool_stats(1, per)
    assert pool.ops.puts == 4 and pool.ops.puts_declined.frozen == 1
    assert (pool.ops.gets, pool.ops.get_hits, pool.ops.flushes, pool.ops.flushes_found) == (
        2,
        1,
        2,
        1,
    )
    assert (
        pool.ops.object_flushes == 1 and pool.ops.compress_poor == 1 and pool.ops.dedup_hits is None
    )
    assert tmem.pool_stats(1, eph, admin=True).ops.dedup_hits == 1
    guest = tmem.guest_stats(1)
    assert (guest.ops.puts, guest.ops.puts_stored, guest.ops.evictions) == (6, 4, 1)
    assert guest.charged_bytes == 0 and guest.logical_pages == 0  # all flushed or evicted
    stats = tmem.stats()
    assert (stats.ops.puts, stats.ops.puts_stored, stats.ops.dedup_hits) == (7, 5, 1)
    assert stats.ops.puts_declined == Declines(quota=0, capacity=1, frozen=1, policy=0)
    assert stats.ops.evictions == 1
    # removed guests keep counting in the global figures
    tmem.remove_guest(1)
    assert tmem.stats().ops.puts == 7


def _world(other_content: bytes) -> Tmem:
    """Guest 2 holds ``other_content``; guest 1 then stores page(1) and a zero page."""
    from broker.core import CoreConfig

    tmem = Tmem(CoreConfig(capacity_bytes=3 * PAGE))
    tmem.add_guest(1, name="one")
    tmem.add_guest(2, name="two")
    tmem.put(2, tmem.create_pool(2, "persistent"), 0, 0, other_content)
    pid = tmem.create_pool(1, "persistent")
    tmem.put(1, pid, 0, 0, page(1))
    tmem.put(1, pid, 0, 1, ZERO)
    return tmem


def test_guest_figures_do_not_reveal_other_guests_contents() -> None:
    shares = _world(page(1))  # guest 2 holds the same content as guest 1
    alone = _world(page(2))
    assert shares.stats().unique_pages == 1 and alone.stats().unique_pages == 2
    assert shares.guest_stats(1) == alone.guest_stats(1)
    assert shares.pool_stats(1, 0) == alone.pool_stats(1, 0)
    assert shares.pools(1) == alone.pools(1)


@pytest.mark.parametrize("kind", ["persistent", "ephemeral"])
def test_capacity_decision_ignores_whether_content_exists(kind: str) -> None:
    # Two worlds, equally full; in one the content guest 1 puts exists already. The put is
    # declined in both: it is charged its own 4096 bytes even though it would dedup.
    from broker.core import CoreConfig

    outcomes = []
    for held in (page(1), page(2)):
        tmem = Tmem(CoreConfig(capacity_bytes=2 * PAGE))
        tmem.add_guest(1, name="one")
        tmem.add_guest(2, name="two")
        other = tmem.create_pool(2, "persistent")
        tmem.put(2, other, 0, 0, held)
        tmem.put(2, other, 0, 1, page(9))  # full
        pid = tmem.create_pool(1, kind)
        outcomes.append((tmem.put(1, pid, 5, 5, page(1)), tmem.guest_stats(1)))
        assert tmem.put(1, pid, 5, 6, ZERO) == Status.DONE  # a zero page is charged nothing
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == Status.CAPACITY


def test_journal_sees_persistent_changes_only(make_tmem: MakeTmem) -> None:
    journal = RecordingJournal()
    tmem = make_tmem(capacity_pages=2, journal=journal)
    per = tmem.create_pool(1, "persistent")
    exc = tmem.create_pool(1, "persistent", exclusive_gets=True)
    eph = tmem.create_pool(1, "ephemeral")
    tmem.put(1, eph, 0, 0, page(1))
    tmem.get(1, eph, 0, 0)
    tmem.flush_object(1, eph, 0)
    assert journal.calls == []
    tmem.put(1, per, 1, 2, page(2))
    tmem.put(1, exc, 3, 4, page(3))
    assert tmem.get(1, exc, 3, 4) == page(3)  # exclusive get: a flush
    tmem.get(1, per, 1, 2)  # non-destructive: nothing
    tmem.flush_page(1, per, 1, 2)
    tmem.flush_page(1, per, 1, 2)  # nothing changed: nothing recorded
    tmem.put(1, per, 5, 0, page(5))
    tmem.freeze(1)
    tmem.put(1, per, 5, 0, page(6))  # declined: the old copy is flushed
    tmem.put(1, per, 5, 1, page(6))  # declined, nothing was there
    tmem.thaw(1)
    tmem.put(1, per, 6, 0, page(7))
    tmem.flush_object(1, per, 6)
    tmem.flush_object(1, per, 6)
    tmem.restore_page(1, per, 8, 8, page(8))  # not journaled
    tmem.destroy_pool(1, exc)
    tmem.destroy_pool(1, eph)
    tmem.flush_guest(1)
    tmem.remove_guest(1)
    assert journal.calls == [
        ("put", 1, per, 1, 2, page(2)),
        ("put", 1, exc, 3, 4, page(3)),
        ("flush", 1, exc, 3, 4),
        ("flush", 1, per, 1, 2),
        ("put", 1, per, 5, 0, page(5)),
        ("flush", 1, per, 5, 0),
        ("put", 1, per, 6, 0, page(7)),
        ("flush_object", 1, per, 6),
        ("destroy_pool", 1, exc),
        ("remove_guest", 1),
        ("remove_guest", 1),
    ]


def test_stats_shape(tmem: Tmem) -> None:
    stats = as_json(tmem.stats())
    for key in (
        "capacity_bytes",
        "used_bytes",
        "logical_pages",
        "unique_pages",
        "zero_pages",
        "dedup_ratio",
        "compression_ratio",
        "persistent_pages",
        "ephemeral_pages",
        "puts",
        "puts_declined",
        "gets",
        "get_hits",
        "flushes",
        "evictions",
        "guests",
    ):
        assert key in stats
    assert [g["guest_id"] for g in stats["guests"]] == [1, 2]
    assert stats["dedup_ratio"] == 1.0 and stats["compression_ratio"] == 1.0
