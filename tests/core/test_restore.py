"""Batch restore at broker start: ``restore_pages`` ends exactly as ``restore_page`` page by page."""

from __future__ import annotations

from typing import Any

import pytest

from broker.core import Tmem
from broker.core.errors import BadHandle, BadPageSize, BadRequest, UnknownPool
from broker.core.figures import as_json

from .conftest import PAGE, ZERO, MakeTmem, page, soft_page

pytestmark = pytest.mark.timeout(60)


def _pages() -> list[tuple[int, int, bytes]]:
    out: list[tuple[int, int, bytes]] = []
    for n in range(60):
        oid, index = n // 7, n % 7
        if n % 9 == 0:
            data = ZERO
        elif n % 5 == 0:
            data = page(3)  # the same content at several handles: shared once
        elif n % 4 == 0:
            data = soft_page(n)  # shrinks under lz4 for a compressing guest
        else:
            data = page(100 + n)
        out.append((oid, index, data))
    # handles restored twice: the later page replaces the earlier (zero -> data, data -> zero)
    out += [(0, 0, page(7)), (0, 1, ZERO), (1, 2, page(3))]
    return out


def _state(tmem: Tmem, pools: list[int]) -> dict[str, Any]:
    stats = as_json(tmem.stats())
    stats.pop("guests")
    return {
        "stats": stats,
        "guest": [as_json(tmem.guest_stats(g)) for g in (1, 2)],
        "pools": [as_json(tmem.pool_stats(1, p, admin=True)) for p in pools],
        "pages": [sorted(tmem.pool_pages(1, p)) for p in pools],
    }


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "hasher", [None, lambda p: p[8] & 1], ids=["xxh3", "colliding"]
)  # the colliding hasher sends most contents down _acquire's collision chains
def test_restore_pages_equals_restore_page_one_by_one(
    make_tmem: MakeTmem, compress: bool, hasher: Any
) -> None:
    kwargs = {} if hasher is None else {"hasher": hasher}
    one, many = make_tmem(**kwargs), make_tmem(**kwargs)
    pages = _pages()
    for tmem in (one, many):
        tmem.update_guest(1, compress=compress, cap_pages=0)  # no quota applies at restore
        tmem.freeze(1)  # nor does frozen
        pools = [tmem.create_pool(1, "persistent") for _ in range(2)]
        tmem.restore_page(1, pools[1], 9, 9, page(3))  # a content already held, other pool
    for oid, index, data in pages:
        one.restore_page(1, pools[0], oid, index, data)
    assert many.restore_pages(1, pools[0], iter(pages)) == len(pages)
    assert _state(many, pools) == _state(one, pools)
    held = {(o, i): d for o, i, d in pages}
    assert dict(((o, i), d) for o, i, d in many.pool_pages(1, pools[0])) == held
    assert many.stats().ops.puts == 0  # not counted as puts


def test_restore_pages_refuses_what_restore_page_refuses(tmem: Tmem) -> None:
    pid = tmem.create_pool(1, "persistent")
    eph = tmem.create_pool(1, "ephemeral")
    with pytest.raises(BadRequest):
        tmem.restore_pages(1, eph, [(0, 0, page(1))])
    with pytest.raises(UnknownPool):
        tmem.restore_pages(1, 9, [(0, 0, page(1))])
    # A malformed page raises; the pages before it stay restored, with their gauges.
    with pytest.raises(BadPageSize):
        tmem.restore_pages(1, pid, [(0, 0, page(1)), (0, 1, b"x"), (0, 2, page(2))])
    with pytest.raises(BadHandle):
        tmem.restore_pages(1, pid, [(0, 3, page(4)), (-1, 0, page(3))])
    assert sorted(tmem.pool_pages(1, pid)) == [(0, 0, page(1)), (0, 3, page(4))]
    assert tmem.pool_stats(1, pid).logical_pages == 2
    assert tmem.stats().used_bytes == 2 * PAGE
