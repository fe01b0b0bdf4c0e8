"""The repository on SQLite and PostgreSQL: guests, pools, authorisations, notices, settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.core.errors import GuestExists, UnknownGuest
from broker.db.engine import make_engine, upgrade
from broker.db.repo import NbdExportRecord, PoolRecord, Repository


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    upgrade(db_url)
    r = Repository(make_engine(db_url))
    yield r
    r.close()


def _guest(repo: Repository, name: str = "vm1") -> int:
    return repo.create_guest(
        name=name,
        token_hash=name.encode().ljust(32, b"."),
        weight=100,
        cap_pages=None,
        dedup_domain="default",
        compress=False,
    ).guest_id


def test_guest_names_are_unique(repo: Repository) -> None:
    _guest(repo, "vm1")
    with pytest.raises(GuestExists):
        _guest(repo, "vm1")
    assert [g.name for g in repo.guests()] == ["vm1"]


def test_update_and_delete_guest(repo: Repository) -> None:
    gid = _guest(repo)
    record = repo.update_guest(gid, {"cap_pages": 10, "frozen": True, "weight": 7})
    assert (record.cap_pages, record.frozen, record.weight) == (10, True, 7)
    assert repo.guest(gid) == record
    repo.add_pool(PoolRecord(gid, 0, "persistent", False, None, False))
    repo.set_shared_auth("0b7c4a3e-7d3c-4d2b-9f77-2c1f1c1d1e1f", gid, True)
    repo.add_notice(gid, "freeze")
    repo.delete_guest(gid)
    assert repo.guests() == []
    assert repo.pools() == []
    assert repo.shared_auths() == []
    with pytest.raises(UnknownGuest):
        repo.delete_guest(gid)
    with pytest.raises(UnknownGuest):
        repo.update_guest(gid, {"weight": 1})


def test_notice_sequence_numbers_survive_a_restart(repo: Repository, db_url: str) -> None:
    a, b = _guest(repo, "a"), _guest(repo, "b")
    assert [repo.add_notice(a, "quota", cap_pages=5).seq for _ in range(3)] == [1, 2, 3]
    assert repo.add_notice(b, "freeze").seq == 1  # per guest
    again = Repository(make_engine(db_url))
    try:
        assert again.add_notice(a, "thaw").seq == 4
        notices = again.notices_after(a, 2)
        assert [(n.seq, n.type) for n in notices] == [(3, "quota"), (4, "thaw")]
        assert notices[0].cap_pages == 5
        assert notices[0].issued_at.tzinfo is not None
    finally:
        again.close()
    with pytest.raises(UnknownGuest):
        repo.add_notice(999, "quota")


def test_acks_are_stored(repo: Repository) -> None:
    gid = _guest(repo)
    seq = repo.add_notice(gid, "shed", pages=100).seq
    acked = repo.ack_notice(gid, seq, 80)
    assert acked is not None
    assert acked.pages_returned == 80
    assert acked.acked_at is not None
    assert repo.ack_notice(gid, seq + 1, 1) is None


def test_shared_auth_allow_and_withdraw(repo: Repository) -> None:
    gid = _guest(repo)
    uuid = "0b7c4a3e-7d3c-4d2b-9f77-2c1f1c1d1e1f"
    repo.set_shared_auth(uuid, gid, True)
    repo.set_shared_auth(uuid, gid, True)
    assert repo.shared_auths() == [(uuid, gid)]
    repo.set_shared_auth(uuid, gid, False)
    assert repo.shared_auths() == []
    with pytest.raises(UnknownGuest):
        repo.set_shared_auth(uuid, 999, True)


def test_settings_round_trip(repo: Repository) -> None:
    assert repo.settings() == {}
    repo.set_setting("capacity_bytes", 1 << 20)
    repo.set_setting("capacity_bytes", 2 << 20)
    assert repo.settings() == {"capacity_bytes": 2 << 20}


def test_nbd_exports_are_kept_until_deleted_or_their_guest_goes(repo: Repository) -> None:
    gid, other = _guest(repo, "vm1"), _guest(repo, "vm2")
    repo.add_pool(PoolRecord(gid, 0, "persistent", False, None, False))
    repo.add_nbd_export(NbdExportRecord(gid, "swap", 8 << 20, 0))
    repo.add_nbd_export(NbdExportRecord(gid, "data", 4096, 1))
    repo.add_nbd_export(NbdExportRecord(other, "swap", 1 << 30, 0))
    assert repo.nbd_exports() == [
        NbdExportRecord(gid, "data", 4096, 1),
        NbdExportRecord(gid, "swap", 8 << 20, 0),
        NbdExportRecord(other, "swap", 1 << 30, 0),
    ]
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        repo.add_nbd_export(NbdExportRecord(gid, "swap", 4096, 2))
    repo.delete_nbd_export(gid, "data")
    repo.delete_guest(gid)
    assert repo.nbd_exports() == [NbdExportRecord(other, "swap", 1 << 30, 0)]
