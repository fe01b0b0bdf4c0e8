"""``Repository.prune_notices`` on SQLite and PostgreSQL: which notices are settled (acked,
past their deadline, informational) and may go, and that open sheds and numbering stay."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.db.engine import make_engine, upgrade
from broker.db.repo import Repository
from tests.db.pg import temp_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Repository]:
    def build(url: str) -> Iterator[Repository]:
        upgrade(url)
        r = Repository(make_engine(url))
        try:
            yield r
        finally:
            r.close()

    if request.param == "sqlite":
        yield from build(f"sqlite:///{tmp_path / 'broker.sqlite3'}")
    else:
        with temp_database() as url:
            yield from build(url)


def test_prune_keeps_open_sheds_and_drops_settled_notices_oldest_first(repo: Repository) -> None:
    gid = repo.create_guest(
        name="g",
        token_hash=b"\0" * 32,
        weight=100,
        cap_pages=None,
        dedup_domain="d",
        compress=False,
    ).guest_id
    now = datetime.now(UTC)
    open_shed = repo.add_notice(gid, "shed", pages=5, deadline=now + timedelta(hours=1)).seq
    late_shed = repo.add_notice(gid, "shed", pages=5, deadline=now - timedelta(seconds=1)).seq
    acked_shed = repo.add_notice(gid, "shed", pages=5, deadline=now + timedelta(hours=1)).seq
    assert repo.ack_notice(gid, acked_shed, 5) is not None
    quota = repo.add_notice(gid, "quota", cap_pages=10).seq
    newest = repo.add_notice(gid, "evicted", pages=1).seq
    assert repo.prune_notices(gid, keep=5) == 0  # not over the limit: nothing goes
    assert repo.prune_notices(gid, keep=2) == 3  # the three settled ones, oldest first
    assert [n.seq for n in repo.notices_after(gid, 0)] == [open_shed, newest]
    assert late_shed < acked_shed < quota < newest
    assert repo.prune_notices(gid, keep=1) == 1  # the open shed stays even over the limit
    assert [n.seq for n in repo.notices_after(gid, 0)] == [open_shed]
    assert repo.prune_notices(gid, keep=1) == 0
    assert repo.add_notice(gid, "thaw").seq == newest + 1  # numbers are never reused
