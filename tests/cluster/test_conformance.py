"""The contract's page and batch semantics tests (tests/api), run against a broker that is NOT
the guest's home: two real apps in cluster mode on the real data plane (the session's Redis
Cluster, a key namespace of their own) and one PostgreSQL database. The tests talk to the
``front`` broker; every guest's home is ``home``, so each guest call is answered with a 307
and followed (the HTTP client dispatches by host to the right app), as an agent would.

The test functions are the tests/api ones, imported: the same assertions, another topology.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.settings import Settings
from tests.api.conftest import (  # noqa: F401  (the shared fixtures, with this module's client)
    ADMIN,
    ADMIN_TOKEN,
    Guest,
    error_code,
    guest,
    make_pool,
)
from tests.api.test_batch import (  # noqa: F401  (collected here, with this module's fixtures)
    test_batch_on_unknown_pool,
    test_declines_in_a_batch,
    test_empty_batch,
    test_every_op_in_order,
    test_malformed_batch_changes_nothing,
)
from tests.api.test_pages import (  # noqa: F401
    test_create_pools,
    test_destroy_pool,
    test_ephemeral_gets_are_exclusive,
    test_exclusive_gets_in_a_persistent_pool,
    test_extreme_handles,
    test_flush_object,
    test_pools_are_per_guest,
    test_put_get_flush_round_trip,
    test_quota_declines_with_reason,
    test_unknown_or_bad_pool,
)
from tests.cluster.redis_proc import RedisClusterProc
from tests.db.pg import temp_database

pytestmark = [pytest.mark.postgres]


class ByHost(httpx.BaseTransport):
    """Sends each request to the app its URL's host names and follows a 307 to another broker
    as the agent does: the same method, body and ``Authorization`` (httpx's own following drops
    ``Authorization`` across hosts, which the agent's does not)."""

    def __init__(self, transports: dict[str, httpx.BaseTransport]) -> None:
        self.transports = transports
        self.followed = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        for _ in range(4):
            response = self.transports[request.url.host].handle_request(request)
            if response.status_code != 307 or request.headers.get("x-no-follow"):
                return response
            response.read()
            self.followed += 1
            request = httpx.Request(
                request.method, response.headers["location"], headers=request.headers, content=body
            )
        return response


@pytest.fixture(scope="module")
def brokers(
    tmp_path_factory: pytest.TempPathFactory, redis_cluster: RedisClusterProc
) -> Iterator[dict[str, TestClient]]:
    namespace = f"c{secrets.token_hex(4)}"
    tmp = tmp_path_factory.mktemp("conformance")

    def settings(name: str, **extra: Any) -> Settings:
        return Settings(
            **extra,
            data_dir=tmp / name,
            database_url=url,
            admin_token=ADMIN_TOKEN,
            durability="none",
            capacity=64 << 20,
            max_batch_ops=64,
            cluster=redis_cluster.seeds,
            cluster_namespace=namespace,
            broker_id=f"{namespace}-{name}",
            advertise_url=f"http://{name}.test",
            lease_s=30.0,
        )

    with (
        temp_database() as url,  # the module's own: no other test's brokers or guests in it
        TestClient(
            create_app(settings("home", nbd_dir=tmp / "nbd")), base_url="http://home.test"
        ) as home,
        TestClient(create_app(settings("front")), base_url="http://front.test") as front,
    ):
        front._transport = ByHost(  # type: ignore[assignment]
            {"home.test": home._transport, "front.test": front._transport}
        )
        yield {"home": home, "front": front}


@pytest.fixture
def client(brokers: dict[str, TestClient]) -> TestClient:
    return brokers["front"]


@pytest.fixture
def make_guest(brokers: dict[str, TestClient]) -> Callable[..., Guest]:
    """A guest created through ``front`` whose home is ``home``."""
    front = brokers["front"]
    home_id = brokers["home"].app.state.settings.broker_id  # type: ignore[attr-defined]

    def make(name: str | None = None, **fields: Any) -> Guest:
        body = {"name": name or f"vm-{secrets.token_hex(4)}", **fields}
        r = front.post("/v1/guests", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        gid = r.json()["guest_id"]
        moved = front.post(f"/v1/guests/{gid}/home", json={"broker": home_id}, headers=ADMIN)
        assert moved.status_code == 200 and moved.json()["home_broker"] == home_id
        return gid, {"Authorization": f"Bearer {r.json()['token']}"}

    return make


def _publish(brokers: dict[str, TestClient]) -> None:
    """One control step at each broker: each publishes its figures now."""
    for c in brokers.values():
        control = c.app.state.box.service.cluster  # type: ignore[attr-defined]
        c.portal.call(control.step)  # type: ignore[union-attr]


def test_pool_counts_a_content_shared_across_brokers_once(
    brokers: dict[str, TestClient],
    make_guest: Callable[..., Guest],
    make_pool: Callable[..., int],  # noqa: F811
) -> None:
    """Two guests homed on different brokers put the same page: each broker's figures count
    it (its guests reference it), the pool's ``unique_pages`` once (the cluster's count)."""
    front = brokers["front"]
    front_id = front.app.state.settings.broker_id  # type: ignore[attr-defined]
    (_a, auth_a), (b, auth_b) = make_guest(), make_guest()
    moved = front.post(f"/v1/guests/{b}/home", json={"broker": front_id}, headers=ADMIN)
    assert moved.status_code == 200 and moved.json()["home_broker"] == front_id
    pools = {id(auth): make_pool(auth) for auth in (auth_a, auth_b)}
    _publish(brokers)
    before = front.get("/v1/stats", headers=ADMIN).json()
    shared = secrets.token_bytes(4096)
    for auth in (auth_a, auth_b):
        r = front.put(
            f"/v1/pools/{pools[id(auth)]}/objects/1/pages/0", content=shared, headers=auth
        )
        assert r.status_code == 204, r.text
    _publish(brokers)
    after = front.get("/v1/stats", headers=ADMIN).json()
    assert after["unique_pages"] - before["unique_pages"] == 1
    assert after["logical_pages"] - before["logical_pages"] == 2
    # each broker's own figure is kept: both count it (brokers of other tests in this database
    # are listed too, dead: left out)
    ours = {front_id, brokers["home"].app.state.settings.broker_id}  # type: ignore[attr-defined]
    was = {b["broker_id"]: b["stats"]["unique_pages"] for b in before["brokers"]}
    now = {b["broker_id"]: b["stats"]["unique_pages"] for b in after["brokers"]}
    assert {k: now[k] - was[k] for k in ours} == dict.fromkeys(ours, 1)
    # the figure is the admin's: a guest's token does not read it
    assert front.get("/v1/stats", headers={**auth_a, "x-no-follow": "1"}).status_code in (401, 403)


def test_broker_nbd_exports_are_refused_in_cluster_mode(
    brokers: dict[str, TestClient],
    guest: Guest,  # noqa: F811
) -> None:
    """The home runs with --nbd-dir, yet refuses an export of its own (docs/scale.md: the
    export would be pinned to one host while the guest's home moves)."""
    _, auth = guest
    r = brokers["front"].put("/v1/self/nbd/swap", json={"size": 1 << 20}, headers=auth)
    assert r.status_code == 409 and error_code(r) == "nbd_in_cluster_mode"
    assert "tmem-agent nbd" in r.json()["error"]["message"]
    assert list((brokers["home"].app.state.settings.nbd_dir).iterdir()) == []  # type: ignore[attr-defined]


def test_front_really_redirects(brokers: dict[str, TestClient], guest: Guest) -> None:  # noqa: F811
    """The topology under the imported tests: front is not the home and says so."""
    _, auth = guest
    r = brokers["front"].get(
        "/v1/self", headers={**auth, "x-no-follow": "1"}, follow_redirects=False
    )
    assert r.status_code == 307 and r.headers["location"] == "http://home.test/v1/self"
    followed = brokers["front"]._transport.followed  # type: ignore[attr-defined]
    assert brokers["front"].get("/v1/self", headers=auth).status_code == 200
    assert brokers["front"]._transport.followed == followed + 1  # type: ignore[attr-defined]
