"""Export and import routes on the real app (in process): freezing, refusals, nothing half-done."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from broker.app import create_app, service_of
from broker.db.repo import PoolRecord
from schemas.export import (
    EXPORT_CONTENT_TYPE,
    ExportGuest,
    ExportHeader,
    ExportPool,
    decode_export,
    encode_export,
)
from tests.api.conftest import ADMIN, error_code, make_settings, page, page_url

pytestmark = pytest.mark.timeout(120)


def broker(tmp_path: Path, name: str, **overrides: Any) -> TestClient:
    values: dict[str, Any] = {"durability": "sync", **overrides}
    settings = make_settings(tmp_path / name, f"sqlite:///{tmp_path / f'{name}.sqlite3'}", **values)
    return TestClient(create_app(settings))


@pytest.fixture
def src(tmp_path: Path) -> Iterator[TestClient]:
    with broker(tmp_path, "src") as c:
        yield c


@pytest.fixture
def dst(tmp_path: Path) -> Iterator[TestClient]:
    with broker(tmp_path, "dst") as c:
        yield c


def new_guest(c: TestClient, name: str, **fields: Any) -> tuple[int, dict[str, str]]:
    r = c.post("/v1/guests", json={"name": name, **fields}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["guest_id"], {"Authorization": f"Bearer {r.json()['token']}"}


def filled_guest(c: TestClient) -> tuple[int, dict[str, str]]:
    gid, auth = new_guest(c, "vm", weight=300, cap_pages=50, dedup_domain="blue")
    for kind, extra in (
        ("persistent", {}),
        ("ephemeral", {}),
        ("persistent", {"exclusive_gets": True}),
    ):
        assert c.post("/v1/pools", json={"kind": kind, **extra}, headers=auth).status_code == 201
    for i in range(20):
        assert c.put(page_url(0, 1, i), content=page(i % 5), headers=auth).status_code == 204
        assert c.put(page_url(2, 9, i), content=bytes(4096), headers=auth).status_code == 204
    assert c.put(page_url(1, 1, 1), content=page(99), headers=auth).status_code == 204
    return gid, auth


def test_export_carries_settings_persistent_pools_and_pages(src: TestClient) -> None:
    gid, auth = filled_guest(src)
    r = src.get(f"/v1/guests/{gid}/export", headers=ADMIN)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(EXPORT_CONTENT_TYPE)
    header, pages, trailer = decode_export(r.content)
    # compress None: the guest was made without one and inherits its domain's mode
    assert header.guest == ExportGuest(
        name="vm", weight=300, cap_pages=50, dedup_domain="blue", compress=None
    )
    assert header.pools == [ExportPool(pool_id=0), ExportPool(pool_id=2, exclusive_gets=True)]
    assert trailer.pages == 40 and trailer.zero_pages == 20
    assert {(p.pool_id, p.oid, p.index): p.page for p in pages}[(0, 1, 3)] == page(3)
    # Exclusive-get pool pages are still there: the export read them without side effects.
    assert src.get(page_url(2, 9, 0), headers=auth).status_code == 200
    assert src.get(f"/v1/guests/{gid}", headers=ADMIN).json()["frozen"] is False


def test_export_leaves_a_guest_frozen_before_frozen(src: TestClient) -> None:
    gid, _ = filled_guest(src)
    assert src.post(f"/v1/guests/{gid}/freeze", headers=ADMIN).status_code == 204
    assert src.get(f"/v1/guests/{gid}/export", headers=ADMIN).status_code == 200
    assert src.get(f"/v1/guests/{gid}", headers=ADMIN).json()["frozen"] is True


def test_import_recreates_the_guest_with_a_new_token(src: TestClient, dst: TestClient) -> None:
    gid, _ = filled_guest(src)
    new_guest(dst, "someone-else")
    stream = src.get(f"/v1/guests/{gid}/export", headers=ADMIN).content
    r = dst.post(
        "/v1/guests/import", content=stream, headers={**ADMIN, "Content-Type": EXPORT_CONTENT_TYPE}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"guest_id", "token"}
    auth = {"Authorization": f"Bearer {body['token']}"}
    info = dst.get(f"/v1/guests/{body['guest_id']}", headers=ADMIN).json()
    assert (info["name"], info["weight"], info["cap_pages"], info["dedup_domain"]) == (
        "vm",
        300,
        50,
        "blue",
    )
    assert [(p["pool_id"], p["kind"], p["exclusive_gets"], p["pages"]) for p in info["pools"]] == [
        (0, "persistent", False, 20),
        (2, "persistent", True, 20),
    ]
    assert dst.get(page_url(0, 1, 7), headers=auth).content == page(2)
    assert dst.get(page_url(2, 9, 7), headers=auth).content == bytes(4096)
    stats = dst.get("/v1/stats", headers=ADMIN).json()
    assert stats["unique_pages"] == 5  # 20 pages of 5 contents, deduplicated on the way in
    # The same name again: 409, and still one guest of that name.
    again = dst.post("/v1/guests/import", content=stream, headers=ADMIN)
    assert again.status_code == 409
    assert [g["name"] for g in dst.get("/v1/guests", headers=ADMIN).json()].count("vm") == 1


def nothing_imported(c: TestClient) -> None:
    assert c.get("/v1/guests", headers=ADMIN).json() == []
    stats = c.get("/v1/stats", headers=ADMIN).json()
    assert stats["logical_pages"] == 0 and stats["used_bytes"] == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_a_damaged_stream_is_refused_whole(src: TestClient, dst: TestClient, damage: str) -> None:
    gid, _ = filled_guest(src)
    stream = src.get(f"/v1/guests/{gid}/export", headers=ADMIN).content
    bad = {
        "flip": stream[:300] + bytes([stream[300] ^ 1]) + stream[301:],
        "truncate": stream[:-20],
        "empty": b"",
        "garbage": b"not an export at all",
    }[damage]
    r = dst.post("/v1/guests/import", content=bad, headers=ADMIN)
    assert r.status_code == 400
    assert error_code(r) == "bad_export"
    nothing_imported(dst)


def test_an_import_that_does_not_fit_leaves_nothing(tmp_path: Path) -> None:
    pages = [(0, n, 0, page(n)) for n in range(40)]
    header = ExportHeader(guest=ExportGuest(name="big"), pools=[ExportPool(pool_id=0)])
    stream = b"".join(encode_export(header, pages))
    with broker(tmp_path, "small", capacity=16 * 4096) as small:
        r = small.post("/v1/guests/import", content=stream, headers=ADMIN)
        assert r.status_code == 409
        assert error_code(r) == "import_declined"
        nothing_imported(small)
    # ...and after a restart, no journal record brings anything back.
    with broker(tmp_path, "small", capacity=16 * 4096) as small:
        nothing_imported(small)


def test_migration_routes_need_the_admin_token(src: TestClient) -> None:
    gid, auth = filled_guest(src)
    assert src.get(f"/v1/guests/{gid}/export", headers=auth).status_code == 403
    assert src.post("/v1/guests/import", content=b"", headers=auth).status_code == 403
    assert src.get(f"/v1/guests/{gid}/export").status_code == 401
    r = src.get("/v1/guests/9999/export", headers=ADMIN)
    assert r.status_code == 404 and error_code(r) == "unknown_guest"


def test_export_works_without_the_journal(tmp_path: Path) -> None:
    # --durability none: the pages are read from the core, without side effects
    with broker(tmp_path, "ram", durability="none") as c:
        gid, auth = filled_guest(c)
        r = c.get(f"/v1/guests/{gid}/export", headers=ADMIN)
        assert r.status_code == 200
        _header, pages, trailer = decode_export(r.content)
        assert trailer.pages == 40 and trailer.zero_pages == 20
        assert {(p.pool_id, p.oid, p.index): p.page for p in pages}[(0, 1, 4)] == page(4)
        assert c.get(page_url(2, 9, 0), headers=auth).status_code == 200
        assert c.get(f"/v1/guests/{gid}", headers=ADMIN).json()["frozen"] is False


def test_an_import_whose_pool_cannot_be_stored_leaves_nothing(
    src: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gid, _ = filled_guest(src)
    stream = src.get(f"/v1/guests/{gid}/export", headers=ADMIN).content
    app = create_app(
        make_settings(tmp_path / "dst", f"sqlite:///{tmp_path / 'dst.sqlite3'}", durability="sync")
    )
    with TestClient(app, raise_server_exceptions=False) as dst:
        repo = service_of(app).repo
        real = repo.add_pool
        stored: list[int] = []

        def add_pool(record: PoolRecord) -> None:
            # SQL takes the first pool and fails on the second, as a full disk would
            if stored:
                raise OperationalError("INSERT INTO pools", {}, Exception("disk I/O error"))
            real(record)
            stored.append(record.pool_id)

        monkeypatch.setattr(repo, "add_pool", add_pool)
        r = dst.post("/v1/guests/import", content=stream, headers=ADMIN)
        assert r.status_code == 500 and stored == [0]
        monkeypatch.setattr(repo, "add_pool", real)
        nothing_imported(dst)
        assert repo.pools() == []
        # the pools the core refused to keep can be made again by the next import
        assert dst.post("/v1/guests/import", content=stream, headers=ADMIN).status_code == 201
    with broker(tmp_path, "dst") as again:  # and after a restart: the one whole import only
        guests = again.get("/v1/guests", headers=ADMIN).json()
        assert [(g["name"], len(g["pools"])) for g in guests] == [("vm", 2)]
