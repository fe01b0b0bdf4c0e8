"""The co-located setup: ``tmem-broker serve --uds PATH`` and ``tmem-agent nbd --broker
unix:PATH``. Pages, batches and the notice WebSocket all travel over the Unix socket; the TCP
listener keeps serving beside it."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from guest_agent.transport import HTTPTransport, Request
from tests.e2e.brokerproc import ADMIN
from tests.e2e.nbd_support import (
    NbdAgent,
    UdsBrokerProcess,
    new_guest,
    persistent_pages,
    run,
    wait_for_an_acked_shed,
)

pytestmark = pytest.mark.timeout(120)

CAPACITY_PAGES = 2048  # 8 MiB: persistent pages above 75% of it (1536) bring quotas down
WRITTEN_PAGES = 1900


def _readyz(url: str) -> int:
    transport = HTTPTransport(url, timeout=5)
    try:
        return transport.handle_request(Request("GET", "/readyz")).status
    finally:
        transport.close()


def test_tcp_and_unix_socket_serve_one_broker(tmp_path: Path) -> None:
    sock = tmp_path / "broker.sock"
    with UdsBrokerProcess(tmp_path / "broker", uds=sock, durability="none") as broker:
        assert _readyz(broker.url) == 200
        assert _readyz(broker.unix_url) == 200
        # a guest made over TCP is the same guest over the socket
        _, token = new_guest(broker, "vm")
        transport = HTTPTransport(broker.unix_url)
        body = json.dumps({"kind": "persistent"}).encode()
        headers = [("Authorization", f"Bearer {token}"), ("Content-Type", "application/json")]
        created = transport.handle_request(Request("POST", "/v1/pools", body, headers))
        assert created.status == 201, created.body
        guest = transport.handle_request(
            Request("GET", "/v1/guests", headers=[("Authorization", f"Bearer {ADMIN}")])
        )
        assert guest.status == 200 and b'"vm"' in guest.body
        transport.close()
    assert not sock.exists()  # removed at a clean stop


def test_a_stale_socket_file_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    sock = tmp_path / "broker.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nothing listens: what a killed broker leaves
    with UdsBrokerProcess(tmp_path / "one", uds=sock, durability="none") as broker:
        assert _readyz(broker.unix_url) == 200
        second = UdsBrokerProcess(tmp_path / "two", uds=sock, durability="none")
        with pytest.raises(RuntimeError, match="another process listens there"):
            second.start(timeout=30)
        second.stop()
        assert _readyz(broker.unix_url) == 200  # the first one still has its socket


@pytest.mark.skipif(not shutil.which("qemu-io"), reason="needs qemu-utils (scripts/system-deps.sh)")
def test_the_export_over_the_unix_socket_stores_and_sheds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the shed notice reaches the agent on the notice WebSocket over the socket too
    monkeypatch.setenv("TMEM_PRESSURE_INTERVAL_S", "0.1")
    monkeypatch.setenv("TMEM_SHED_DEADLINE_S", "10")
    with UdsBrokerProcess(
        tmp_path / "broker", uds=tmp_path / "broker.sock", capacity=f"{CAPACITY_PAGES * 4}KiB"
    ) as broker:
        guest_id, token = new_guest(broker, "vm")
        with NbdAgent.for_broker(broker, token, tmp_path, url=broker.unix_url) as agent:
            run(["qemu-io", "-f", "raw", agent.uri, "-c", f"write -P 0x5a 0 {WRITTEN_PAGES * 4}k"])
            pressure = wait_for_an_acked_shed(broker)
            assert pressure["sheds_acked"] >= 1, pressure
            held = persistent_pages(broker, guest_id)
            assert 0 < held < WRITTEN_PAGES
            out = run(
                ["qemu-io", "-f", "raw", agent.uri, "-c", f"read -P 0x5a 0 {WRITTEN_PAGES * 4}k"]
            )
            assert "Pattern verification failed" not in out.stdout + out.stderr
