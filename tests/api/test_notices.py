"""The notices channel: long-poll, WebSocket push (header or query token, backlog after
``after``), acks, and the in-process hub that policy code publishes through."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from broker.app import create_app, service_of
from broker.settings import Settings
from tests.api.conftest import ADMIN, Guest, error_code


def _publish(client: TestClient, guest_id: int, type_: str, **fields: object) -> dict[str, object]:
    """Publish through the app's NoticeHub, on the app's event loop (as policy code would)."""
    hub = service_of(client.app).hub
    assert client.portal is not None
    notice = client.portal.call(lambda: hub.publish(guest_id, type_, **fields))  # type: ignore[arg-type]
    return notice.model_dump(mode="json")


def test_poll_returns_notices_after_seq(client: TestClient, guest: Guest) -> None:
    gid, headers = guest
    assert client.get("/v1/notices", headers=headers).json() == []
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    _publish(client, gid, "shed", pages=100, deadline=deadline)
    _publish(client, gid, "evicted", pages=3, pool_id=1)
    notices = client.get("/v1/notices", headers=headers).json()
    assert [n["seq"] for n in notices] == [1, 2]
    shed = notices[0]
    assert shed["type"] == "shed"
    assert shed["pages"] == 100
    assert datetime.fromisoformat(shed["deadline"]) == deadline
    assert datetime.fromisoformat(shed["issued_at"]).tzinfo is not None
    assert (notices[1]["pool_id"], notices[1]["cap_pages"]) == (1, None)
    assert [n["seq"] for n in client.get("/v1/notices?after=1", headers=headers).json()] == [2]
    assert client.get("/v1/notices?after=2", headers=headers).json() == []


def test_notices_are_per_guest(client: TestClient, make_guest: Callable[..., Guest]) -> None:
    a_id, a = make_guest()
    b_id, b = make_guest()
    client.post(f"/v1/guests/{a_id}/freeze", headers=ADMIN)
    assert [n["type"] for n in client.get("/v1/notices", headers=a).json()] == ["freeze"]
    assert client.get("/v1/notices", headers=b).json() == []
    client.post(f"/v1/guests/{b_id}/freeze", headers=ADMIN)
    assert client.get("/v1/notices", headers=b).json()[0]["seq"] == 1


@pytest.mark.timeout(30)
def test_long_poll_wakes_on_publish(client: TestClient, guest: Guest) -> None:
    gid, headers = guest
    got: list[object] = []

    def poll() -> None:
        got.append(client.get("/v1/notices?after=0&wait=20", headers=headers).json())

    waiter = threading.Thread(target=poll)
    waiter.start()
    # The waiter may be before or inside its wait: either way it must return this notice.
    client.post(f"/v1/guests/{gid}/freeze", headers=ADMIN)
    waiter.join(25)
    assert not waiter.is_alive()
    assert [[n["type"] for n in batch] for batch in got] == [["freeze"]]  # type: ignore[union-attr]


@pytest.mark.timeout(30)
def test_long_poll_times_out_empty(client: TestClient, guest: Guest) -> None:
    _, headers = guest
    r = client.get("/v1/notices?wait=0.2", headers=headers)
    assert (r.status_code, r.json()) == (200, [])


@pytest.mark.parametrize("query", ["wait=61", "wait=-1", "after=-1", "after=x", "wait=soon"])
def test_bad_poll_parameters_are_422(client: TestClient, guest: Guest, query: str) -> None:
    _, headers = guest
    r = client.get(f"/v1/notices?{query}", headers=headers)
    assert r.status_code == 422
    assert error_code(r) == "validation_error"


def test_ack_is_stored(client: TestClient, guest: Guest) -> None:
    gid, headers = guest
    seq = _publish(client, gid, "shed", pages=10)["seq"]
    assert (
        client.post(
            f"/v1/notices/{seq}/ack", json={"pages_returned": 8}, headers=headers
        ).status_code
        == 204
    )
    record = service_of(client.app).repo.notices_after(gid, 0)[0]
    assert (record.pages_returned, record.acked_at is not None) == (8, True)
    r = client.post("/v1/notices/99/ack", json={"pages_returned": 1}, headers=headers)
    assert (r.status_code, error_code(r)) == (404, "unknown_notice")
    r = client.post(f"/v1/notices/{seq}/ack", json={"pages_returned": -1}, headers=headers)
    assert r.status_code == 422
    r = client.post(f"/v1/notices/{seq}/ack", json={"pages": 1}, headers=headers)
    assert r.status_code == 422


def test_ack_of_another_guests_notice_is_404(
    client: TestClient, make_guest: Callable[..., Guest]
) -> None:
    a_id, _ = make_guest()
    _, b = make_guest()
    seq = _publish(client, a_id, "shed", pages=1)["seq"]
    r = client.post(f"/v1/notices/{seq}/ack", json={"pages_returned": 1}, headers=b)
    assert r.status_code == 404


@pytest.mark.timeout(30)
def test_websocket_backlog_then_push(client: TestClient, guest: Guest) -> None:
    gid, headers = guest
    for _ in range(3):
        _publish(client, gid, "evicted", pages=1)
    with client.websocket_connect("/v1/notices/ws?after=1", headers=headers) as ws:
        assert [ws.receive_json()["seq"] for _ in range(2)] == [2, 3]
        client.post(f"/v1/guests/{gid}/freeze", headers=ADMIN)
        pushed = ws.receive_json()
        assert (pushed["seq"], pushed["type"]) == (4, "freeze")


@pytest.mark.timeout(30)
def test_websocket_token_in_query(client: TestClient, guest: Guest) -> None:
    gid, headers = guest
    token = headers["Authorization"].split()[1]
    _publish(client, gid, "thaw")
    with client.websocket_connect(f"/v1/notices/ws?token={token}") as ws:
        assert ws.receive_json()["type"] == "thaw"


@pytest.mark.parametrize("auth", [{}, {"Authorization": "Bearer nope"}, ADMIN])
def test_websocket_refuses_bad_tokens(client: TestClient, auth: dict[str, str]) -> None:
    with (
        pytest.raises((WebSocketDisconnect, WebSocketDenialResponse)) as info,
        client.websocket_connect("/v1/notices/ws", headers=auth) as ws,
    ):
        ws.receive_json()
    if isinstance(info.value, WebSocketDenialResponse):  # an HTTP answer: 401, or 403 for admin
        assert info.value.status_code == (403 if auth == ADMIN else 401)
    else:
        assert info.value.code == 1008


def test_notice_sequence_survives_restart(settings: Settings) -> None:
    with TestClient(create_app(settings)) as c:
        created = c.post("/v1/guests", json={"name": "vm"}, headers=ADMIN).json()
        headers = {"Authorization": f"Bearer {created['token']}"}
        gid = created["guest_id"]
        c.post(f"/v1/guests/{gid}/freeze", headers=ADMIN)
        c.post(f"/v1/guests/{gid}/thaw", headers=ADMIN)
    with TestClient(create_app(settings)) as c:
        c.patch(f"/v1/guests/{gid}", json={"cap_pages": 5}, headers=ADMIN)
        notices = c.get("/v1/notices", headers=headers).json()
        assert [(n["seq"], n["type"]) for n in notices] == [
            (1, "freeze"),
            (2, "thaw"),
            (3, "quota"),
        ]
