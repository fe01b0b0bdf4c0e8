"""The LMDB journal: group commit, ordering, range deletes, reload, failures."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.store import LmdbJournal, NullJournal, open_journal, reload_journal
from broker.store.errors import JournalClosed, JournalFailed
from schemas.batch import OP_FLUSH_PAGE, OP_PUT

pytestmark = pytest.mark.timeout(60)


def page(n: int) -> bytes:
    return n.to_bytes(8, "big") * 512


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[LmdbJournal]:
    j = LmdbJournal(tmp_path / "j")
    yield j
    j.close()


def stored(j: LmdbJournal) -> dict[tuple[int, int, int, int], bytes]:
    return {(g, p, o, i): data for g, p, o, i, data in j.load()}


def test_round_trip_survives_reopen(tmp_path: Path) -> None:
    j = LmdbJournal(tmp_path / "j")
    big_oid = (1 << 192) - 1
    j.record_put(1, 0, 7, 3, page(1))
    j.record_put(1, 0, big_oid, (1 << 32) - 1, page(2))
    j.record_put(2, 15, 0, 0, bytes(4096))
    j.sync()
    j.close()
    j2 = LmdbJournal(tmp_path / "j")
    try:
        assert stored(j2) == {
            (1, 0, 7, 3): page(1),
            (1, 0, big_oid, (1 << 32) - 1): page(2),
            (2, 15, 0, 0): bytes(4096),
        }
        assert j2.count() == 3
    finally:
        j2.close()


def test_zero_page_takes_no_bytes(journal: LmdbJournal) -> None:
    journal.record_put(1, 0, 1, 1, bytes(4096))
    journal.sync()
    journal.checkpoint()  # from the writer's log into LMDB, where _env reads
    with journal._env.begin() as txn:
        assert [v for _k, v in txn.cursor()] == [b""]
    assert journal._env.stat()["overflow_pages"] == 0
    assert stored(journal) == {(1, 0, 1, 1): bytes(4096)}


def test_a_page_takes_one_lmdb_page_and_a_handle_one_key(journal: LmdbJournal) -> None:
    # 4096-byte values would take two overflow pages each; the tail in the key makes it one.
    for n in range(100):
        journal.record_put(1, 0, n, 0, page(n + 1))
    journal.sync()
    for n in range(100):  # replacing with a different tail must not leave the old key behind
        journal.record_put(1, 0, n, 0, page(n + 1000))
    journal.sync()
    journal.checkpoint()
    stat = journal._env.stat()
    assert stat["entries"] == 100
    assert stat["overflow_pages"] == 100
    assert stored(journal) == {(1, 0, n, 0): page(n + 1000) for n in range(100)}


def test_put_replaces(journal: LmdbJournal) -> None:
    journal.record_put(1, 0, 1, 1, page(1))
    journal.sync()
    journal.record_put(1, 0, 1, 1, page(2))
    journal.sync()
    assert stored(journal) == {(1, 0, 1, 1): page(2)}


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        ([("put", 1), ("flush",)], None),
        ([("flush",), ("put", 1)], 1),
        ([("put", 1), ("put", 2), ("flush",), ("put", 3)], 3),
        ([("put", 1), ("flush_object",)], None),
        ([("put", 1), ("destroy_pool",), ("put", 4)], 4),
        ([("put", 1), ("remove_guest",)], None),
    ],
)
def test_ops_in_one_round_apply_in_order(
    journal: LmdbJournal, ops: list[tuple[object, ...]], expected: int | None
) -> None:
    for op in ops:
        if op[0] == "put":
            journal.record_put(3, 1, 9, 9, page(int(op[1])))  # type: ignore[call-overload]
        elif op[0] == "flush":
            journal.record_flush(3, 1, 9, 9)
        elif op[0] == "flush_object":
            journal.record_flush_object(3, 1, 9)
        elif op[0] == "destroy_pool":
            journal.record_destroy_pool(3, 1)
        else:
            journal.record_remove_guest(3)
    journal.sync()
    assert journal.commits == 1
    got = stored(journal).get((3, 1, 9, 9))
    assert got == (None if expected is None else page(expected))


def _neighbours(j: LmdbJournal) -> None:
    # Handles chosen so that a sloppy prefix (oid, pool or guest id as a string, or a short
    # prefix) would catch a neighbour: guest 1 vs 256, pool 1 vs 2, oid 5 vs 5 << 64 and 6.
    for g in (1, 256):
        for p in (1, 2):
            for o in (5, 6, 5 << 64, (5 << 128) | 5):
                for i in (0, 1, 2):
                    j.record_put(g, p, o, i, page(g * 1000 + p * 100 + (o % 97) * 10 + i))
    j.sync()


def test_flush_object_is_a_range_delete_of_that_object_only(journal: LmdbJournal) -> None:
    _neighbours(journal)
    before = stored(journal)
    journal.record_flush_object(1, 1, 5)
    journal.sync()
    after = stored(journal)
    assert set(before) - set(after) == {(1, 1, 5, i) for i in (0, 1, 2)}


def test_destroy_pool_is_a_range_delete_of_that_pool_only(journal: LmdbJournal) -> None:
    _neighbours(journal)
    before = stored(journal)
    journal.record_destroy_pool(1, 1)
    journal.sync()
    after = stored(journal)
    assert set(before) - set(after) == {k for k in before if k[:2] == (1, 1)}
    assert journal.pools() == [(1, 2), (256, 1), (256, 2)]


def test_remove_guest_is_a_range_delete_of_that_guest_only(journal: LmdbJournal) -> None:
    _neighbours(journal)
    before = stored(journal)
    journal.record_remove_guest(1)
    journal.sync()
    after = stored(journal)
    assert set(after) == {k for k in before if k[0] == 256}
    assert list(journal.load_pool(256, 2)) == [
        (o, i, d) for (g, p, o, i), d in sorted(after.items()) if (g, p) == (256, 2)
    ]


def test_range_delete_at_the_end_of_the_key_space(journal: LmdbJournal) -> None:
    top = (1 << 64) - 1
    journal.record_put(top, 0xFFFF, (1 << 192) - 1, (1 << 32) - 1, page(1))
    journal.record_put(top, 0xFFFE, 1, 1, page(2))
    journal.sync()
    assert journal.pools() == [(top, 0xFFFE), (top, 0xFFFF)]
    journal.record_destroy_pool(top, 0xFFFF)
    journal.sync()
    assert stored(journal) == {(top, 0xFFFE, 1, 1): page(2)}


async def test_barrier_waits_for_disk_and_concurrent_writers_share_commits(
    journal: LmdbJournal,
) -> None:
    seen_durable: list[bool] = []

    async def writer(w: int) -> None:
        for k in range(20):
            journal.record_put(1, 0, w, k, page(w * 100 + k + 1))
            assert journal.pending
            await journal.barrier()
            # What this writer recorded must be readable from disk by now.
            on_disk = {(o, i): d for o, i, d in journal.load_pool(1, 0)}
            seen_durable.append(on_disk.get((w, k)) == page(w * 100 + k + 1))

    await asyncio.gather(*(writer(w) for w in range(16)))
    assert all(seen_durable) and len(seen_durable) == 320
    assert not journal.pending
    assert journal.committed_records == 320
    # 320 records from 16 concurrent writers: rounds are shared, far fewer than one per record.
    assert journal.commits < 320
    assert len(stored(journal)) == 320


async def test_records_made_during_a_round_form_the_next_round(journal: LmdbJournal) -> None:
    journal.record_put(1, 0, 1, 1, page(1))
    first = asyncio.ensure_future(journal.barrier())
    await asyncio.sleep(0)  # the round with record 1 is now running in the worker thread
    journal.record_flush(1, 0, 1, 1)
    journal.record_put(1, 0, 2, 2, page(2))
    second = asyncio.ensure_future(journal.barrier())
    await asyncio.gather(first, second)
    assert stored(journal) == {(1, 0, 2, 2): page(2)}
    assert journal.commits == 2


async def test_records_without_a_barrier_still_reach_disk(journal: LmdbJournal) -> None:
    journal.record_put(1, 0, 1, 1, page(1))  # as an exclusive get's flush would: no barrier
    for _ in range(200):
        if not journal.pending:
            break
        await asyncio.sleep(0.01)
    assert not journal.pending
    assert stored(journal) == {(1, 0, 1, 1): page(1)}


async def test_a_dead_writer_fails_every_waiter_and_later_barriers(journal: LmdbJournal) -> None:
    journal._proc.kill()
    journal._proc.wait()
    journal.record_put(1, 0, 1, 1, page(1))
    results = await asyncio.gather(journal.barrier(), journal.barrier(), return_exceptions=True)
    assert all(isinstance(r, JournalFailed) for r in results), results
    assert journal.pending
    with pytest.raises(JournalFailed):
        await journal.barrier()


async def test_a_commit_lmdb_cannot_make_keeps_the_log_and_refuses_later_rounds(
    tmp_path: Path,
) -> None:
    # A map too small for the round: LMDB's transaction fails as on a full disk. The round was
    # acknowledged from the writer's log, so it must survive: later rounds are refused, a
    # restart that still cannot apply the log refuses to start, and one that can has the pages.
    expected = {(1, 0, n, 0): page(n + 1) for n in range(64)}
    j = LmdbJournal(tmp_path / "j", map_size=1 << 16)
    try:
        for n in range(64):
            j.record_put(1, 0, n, 0, page(n + 1))
        await j.barrier()  # durable: in the log
        with pytest.raises(JournalFailed, match="MapFull"):
            j.checkpoint()  # applying the log to LMDB fails
        j.record_put(1, 0, 99, 0, page(99))
        with pytest.raises(JournalFailed):
            await j.barrier()
    finally:
        j.close()
    with pytest.raises(JournalFailed, match="MapFull"):
        LmdbJournal(tmp_path / "j", map_size=1 << 16)
    j2 = LmdbJournal(tmp_path / "j")
    try:
        assert stored(j2) == expected
    finally:
        j2.close()


async def test_acknowledged_rounds_survive_a_killed_writer(tmp_path: Path) -> None:
    # Rounds answered from the log but not yet in LMDB: a SIGKILL of the writer, then a start
    # that replays the log, must show every one of them, and nothing the broker did not record.
    j = LmdbJournal(tmp_path / "j")
    acked: dict[tuple[int, int, int, int], bytes] = {}
    try:

        async def writer(w: int) -> None:
            for k in range(30):
                journal_page = page(w * 100 + k + 1)
                j.record_put(1, 0, w, k, journal_page)
                if k % 3 == 2:
                    j.record_flush(1, 0, w, k - 1)
                await j.barrier()
                acked[(1, 0, w, k)] = journal_page
                if k % 3 == 2:
                    acked.pop((1, 0, w, k - 1))

        await asyncio.gather(*(writer(w) for w in range(8)))
        assert not j.pending
    finally:
        j._proc.kill()
        j._proc.wait()
        j.close()
    j2 = LmdbJournal(tmp_path / "j")
    try:
        assert stored(j2) == acked
        assert j2.count() == len(acked)
    finally:
        j2.close()


def test_writer_refuses_an_unknown_record_kind(tmp_path: Path) -> None:
    import lmdb

    from broker.store import writer

    env = lmdb.open(str(tmp_path / "w"), map_size=1 << 24)
    try:
        with pytest.raises(ValueError, match="unknown record kind"):
            writer.apply_records(env, bytes((9, 1, 0)))
    finally:
        env.close()


def test_closed_journal_refuses_records(tmp_path: Path) -> None:
    j = LmdbJournal(tmp_path / "j")
    j.record_put(1, 0, 1, 1, page(1))
    j.close()  # commits what was recorded
    with pytest.raises(JournalClosed):
        j.record_put(1, 0, 1, 2, page(2))
    j2 = LmdbJournal(tmp_path / "j")
    try:
        assert stored(j2) == {(1, 0, 1, 1): page(1)}
    finally:
        j2.close()


_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.integers(1, 2),
            st.integers(0, 1),
            st.integers(0, 2),
            st.integers(0, 2),
            st.integers(0, 3),
        ),
        st.tuples(
            st.just("flush"),
            st.integers(1, 2),
            st.integers(0, 1),
            st.integers(0, 2),
            st.integers(0, 2),
        ),
        st.tuples(st.just("flush_object"), st.integers(1, 2), st.integers(0, 1), st.integers(0, 2)),
        st.tuples(st.just("destroy_pool"), st.integers(1, 2), st.integers(0, 1)),
        st.tuples(st.just("remove_guest"), st.integers(1, 2)),
        st.tuples(st.just("commit")),
    ),
    max_size=60,
)


# 60 examples each start a journal writer process: ~15 s on a quiet machine, over 60 s at load 14
@pytest.mark.timeout(300)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS)
def test_journal_matches_a_model_for_any_sequence_and_round_split(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[object, ...]]
) -> None:
    j = LmdbJournal(tmp_path_factory.mktemp("j"))
    model: dict[tuple[int, int, int, int], bytes] = {}
    try:
        for op in ops:
            name, args = op[0], [int(a) for a in op[1:]]  # type: ignore[call-overload]
            if name == "put":
                g, p, o, i, v = args
                data = bytes(4096) if v == 0 else page(v)
                j.record_put(g, p, o, i, data)
                model[(g, p, o, i)] = data
            elif name == "flush":
                j.record_flush(*args)
                model.pop(tuple(args), None)  # type: ignore[arg-type]
            elif name == "flush_object":
                j.record_flush_object(*args)
                model = {k: v for k, v in model.items() if list(k[:3]) != args}
            elif name == "destroy_pool":
                j.record_destroy_pool(*args)
                model = {k: v for k, v in model.items() if list(k[:2]) != args}
            elif name == "remove_guest":
                j.record_remove_guest(*args)
                model = {k: v for k, v in model.items() if k[0] != args[0]}
            else:
                j.sync()
        j.sync()
        assert stored(j) == model
    finally:
        j.close()


@dataclass
class _Pool:
    pool_id: int
    kind: str


class FakeTmem:
    def __init__(self, pools: dict[int, list[_Pool]]) -> None:
        self._pools = pools
        self.restored: dict[tuple[int, int, int, int], bytes] = {}

    def has_guest(self, guest_id: int) -> bool:
        return guest_id in self._pools

    def pools(self, guest_id: int) -> list[_Pool]:
        return self._pools[guest_id]

    def restore_pages(
        self, guest_id: int, pool_id: int, pages: Iterable[tuple[int, int, bytes]]
    ) -> int:
        n = 0
        for oid, index, data in pages:
            self.restored[(guest_id, pool_id, oid, index)] = data
            n += 1
        return n


async def test_reload_restores_known_pools_and_drops_destroyed_ones(
    journal: LmdbJournal, caplog: pytest.LogCaptureFixture
) -> None:
    for n in range(5000):
        journal.record_put(1, 0, n // 10, n % 10, page(n))
    journal.record_put(1, 3, 1, 1, page(1))  # pool 3 no longer exists
    journal.record_put(1, 4, 1, 1, page(1))  # pool 4 is ephemeral now: never restored
    journal.record_put(9, 0, 1, 1, page(1))  # guest 9 is gone
    journal.record_put(2, 1, 1, 1, bytes(4096))
    await journal.barrier()
    tmem = FakeTmem(
        {1: [_Pool(0, "persistent"), _Pool(4, "ephemeral")], 2: [_Pool(1, "persistent")]}
    )
    with caplog.at_level(logging.INFO, logger="broker.store.reload"):
        report = await reload_journal(journal, tmem, every_pages=1000, chunk=500)
    assert report.pages == 5001
    assert sorted(report.dropped_pools) == [(1, 3), (1, 4), (9, 0)]
    assert tmem.restored[(1, 0, 499, 9)] == page(4999)
    assert tmem.restored[(2, 1, 1, 1)] == bytes(4096)
    assert len(tmem.restored) == 5001
    # dropped for good: a second reload neither restores nor drops them again
    assert journal.pools() == [(1, 0), (2, 1)]
    messages = [r.getMessage() for r in caplog.records]
    assert any("guest 9 pool 0" in m and "dropping" in m for m in messages)
    assert any("reloaded 1000/5001 pages" in m and "pages/s" in m for m in messages)


async def test_reload_skips_pools_destroyed_while_it_runs(journal: LmdbJournal) -> None:
    from broker.core.errors import UnknownPool

    for n in range(3000):
        journal.record_put(1, n % 3, n, 0, page(n + 1))  # 1000 pages in each of pools 0, 1, 2
    await journal.barrier()

    class Destroyed(FakeTmem):
        calls: list[tuple[int, int]] = []

        def restore_pages(
            self, guest_id: int, pool_id: int, pages: Iterable[tuple[int, int, bytes]]
        ) -> int:
            self.calls.append((guest_id, pool_id))
            # pool 1 is destroyed after three of its chunks went in
            if pool_id == 1 and sum(k[1] == 1 for k in self.restored) >= 300:
                raise UnknownPool("pool 1 was destroyed meanwhile")
            return super().restore_pages(guest_id, pool_id, pages)

    pools = [_Pool(p, "persistent") for p in range(3)]
    tmem = Destroyed({1: pools})
    report = await reload_journal(journal, tmem, chunk=100)
    per_pool = [sum(k[1] == p for k in tmem.restored) for p in range(3)]
    assert per_pool == [1000, 300, 1000]  # the pools after the destroyed one are all back
    assert report.pages == 2300
    assert tmem.calls.count((1, 1)) == 4  # once refused, pool 1 is not asked again


async def test_reload_of_null_journal_is_empty() -> None:
    report = await reload_journal(NullJournal(), FakeTmem({}))
    assert report.pages == 0


def test_open_journal_picks_by_durability(tmp_path: Path) -> None:
    assert isinstance(
        open_journal(SimpleNamespace(durability="none", data_dir=tmp_path)), NullJournal
    )
    j = open_journal(SimpleNamespace(durability="sync", data_dir=tmp_path))
    try:
        assert isinstance(j, LmdbJournal)
        assert os.path.isdir(tmp_path / "journal")
    finally:
        j.close()
    with pytest.raises(ValueError, match="durability"):
        open_journal(SimpleNamespace(durability="maybe", data_dir=tmp_path))


async def test_rounds_in_flight_keep_record_order(journal: LmdbJournal) -> None:
    # Several writers on overlapping handles, barriers at random points: the disk must end as
    # the records were made, across however many rounds were in flight at once.
    import random

    model: dict[tuple[int, int, int, int], bytes] = {}
    rng = random.Random(7)

    async def writer(w: int) -> None:
        for step in range(150):
            h = (1, 0, rng.randrange(4), rng.randrange(8))
            r = rng.random()
            if r < 0.6:
                data = page(w * 1000 + step + 1)
                journal.record_put(*h, data)
                model[h] = data
            elif r < 0.9:
                journal.record_flush(*h)
                model.pop(h, None)
            else:
                journal.record_flush_object(1, 0, h[2])
                for k in [k for k in model if k[2] == h[2]]:
                    del model[k]
            if rng.random() < 0.3:
                await journal.barrier()

    await asyncio.gather(*(writer(w) for w in range(4)))
    await journal.barrier()
    assert stored(journal) == model
    assert journal.commits > 2


def test_writer_applies_nothing_after_a_failed_round(tmp_path: Path) -> None:
    import socket
    import threading

    import lmdb

    from broker.store import writer
    from broker.store.durable import page_key

    env = lmdb.open(str(tmp_path / "w"), map_size=1 << 24)
    ours, theirs = socket.socketpair()
    server = threading.Thread(target=writer.serve, args=(theirs, env))
    server.start()
    try:
        good = bytes((writer.PUT, 38)) + page_key(1, 0, 1, 1) + writer.DATA_LEN.pack(4096) + page(1)
        for round_id, body in ((1, good), (2, bytes((9, 1, 0))), (3, good)):
            ours.sendall(writer.REQUEST.pack(round_id, len(body), writer.INLINE) + body)
        replies = []
        for _ in range(3):
            head = writer.recv_exact(ours, writer.REPLY.size)
            assert head is not None
            rid, status, records, _micros, msg_len = writer.REPLY.unpack(head)
            writer.recv_exact(ours, msg_len) if msg_len else None
            replies.append((rid, status, records))
        assert replies == [(1, 0, 1), (2, 1, 0), (3, 1, 0)]
    finally:
        ours.close()
        server.join(timeout=10)
        theirs.close()
    with env.begin() as txn:
        assert txn.stat()["entries"] == 1  # round 1 only
    env.close()


def test_load_chunks_holds_what_load_holds_one_pool_per_chunk(journal: LmdbJournal) -> None:
    _neighbours(journal)
    journal.record_put(1, 1, 5, 7, bytes(4096))
    journal.sync()
    chunks = list(journal.load_chunks(chunk=5))
    assert all(0 < len(pages) <= 5 for _g, _p, pages in chunks)
    flat = [(g, p, o, i, d) for g, p, pages in chunks for o, i, d in pages]
    assert flat == list(journal.load())
    assert len(chunks) == 12  # 4 pools of 12 pages (13 in pool (1, 1)): 5 + 5 + 2 or 3 each


async def test_reload_into_the_core_restores_every_page_with_gc_as_it_was(
    journal: LmdbJournal,
) -> None:
    import gc

    from broker.core import CoreConfig, Tmem

    expected: dict[tuple[int, int, int], bytes] = {}
    for n in range(2500):
        data = bytes(4096) if n % 10 == 0 else page(n % 700)  # zero pages and shared contents
        journal.record_put(1, n % 2, n // 7, n % 7, data)
        expected[(n % 2, n // 7, n % 7)] = data
    await journal.barrier()
    tmem = Tmem(CoreConfig(capacity_bytes=1 << 30))
    tmem.add_guest(1, name="one")
    for _ in range(2):
        tmem.create_pool(1, "persistent")
    assert gc.isenabled()
    report = await reload_journal(journal, tmem, chunk=300)
    assert gc.isenabled()
    assert report.pages == 2500
    got = {(p, o, i): d for p in (0, 1) for o, i, d in tmem.pool_pages(1, p)}
    assert got == expected
    assert tmem.stats().unique_pages == len({d for d in expected.values() if any(d)})


async def test_rounds_larger_than_a_shared_memory_slot_go_inline(journal: LmdbJournal) -> None:
    from broker.store.durable import SLOT_BYTES

    count = SLOT_BYTES // 4096 + 100  # one round bigger than a slot
    for n in range(count):
        journal.record_put(1, 0, n, 0, page(n + 1))
    await journal.barrier()  # the big round, inline
    journal.record_put(1, 0, 0, 0, page(0))  # then small rounds through the slots again
    await journal.barrier()
    journal.record_flush(1, 0, 1, 0)
    await journal.barrier()
    got = {o: d for o, _i, d in journal.load_pool(1, 0)}
    assert len(got) == count - 1
    assert got[0] == page(0) and 1 not in got and got[count - 1] == page(count)
    assert journal.commits == 3


@pytest.mark.parametrize("nonzero_at", [0, 2048, 4079, 4080, 4095])
def test_a_page_with_one_nonzero_byte_is_not_a_zero_page(
    journal: LmdbJournal, nonzero_at: int
) -> None:
    data = bytearray(4096)
    data[nonzero_at] = 7
    journal.record_put(1, 0, 1, 1, bytes(data))
    journal.record_put(1, 0, 1, 2, bytes(4096))
    journal.sync()
    assert stored(journal) == {(1, 0, 1, 1): bytes(data), (1, 0, 1, 2): bytes(4096)}


async def test_puts_ahead_are_sent_at_once_and_durable_at_the_barrier(
    journal: LmdbJournal,
) -> None:
    body = b"".join(page(i + 1) for i in range(256))
    view = memoryview(body)
    puts = [(OP_PUT, 5, i, view[i * 4096 : (i + 1) * 4096]) for i in range(256)]
    assert journal.put_ahead(1, 0, puts)
    assert journal.pending
    assert journal.put_ahead(1, 0, [(OP_PUT, 6, 0, page(7))])  # a second round in flight
    assert not journal.put_ahead(1, 0, [(OP_PUT, 6, 1, page(8))])  # not a third: nothing recorded
    journal.record_flush(1, 0, 5, 3)  # made after the rounds sent: the next round
    await journal.barrier()
    want = {(1, 0, 5, i): page(i + 1) for i in range(256) if i != 3}
    want[(1, 0, 6, 0)] = page(7)
    assert stored(journal) == want
    assert journal.commits == 3 and journal.committed_records == 258


def test_puts_ahead_outside_an_event_loop_are_refused(journal: LmdbJournal) -> None:
    assert not journal.put_ahead(1, 0, [(OP_PUT, 5, 0, page(1))])
    assert not journal.pending
    with pytest.raises(ValueError):
        asyncio.run(_ahead_short_page(journal))
    assert not journal.pending


async def _ahead_short_page(journal: LmdbJournal) -> None:
    journal.put_ahead(1, 0, [(OP_PUT, 5, 0, page(1)), (OP_PUT, 5, 1, b"short")])


async def test_the_core_sends_a_batch_of_puts_before_it_applies_them(
    journal: LmdbJournal,
) -> None:
    from broker.core import CoreConfig, Tmem

    t = Tmem(CoreConfig(capacity_bytes=1 << 24), journal=journal)
    t.add_guest(1, name="one")
    pool = t.create_pool(1, "persistent")
    t.batch(1, pool, [(OP_PUT, 5, i, page(i + 1)) for i in range(64)])
    assert len(journal._in_flight) == 1  # sent while the core ran, before any await
    # a flush in it: the core records the batch as it applies it
    t.batch(1, pool, [(OP_PUT, 5, 0, page(99)), (OP_FLUSH_PAGE, 5, 1, None)])
    assert len(journal._in_flight) == 1
    await journal.barrier()
    want = {(1, pool, 5, i): page(i + 1) for i in range(64) if i != 1}
    want[(1, pool, 5, 0)] = page(99)
    assert stored(journal) == want
