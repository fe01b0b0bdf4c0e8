"""Hypothesis fuzz of the two binary parsers, through the real app: the batch decoder
(``POST /v1/pools/{id}/batch``) and the export-stream parser (``POST /v1/guests/import``).

Inputs are random, or valid bodies mutated (truncated, bytes flipped, bytes spliced in, parts
repeated). The oracle is the codec itself: a body the codec accepts must be served (200 / 201);
any other is a 4xx with the error shape and changes nothing — admin stats, the guests and the
pages are as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.batch import (
    MAX_INDEX,
    OP_FLUSH_OBJECT,
    OP_FLUSH_PAGE,
    OP_GET,
    OP_PUT,
    PAGE_SIZE,
    BatchError,
    decode_request,
    encode_request,
)
from schemas.export import EXPORT_CONTENT_TYPE, ExportError, decode_export
from tests.api.conftest import ADMIN, error_code, page, page_url
from tests.harden.conftest import new_guest, new_pool

MAX_OPS = 64  # tests.api.conftest.make_settings
HANDLES = [(1, i) for i in range(4)] + [(2, 0)]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def admin_stats(client: TestClient) -> Any:
    """``GET /v1/stats`` without the pressure loop's own status (its clock ticks on)."""
    stats = client.get("/v1/stats", headers=ADMIN).json()
    stats.pop("pressure", None)
    return stats


def mutate(data: st.DataObject, body: bytes) -> bytes:
    """One of: unchanged, truncated, bytes overwritten, bytes spliced in, a slice repeated."""
    kind = data.draw(st.sampled_from(["same", "truncate", "flip", "splice", "repeat"]))
    if kind == "same" or not body:
        return body
    at = data.draw(st.integers(0, len(body) - 1))
    if kind == "truncate":
        return body[:at]
    if kind == "flip":
        n = data.draw(st.integers(1, 8))
        out = bytearray(body)
        for _ in range(n):
            pos = data.draw(st.integers(0, len(body) - 1))
            out[pos] = data.draw(st.integers(0, 255))
        return bytes(out)
    if kind == "splice":
        return body[:at] + data.draw(st.binary(min_size=1, max_size=40)) + body[at:]
    end = data.draw(st.integers(at, min(len(body), at + 64)))
    return body[:end] + body[at:end] + body[end:]


ops_strategy = st.lists(
    st.tuples(
        st.sampled_from([OP_PUT, OP_GET, OP_FLUSH_PAGE, OP_FLUSH_OBJECT]),
        st.sampled_from([1, 2, 3, (1 << 192) - 1]),
        st.sampled_from([0, 1, 2, 3, MAX_INDEX]),
        st.integers(0, 3),
    ),
    max_size=8,
)


def _accepted(body: bytes) -> bool:
    try:
        decode_request(body, MAX_OPS)
    except BatchError:
        return False
    return True


@pytest.mark.timeout(180)
@FUZZ
@given(data=st.data())
def test_batch_decoder_refuses_bad_bodies_and_changes_nothing(
    client_factory: Callable[..., TestClient], data: st.DataObject
) -> None:
    client, headers = _batch_world(client_factory)
    for oid, index in HANDLES:  # the same start every example
        r = client.put(page_url(0, oid, index), content=page(oid * 10 + index), headers=headers)
        assert r.status_code == 204
    if data.draw(st.booleans()):
        ops = data.draw(ops_strategy)
        body = encode_request(
            (op, oid, index, page(100 + seed) if op == OP_PUT else None)
            for op, oid, index, seed in ops
        )
        body = mutate(data, body)
    else:
        body = data.draw(st.binary(max_size=200))
    before = admin_stats(client)
    r = client.post(
        "/v1/pools/0/batch",
        content=body,
        headers={**headers, "Content-Type": "application/x-tmem-batch"},
    )
    if _accepted(body):
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400 and error_code(r) == "bad_batch", r.text
    assert admin_stats(client) == before
    for oid, index in HANDLES:
        assert client.get(page_url(0, oid, index), headers=headers).content == page(
            oid * 10 + index
        )


_BATCH_WORLDS: dict[int, tuple[TestClient, dict[str, str]]] = {}


def _batch_world(start: Callable[..., TestClient]) -> tuple[TestClient, dict[str, str]]:
    # One broker per test run (hypothesis calls the test many times with the same fixture).
    key = id(start)
    if key not in _BATCH_WORLDS:
        _BATCH_WORLDS.clear()
        client = start()
        _, headers = new_guest(client, "fuzz")
        assert new_pool(client, headers) == 0
        _BATCH_WORLDS[key] = (client, headers)
    return _BATCH_WORLDS[key]


@pytest.mark.timeout(60)
def test_batch_size_limits(client_factory: Callable[..., TestClient]) -> None:
    client, headers = _batch_world(client_factory)
    hdr = {**headers, "Content-Type": "application/x-tmem-batch"}
    too_many = encode_request([(OP_GET, 1, 0, None)] * (MAX_OPS + 1))
    r = client.post("/v1/pools/0/batch", content=too_many, headers=hdr)
    assert r.status_code == 400 and error_code(r) == "bad_batch"
    largest = MAX_OPS * (29 + PAGE_SIZE)
    r = client.post("/v1/pools/0/batch", content=b"\1" * (largest + 1), headers=hdr)
    assert r.status_code == 413 and error_code(r) == "body_too_large"
    full = encode_request([(OP_PUT, 1, i, page(i)) for i in range(MAX_OPS)])
    assert len(full) == largest
    assert client.post("/v1/pools/0/batch", content=full, headers=hdr).status_code == 200


# -- export streams ---------------------------------------------------------------------------


def _snapshot(client: TestClient) -> Any:
    return admin_stats(client), client.get("/v1/guests", headers=ADMIN).json()


_EXPORT: dict[int, tuple[TestClient, bytes]] = {}


def _export_world(start: Callable[..., TestClient]) -> tuple[TestClient, bytes]:
    key = id(start)
    if key not in _EXPORT:
        _EXPORT.clear()
        src = start(durability="sync")
        gid, headers = new_guest(src, "migrant", cap_pages=100)
        assert new_pool(src, headers) == 0
        assert new_pool(src, headers) == 1
        for i in range(3):
            assert src.put(page_url(0, 1, i), content=page(i), headers=headers).status_code == 204
        assert (
            src.put(page_url(1, 7, 9), content=bytes(PAGE_SIZE), headers=headers).status_code == 204
        )
        stream = src.get(f"/v1/guests/{gid}/export", headers=ADMIN).content
        decode_export(stream)  # the control: a real stream decodes
        _EXPORT[key] = (start(durability="sync"), stream)
    return _EXPORT[key]


@pytest.mark.timeout(180)
@FUZZ
@given(data=st.data())
def test_import_refuses_bad_streams_and_changes_nothing(
    client_factory: Callable[..., TestClient], data: st.DataObject
) -> None:
    dst, stream = _export_world(client_factory)
    body = mutate(data, stream) if data.draw(st.integers(0, 9)) else data.draw(st.binary())
    try:
        decode_export(body)
        valid = True
    except ExportError:
        valid = False
    before = _snapshot(dst)
    r = dst.post(
        "/v1/guests/import", content=body, headers={**ADMIN, "Content-Type": EXPORT_CONTENT_TYPE}
    )
    if valid:
        assert r.status_code == 201, r.text
        assert dst.delete(f"/v1/guests/{r.json()['guest_id']}", headers=ADMIN).status_code == 204
        return
    assert r.status_code == 400 and error_code(r) == "bad_export", r.text
    assert _snapshot(dst) == before
