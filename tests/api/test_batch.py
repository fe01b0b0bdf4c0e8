"""The binary batch: every op, every status, in order; malformed batches refused whole."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from schemas.batch import (
    HEADER,
    OP_FLUSH_OBJECT,
    OP_FLUSH_PAGE,
    OP_GET,
    OP_PUT,
    STATUS_DONE,
    STATUS_FROZEN,
    STATUS_MISS,
    STATUS_QUOTA,
    decode_results,
    encode_request,
)
from tests.api.conftest import ADMIN, Guest, error_code, own_stats, page, page_url

CT = {"Content-Type": "application/x-tmem-batch"}


def _batch(
    client: TestClient,
    headers: dict[str, str],
    pool: int,
    ops: list[tuple[int, int, int, bytes | None]],
) -> list[tuple[int, bytes | None]]:
    r = client.post(
        f"/v1/pools/{pool}/batch", content=encode_request(ops), headers={**headers, **CT}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-tmem-batch"
    return [(res.status, res.page) for res in decode_results(r.content, [op for op, *_ in ops])]


def test_every_op_in_order(client: TestClient, guest: Guest, make_pool: Callable[..., int]) -> None:
    _, headers = guest
    pool = make_pool(headers)
    big = (1 << 192) - 1
    ops: list[tuple[int, int, int, bytes | None]] = [
        (OP_PUT, 1, 0, page(1)),
        (OP_PUT, 1, 1, page(2)),
        (OP_PUT, big, 7, page(3)),
        (OP_GET, 1, 0, None),
        (OP_GET, 2, 0, None),
        (OP_FLUSH_PAGE, 1, 0, None),
        (OP_GET, 1, 0, None),
        (OP_PUT, 1, 0, page(4)),  # operations apply in order: this put follows the flush
        (OP_GET, big, 7, None),
        (OP_FLUSH_OBJECT, 1, 0, None),
        (OP_GET, 1, 1, None),
    ]
    results = _batch(client, headers, pool, ops)
    assert results == [
        (STATUS_DONE, None),
        (STATUS_DONE, None),
        (STATUS_DONE, None),
        (STATUS_DONE, page(1)),
        (STATUS_MISS, None),
        (STATUS_DONE, None),
        (STATUS_MISS, None),
        (STATUS_DONE, None),
        (STATUS_DONE, page(3)),
        (STATUS_DONE, None),
        (STATUS_MISS, None),
    ]
    # the batch and the single-page routes see the same pages
    assert client.get(page_url(pool, big, 7), headers=headers).content == page(3)


def test_declines_in_a_batch(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    gid, headers = make_guest(cap_pages=1)
    pool = make_pool(headers)
    results = _batch(client, headers, pool, [(OP_PUT, 1, 0, page(1)), (OP_PUT, 1, 1, page(2))])
    assert results == [(STATUS_DONE, None), (STATUS_QUOTA, None)]
    client.post(f"/v1/guests/{gid}/freeze", headers=ADMIN)
    results = _batch(client, headers, pool, [(OP_PUT, 1, 0, page(3)), (OP_GET, 1, 0, None)])
    assert results == [(STATUS_FROZEN, None), (STATUS_MISS, None)]


def test_empty_batch(client: TestClient, guest: Guest, make_pool: Callable[..., int]) -> None:
    _, headers = guest
    pool = make_pool(headers)
    r = client.post(f"/v1/pools/{pool}/batch", content=b"", headers={**headers, **CT})
    assert (r.status_code, r.content) == (200, b"")


def _malformed() -> list[tuple[str, bytes]]:
    put = HEADER.pack(OP_PUT, 0, 0, 5, 0) + page(1)
    return [
        ("unknown op", put + HEADER.pack(9, 0, 0, 1, 0)),
        ("truncated header", put + HEADER.pack(OP_GET, 0, 0, 1, 0)[:20]),
        ("truncated page", put + HEADER.pack(OP_PUT, 0, 0, 1, 0) + b"z" * 100),
        ("too many ops", put + HEADER.pack(OP_GET, 0, 0, 1, 0) * 64),  # max_batch_ops is 64
    ]


@pytest.mark.parametrize(("what", "body"), _malformed())
def test_malformed_batch_changes_nothing(
    client: TestClient, guest: Guest, make_pool: Callable[..., int], what: str, body: bytes
) -> None:
    _, headers = guest
    pool = make_pool(headers)
    r = client.post(f"/v1/pools/{pool}/batch", content=body, headers={**headers, **CT})
    assert r.status_code == 400, what
    assert error_code(r) == "bad_batch"
    # the valid put at the front was not applied
    assert client.get(page_url(pool, 5, 0), headers=headers).status_code == 404
    assert own_stats(client, headers)["puts"] == 0


def test_oversized_batch_is_413(
    client: TestClient, guest: Guest, make_pool: Callable[..., int]
) -> None:
    _, headers = guest
    pool = make_pool(headers)
    body = (HEADER.pack(OP_PUT, 0, 0, 1, 0) + page(1)) * 65
    r = client.post(f"/v1/pools/{pool}/batch", content=body, headers={**headers, **CT})
    assert r.status_code == 413
    assert error_code(r) == "body_too_large"
    assert own_stats(client, headers)["logical_pages"] == 0


def test_batch_on_unknown_pool(client: TestClient, guest: Guest) -> None:
    _, headers = guest
    body = encode_request([(OP_PUT, 1, 0, page(1))])
    r = client.post("/v1/pools/3/batch", content=body, headers={**headers, **CT})
    assert (r.status_code, error_code(r)) == (404, "unknown_pool")


def test_largest_legal_batch(
    client: TestClient, guest: Guest, make_pool: Callable[..., int]
) -> None:
    _, headers = guest
    pool = make_pool(headers)
    ops: list[tuple[int, int, int, bytes | None]] = [(OP_PUT, 3, i, page(i)) for i in range(64)]
    assert all(s == STATUS_DONE for s, _ in _batch(client, headers, pool, ops))
    gets: list[tuple[int, int, int, bytes | None]] = [(OP_GET, 3, i, None) for i in range(64)]
    assert [p for _, p in _batch(client, headers, pool, gets)] == [page(i) for i in range(64)]
