"""Page contents: dedup, digest collisions, dedup domains, zero pages and compression."""

from __future__ import annotations

import pytest

from broker.core import Status, Tmem
from broker.core.content import compress
from tests.core.conftest import PAGE, ZERO, MakeTmem, page, soft_page


def test_identical_pages_are_stored_once(tmem: Tmem) -> None:
    a = tmem.create_pool(1, "persistent")
    b = tmem.create_pool(2, "ephemeral")
    for handle in range(3):
        tmem.put(1, a, 0, handle, page(1))
    tmem.put(2, b, 0, 0, page(1))
    stats = tmem.stats()
    assert (stats.logical_pages, stats.unique_pages, stats.used_bytes) == (4, 1, PAGE)
    assert stats.ops.dedup_hits == 3 and stats.dedup_ratio == 4.0
    # references: the bytes go with the last one
    tmem.flush_object(1, a, 0)
    assert tmem.stats().used_bytes == PAGE
    assert tmem.get(2, b, 0, 0) == page(1)
    assert tmem.stats().used_bytes == 0 and len(tmem.store) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize("hasher", [lambda p: 42, lambda p: p[0] & 1], ids=["constant", "one-bit"])
def test_digest_collision_never_shares_bytes(make_tmem: MakeTmem, hasher: object) -> None:
    tmem = make_tmem(hasher=hasher)
    pid = tmem.create_pool(1, "persistent")
    pages = [page(i) for i in range(6)]
    for i, data in enumerate(pages):
        assert tmem.put(1, pid, 0, i, data) == Status.DONE
    for i, data in enumerate(pages):
        assert tmem.get(1, pid, 0, i) == data
    assert tmem.stats().unique_pages == 6 and tmem.stats().ops.dedup_hits == 0
    # an identical page still shares, found along the collision chain
    assert tmem.put(1, pid, 1, 0, page(4)) == Status.DONE
    assert tmem.stats().unique_pages == 6 and tmem.stats().ops.dedup_hits == 1
    # holes in the chain: free some, then put again; still never a wrong page
    tmem.flush_page(1, pid, 0, 0)
    tmem.flush_page(1, pid, 0, 2)
    tmem.put(1, pid, 2, 0, page(5))  # shares with (0, 5)
    tmem.put(1, pid, 2, 1, page(77))  # new, takes a hole
    assert tmem.get(1, pid, 2, 0) == page(5)
    assert tmem.get(1, pid, 2, 1) == page(77)
    assert tmem.get(1, pid, 0, 5) == page(5)
    assert tmem.stats().unique_pages == 5


def test_dedup_domains_do_not_share(tmem: Tmem) -> None:
    tmem.add_guest(3, name="three", dedup_domain="tenant-b")
    a = tmem.create_pool(1, "persistent")
    c = tmem.create_pool(3, "persistent")
    tmem.put(1, a, 0, 0, page(1))
    tmem.put(3, c, 0, 0, page(1))
    assert tmem.stats().unique_pages == 2
    # moving guest 3 into the default domain shares its pages from then on
    tmem.update_guest(3, dedup_domain="default")
    stats = tmem.stats()
    assert (stats.unique_pages, stats.used_bytes) == (1, PAGE)
    assert tmem.get(3, c, 0, 0) == page(1) and tmem.get(1, a, 0, 0) == page(1)
    assert tmem.guest_stats(3).dedup_domain == "default"


@pytest.mark.parametrize("kind", ["persistent", "ephemeral"])
def test_zero_pages_take_no_storage(make_tmem: MakeTmem, kind: str) -> None:
    tmem = make_tmem(capacity_pages=0)
    pid = tmem.create_pool(1, kind)
    for i in range(5):
        assert tmem.put(1, pid, 0, i, ZERO) == Status.DONE  # fits even with no capacity
    stats = tmem.stats()
    assert (stats.zero_pages, stats.logical_pages, stats.used_bytes) == (5, 5, 0)
    assert stats.unique_pages == 0
    assert tmem.get(1, pid, 0, 3) == ZERO
    assert tmem.put(1, pid, 0, 9, page(1)) == Status.CAPACITY


def test_compression_is_off_by_default(tmem: Tmem) -> None:
    pid = tmem.create_pool(1, "persistent")
    tmem.put(1, pid, 0, 0, soft_page(1))
    assert tmem.stats().used_bytes == PAGE and tmem.stats().ops.compress_poor == 0


@pytest.mark.parametrize("ratio", [0.75, 0.001])
def test_compression(make_tmem: MakeTmem, ratio: float) -> None:
    from broker.core import CoreConfig

    tmem = Tmem(CoreConfig(capacity_bytes=100 * PAGE, compress_max_ratio=ratio))
    tmem.add_guest(1, name="one", compress=True)
    pid = tmem.create_pool(1, "persistent")
    packed = len(compress(soft_page(1)))
    tmem.put(1, pid, 0, 0, soft_page(1))
    tmem.put(1, pid, 0, 1, page(2))  # incompressible: kept raw
    stats = tmem.stats()
    if ratio == 0.75:
        assert stats.used_bytes == packed + PAGE and stats.ops.compress_poor == 1
        assert tmem.guest_stats(1).charged_bytes == packed + PAGE
    else:  # nothing shrinks to 4 bytes: both raw, both poor
        assert stats.used_bytes == 2 * PAGE and stats.ops.compress_poor == 2
    assert tmem.get(1, pid, 0, 0) == soft_page(1)
    assert tmem.get(1, pid, 0, 1) == page(2)
    assert stats.compression_ratio == pytest.approx(2 * PAGE / stats.used_bytes)


def test_dedup_is_on_raw_content_across_compress_settings(tmem: Tmem) -> None:
    tmem.update_guest(2, compress=True)
    a = tmem.create_pool(1, "persistent")
    b = tmem.create_pool(2, "persistent")
    packed = len(compress(soft_page(1)))
    tmem.put(2, b, 0, 0, soft_page(1))  # stored compressed
    tmem.put(1, a, 0, 0, soft_page(1))  # shares the compressed copy
    stats = tmem.stats()
    assert (stats.unique_pages, stats.used_bytes) == (1, packed)
    # each guest is charged its own stored size, whatever is actually held
    assert tmem.guest_stats(1).charged_bytes == PAGE
    assert tmem.guest_stats(2).charged_bytes == packed
    tmem.flush_page(2, b, 0, 0)
    assert tmem.get(1, a, 0, 0) == soft_page(1)
    tmem.flush_page(1, a, 0, 0)
    assert tmem.stats().used_bytes == 0 and tmem.guest_stats(1).charged_bytes == 0
