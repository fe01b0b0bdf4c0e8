"""Cleancache and the ``tmem-agent`` command line against a real broker process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent import Cleancache, TmemClient
from guest_agent.errors import Forbidden
from tests.e2e.brokerproc import BrokerProcess

pytestmark = pytest.mark.timeout(180)

TMEM_AGENT = str(Path(sys.executable).parent / "tmem-agent")
UUID = "5d0c2f2e-8f53-4d55-9a57-2b1c0f6f4c11"


def page(i: int) -> bytes:
    return i.to_bytes(8, "big") * 512


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path / "data", durability="none") as proc:
        yield proc


def test_cleancache_round_trip_with_exclusive_gets(broker: BrokerProcess) -> None:
    _, token = broker.new_guest("fs-guest")
    other_id, other_token = broker.new_guest("fs-peer")
    with TmemClient(broker.url, token) as client, TmemClient(broker.url, other_token) as peer:
        cc = Cleancache(client)
        pool = cc.init_fs()
        inode = (1 << 190) + 12345  # a 192-bit file key
        for index in range(64):
            assert cc.put_page(pool, inode, index, page(index))
        for index in range(64):
            assert cc.get_page(pool, inode, index) == page(index)
        # private ephemeral: a hit is exclusive, the page left the pool
        assert all(cc.get_page(pool, inode, index) is None for index in range(64))
        cc.put_page(pool, b"\x00" * 23 + b"\x07", 0, page(7))
        cc.put_page(pool, 7, 1, page(8))
        cc.invalidate_page(pool, 7, 0)
        assert cc.get_page(pool, 7, 0) is None
        cc.invalidate_inode(pool, 7)
        assert cc.get_page(pool, 7, 1) is None
        cc.invalidate_fs(pool)

        # a shared pool needs the admin's authorisation; then both guests see one pool
        with pytest.raises(Forbidden):
            Cleancache(peer).init_shared_fs(UUID)
        guest_id = client.self_info().guest_id
        for gid in (guest_id, other_id):
            broker.json(
                "POST",
                "/v1/shared-auth",
                {"uuid": UUID, "guest_id": gid, "allow": True},
                expect=204,
            )
        mine = cc.init_shared_fs(UUID)
        theirs = Cleancache(peer).init_shared_fs(UUID)
        assert cc.put_page(mine, 99, 0, page(99))
        assert Cleancache(peer).get_page(theirs, 99, 0) == page(99)
        assert cc.get_page(mine, 99, 0) == page(99)  # shared gets are not exclusive


def agent(
    *args: str, env: dict[str, str], stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [TMEM_AGENT, *args], env=env, input=stdin, capture_output=True, timeout=60, check=False
    )


def test_cli_put_get_stats_watch(broker: BrokerProcess, tmp_path: Path) -> None:
    guest_id, token = broker.new_guest("cli-guest")
    broker.json("PATCH", f"/v1/guests/{guest_id}", {"cap_pages": 1})  # notice seq 1
    env = {**os.environ, "TMEM_BROKER_URL": broker.url, "TMEM_TOKEN": token}
    made = agent("create-pool", "persistent", env=env)
    assert made.returncode == 0, made.stderr
    pool = made.stdout.decode().strip()
    put = agent("put", pool, "5", "6", env=env, stdin=page(56))
    assert (put.returncode, put.stdout) == (0, b"stored\n"), put.stderr
    (tmp_path / "p").write_bytes(page(57))
    declined = agent("put", pool, "5", "7", "--file", str(tmp_path / "p"), env=env)
    assert (declined.returncode, declined.stdout) == (1, b"declined: quota\n")
    got = agent("get", pool, "5", "6", env=env)
    assert (got.returncode, got.stdout) == (0, page(56))
    missed = agent("get", pool, "5", "7", "-o", str(tmp_path / "out"), env=env)
    assert missed.returncode == 1 and b"miss" in missed.stderr
    stats = agent("stats", env=env)
    assert stats.returncode == 0
    info = json.loads(stats.stdout)
    assert info["name"] == "cli-guest" and info["cap_pages"] == 1
    broker.json("POST", f"/v1/guests/{guest_id}/freeze", expect=204)  # seq 2
    watched = agent("watch", "--count", "2", env=env)
    lines = [json.loads(line) for line in watched.stdout.decode().splitlines()]
    assert [(n["seq"], n["type"]) for n in lines] == [(1, "quota"), (2, "freeze")]
    polled = agent("watch", "--poll", "--after", "1", "--count", "1", env=env)
    assert json.loads(polled.stdout)["type"] == "freeze"
    bad = agent("stats", "--token", "wrong", env=env)
    assert bad.returncode == 2 and b"401" in bad.stderr
