"""FallbackStore: fixed 4 KiB slots, a free list, an in-memory key map."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_agent.errors import FallbackFull
from guest_agent.fallback import FallbackStore

pytestmark = pytest.mark.timeout(30)


def page(n: int) -> bytes:
    return n.to_bytes(4, "big") * 1024


def test_write_read_replace_discard(tmp_path: Path) -> None:
    path = tmp_path / "swap.fallback"
    with FallbackStore(path) as store:
        store.write((0, 1), page(1))
        store.write((0, 2), page(2))
        store.write((0, 1), page(11))  # replace in place
        assert store.read((0, 1)) == page(11)
        assert store.read((0, 2)) == page(2)
        assert store.read((0, 3)) is None
        assert len(store) == 2 and (0, 1) in store
        assert store.file_slots == 2
        assert store.discard((0, 1)) and not store.discard((0, 1))
        store.write((5, 5), page(5))  # reuses the freed slot
        assert store.file_slots == 2
        assert store.read((5, 5)) == page(5) and store.read((0, 2)) == page(2)
        assert sorted(store) == [(0, 2), (5, 5)]  # type: ignore[type-var]
        assert path.stat().st_size == 2 * 4096


def test_the_file_is_truncated_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old" * 10000)
    with FallbackStore(path) as store:
        assert len(store) == 0 and path.stat().st_size == 0


def test_max_pages_and_page_size() -> None:
    with FallbackStore(None, max_pages=2) as store:
        store.write("a", page(1))
        store.write("b", page(2))
        with pytest.raises(FallbackFull):
            store.write("c", page(3))
        store.write("a", page(4))  # replacing needs no new slot
        store.discard("b")
        store.write("c", page(3))
        assert store.read("c") == page(3) and store.read("a") == page(4)
        with pytest.raises(ValueError):
            store.write("d", b"short")
