"""The journal writer's log: what a crash leaves in it is replayed into LMDB, and only that."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from broker.store import LmdbJournal, writer
from broker.store.durable import page_key

pytestmark = pytest.mark.timeout(60)


def page(n: int) -> bytes:
    return n.to_bytes(8, "big") * 512


def put(oid: int, n: int) -> bytes:
    return bytes((writer.PUT, 38)) + page_key(1, 0, oid, 0) + writer.DATA_LEN.pack(4096) + page(n)


def stored(env: lmdb.Environment) -> dict[bytes, bytes]:
    with env.begin() as txn:
        return {k[:38]: bytes(v) + k[38:] for k, v in txn.cursor()}


def key(oid: int) -> bytes:
    return page_key(1, 0, oid, 0)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[lmdb.Environment]:
    e = lmdb.open(str(tmp_path / "db"), map_size=1 << 30, subdir=True)
    yield e
    e.close()


def new_log(tmp_path: Path, size: int = 0) -> writer.Log:
    return writer.Log(str(tmp_path / "db" / writer.WAL_NAME), size)


def test_frames_written_but_not_applied_are_replayed_once(
    env: lmdb.Environment, tmp_path: Path
) -> None:
    log = new_log(tmp_path)
    assert writer.recover(env, log) == (0, 1)  # a new log
    pos = writer.HEAD_BYTES
    for seq in (1, 2, 3):
        body = put(seq, seq) + put(9, seq)  # the last frame's page 9 wins
        log.write_frame(pos, seq, body)
        pos += writer._FRAME.size + len(body)
    log.close()
    again = new_log(tmp_path)
    assert writer.recover(env, again) == (3, 4)
    assert stored(env) == {key(1): page(1), key(2): page(2), key(3): page(3), key(9): page(3)}
    assert writer.recover(env, again) == (0, 4)  # LMDB holds them now: nothing to replay
    again.close()


@pytest.mark.parametrize("damage", ["records", "head", "seq"])
def test_replay_stops_at_a_torn_or_foreign_frame(
    env: lmdb.Environment, tmp_path: Path, damage: str
) -> None:
    log = new_log(tmp_path)
    writer.recover(env, log)
    pos = writer.HEAD_BYTES
    starts = []
    for seq in (1, 2, 3):
        body = put(seq, seq)
        starts.append(pos)
        # a frame from another lap carries another seq: it must end the replay like a torn one
        log.write_frame(pos, seq + 100 if (damage == "seq" and seq == 2) else seq, body)
        pos += writer._FRAME.size + len(body)
    if damage == "records":
        os.pwrite(log.fd, b"\xff", starts[1] + writer._FRAME.size + 3000)
    elif damage == "head":
        os.pwrite(log.fd, b"\x00\x00\x00\x00", starts[1])
    log.close()
    again = new_log(tmp_path)
    assert writer.recover(env, again)[0] == 1
    assert stored(env) == {key(1): page(1)}  # frame 3 follows the broken one: not replayed
    again.close()


def test_the_ring_wraps_and_a_crash_after_the_wrap_replays_only_the_new_frames(
    env: lmdb.Environment, tmp_path: Path
) -> None:
    log = new_log(tmp_path, size=0)  # the smallest log: 1 MiB of frames
    _replayed, seq = writer.recover(env, log)
    cp = writer.Checkpointer(env, log, seq)
    cp.start()
    try:
        starts = []
        for n in range(1, 41):  # 40 frames of 25 pages (~100 KiB): four laps of the ring
            body = b"".join(put(oid, n) for oid in range(n % 5, n % 5 + 25))
            spot = cp.place(len(body))
            assert spot is not None
            starts.append(spot[0])
            log.write_frame(spot[0], spot[1], body)
            cp.written(spot[1])
        assert starts.count(writer.HEAD_BYTES) >= 3  # it wrapped
        assert cp.checkpoint() is None
        expected = stored(env)
        assert expected[key(28)] == page(39) and expected[key(0)] == page(40)
        # Two more frames reach the log and are answered, then the process dies before the
        # checkpointer applies them (written() never called).
        for n, oid in ((41, 7), (42, 100)):
            body = put(oid, n)
            spot = cp.place(len(body))
            assert spot is not None
            log.write_frame(spot[0], spot[1], body)
        expected |= {key(7): page(41), key(100): page(42)}
    finally:
        with cp.cond:
            cp.stopping = True
            cp.cond.notify_all()
        cp.join(timeout=10)
        log.close()
    fresh = new_log(tmp_path)
    assert writer.recover(env, fresh)[0] == 2
    assert stored(env) == expected
    fresh.close()


def test_a_second_writer_waits_for_the_first_to_let_go_of_the_log(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    first = new_log(tmp_path)
    with pytest.raises(RuntimeError, match="another journal writer"):
        writer.Log(str(tmp_path / "db" / writer.WAL_NAME), 0, lock_timeout=0.2)
    first.close()
    new_log(tmp_path).close()


def test_a_log_left_by_a_killed_writer_is_replayed_even_with_the_log_turned_off(
    tmp_path: Path,
) -> None:
    j = LmdbJournal(tmp_path / "j")
    try:
        for n in range(50):
            j.record_put(1, 0, n, 0, page(n))
        j.sync()
    finally:
        j._proc.kill()
        j._proc.wait()
        j.close()
    assert (tmp_path / "j" / writer.WAL_NAME).exists()
    j2 = LmdbJournal(tmp_path / "j", wal_bytes=0)
    try:
        assert {(g, p, o, i): d for g, p, o, i, d in j2.load()} == {
            (1, 0, n, 0): page(n) for n in range(50)
        }
        assert not (tmp_path / "j" / writer.WAL_NAME).exists()
    finally:
        j2.close()


@pytest.mark.parametrize("wal_bytes", [0, 2 << 20])
def test_rounds_larger_than_the_log_go_straight_to_lmdb(tmp_path: Path, wal_bytes: int) -> None:
    # 2 MiB of log; a round of 700 pages (~2.9 MiB) cannot be a frame
    j = LmdbJournal(tmp_path / "j", wal_bytes=wal_bytes)
    try:
        for n in range(700):
            j.record_put(1, 0, n, 0, page(n))
        j.sync()
        j.record_flush(1, 0, 5, 0)
        j.sync()
        got = {o: d for _g, _p, o, _i, d in j.load()}
        assert len(got) == 699 and 5 not in got and got[699] == page(699)
    finally:
        j.close()


def test_the_journal_log_setting_sizes_the_log_or_turns_it_off(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from broker.settings import Settings
    from broker.store import open_journal

    for size, expected in (("8MiB", 8 << 20), ("0", None)):
        data = tmp_path / size
        j = open_journal(Settings(data_dir=data, journal_log=size))
        try:
            log = data / "journal" / writer.WAL_NAME
            assert (log.stat().st_size if log.exists() else None) == expected
        finally:
            j.close()
    for bad in ("1MiB", "65GiB"):
        with pytest.raises(ValidationError, match="journal_log"):
            Settings(journal_log=bad)
