"""Migration between two real brokers: export, refused corrupted/truncated imports, migrate."""

from __future__ import annotations

import http.client
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from guest_agent.client import TmemClient
from schemas.batch import (
    BATCH_CONTENT_TYPE,
    OP_GET,
    OP_PUT,
    STATUS_DONE,
    decode_results,
    encode_request,
)
from schemas.export import EXPORT_CONTENT_TYPE, decode_export
from tests.e2e.brokerproc import ADMIN, TMEM_BROKER, BrokerProcess

pytestmark = pytest.mark.timeout(900)

PAGES = 50_000
SPLIT = 40_000  # pages [0, SPLIT) in pool 0, the rest in pool 1 (exclusive gets)


def content(n: int) -> bytes:
    if n % 20 == 0:
        return bytes(4096)  # zero pages: no bytes in the stream, no storage
    if n % 20 == 1:
        return b"same" * 1024  # one content at 2500 handles: dedup at the destination
    return struct.pack(">QQ", n, n * 7919) * 256


def handle(n: int) -> tuple[int, int, int]:
    pool = 0 if n < SPLIT else 1
    return pool, n // 64, n % 64


def batch(
    broker: BrokerProcess, token: str, pool: int, ops: list[tuple[int, int, int, bytes | None]]
) -> list:
    status, body = broker.call(
        "POST",
        f"/v1/pools/{pool}/batch",
        encode_request(ops),
        token=token,
        content_type=BATCH_CONTENT_TYPE,
    )
    assert status == 200, (status, body[:300])
    return decode_results(body, [op[0] for op in ops])


def fill(broker: BrokerProcess, token: str) -> None:
    for start in range(0, PAGES, 1000):
        by_pool: dict[int, list[tuple[int, int, int, bytes | None]]] = {0: [], 1: []}
        for n in range(start, min(start + 1000, PAGES)):
            pool, oid, index = handle(n)
            by_pool[pool].append((OP_PUT, oid, index, content(n)))
        for pool, ops in by_pool.items():
            if ops:
                assert all(r.status == STATUS_DONE for r in batch(broker, token, pool, ops))


def guest_named(broker: BrokerProcess, name: str) -> dict | None:
    return next((g for g in broker.json("GET", "/v1/guests") if g["name"] == name), None)


def assert_nothing_imported(broker: BrokerProcess) -> None:
    assert broker.json("GET", "/v1/guests") == []
    stats = broker.json("GET", "/v1/stats")
    assert stats["persistent_pages"] == 0
    assert stats["logical_pages"] == 0


