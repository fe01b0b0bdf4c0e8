"""Isolation between guests, through the real app.

* No guest can read, flush or even detect another guest's private pages: guests A and B use the
  same pool ids; B's operations never touch A's pages, and every answer B gets is the same
  whether A holds pages at those handles or not.
* Dedup isolation: ``dedup_domain`` bounds sharing (admin ``unique_pages``), and what a guest
  observes — answers, ``/v1/self``, its quota, whether a put is declined — is the same in two
  worlds that differ only in another guest's contents, also when capacity is tight.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.app import service_of
from schemas.batch import OP_FLUSH_OBJECT, OP_FLUSH_PAGE, OP_GET, OP_PUT, encode_request
from tests.api.conftest import ADMIN, page, page_url
from tests.harden.conftest import new_guest, new_pool

pytestmark = pytest.mark.timeout(120)

BATCH = {"Content-Type": "application/x-tmem-batch"}
Observation = tuple[Any, ...]


def _seen(r: Any) -> Observation:
    """What a client can see of an answer (all but the Date header)."""
    headers = sorted((k, v) for k, v in r.headers.items() if k.lower() != "date")
    return (r.status_code, r.content, tuple(headers))


# Series whose values are times, not figures: they differ between any two runs.
_TIMED = ("tmem_request_duration_seconds", "tmem_pressure_loop_last_step_age_seconds")


def _public_metrics(client: TestClient) -> list[str]:
    """What anyone (a guest too) reads at ``/metrics`` without a token, timings left out."""
    r = client.get("/metrics")
    assert r.status_code == 200
    return [line for line in r.text.splitlines() if not line.startswith(_TIMED)]


def _self(client: TestClient, headers: dict[str, str]) -> Any:
    r = client.get("/v1/self", headers=headers)
    assert r.status_code == 200
    return r.json()


# -- B cannot reach or detect A's pages --------------------------------------------------------


def _b_probes(client: TestClient, b: dict[str, str]) -> list[Observation]:
    """Everything B might try against the handles where A keeps pages, in B's own pools
    (0 and 1 exist for B) and in pool ids B does not have (2, 5)."""
    seen = []
    for pool in (0, 1, 2, 5):
        for oid, index in ((1, 0), (1, 1), (2, 7)):
            seen.append(_seen(client.get(page_url(pool, oid, index), headers=b)))
            seen.append(_seen(client.delete(page_url(pool, oid, index), headers=b)))
        seen.append(_seen(client.delete(f"/v1/pools/{pool}/objects/1", headers=b)))
        body = encode_request(
            [(OP_GET, 1, 0, None), (OP_GET, 2, 7, None), (OP_FLUSH_PAGE, 1, 1, None)]
        )
        seen.append(
            _seen(client.post(f"/v1/pools/{pool}/batch", content=body, headers={**b, **BATCH}))
        )
    seen.append(_seen(client.post("/v1/notices/1/ack", json={"pages_returned": 0}, headers=b)))
    seen.append(_seen(client.get("/v1/notices", headers=b)))
    self_view = _self(client, b)
    seen.append(("self", repr(self_view)))
    return seen


def test_guest_b_cannot_read_flush_or_detect_guest_a_pages(
    client_factory: Callable[..., TestClient],
) -> None:
    observations = {}
    for world in ("a-full", "a-empty"):
        client = client_factory(durability="sync")
        _, a = new_guest(client, "a")
        _, b = new_guest(client, "b")
        for headers in (a, b):  # same pool ids in both namespaces
            assert new_pool(client, headers, "persistent") == 0
            assert new_pool(client, headers, "ephemeral") == 1
        if world == "a-full":
            for pool in (0, 1):
                for n, (oid, index) in enumerate(((1, 0), (1, 1), (2, 7))):
                    r = client.put(page_url(pool, oid, index), content=page(n), headers=a)
                    assert r.status_code == 204
            assert (
                client.post("/v1/pools", json={"kind": "persistent"}, headers=a).json()["pool_id"]
                == 2
            )
        observations[world] = _b_probes(client, b)
        if world == "a-full":
            # nothing B did touched A's pages (ephemeral gets are exclusive: read them last)
            for pool in (0, 1):
                for n, (oid, index) in enumerate(((1, 0), (1, 1), (2, 7))):
                    assert client.get(page_url(pool, oid, index), headers=a).content == page(n)
    assert observations["a-full"] == observations["a-empty"]
    codes = {o[0] for o in observations["a-full"] if isinstance(o[0], int)}
    assert 404 in codes and 204 in codes  # B got real answers: misses, and its own flushes


# -- dedup domains -----------------------------------------------------------------------------


def _stats(client: TestClient) -> Any:
    return client.get("/v1/stats", headers=ADMIN).json()


def test_dedup_domain_bounds_sharing(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory()
    guests = {}
    for name, domain in (("a", "red"), ("b", "blue"), ("c", "red")):
        gid, headers = new_guest(client, name, dedup_domain=domain)
        assert new_pool(client, headers) == 0
        guests[name] = (gid, headers)
    for _, headers in guests.values():
        assert client.put(page_url(0, 1, 0), content=page(42), headers=headers).status_code == 204
    stats = _stats(client)
    assert stats["logical_pages"] == 3
    assert stats["unique_pages"] == 2  # red shares one copy, blue has its own
    # moving b into red lets it share
    b_id = guests["b"][0]
    assert (
        client.patch(f"/v1/guests/{b_id}", json={"dedup_domain": "red"}, headers=ADMIN).status_code
        == 200
    )
    assert _stats(client)["unique_pages"] == 1
    # and out again into its own domain: a copy of its own
    assert (
        client.patch(f"/v1/guests/{b_id}", json={"dedup_domain": "solo"}, headers=ADMIN).status_code
        == 200
    )
    assert _stats(client)["unique_pages"] == 2
    for _, headers in guests.values():
        assert client.get(page_url(0, 1, 0), headers=headers).content == page(42)


# -- two worlds: another guest's contents never show -------------------------------------------

A_PAGES = 12


class _Stepping:
    """A test client that runs ``step`` before every request."""

    def __init__(self, client: TestClient, step: Callable[[], None]) -> None:
        self._client, self._step = client, step

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self._step()
            return method(*args, **kwargs)

        return call


def _a_session(client: TestClient, a: dict[str, str], step: Callable[[], None]) -> list[Any]:
    """Guest A's mixed workload; returns everything A saw. ``step`` runs before each of A's
    requests (a pressure-loop step, or nothing)."""
    seen: list[Any] = []
    client = _Stepping(client, step)  # type: ignore[assignment]
    for i in range(A_PAGES):  # persistent, then ephemeral copies of the same contents
        seen.append(_seen(client.put(page_url(0, 1, i), content=page(i), headers=a)))
        seen.append(_seen(client.put(page_url(1, 2, i), content=page(i), headers=a)))
    seen.append(_self(client, a))
    # fill with fresh contents until the broker declines (or 64 pages)
    for i in range(64):
        r = client.put(page_url(0, 3, i), content=page(1000 + i), headers=a)
        seen.append(_seen(r))
        if r.status_code != 204:
            break
    seen.append(_self(client, a))
    # flush own pages that shared contents, then put them again
    for i in range(0, A_PAGES, 2):
        seen.append(_seen(client.delete(page_url(0, 1, i), headers=a)))
    for i in range(0, A_PAGES, 2):
        seen.append(_seen(client.put(page_url(0, 1, i), content=page(i), headers=a)))
    ops = [(OP_PUT, 4, i, page(i)) for i in range(4)] + [
        (OP_GET, 1, i, None) for i in range(A_PAGES)
    ]
    ops += [(OP_GET, 2, i, None) for i in range(A_PAGES)] + [(OP_FLUSH_OBJECT, 4, 0, None)]
    seen.append(
        _seen(
            client.post(
                "/v1/pools/0/batch", content=encode_request(ops[:64]), headers={**a, **BATCH}
            )
        )
    )
    for i in range(A_PAGES):
        seen.append(_seen(client.get(page_url(1, 2, i), headers=a)))
    seen.append(_self(client, a))
    seen.append(_public_metrics(client))
    return seen


def _world(
    client_factory: Callable[..., TestClient],
    capacity: str,
    other_holds_a_contents: bool,
    pressure_steps: bool = False,
) -> tuple[list[Any], Any]:
    # The pressure loop's timer is kept out of the way (one step at start, none after), so
    # that the worlds are deterministic; with ``pressure_steps`` its steps run at fixed points.
    client = client_factory(capacity=capacity, pressure_interval_s=3600)
    _, a = new_guest(client, "a")
    _, c = new_guest(client, "c")
    for headers in (a, c):
        assert new_pool(client, headers, "persistent") == 0
        assert new_pool(client, headers, "ephemeral") == 1
    # C holds as many pages in both worlds: in its persistent pool A's contents in one world,
    # contents of its own in the other; in its ephemeral pool contents of its own in both.
    for i in range(A_PAGES):
        content = page(i) if other_holds_a_contents else page(5000 + i)
        assert client.put(page_url(0, 1, i), content=content, headers=c).status_code == 204
        assert client.put(page_url(1, 1, i), content=page(7000 + i), headers=c).status_code == 204
    loop = service_of(client.app).pressure_loop
    portal = client.portal
    assert portal is not None and loop is not None

    def step() -> None:
        if pressure_steps:
            portal.call(loop.step_once)

    return _a_session(client, a, step), _stats(client)


@pytest.mark.parametrize("capacity", ["64MiB", "160KiB"], ids=["roomy", "tight"])
def test_a_sees_the_same_whatever_another_guest_holds(
    client_factory: Callable[..., TestClient], capacity: str
) -> None:
    shared, shared_stats = _world(client_factory, capacity, True)
    apart, apart_stats = _world(client_factory, capacity, False)
    # the worlds really differ (the admin sees it) ...
    assert shared_stats["unique_pages"] < apart_stats["unique_pages"]
    # ... and A cannot tell them apart
    assert shared == apart
    declined = [o for o in shared if isinstance(o, tuple) and o[0] == 409]
    if capacity == "160KiB":
        assert declined, "the tight world should make the broker decline a put"
    else:
        assert not declined


def _a_fills_its_cache(
    client: TestClient, a: dict[str, str], step: Callable[[], None]
) -> list[Any]:
    """A fills its ephemeral pool past capacity, then reads it back (gets are exclusive)."""
    client = _Stepping(client, step)  # type: ignore[assignment]
    seen: list[Any] = []
    for i in range(A_PAGES):
        seen.append(_seen(client.put(page_url(0, 1, i), content=page(i), headers=a)))
    for i in range(48):
        seen.append(_seen(client.put(page_url(1, 5, i), content=page(3000 + i), headers=a)))
    seen += [_seen(client.get(page_url(1, 5, i), headers=a)) for i in range(48)]
    seen.append(_self(client, a))
    return seen


def test_the_pressure_policy_does_not_tell_either(
    client_factory: Callable[..., TestClient],
) -> None:
    # The watermarks compare charged_bytes, so sharing saved or not, A sees the same.
    seen = {}
    for shared in (True, False):
        client = client_factory(capacity="160KiB", pressure_interval_s=3600)
        _, a = new_guest(client, "a")
        _, c = new_guest(client, "c")
        for headers in (a, c):
            assert new_pool(client, headers, "persistent") == 0
            assert new_pool(client, headers, "ephemeral") == 1
        for i in range(A_PAGES):
            content = page(i) if shared else page(5000 + i)
            assert client.put(page_url(0, 1, i), content=content, headers=c).status_code == 204
        loop = service_of(client.app).pressure_loop
        portal = client.portal
        assert portal is not None and loop is not None
        seen[shared] = _a_fills_its_cache(client, a, partial(portal.call, loop.step_once))
    assert seen[True] == seen[False]


# -- compressing and non-compressing guests (issue #16: a raw copy another guest left) ---------


def _half_compressible(i: int) -> bytes:
    return page(9000 + i)[:2048] + bytes(2048)


def _compress_world(
    client_factory: Callable[..., TestClient],
    a_compresses: bool,
    c_held_a_contents: bool,
) -> tuple[list[Any], Any]:
    """C (the other compression setting) once held A's contents and flushed them, or never
    did; then A fills a tight broker with half-compressible pages."""
    client = client_factory(capacity="96KiB", pressure_interval_s=3600)
    _, a = new_guest(client, "a", compress=a_compresses)
    _, c = new_guest(client, "c", compress=not a_compresses)
    for headers in (a, c):
        assert new_pool(client, headers, "persistent") == 0
    if c_held_a_contents:
        for i in range(8):
            url = page_url(0, 1, i)
            assert client.put(url, content=_half_compressible(i), headers=c).status_code == 204
    seen: list[Any] = []
    for i in range(48):  # A's first 8 contents are the ones C held (or not)
        r = client.put(page_url(0, 2, i), content=_half_compressible(i), headers=a)
        seen.append(_seen(r))
        if i == 7 and c_held_a_contents:
            for j in range(8):  # C lets go of its copies once A shares them
                assert client.delete(page_url(0, 1, j), headers=c).status_code == 204
    seen.append(_self(client, a))
    return seen, _stats(client)


@pytest.mark.parametrize("a_compresses", [True, False], ids=["a-compresses", "c-compresses"])
def test_compression_settings_do_not_tell_either(
    client_factory: Callable[..., TestClient], a_compresses: bool
) -> None:
    held, held_stats = _compress_world(client_factory, a_compresses, True)
    never, never_stats = _compress_world(client_factory, a_compresses, False)
    assert held_stats["dedup_hits"] > never_stats["dedup_hits"]  # the worlds differ ...
    assert held == never  # ... and A cannot tell them apart
    assert any(o[0] == 409 for o in held if isinstance(o, tuple) and isinstance(o[0], int))
