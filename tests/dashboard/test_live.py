"""GET /dashboard (the page and its files) and the /dashboard/live WebSocket, in process."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from broker.api.dashboard import CLOSE_FORBIDDEN, CLOSE_UNAUTHORISED, feed_of
from tests.api.conftest import ADMIN, ADMIN_TOKEN, page, page_url
from tests.harden.conftest import new_guest, new_pool

LIVE = "/dashboard/live"


def _steady(stats: dict[str, Any]) -> dict[str, Any]:
    """The stats without what the pressure loop's own heartbeat moves between two reads."""
    out = dict(stats)
    pressure = dict(out.pop("pressure", {}))
    for key in ("loop", "steps"):
        pressure.pop(key, None)
    return {**out, "pressure": pressure}


def test_the_page_and_its_files(client: TestClient) -> None:
    r = client.get("/dashboard")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert 'id="signin-form"' in r.text and 'data-stat="dedup_ratio"' in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["referrer-policy"] == "no-referrer"
    js = client.get("/dashboard/dashboard.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "/dashboard/live" in js.text
    css = client.get("/dashboard/dashboard.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    # not part of the API document
    paths = client.get("/openapi.json").json()["paths"]
    assert not any(p.startswith("/dashboard") for p in paths)
    assert "/v1/pools/{pool_id}" in paths and "/v1/guests/{guest_id}/pools" in paths


def test_an_admin_gets_the_stats_once_a_second(client: TestClient) -> None:
    guest_id, a = new_guest(client, "a")
    pool = new_pool(client, a)
    with client.websocket_connect(LIVE) as ws:
        ws.send_json({"token": ADMIN_TOKEN})
        first = ws.receive_json()
        assert first["history"] and first["history"][-1] == first["point"]
        stats = client.get("/v1/stats", headers=ADMIN).json()
        # within one update: a snapshot taken before the guest's pool may come first
        snap = first
        for _ in range(3):
            if _steady(snap["stats"]) == _steady(stats):
                break
            snap = ws.receive_json()
        assert _steady(snap["stats"]) == _steady(stats)
        assert snap["ready"] is True
        assert list(snap["guests"]) == [str(guest_id)]
        assert snap["guests"][str(guest_id)] == {"pressure": None, "shed": None}

        assert client.put(page_url(pool, 1, 0), content=page(1), headers=a).status_code == 204
        body = {"psi_some_avg10": 12.5}
        assert client.post("/v1/self/pressure", json=body, headers=a).status_code == 204
        assert client.post(f"/v1/guests/{guest_id}/freeze", headers=ADMIN).status_code == 204
        for _ in range(5):
            snap = ws.receive_json()
            if snap["stats"]["logical_pages"] == 1 and snap["notices"]:
                break
        else:
            pytest.fail("the put and the freeze never showed")
        assert "history" not in snap
        assert snap["t"] - first["t"] >= 0.5
        assert snap["stats"]["guests"][0]["persistent_pages"] == 1
        assert snap["guests"][str(guest_id)]["pressure"]["psi_some_avg10"] == 12.5
        assert snap["notices"][-1]["guest_id"] == guest_id
        assert snap["notices"][-1]["type"] == "freeze"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"token": "not-a-token"}, CLOSE_UNAUTHORISED),
        ({"token": ""}, CLOSE_UNAUTHORISED),
        ({"not": "a token"}, CLOSE_UNAUTHORISED),
        ("plain text", CLOSE_UNAUTHORISED),
        (b"binary frame", CLOSE_UNAUTHORISED),
        ("guest", CLOSE_FORBIDDEN),
    ],
)
def test_a_wrong_token_gets_nothing(client: TestClient, message: Any, code: int) -> None:
    _, a = new_guest(client, "a")
    with client.websocket_connect(LIVE) as ws:
        if message == "guest":
            ws.send_json({"token": a["Authorization"].removeprefix("Bearer ")})
        elif isinstance(message, str):
            ws.send_text(message)
        elif isinstance(message, bytes):
            ws.send_bytes(message)
        else:
            ws.send_json(message)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == code


def test_a_bearer_header_at_the_handshake(client: TestClient) -> None:
    _, a = new_guest(client, "a")
    with client.websocket_connect(LIVE, headers=ADMIN) as ws:
        assert "stats" in ws.receive_json()  # no token message needed
    for headers, status in (({"Authorization": "Bearer nope"}, 401), (a, 403)):
        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            client.websocket_connect(LIVE, headers=headers),
        ):
            pass
        assert denied.value.status_code == status


def test_the_chart_history_grows_while_nobody_watches(client: TestClient) -> None:
    feed = feed_of(client.app)
    deadline = time.monotonic() + 10
    while len(feed.history) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(feed.history) >= 3, "the feed's loop does not sample"
    times = [point[0] for point in feed.history]
    assert times == sorted(times) and times[-1] - times[0] >= 1.5 * feed.interval
    with client.websocket_connect(LIVE) as ws:
        ws.send_json({"token": ADMIN_TOKEN})
        first = ws.receive_json()
    assert len(first["history"]) >= 3  # a page opened now shows the minutes before it
    assert first["history"][-1] == first["point"]


def test_one_snapshot_per_half_interval_however_many_pages(client: TestClient) -> None:
    feed = feed_of(client.app)
    service = client.app.state.box.service  # type: ignore[attr-defined]
    now = time.time() + 100  # later than the loop's own samples
    first = feed.snapshot(service, now)
    assert feed.snapshot(service, now + 0.4 * feed.interval) is first
    later = feed.snapshot(service, now + feed.interval)
    assert later is not first and later["point"][0] == round(now + feed.interval, 3)
    assert list(feed.history)[-1] == later["point"]
