"""A batch of puts journaled before the core applies it (``put_ahead``): what the journal holds
after the batch is what the core holds, whichever path the batch took."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import CoreConfig, Tmem
from broker.core.policy import TINYLFU
from broker.core.pressure import PressureSettings
from schemas.batch import OP_FLUSH_PAGE, OP_GET, OP_PUT, STATUS_DONE
from tests.core.conftest import PAGE, RecordingJournal, page

pytestmark = pytest.mark.timeout(60)


class AheadJournal(RecordingJournal):
    """A recording journal that takes a batch's puts ahead (unless ``refuse``)."""

    def __init__(self, refuse: bool = False) -> None:
        super().__init__()
        self.refuse = refuse

    def put_ahead(
        self,
        guest_id: int,
        pool_id: int,
        pages: Sequence[tuple[int, int, int, bytes | memoryview | None]],
    ) -> bool:
        if self.refuse:
            return False
        for op, oid, index, data in pages:
            assert op == OP_PUT and data is not None
            self.calls.append(("ahead", guest_id, pool_id, oid, index, bytes(data)))
        return True


def replay(calls: list[tuple[Any, ...]]) -> dict[tuple[int, int, int, int], bytes]:
    held: dict[tuple[int, int, int, int], bytes] = {}
    for call in calls:
        kind, handle = call[0], tuple(call[1:5])
        if kind in ("put", "ahead"):
            held[handle] = call[5]
        elif kind == "flush":
            held.pop(handle, None)
        else:
            raise AssertionError(f"unexpected record {call}")
    return held


def core_holds(t: Tmem, pool: int, handles: list[tuple[int, int]]) -> dict[Any, bytes]:
    out = {}
    for oid, index in handles:
        got = t.get(1, pool, oid, index)
        if got is not None:
            out[(1, pool, oid, index)] = got
    return out


def test_distinct_puts_are_journaled_ahead_and_nothing_more() -> None:
    j = AheadJournal()
    t = Tmem(CoreConfig(capacity_bytes=1000 * PAGE), journal=j)
    t.add_guest(1, name="one")
    pool = t.create_pool(1, "persistent")
    ops = [(OP_PUT, 7, i, page(i)) for i in range(10)]
    results = t.batch(1, pool, ops)
    assert [s for s, _ in results] == [STATUS_DONE] * 10
    assert [c[0] for c in j.calls] == ["ahead"] * 10
    assert replay(j.calls) == core_holds(t, pool, [(7, i) for i in range(10)])


@pytest.mark.parametrize(
    "case", ["repeated handle", "a get in it", "a flush in it", "frozen", "quota", "refused"]
)
def test_other_batches_are_journaled_as_the_core_applies_them(case: str) -> None:
    j = AheadJournal(refuse=case == "refused")
    t = Tmem(CoreConfig(capacity_bytes=1000 * PAGE), journal=j)
    t.add_guest(1, name="one", cap_pages=5 if case == "quota" else None)
    pool = t.create_pool(1, "persistent")
    ops: list[tuple[int, int, int, bytes | None]] = [(OP_PUT, 7, i, page(i)) for i in range(8)]
    if case == "repeated handle":
        ops.append((OP_PUT, 7, 0, page(100)))
    elif case == "a get in it":
        ops.append((OP_GET, 7, 0, None))
    elif case == "a flush in it":
        ops.append((OP_FLUSH_PAGE, 7, 1, None))
    elif case == "frozen":
        t.freeze(1)
    t.batch(1, pool, ops)
    assert all(c[0] != "ahead" for c in j.calls)
    if case != "frozen":
        t_handles = [(7, i) for i in range(8)]
        assert replay(j.calls) == core_holds(t, pool, t_handles)


def test_a_put_the_core_declines_after_it_was_journaled_ahead_is_flushed() -> None:
    """A compressing guest's incompressible page is declined under TinyLFU (its cost), which
    the check before the batch cannot know: the journal flushes the handle after."""
    j = AheadJournal()
    t = Tmem(CoreConfig(capacity_bytes=1000 * PAGE), journal=j)
    t.configure_pressure(PressureSettings(ephemeral_policy=TINYLFU))
    t.add_guest(1, name="one", compress=True)
    pool = t.create_pool(1, "persistent")
    soft = b"\x01" + bytes(PAGE - 1)
    ops = [(OP_PUT, 7, 0, soft), (OP_PUT, 7, 1, page(1)), (OP_PUT, 7, 2, soft)]
    statuses = [s for s, _ in t.batch(1, pool, ops)]
    assert statuses[0] == STATUS_DONE and statuses[1] != STATUS_DONE
    assert ("flush", 1, pool, 7, 1) in j.calls
    assert replay(j.calls) == core_holds(t, pool, [(7, 0), (7, 1), (7, 2)])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.sampled_from([OP_PUT, OP_PUT, OP_PUT, OP_FLUSH_PAGE]),
                st.integers(0, 2),
                st.integers(0, 5),
                st.integers(1, 4),
            ),
            min_size=1,
            max_size=12,
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(3, 40),
)
def test_the_journal_always_holds_what_the_core_holds(
    batches: list[list[tuple[int, int, int, int]]], capacity: int
) -> None:
    j = AheadJournal()
    t = Tmem(CoreConfig(capacity_bytes=capacity * PAGE), journal=j)
    t.add_guest(1, name="one")
    pool = t.create_pool(1, "persistent")
    for batch in batches:
        ops = [(op, oid, index, page(tag) if op == OP_PUT else None)
               for op, oid, index, tag in batch]  # fmt: skip
        t.batch(1, pool, ops)
    handles = [(oid, index) for oid in range(3) for index in range(6)]
    assert replay(j.calls) == core_holds(t, pool, handles)