def test_export_import_and_migrate_50k_pages(tmp_path: Path) -> None:
    a = BrokerProcess(tmp_path / "a")
    b = BrokerProcess(tmp_path / "b")
    a.start()
    b.start()
    try:
        created = a.json(
            "POST",
            "/v1/guests",
            {
                "name": "mover",
                "weight": 150,
                "cap_pages": 80_000,
                "dedup_domain": "t1",
                "compress": True,
            },
            expect=201,
        )
        gid, token = int(created["guest_id"]), created["token"]
        assert a.new_pool(token, "persistent") == 0
        assert a.new_pool(token, "persistent", exclusive_gets=True) == 1
        eph = a.new_pool(token, "ephemeral")
        fill(a, token)
        assert batch(a, token, eph, [(OP_PUT, 1, 1, content(5))])[0].status == STATUS_DONE

        # -- export: frozen while it streams, thawed after --------------------------------
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=120)
        conn.request(
            "GET", f"/v1/guests/{gid}/export", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("content-type", "").startswith(EXPORT_CONTENT_TYPE)
        first = resp.read(4096)
        status, body = a.call("PUT", "/v1/pools/0/objects/999999/pages/0", content(3), token=token)
        assert status == 409 and json.loads(body)["error"]["reason"] == "frozen"
        stream = first + resp.read()
        conn.close()
        assert a.json("GET", f"/v1/guests/{gid}")["frozen"] is False

        header, pages, trailer = decode_export(stream)
        assert header.guest.name == "mover" and header.guest.weight == 150
        assert [(p.pool_id, p.exclusive_gets) for p in header.pools] == [(0, False), (1, True)]
        assert trailer.pages == PAGES and trailer.zero_pages == PAGES // 20
        assert len(pages) == PAGES

        # -- a corrupted and a truncated stream are refused whole --------------------------
        corrupted = bytearray(stream)
        corrupted[len(stream) // 2] ^= 0x40
        for bad in (bytes(corrupted), stream[: len(stream) * 2 // 3], stream[:-1]):
            status, body = b.call(
                "POST", "/v1/guests/import", bad, content_type=EXPORT_CONTENT_TYPE
            )
            assert status == 400, (status, body[:300])
            assert json.loads(body)["error"]["code"] == "bad_export"
            assert_nothing_imported(b)
        # ...and leave no journal record: nothing comes back after a crash and restart.
        b.kill()
        b.start()
        assert_nothing_imported(b)

        # -- the whole move with the CLI ---------------------------------------------------
        env = {**os.environ, "TMEM_FROM_TOKEN": ADMIN, "TMEM_TO_TOKEN": ADMIN}
        done = subprocess.run(
            [TMEM_BROKER, "migrate", "--from", a.url, "--to", b.url, "--guest", "mover"],
            env=env,
            capture_output=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        moved = json.loads(done.stdout.decode().strip().splitlines()[-1])
        assert moved["kept_token"] is True and "token" not in moved
        new_token = token  # the guest keeps its token
        assert f"{PAGES} persistent pages" in done.stderr.decode()
        # the source sends the guest's calls on to the destination, same path, and its agent
        # (TmemClient, the shims, the NBD export) follows and remembers it
        status, body = a.call("GET", "/v1/pools/0/objects/1/pages/0", token=token)
        assert status == 307, body[:300]
        assert json.loads(body)["error"]["code"] == "not_home"
        with TmemClient(a.url, token) as follower:
            assert follower.self_info().name == "mover"
            assert follower.base_url == b.url

        # The source no longer has the guest; the destination has it, settings and pools intact.
        status, _ = a.call("GET", f"/v1/guests/{gid}")
        assert status == 404
        there = b.json("GET", f"/v1/guests/{moved['guest_id']}")
        assert (
            there["name"],
            there["weight"],
            there["cap_pages"],
            there["dedup_domain"],
            there["compress"],
        ) == (
            "mover",
            150,
            80_000,
            "t1",
            True,
        )
        assert there["frozen"] is False
        assert sorted(
            (p["pool_id"], p["kind"], p["exclusive_gets"], p["pages"]) for p in there["pools"]
        ) == [
            (0, "persistent", False, SPLIT),
            (1, "persistent", True, PAGES - SPLIT),
        ]
        stats = b.json("GET", "/v1/stats")
        assert stats["zero_pages"] == PAGES // 20
        assert stats["unique_pages"] <= PAGES - PAGES // 20 - PAGES // 20 + 1  # dedup applied

        # Every page, byte for byte, with the new token (pool 1 last: its gets are exclusive).
        for start in range(0, PAGES, 1000):
            wanted = [n for n in range(start, min(start + 1000, PAGES))]
            for pool in (0, 1):
                ns = [n for n in wanted if handle(n)[0] == pool]
                if not ns:
                    continue
                results = batch(
                    b, new_token, pool, [(OP_GET, handle(n)[1], handle(n)[2], None) for n in ns]
                )
                for n, r in zip(ns, results, strict=True):
                    assert r.status == STATUS_DONE and r.page == content(n), n

        # The same name cannot be imported twice.
        status, body = b.call("POST", "/v1/guests/import", stream, content_type=EXPORT_CONTENT_TYPE)
        assert status == 409, body[:300]
    finally:
        a.stop()
        b.stop()


def test_a_failed_move_keeps_the_guest_at_the_source(tmp_path: Path) -> None:
    from broker.migrate import MigrationError, migrate

    a = BrokerProcess(tmp_path / "a")
    b = BrokerProcess(tmp_path / "b")
    a.start()
    b.start()
    try:
        gid, token = a.new_guest("stay")
        pool = a.new_pool(token)
        ops = [(OP_PUT, 1, i, content(i + 2)) for i in range(100)]
        assert all(r.status == STATUS_DONE for r in batch(a, token, pool, ops))
        b.new_guest("stay")  # the name is taken at the destination: the import answers 409
        with pytest.raises(MigrationError, match="409"):
            migrate(a.url, b.url, "stay", from_token=ADMIN, to_token=ADMIN)
        guest = a.json("GET", f"/v1/guests/{gid}")
        assert guest["frozen"] is False  # thawed again
        assert guest["pools"][0]["pages"] == 100
        results = batch(a, token, pool, [(OP_GET, 1, i, None) for i in range(100)])
        assert [r.page for r in results] == [content(i + 2) for i in range(100)]
        with pytest.raises(MigrationError, match="no guest named"):
            migrate(a.url, b.url, "nobody", from_token=ADMIN, to_token=ADMIN)
    finally:
        a.stop()
        b.stop()


@pytest.mark.timeout(300)
def test_a_frontswap_shim_follows_its_guest_to_the_new_broker(tmp_path: Path) -> None:
    """tmem-broker migrate with the token kept, while a Frontswap shim keeps swapping: pages
    stored before, during (the guest frozen: declined to the fallback) and after the move all
    load back, and the shim ends up talking to the destination by itself."""
    from broker.migrate import migrate
    from guest_agent import Frontswap

    a = BrokerProcess(tmp_path / "a", durability="none")
    b = BrokerProcess(tmp_path / "b", durability="none")
    a.start()
    b.start()
    try:
        _, token = a.new_guest("swapper")
        want: dict[int, bytes] = {}
        with TmemClient(a.url, token) as client:
            fs = Frontswap(client, tmp_path / "swap.fallback")
            try:
                fs.init(0)
                for off in range(0, 3000):
                    want[off] = content(off)
                    fs.store(0, off, want[off])
                assert fs.broker_pages == 3000
                result = migrate(a.url, b.url, "swapper", from_token=ADMIN, to_token=ADMIN)
                assert result.pages == 3000 and result.token == ""
                # the shim carries on with the same client and token: new pages go to b
                for off in range(3000, 3500):
                    want[off] = content(off)
                    assert fs.store(0, off, want[off])
                assert client.base_url == b.url
                for off, data in want.items():
                    assert fs.load(0, off) == data, off
                assert fs.fallback_pages == 0
            finally:
                fs.close(destroy_pool=False)  # the count below reads the pool
        there = b.json("GET", "/v1/guests")
        assert [g["name"] for g in there] == ["swapper"]
        assert sum(p["pages"] for p in there[0]["pools"]) == 3500
    finally:
        a.stop()
        b.stop()
